"""The parity study's report: for each layout, the share of the source's pretraining compute C at
which it gets back to 1.01x the source, the control and its own from-scratch twin, in and out of
domain; a markdown table and a plot (ratio against % of C, one line per arm, the control dashed,
the papers' 10-15% band shaded). Reads bench/results/parity_study_<device>.json, adds "fits" to it.

    python bench/parity_report.py [results.json]
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

TARGET = 1.01
CLIP = 2.0  # the plot's top: step 0 can be several times the source, and parity is decided near 1
REFERENCES = ("vs_source", "vs_control", "vs_scratch")


def ratio_curve(arm: dict, text: str, reference: str, scratch: dict | None) -> list[tuple[float, float, float | None]]:
    """(share of C, ratio, CI high) at each measured point; against the from-scratch twin the ratio is
    of perplexities on the same tokens (no interval: the twin is scored in another validate run)."""
    curve = []
    for point in arm["points"]:
        entry = point["texts"][text]
        if reference == "vs_scratch":
            if scratch is None:
                return []
            curve.append((point["share_of_pretraining_flops"], entry["ppl"] / scratch["texts"][text]["ppl"], None))
        elif entry[reference] and entry[reference]["ratio"] is not None:
            curve.append((point["share_of_pretraining_flops"], entry[reference]["ratio"], entry[reference]["ci_high"]))
    return curve


def crossing(curve: list[tuple[float, float, float | None]], target: float = TARGET) -> dict:
    """Where a curve first reaches the target: the first measured point at or under it, the share
    interpolated between it and the point before (linear in share, log in ratio), and the first
    point whose 95% CI lies wholly under it (the confident version). None where it never does."""
    first = next((i for i, (_, r, _) in enumerate(curve) if r <= target), None)
    confident = next((s for s, _, high in curve if high is not None and high <= target), None)
    if first is None:
        best = min(curve, key=lambda p: p[1]) if curve else None
        return {"reached": False, "best_ratio": best[1] if best else None, "at_share": best[0] if best else None,
                "confident_share": None}
    share, ratio, _ = curve[first]
    estimate = share
    if first > 0:
        (s0, r0, _), (s1, r1, _) = curve[first - 1], curve[first]
        if r0 > target and r0 > 0 and r1 > 0 and r0 != r1:
            estimate = s0 + (s1 - s0) * (math.log(r0) - math.log(target)) / (math.log(r0) - math.log(r1))
    return {"reached": True, "first_point": share, "interpolated": estimate, "bracket": [curve[first - 1][0] if first else 0.0, share],
            "ratio_there": ratio, "confident_share": confident}


def fits(results: dict) -> dict:
    out = {}
    for shape, data in results["shapes"].items():
        scratch = data.get("scratch", {})
        for name, arm in data.get("arms", {}).items():
            for text in ("code", "wikitext"):
                for reference in REFERENCES if arm["layout"] else ("vs_source",):  # a control is its own control
                    curve = ratio_curve(arm, text, reference, scratch.get(arm["layout"]) if arm["layout"] else None)
                    if curve:
                        out.setdefault(shape, {}).setdefault(name, {}).setdefault(text, {})[reference] = crossing(curve)
    return out


def share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.3g}%"


def describe(fit: dict | None) -> str:
    if fit is None:
        return "n/a"
    if not fit["reached"]:
        return f"never (best x{fit['best_ratio']:.3f} at {share(fit['at_share'])})"
    confident = f", CI by {share(fit['confident_share'])}" if fit["confident_share"] is not None else ""
    return f"{share(fit['interpolated'])} ({share(fit['bracket'][0])}-{share(fit['bracket'][1])}{confident})"


def table(results: dict, fitted: dict) -> str:
    """Markdown: per shape and arm, the ratio to the control at 5% and 15% of C and where 1.01x is reached."""
    lines = ["| source | arm | KV/token | code vs control at 5% / 15% of C's tokens | code: 1.01x source | code: 1.01x control | "
             "code: 1.01x scratch | prose vs control @15% | prose: 1.01x control |",
             "|---|---|---:|---:|---|---|---|---:|---|"]
    for shape, data in results["shapes"].items():
        for name, arm in sorted(data.get("arms", {}).items(), key=lambda kv: (kv[1]["layout"] or "", kv[0])):
            at = {p["share_of_pretraining_tokens"]: p for p in arm["points"]}  # the measured points
            last = arm["points"][-1]
            kv = f"{last['kv_bytes_per_token'] / last['source_kv_bytes_per_token']:.0%}"

            def ratio(point, text):
                entry = point["texts"][text]["vs_control"] if point else None
                return f"x{entry['ratio']:.3f}" if entry and entry["ratio"] is not None else "-"

            fit = fitted.get(shape, {}).get(name, {})
            lines.append(f"| {shape} | {name} | {kv} | {ratio(at.get(0.05), 'code')} / {ratio(last, 'code')} | "
                         f"{describe(fit.get('code', {}).get('vs_source'))} | {describe(fit.get('code', {}).get('vs_control'))} | "
                         f"{describe(fit.get('code', {}).get('vs_scratch'))} | {ratio(last, 'wikitext')} | "
                         f"{describe(fit.get('wikitext', {}).get('vs_control'))} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Candidate/source perplexity ratio against % of C: a panel per source and text. A colour per layout,
    its arms (inits, recipe variants) in it, the one that ends lowest in domain bold; controls dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(results["shapes"])
    every_layout = sorted({a["layout"] for s in results["shapes"].values() for a in s.get("arms", {}).values() if a["layout"]})
    colours = {layout: f"C{i}" for i, layout in enumerate(every_layout)}  # one colour per layout in every panel
    fig, axes = plt.subplots(len(shapes), 2, figsize=(13, 5 * len(shapes)), squeeze=False)
    for row, shape in enumerate(shapes):
        arms = results["shapes"][shape].get("arms", {})
        layouts = sorted({arm["layout"] for arm in arms.values() if arm["layout"]})
        best = {layout: min((n for n, a in arms.items() if a["layout"] == layout),
                            key=lambda n: arms[n]["points"][-1]["texts"]["code"]["vs_source"]["ratio"]) for layout in layouts}
        for col, (text, title) in enumerate((("code", "held-out code (in domain)"),
                                             ("wikitext", "WikiText-2 test (out of domain)"))):
            ax = axes[row][col]
            ax.axvspan(10, 15, color="0.92", label="papers' budget (10-15% of C)")
            ax.axhline(TARGET, color="0.3", linewidth=0.8, linestyle=":", label=f"{TARGET}x the source")
            for k, (name, arm) in enumerate(sorted(arms.items())):
                xs = [100 * p["share_of_pretraining_flops"] for p in arm["points"]]
                ys = [p["texts"][text]["vs_source"]["ratio"] for p in arm["points"]]
                if arm["layout"] is None:
                    style = dict(color=f"{0.15 * k:.2f}", linestyle="--", linewidth=1.8)
                elif name == best[arm["layout"]]:
                    style = dict(color=colours[arm["layout"]], linewidth=2.2)
                else:
                    style = dict(color=colours[arm["layout"]], linewidth=0.9, alpha=0.6)
                ax.plot(xs, ys, marker="o", markersize=3, label=name, **style)
            top = max(y for line in ax.get_lines() for y in line.get_ydata())
            ax.set_ylim(bottom=min(0.95, ax.get_ylim()[0]), top=min(CLIP, top * 1.02))  # where parity is decided
            ax.set_xlabel("uptraining compute, % of the source's pretraining C (6N a token; kd: +2N)")
            ax.set_ylabel("perplexity / the source's")
            ax.set_title(f"{shape}: {title}" + (f" (clipped at {CLIP}x)" if top > CLIP else ""))
            ax.grid(True, which="both", alpha=0.3)
        axes[row][1].legend(fontsize=7, loc="upper right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(path: Path) -> None:
    results = json.loads(path.read_text())
    results["fits"] = fits(results)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.rename(path)
    plot(results, path.with_suffix(".png"))
    markdown = table(results, results["fits"])
    path.with_suffix(".md").write_text(markdown + "\n")  # what docs/parity.md quotes
    print(markdown)
    print(f"table: {path.with_suffix('.md')}, plot: {path.with_suffix('.png')}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results" / "parity_study_cpu.json")

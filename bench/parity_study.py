"""Parity where pretraining compute is known: pretrain small Llama sources here, convert them to every
layout, uptrain each arm beside a matched control, and measure the share of the source's
pretraining compute C at which each layout gets back to the source, the control and its own
from-scratch twin, in domain (held-out code) and out of domain (WikiText-2 test, English prose).

    python bench/parity_study.py                     # everything missing: sources, arms, report
    python bench/parity_study.py pretrain            # the sources (once; committed in data/mini-sources/)
    python bench/parity_study.py arms --arms fusedkv-reconstruct,control
    python bench/parity_study.py report              # fits, table, plot from what has finished
    python bench/parity_study.py --shape demo        # make demo's 0.56M source: every arm in minutes
    python bench/parity_study.py --shape mha-25m     # a larger shape, on a GPU: the same code

Every stage is the project's own (convert.run, uptrain.run, validate.run), each arm in a fresh
process, `--jobs` of them at a time (one thread each on a CPU). Every arm is resumable: a finished
one is skipped, an interrupted one resumes from its last checkpoint, and its measurements are
appended to the results file as it finishes.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import fcntl
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from checkpoint_io.run_folder import RunFolder
from common.processes import fresh_processes

ROOT = Path(__file__).resolve().parent.parent

SOURCES = ROOT / "data" / "mini-sources"  # the committed, pretrained CPU shapes
# Set by --work and --results; environment variables, so that every spawned arm process sees them.
WORK = Path(os.environ.get("PARITY_WORK", ROOT / "runs" / "parity"))
RESULTS = Path(os.environ.get("PARITY_RESULTS", ROOT / "bench" / "results"))
VOCAB = 4096
POINTS = (0.0, 0.01, 0.025, 0.05, 0.10, 0.15)  # shares of C at which every arm is measured


@dataclass(frozen=True)
class Shape:
    """A source's architecture and how it is (pre)trained: batch, lr, tokens per parameter."""
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    positions: int = 256
    seq_len: int = 256
    micro_batch: int = 32
    lr: float = 3e-3
    tokens_per_param: int = 20

    def llama_config(self, eos: int) -> dict:
        return dict(vocab_size=VOCAB, hidden_size=self.hidden, intermediate_size=self.ffn,
                    num_hidden_layers=self.layers, num_attention_heads=self.heads,
                    num_key_value_heads=self.kv_heads, max_position_embeddings=self.positions,
                    tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos)


SHAPES = {
    # 2 CPU cores: 1.28M / 1.21M parameters, 20 tokens each, about 80 minutes on one core each
    "mha": Shape(layers=8, hidden=96, heads=4, kv_heads=4, ffn=256),
    "gqa": Shape(layers=8, hidden=96, heads=4, kv_heads=2, ffn=256),
    # `make demo`'s part one: 0.56M parameters at 10 tokens each, so that 15% of C trains in about two
    # minutes on one core (candidate and control side by side)
    "demo": Shape(layers=6, hidden=64, heads=4, kv_heads=4, ffn=176, tokens_per_param=10),
    # the study's own smoke test: every stage in a minute or two
    "tiny": Shape(layers=4, hidden=32, heads=4, kv_heads=2, ffn=64, positions=64, seq_len=64, micro_batch=8,
                  tokens_per_param=1),
    # a GPU: 25M parameters would want 500M tokens, about 6 epochs of the corpus
    "mha-25m": Shape(layers=12, hidden=384, heads=6, kv_heads=6, ffn=1024, positions=1024, seq_len=1024,
                     micro_batch=32, lr=1e-3),
}


COMMITTED = ("mha", "gqa", "demo")  # the CPU shapes whose pretrained sources are in data/mini-sources/


def work_dir(shape: str) -> Path:
    return WORK / shape


# ---------------------------------------------------------------- corpus and sources


def corpus() -> Path:
    """train.jsonl / heldout.jsonl of the installed packages' Python sources, built once per machine."""
    from common import code_corpus

    folder = WORK / "corpus"
    if not (folder / "corpus.json").is_file():
        print(f"building the corpus in {folder}", flush=True)
        code_corpus.build(folder)
    return folder


def source_dir(shape: str) -> Path:
    """Where a shape's pretrained source lives: committed for the CPU shapes, in the work folder for others."""
    return SOURCES / shape if shape in COMMITTED else work_dir(shape) / "source"


def tokenizer_dir() -> Path:
    """The BPE tokenizer every source shares: the committed one, else trained on the train split."""
    for shape in SHAPES:
        if (source_dir(shape) / "tokenizer.json").is_file():
            return source_dir(shape)
    from common import code_corpus

    folder = WORK / "tokenizer"
    if not (folder / "tokenizer.json").is_file():
        code_corpus.train_tokenizer(folder, code_corpus.sample_texts(corpus() / "train.jsonl", 40_000_000), VOCAB)
    return folder


def random_llama(folder: Path, shape: Shape, seed: int = 0) -> int:
    """A random-init Llama of the shape with the shared tokenizer, bf16 (as the sources are kept)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**shape.llama_config(tokenizer.eos_token_id))).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def in_fresh_process(jobs: int, tasks: list[tuple]) -> list:
    """Run (fn, *args) tasks, `jobs` at a time, each in a fresh process with one torch thread."""
    with fresh_processes(jobs, one_thread=True) as pool:
        futures = [pool.submit(*task) for task in tasks]
        return [f.result() for f in futures]


def uptrain_in_place(recipe) -> Path:
    """uptrain.run's export: found when the run finished before, else trained, resuming from the last
    checkpoint when there is one (a killed study goes on)."""
    import uptrain

    out = Path(recipe.out)
    if (out / "final" / "config.json").is_file():
        return out / "final"
    resume = (out / "checkpoints" / "latest").is_file()
    return uptrain.run(recipe, resume=resume).final


def shown(path: str) -> str:
    """A path as the results show it: relative to the project where it is inside it."""
    return os.path.relpath(path, ROOT) if Path(path).resolve().is_relative_to(ROOT) else path


def count_params(folder: Path) -> int:
    from uptrain.stage import count_params as counted

    return counted(folder)


def pretrain_recipe(shape_name: str, model: Path, out: Path):
    """Pretraining from random init: 20 tokens per parameter of the source, warm-up over 2.5%, cosine to a
    tenth of the peak at the end. A from-scratch layout arm trains on the source's recipe (its tokens)."""
    from uptrain.recipe import Recipe

    shape = SHAPES[shape_name]
    source_params = count_params(work_dir(shape_name) / "pretrain" / "init")
    steps = math.ceil(shape.tokens_per_param * source_params / (shape.micro_batch * shape.seq_len))
    data = corpus()
    return Recipe(model=str(model), data=str(data / "train.jsonl"), eval_data=str(data / "heldout.jsonl"),
                  token_cache=str(WORK / "tokens"), out=str(out), seq_len=shape.seq_len, micro_batch=shape.micro_batch,
                  budget={"steps": steps}, lr=shape.lr, warmup_steps=max(10, steps // 40), min_lr_ratio=0.1,
                  zero_stage=0, eval_every=max(1, steps // 20), eval_tokens=32 * shape.seq_len * 4,
                  save_every=max(1, steps // 20), keep_last=1, log_every=10, seed=0)


def pretrain(shape_name: str) -> dict:
    """(In a child.) Pretrain one source through the project's own uptrain stage from random init,
    cosine to the end, 20 tokens a parameter; publish it with its pretraining manifest."""
    from bench.machine import machine_info
    from common.outputs import atomic_folder

    shape, target = SHAPES[shape_name], source_dir(shape_name)
    if (target / "pretraining.json").is_file():
        return json.loads((target / "pretraining.json").read_text())
    folder = work_dir(shape_name) / "pretrain"
    init = folder / "init"
    if not (init / "config.json").is_file():
        random_llama(init, shape)
    params = count_params(init)
    recipe = pretrain_recipe(shape_name, init, folder / "run")
    final = uptrain_in_place(recipe)
    records = RunFolder(folder / "run").records()
    tokens = records[-1]["tokens"]
    manifest = {"shape": shape_name, **asdict(shape), "params": params, "tokens": tokens, "steps": records[-1]["step"],
                "flops_6n": 6.0 * params * tokens, "tokens_per_param": tokens / params,
                "corpus": json.loads((corpus() / "corpus.json").read_text()),
                "recipe": {k: shown(v) if k in ("data", "eval_data") else v for k, v in asdict(recipe).items()
                           if k not in ("model", "out", "token_cache")},
                "final_eval_ppl": records[-1].get("eval_ppl"),
                "eval_curve": [(r["step"], r["eval_ppl"]) for r in records if "eval_ppl" in r],
                "tokens_per_s_median": median_rate(records), "machine": machine_info(),
                "command": f"python bench/parity_study.py pretrain --shape {shape_name}"}
    with atomic_folder(target, force=True, markers=("pretraining.json",)) as staged:
        for item in final.iterdir():
            shutil.copy2(item, staged / item.name)
        (staged / "pretraining.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest



# ---------------------------------------------------------------- arms: convert, uptrain beside the control


@dataclass(frozen=True)
class Arm:
    """One uptraining arm, named `<layout>-<init>[+variant...]` or `control[+variant...]`: a layout and
    init (none: the control, the source itself) and what its recipe changes from the study's."""
    name: str
    layout: str | None = None
    init: str = "copy"
    recipe: dict = field(default_factory=dict)
    control: str = "control"  # the arm it is judged against: the control with the same schedule


# The study's uptraining recipe, the same for every arm and its control (a variant may change a key):
# lr re-warmed to a third of pretraining's peak, cosine to a tenth of that at 15% of C.
UPTRAIN = dict(lr_share_of_pretraining=1 / 3, warmup_share=0.02, min_lr_ratio=0.1, seed=1)
# Recipe variants, `+name` after an arm's name. Those that change the schedule change the control's too
# (SHARED_WITH_CONTROL): a candidate is always judged against the control trained as it was.
VARIANTS = {
    "kd": {"loss": "lm+kd"},  # distillation from the source beside the data loss (temperature 2)
    "kdfade": {"loss": "lm+kd", "kd_weight_end": 0.0},  # kd's weight falls to 0 by the end: past a weak teacher
    "kdt1": {"loss": "lm+kd", "kd_temperature": 1.0},
    "kdonly": {"loss": "kd", "kd_temperature": 1.0},  # the source's distribution alone, as Minitron recovers
    "hidden": {"kd_hidden_weight": 10.0},  # with kd: every layer's output pulled towards the source's too
    "lr1x": {"lr_share_of_pretraining": 1.0},  # re-warmed to pretraining's peak
    "lr2x": {"lr_share_of_pretraining": 2 / 3},
    "lrhigh": {"lr_share_of_pretraining": 1.5},  # half again pretraining's peak
    "lrtenth": {"lr_share_of_pretraining": 0.1},  # no re-warm: the lr pretraining's cosine ended at
    "layerwise": {"blend_share": 0.025, "blend_schedule": "layerwise"},  # one layer at a time, top first
    "newfirst": {"warmup_new_params_share": 0.01},  # only what the conversion changed trains first
    "adapt1p5x": {"adapting_lr_scale": 1.5},  # with lr2x: what the conversion changed at the peak, the rest at 2/3
    "adapt3x": {"adapting_lr_scale": 3.0},  # what the conversion changed at 3x the lr of the rest
    "adapt10x": {"adapting_lr_scale": 10.0},
    "layers": {"adapting_scope": "layer"},  # adapt3x/adapt10x/newfirst apply to whole converted layers, MLPs too
    "warm10": {"warmup_share": 0.1},  # a re-warm five times longer, 10% of the run
    "warm25": {"warmup_share": 0.25},
    "c5": {"budget_share": 0.05},  # the whole schedule in 5% of C, annealed there (not a mid-run export)
    "c30": {"budget_share": 0.30},  # twice the papers' budget: where a layout that misses at 15% gets to
    "b16": {"batch_share": 0.5},  # half the source's batch, twice the steps, the same tokens
    "b8": {"batch_share": 0.25},  # a quarter of it, four times the steps
    # cosine to zero, past the tenth of its peak the source's own cosine ended at: how much of a gap
    # the anneal alone closes (its control anneals as far)
    "anneal0": {"min_lr_ratio": 0.0},
    # no weight decay: AdamW decays by lr x wd a step, so a smaller batch (more steps) decays more a token
    "wd0": {"weight_decay": 0.0},
}
SHARED_WITH_CONTROL = ("lr_share_of_pretraining", "warmup_share", "min_lr_ratio", "budget_share", "batch_share",
                       "weight_decay")


def parse_arm(name: str) -> Arm:
    from convert.options import INITS
    from models import LAYOUTS

    base, *variants = name.split("+")
    unknown = [v for v in variants if v not in VARIANTS]
    layout, _, init = base.rpartition("-")
    if unknown or (base != "control" and (layout not in LAYOUTS or init not in INITS)):
        raise SystemExit(f"unknown arm {name!r}: control or <layout>-<init> ({', '.join(LAYOUTS)}; {', '.join(INITS)}), "
                         f"then +variant ({', '.join(VARIANTS)})")
    recipe = {k: v for variant in variants for k, v in VARIANTS[variant].items()}
    shared = [v for v in variants if set(VARIANTS[v]) <= set(SHARED_WITH_CONTROL)]
    if base == "control":
        return Arm(name, recipe=recipe, control=name)
    return Arm(name, layout, init, recipe, control="+".join(["control", *shared]))


# Each layout's best recipe on the MHA source (docs/parity.md, "What was tried"): reconstruct init and
# distillation, re-warmed to pretraining's peak with half the source's batch for the FusedKVs and to two
# thirds of the peak for the others.
BEST_RECIPES = {"fusedkv": "reconstruct+kd+lr1x+b16", "fusedkv_lite": "reconstruct+kd+lr1x+b16",
                "skipv1": "reconstruct+kd+lr2x", "commonkv": "reconstruct+kd+lr2x"}


def default_arms() -> list[str]:
    """The control, each layout with copy init (the mission's conversion) on the study's recipe, and each
    layout's best recipe; run_arms adds the controls those need."""
    from models import LAYOUTS

    return ["control", *(f"{layout}-copy" for layout in LAYOUTS), *(f"{layout}-{BEST_RECIPES[layout]}" for layout in LAYOUTS)]


def manifest_of(shape_name: str) -> dict:
    path = source_dir(shape_name) / "pretraining.json"
    if not path.is_file():
        raise SystemExit(f"no pretrained {shape_name} source in {path.parent}: run `python bench/parity_study.py "
                         f"pretrain --shape {shape_name}` first")
    return json.loads(path.read_text())


def micro_batch(shape_name: str, arm: Arm | None = None) -> int:
    """An arm's sequences a step: the source's pretraining batch, or the share of it a variant asks for."""
    return round(manifest_of(shape_name)["micro_batch"] * (arm.recipe.get("batch_share", 1.0) if arm else 1.0))


def point_steps(shape_name: str, arm: Arm | None = None) -> dict[float, int]:
    """The step at which each share of C is reached at the arm's batch (the source's without one); a
    run longer than the last point is also measured where it ends."""
    last = budget_share(arm) if arm else POINTS[-1]
    return {share: steps_at(shape_name, share, arm) for share in sorted({*POINTS, last})}


def steps_at(shape_name: str, share_of_c: float, arm: Arm | None = None) -> int:
    """The steps in which an arm trains that share of C's tokens, at its batch."""
    manifest = manifest_of(shape_name)
    return round(share_of_c * manifest["tokens"] / (micro_batch(shape_name, arm) * manifest["seq_len"]))


def budget_share(arm: Arm) -> float:
    """The share of C's tokens the arm's schedule runs to (15% unless a variant says otherwise)."""
    return arm.recipe.get("budget_share", POINTS[-1])


def calib_text() -> Path:
    from common import code_corpus

    return code_corpus.calib_text(corpus())


def conversion_dir(shape_name: str, arm: Arm) -> Path:
    """One conversion per layout and init, shared by the arms that vary only the recipe."""
    return work_dir(shape_name) / "conversions" / f"{arm.layout}-{arm.init}"


def converted(shape_name: str, arm: Arm, source: Path | None = None, out: Path | None = None, **layout_options) -> Path:
    """The arm's conversion of the source (or of `source`), made once; layout_options (storage_layers) go to
    ConvertOptions."""
    import convert

    out = out or conversion_dir(shape_name, arm)
    if (out / "conversion.json").is_file():
        return out
    from common.code_corpus import RECONSTRUCT_FIT

    fit = RECONSTRUCT_FIT if arm.init != "copy" else {}  # on code, the sources' domain
    options = convert.ConvertOptions(source=str(source or source_dir(shape_name)), layout=arm.layout, init=arm.init,
                                     out=str(out), force=True, calib_text=str(calib_text()), device="cpu",
                                     **fit, **layout_options)
    convert.run(options)
    return out


def arm_recipe(shape_name: str, arm: Arm, model: Path, out: Path):
    from uptrain.recipe import Recipe

    manifest, steps, batch = manifest_of(shape_name), point_steps(shape_name, arm), micro_batch(shape_name, arm)
    data = corpus()
    settings = {**UPTRAIN, **arm.recipe}
    settings.pop("budget_share", None), settings.pop("batch_share", None)
    total = steps[budget_share(arm)]
    lr = manifest["lr"] * settings.pop("lr_share_of_pretraining")
    blend = steps_at(shape_name, settings.pop("blend_share", 0.0), arm)
    new_first = steps_at(shape_name, settings.pop("warmup_new_params_share", 0.0), arm)
    return Recipe(model=str(model), source=str(source_dir(shape_name)), data=str(data / "train.jsonl"),
                  eval_data=str(data / "heldout.jsonl"), token_cache=str(WORK / "tokens"), out=str(out),
                  seq_len=manifest["seq_len"], micro_batch=batch, budget={"steps": total}, lr=lr,
                  zero_stage=0, eval_every=total, eval_tokens=4 * 32 * manifest["seq_len"],
                  save_every=max(1, total // 5), keep_last=1, log_every=10, blend_steps=blend,
                  warmup_new_params_steps=new_first,
                  export_at=tuple(sorted({k for k in steps.values() if 0 < k <= total and k >= blend})), **settings)


def median_rate(records: list[dict]) -> int:
    """The median of a run's logged training tokens/s (evals and exports excluded): what it cost."""
    rates = sorted(r["tokens_per_s"] for r in records if "tokens_per_s" in r)
    return round(rates[len(rates) // 2])


def arm_folder(shape_name: str, name: str) -> Path:
    return work_dir(shape_name) / "arms" / name


def train_arm(shape_name: str, arm_name: str) -> str:
    """(In a child.) Convert and uptrain one arm to 15% of C, exporting at every measured point."""
    arm = parse_arm(arm_name)
    model = source_dir(shape_name) if arm.layout is None else converted(shape_name, arm)
    uptrain_in_place(arm_recipe(shape_name, arm, model, arm_folder(shape_name, arm_name) / "run"))
    return arm_name


def judge(shape_name: str, candidate: Path, control: Path | None, out: Path) -> dict:
    """validate.run on held-out code (in domain) and WikiText-2 test (out of domain): perplexities, the
    candidate/control and candidate/source ratios with paired-bootstrap 95% CIs, measured KV bytes."""
    import validate
    from common.sources import default_wikitext

    manifest = manifest_of(shape_name)
    options = validate.ValidateOptions(
        source=str(source_dir(shape_name)), candidate=str(candidate), control=str(control) if control else None,
        data=(str(WORK / "corpus" / "heldout.txt"), str(default_wikitext("test"))), max_tokens=32768,
        context=manifest["seq_len"], stride=manifest["seq_len"], decode_lengths=(manifest["seq_len"] // 2,),
        decode_new_tokens=2,
        out=str(out))
    report = validate.run(options).data
    texts = {}
    for text, name in zip(report["texts"], TEXTS):
        ppl = text["perplexity"]
        versus_source = text.get("candidate_vs_source", text["comparison"])
        texts[name] = {"ppl": ppl["candidate"], "source_ppl": ppl["source"], "control_ppl": ppl.get("control"),
                       "vs_source": {k: versus_source[k] for k in ("ratio", "ci_low", "ci_high")},
                       "vs_control": {k: text["comparison"][k] for k in ("ratio", "ci_low", "ci_high")}
                       if control else None}
    models = report["models"]
    return {"texts": texts, "kv_bytes_per_token": models["candidate"]["kv_bytes_per_token_measured"],
            "source_kv_bytes_per_token": models["source"]["kv_bytes_per_token_measured"],
            "params": models["candidate"]["parameters"]}


TEXTS = ("code", "wikitext")  # in domain (held-out Python), out of domain (English prose)


def evaluate_arm(shape_name: str, arm_name: str) -> dict:
    """(In a child.) Judge an arm at every point of C, against the source and its control at the same step
    (points inside a blend's ramp are skipped: the model is not the layout there)."""
    arm, manifest = parse_arm(arm_name), manifest_of(shape_name)
    folder = arm_folder(shape_name, arm_name)
    recipe = arm_recipe(shape_name, arm, conversion_dir(shape_name, arm), folder / "run")
    control = arm_folder(shape_name, arm.control) / "run"
    per_step = recipe.micro_batch * recipe.seq_len
    points, started = [], time.monotonic()
    for share, step in point_steps(shape_name, arm).items():
        if step == 0:
            candidate = source_dir(shape_name) if arm.layout is None else conversion_dir(shape_name, arm)
        elif step in recipe.export_at:
            candidate = folder / "run" / "exports" / f"step{step}"
        else:
            continue
        # the control at step 0 is the source; a control is judged against the source only
        reference = control / "exports" / f"step{step}" if step and arm.layout is not None else None
        judged = judge(shape_name, candidate, reference, folder / "validate" / f"step{step}")
        if reference is None:
            for text in judged["texts"].values():
                text["vs_control"], text["control_ppl"] = text["vs_source"], text["source_ppl"]
        tokens = step * per_step
        # 6N a token trained, and 2N of the source's a token for the teacher's forward pass with kd
        flops = 6.0 * judged["params"] * tokens + (2.0 * manifest["params"] * tokens if recipe.loss != "lm" else 0.0)
        points.append({"share_of_pretraining_tokens": share, "step": step, "tokens": tokens,
                       "share_of_pretraining_flops": flops / manifest["flops_6n"], **judged})
    return {"arm": arm_name, "layout": arm.layout, "init": arm.init, "control": arm.control,
            "recipe": {k: v for k, v in asdict(recipe).items()
                       if k not in ("model", "source", "out", "token_cache", "data", "eval_data")},
            "points": points, "tokens_per_s_median": median_rate(RunFolder(folder / "run").records()),
            "judge_seconds": round(time.monotonic() - started)}


# ---------------------------------------------------------------- from scratch: the layout's own cost


# The twins' own control: the project's model code with every layer storing its K/V (FusedKV with all
# layers storage layers). It should pretrain as the Llama source did; a twin's lead over it is the layout's.
SHARING_OFF = "sharing_off"


def train_scratch(shape_name: str, layout: str) -> str:
    """(In a child.) The layout pretrained from random init with the source's recipe and tokens: the
    source's random init converted (copy), so both start from the same draw."""
    folder = work_dir(shape_name) / "scratch" / layout
    if (folder / "run" / "final" / "config.json").is_file():
        return layout  # (its init is not needed again)
    init = work_dir(shape_name) / "pretrain" / "init"
    if not (init / "config.json").is_file():
        random_llama(init, SHAPES[shape_name])  # the same seed: the same draw as the source's
    if layout == SHARING_OFF:
        twin, options = Arm(f"scratch-{layout}", "fusedkv"), {"storage_layers": SHAPES[shape_name].layers}
    else:
        twin, options = Arm(f"scratch-{layout}", layout), {}
    model = converted(shape_name, twin, source=init, out=folder / "init", **options)
    uptrain_in_place(pretrain_recipe(shape_name, model, folder / "run"))
    return layout


def record_scratch_progress(shape_name: str) -> None:
    """A from-scratch twin still training: its held-out perplexity so far beside the source's own
    pretraining at the same steps (the same eval set), so that the results show how it is going."""
    done = recorded(shape_name, "scratch")
    for metrics in sorted((work_dir(shape_name) / "scratch").glob("*/run/metrics.jsonl")):
        layout = metrics.parent.parent.name
        if layout in done or not (source_dir(shape_name) / "pretraining.json").is_file():
            continue
        source = dict(manifest_of(shape_name)["eval_curve"])
        curve = [(r["step"], r["eval_ppl"]) for r in RunFolder(metrics.parent).records()
                 if "eval_ppl" in r and r["step"] in source]
        record(shape_name, "scratch_progress", layout, {
            "steps_of": manifest_of(shape_name)["steps"],
            "points": [{"step": step, "ppl": ppl, "source_ppl": source[step]} for step, ppl in curve]})


def evaluate_scratch(shape_name: str, layout: str) -> dict:
    folder = work_dir(shape_name) / "scratch" / layout
    records = RunFolder(folder / "run").records()
    return {"layout": layout, "eval_curve": [(r["step"], r["eval_ppl"]) for r in records if "eval_ppl" in r],
            **judge(shape_name, folder / "run" / "final", None, folder / "validate")}


# ---------------------------------------------------------------- results, appended as arms finish


def results_path() -> Path:
    import torch

    return RESULTS / f"parity_study_{'cuda' if torch.cuda.is_available() else 'cpu'}.json"


def record(shape_name: str, kind: str, name: str, result: dict) -> None:
    """Put one finished arm's result in the results file (rewritten whole, atomically)."""
    path = results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_suffix(".lock").open("w") as lock:  # two runners (other --arms) may finish at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        write_result(path, shape_name, kind, name, result)


def write_result(path: Path, shape_name: str, kind: str, name: str, result: dict) -> None:
    from bench.machine import machine_info

    results = json.loads(path.read_text()) if path.is_file() else {"shapes": {}}
    shape = results["shapes"].setdefault(shape_name, {})
    manifest = manifest_of(shape_name)
    shape["source"] = {k: manifest[k] for k in ("params", "tokens", "steps", "flops_6n", "tokens_per_param",
                                                 "final_eval_ppl", "layers", "hidden", "heads", "kv_heads")}
    shape.setdefault(kind, {})[name] = {**result, "machine": machine_info(), "finished": time.strftime("%Y-%m-%d %H:%M")}
    results["command"] = "python bench/parity_study.py"
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.rename(path)


def recorded(shape_name: str, kind: str) -> set[str]:
    """The arms (or from-scratch layouts) of a shape whose results are in the results file already."""
    path = results_path()
    results = json.loads(path.read_text()) if path.is_file() else {}
    return set(results.get("shapes", {}).get(shape_name, {}).get(kind, {}))


def run_arms(shape_name: str, names: list[str], jobs: int) -> None:
    """Train the arms, their controls first, `jobs` at a time; judge each as soon as it and its control
    are trained (judging goes before training more), and record its result once judged."""
    done = recorded(shape_name, "arms")
    controls = sorted({parse_arm(n).control for n in names})
    to_train = [n for n in dict.fromkeys(controls + names) if n not in done or n in controls]
    to_judge = [n for n in to_train if n not in done]
    trained: set[str] = set()
    running: dict[concurrent.futures.Future, tuple[str, str]] = {}
    with fresh_processes(jobs, one_thread=True) as pool:
        while to_train or to_judge or running:
            while len(running) < jobs:
                ready = [n for n in to_judge if n in trained and parse_arm(n).control in trained]
                if ready:
                    to_judge.remove(ready[0])
                    running[pool.submit(evaluate_arm, shape_name, ready[0])] = ("judge", ready[0])
                elif to_train:
                    name = to_train.pop(0)
                    running[pool.submit(train_arm, shape_name, name)] = ("train", name)
                else:
                    break
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                kind, name = running.pop(future)
                result = future.result()
                if kind == "train":
                    trained.add(name)
                    continue
                record(shape_name, "arms", name, result)
                print(f"{shape_name} {name}: " + ", ".join(
                    f"{100 * p['share_of_pretraining_tokens']:.3g}%: x{p['texts']['code']['vs_control']['ratio']:.3f}"
                    for p in result["points"]), flush=True)


def comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def chosen(value: str, choices, what: str) -> list[str]:
    """A comma list whose every name is one of choices; the first that is not ends the study in one line."""
    names = comma_list(value)
    for name in names:
        if name not in choices:
            sys.exit(f"unknown {what} {name!r}; choose from {', '.join(choices)}")
    return names


def main() -> None:
    global WORK, RESULTS
    from models import LAYOUTS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", nargs="?", default="all", choices=("all", "pretrain", "scratch", "arms", "report"))
    parser.add_argument("--shape", default="mha,gqa", help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--arms", default=None, help="comma list of arms: control or <layout>-<init>, each with "
                        f"+variants ({', '.join(VARIANTS)}) (default: {', '.join(default_arms())})")
    parser.add_argument("--scratch", default=",".join(LAYOUTS), help="layouts pretrained from scratch (comma list; "
                        f"{SHARING_OFF}: the model code with every layer storing its K/V, the twins' control)")
    parser.add_argument("--jobs", type=int, default=2, help="arms trained at once (one thread each on a CPU)")
    parser.add_argument("--work", default=None, help="corpus, token stores, runs (default runs/parity)")
    parser.add_argument("--results", default=None, help="folder of the results JSON and plot (default bench/results)")
    args = parser.parse_args()
    WORK, RESULTS = Path(args.work or WORK).resolve(), Path(args.results or RESULTS).resolve()
    os.environ.update(PARITY_WORK=str(WORK), PARITY_RESULTS=str(RESULTS))  # what every arm's process reads
    shapes = chosen(args.shape, SHAPES, "shape")
    arms = comma_list(args.arms) if args.arms else default_arms()
    for name in arms:
        parse_arm(name)
    twins = chosen(args.scratch, (*LAYOUTS, SHARING_OFF), "--scratch layout")
    corpus()
    tokenizer_dir()
    calib_text()
    if args.stage in ("all", "pretrain"):
        for manifest in in_fresh_process(args.jobs, [(pretrain, s) for s in shapes]):
            print(f"source {manifest['shape']}: {manifest['params']:,} params, {manifest['tokens']:,} tokens, "
                  f"held-out ppl {manifest['final_eval_ppl']:.2f}", flush=True)
    if args.stage in ("all", "arms"):
        for shape in shapes:
            run_arms(shape, arms, args.jobs)
    if args.stage in ("all", "scratch"):
        tasks = [(train_scratch, s, layout) for s in shapes for layout in twins if layout not in recorded(s, "scratch")]
        in_fresh_process(args.jobs, tasks)
        for (_, shape, layout), result in zip(tasks, in_fresh_process(args.jobs, [(evaluate_scratch, s, l)
                                                                               for _, s, l in tasks])):
            record(shape, "scratch", layout, result)
    if args.stage in ("all", "report"):
        from bench import parity_report

        for shape in shapes:
            record_scratch_progress(shape)
        # the page quotes the CPU study; a GPU run (--shape mha-25m) writes its own file and leaves it be
        page = ROOT / "docs" / "parity.md" if results_path().name == "parity_study_cpu.json" else None
        parity_report.main(results_path(), page if RESULTS == ROOT / "bench" / "results" else None)


if __name__ == "__main__":
    main()

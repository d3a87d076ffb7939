"""Measured numbers in README.md and docs/ cannot go stale: every number a marker ties to a result file
is checked against that file, so a rerun that changes a result fails here until the text follows.

Two markers, HTML comments (invisible when rendered):

    <!-- numbers from bench/results/X.json
    ROW | COLUMN = EXPR
    -->

checks, in the first table below the comment, the cell in the row whose first cell is ROW and the
column headed COLUMN (`*` and backticks ignored; `COLUMN #2` checks the cell's second number; several
comments may precede one table), and

    <!-- X.json: EXPR -->NUMBER

checks the first number after the comment (a file named without a folder is in bench/results/). EXPR is a JSON path (keys joined by dots, a key holding a
dot in double quotes; in a list, an item by index or by `field=value`), or paths and constants joined
by ` * ` and ` / `. The number checked is the first in the cell (commas are thousands separators); it must
be the value rounded to as many digits as it is written with: 59.8 stands for 59.75 up to 59.85.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# The least each page must check: the README's headline table, a handful on each results page.
LEAST = {"README.md": 29, "docs/results.md": 150, "docs/benchmarks.md": 60, "docs/gpu.md": 35,
         "docs/serving.md": 45, "docs/commands.md": 8}

TABLE_MARKER = re.compile(r"<!--\s*numbers from (\S+)\s*\n(.*?)-->", re.S)
INLINE_MARKER = re.compile(r"<!--\s*(\S+\.json):\s*(.*?)\s*-->(?=((?:(?!<!--).){0,40}))", re.S)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?")
KEY = re.compile(r'"([^"]*)"|([^.]+)')


class Stale(Exception):
    pass


def lookup(data, path: str):
    value = data
    for quoted, plain in KEY.findall(path):
        key = quoted or plain
        if isinstance(value, dict):
            if key not in value:
                raise Stale(f"no key {key!r} in {path!r} (has {', '.join(map(str, value))})")
            value = value[key]
        elif isinstance(value, list):
            if "=" in key:
                field, want = key.split("=", 1)
                found = [x for x in value if isinstance(x, dict) and str(x.get(field)) == want]
                if not found:
                    raise Stale(f"no item with {field}={want} in {path!r}")
                value = found[0]
            else:
                value = value[int(key)]
        else:
            raise Stale(f"{path!r} goes past a value at {key!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Stale(f"{path!r} is {value!r}, not a number")
    return value


def evaluate(data, expr: str) -> float:
    parts = re.split(r"\s+([*/])\s+", expr.strip())  # a path may hold spaces and slashes, not " * " or " / "

    def term(text):
        try:
            return float(text)
        except ValueError:
            return lookup(data, text)

    value = term(parts[0])
    for op, text in zip(parts[1::2], parts[2::2]):
        value = value * term(text) if op == "*" else value / term(text)
    return value


def agrees(written: str, value: float) -> bool:
    """`written` is `value` rounded to the digits it shows (either way at exactly half)."""
    exact = Decimal(written.replace(",", ""))
    step = Decimal(1).scaleb(exact.as_tuple().exponent)
    return abs(Decimal(repr(float(value))) - exact) <= step / 2 * Decimal("1.000001")


def plain(cell: str) -> str:
    return re.sub(r"[*`]", "", cell).strip()


def next_table(lines: list[str], start: int) -> tuple[int, list[list[str]]]:
    i = start
    while i < len(lines) and not lines[i].lstrip().startswith("|"):
        i += 1
    rows = []
    while i < len(lines) and lines[i].lstrip().startswith("|"):
        rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
        i += 1
    return start, [r for r in rows if not all(re.fullmatch(r":?-+:?", c) for c in r if c)]


def load(name: str, page: Path) -> dict:
    path = ROOT / name if "/" in name else ROOT / "bench" / "results" / name
    if not path.is_file():
        raise Stale(f"{name} does not exist")
    return json.loads(path.read_text())


def name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix() if page.is_relative_to(ROOT) else page.name


def check(page: Path) -> tuple[int, list[str]]:
    """(numbers checked, what disagrees) for one markdown file."""
    text = page.read_text()
    lines = text.splitlines()
    checked, errors = 0, []
    for match in TABLE_MARKER.finditer(text):
        line_no = text.count("\n", 0, match.end()) + 1
        where = f"{name(page)}:{text.count(chr(10), 0, match.start()) + 1}"
        try:
            data = load(match.group(1), page)
        except Stale as e:
            errors.append(f"{where}: {e}")
            continue
        _, table = next_table(lines, line_no)
        if not table:
            errors.append(f"{where}: no table below the marker")
            continue
        header = [plain(c) for c in table[0]]
        for spec in filter(None, (s.strip() for s in match.group(2).splitlines())):
            try:
                left, expr = spec.rsplit(" = ", 1)  # a label may hold " = ", a path never
                row_label, column = (plain(x) for x in left.split(" | ", 1))
            except ValueError:
                errors.append(f"{where}: cannot read {spec!r} (ROW | COLUMN = EXPR)")
                continue
            nth = re.fullmatch(r"(.*?)\s+#(\d+)", column)  # COLUMN #2: the cell's second number
            column, nth = (nth.group(1), int(nth.group(2))) if nth else (column, 1)
            rows = [r for r in table[1:] if r and plain(r[0]) == row_label]
            if not rows or column not in header:
                errors.append(f"{where}: {spec!r}: no row {row_label!r}" if not rows else
                              f"{where}: {spec!r}: no column {column!r}")
                continue
            cell = rows[0][header.index(column)] if header.index(column) < len(rows[0]) else ""
            numbers = NUMBER.findall(cell)
            written = numbers[nth - 1] if len(numbers) >= nth else None
            try:
                value = evaluate(data, expr)
            except Stale as e:
                errors.append(f"{where}: {spec!r}: {e}")
                continue
            checked += 1
            if not written or not agrees(written, value):
                errors.append(f"{where}: {row_label} / {column} #{nth} reads {cell!r}, "
                              f"{match.group(1)} has {expr} = {value:.6g}")
    for match in INLINE_MARKER.finditer(text):
        where = f"{name(page)}:{text.count(chr(10), 0, match.start()) + 1}"
        if not text[text.rfind("\n", 0, match.start()) + 1:match.start()].strip():
            errors.append(f"{where}: a marker inside a sentence must not start its line (Markdown would "
                          "make the line an HTML block and show it raw)")
        written = NUMBER.search(match.group(3))
        try:
            value = evaluate(load(match.group(1), page), match.group(2))
        except Stale as e:
            errors.append(f"{where}: {e}")
            continue
        checked += 1
        if not written or not agrees(written.group(), value):
            errors.append(f"{where}: reads {match.group(3).strip()[:20]!r}, {match.group(1)} has "
                          f"{match.group(2)} = {value:.6g}")
    return checked, errors


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_every_marked_number_agrees_with_its_result_file(page):
    assert check(page)[1] == [], "\n".join(check(page)[1])


def test_the_readme_and_the_results_pages_check_enough_numbers():
    counts = {name(p): check(p)[0] for p in PAGES}
    assert all(counts.get(name, 0) >= least for name, least in LEAST.items()), counts


def test_every_result_file_the_pages_name_exists():
    named = {m for p in PAGES for m in re.findall(r"bench/results/[\w.\-]+\.(?:json|png)", p.read_text())}
    assert named and sorted(n for n in named if not (ROOT / n).is_file()) == []


# ---------------------------------------------------------------- the check itself can fail

RESULT = {"results": {"a": {"ppl": 59.79, "runs": [{"step": 10, "x": 0.5}, {"step": 40, "x": 1234567.0}]},
                      "b.c": {"ppl": 2.0}}}


def page_with(tmp_path: Path, body: str) -> Path:
    (tmp_path / "r.json").write_text(json.dumps(RESULT))
    page = tmp_path / "page.md"
    page.write_text(body.replace("R.JSON", str(tmp_path / "r.json")))
    return page


def table(a: str, b: str) -> str:
    return ("<!-- numbers from R.JSON\n"
            "**fused** | ppl = results.a.ppl\n"
            "`other` | share = results.a.runs.step=40.x / results.a.runs.0.x * 0.001\n-->\n"
            f"| model | ppl | share |\n|---|---:|---:|\n| **fused** | {a} (x2.7) | - |\n| `other` | - | {b}k |\n")


def test_the_nth_number_of_a_cell_is_checked(tmp_path):
    body = ("<!-- numbers from R.JSON\nfused | ppl #2 = results.a.ppl\n-->\n"
            "| model | ppl |\n|---|---:|\n| fused | 1.0 / 59.8 / 3 |\n")
    assert check(page_with(tmp_path, body)) == (1, [])
    assert len(check(page_with(tmp_path, body.replace("59.8", "58.8")))[1]) == 1
    assert "#4" in check(page_with(tmp_path, body.replace("#2", "#4")))[1][0]


def test_a_table_that_agrees_passes(tmp_path):
    assert check(page_with(tmp_path, table("**59.8**", "2,469.1"))) == (2, [])


@pytest.mark.parametrize("a, b", [("59.9", "2,469.1"), ("59.8", "2,469.2"), ("59.7", "2,469.1"), ("-", "2,469.1")])
def test_a_table_number_that_differs_from_its_file_fails(tmp_path, a, b):
    checked, errors = check(page_with(tmp_path, table(a, b)))
    assert checked == 2 and len(errors) == 1


def test_an_inline_number_is_checked(tmp_path):
    good = 'about <!-- R.JSON: results."b.c".ppl -->2.0x, <!-- R.JSON: results.a.ppl -->60 '
    assert check(page_with(tmp_path, good)) == (2, [])
    checked, errors = check(page_with(tmp_path, good.replace("-->60", "-->61")))
    assert checked == 2 and len(errors) == 1 and "61" in errors[0]


@pytest.mark.parametrize("spec, why", [("fused | ppl = results.a.loss", "no key 'loss'"),
                                       ("nobody | ppl = results.a.ppl", "no row 'nobody'"),
                                       ("fused | loss = results.a.ppl", "no column 'loss'"),
                                       ("fused | ppl = results.a", "not a number"),
                                       ("fused | ppl = results.a.runs.step=20.x", "no item with step=20"),
                                       ("fused ppl results.a.ppl", "cannot read"),
                                       ("fused | ppl = results.a.ppl * two", "no key 'two'")])
def test_a_marker_that_matches_nothing_fails(tmp_path, spec, why):
    body = f"<!-- numbers from R.JSON\n{spec}\n-->\n| model | ppl |\n|---|---:|\n| fused | 59.8 |\n"
    checked, errors = check(page_with(tmp_path, body))
    assert len(errors) == 1 and why in errors[0], errors


def test_an_inline_marker_that_starts_a_line_fails(tmp_path):
    checked, errors = check(page_with(tmp_path, "perplexity\n  <!-- R.JSON: results.a.ppl -->59.8 at step 0"))
    assert len(errors) == 1 and "must not start its line" in errors[0]


def test_a_missing_result_file_fails(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- numbers from bench/results/gone.json\nfused | ppl = results.a.ppl\n-->\n| model | ppl |\n|---|---|\n| fused | 1 |\n")
    assert check(page) == (0, ["page.md:1: bench/results/gone.json does not exist"])


def collected(*args: str) -> int:
    """How many tests pytest collects from args (in a fresh process, as make test would)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return int(re.search(r"^(\d+) tests? collected", out, re.M).group(1))


def test_the_readme_says_how_many_tests_make_test_runs():
    """The README's count of make test's tests is pytest's: adding or removing one fails here until
    the README follows."""
    said = re.search(r"make test +# ([\d,]+) tests, .*?\(([\d,]+) of them the in-process walk of option values\)",
                     (ROOT / "README.md").read_text())
    assert said, "README.md no longer says how many tests make test runs"
    assert [int(n.replace(",", "")) for n in said.groups()] == [
        collected("tests", "--ignore=tests/e2e"), collected("tests/test_option_values.py")]

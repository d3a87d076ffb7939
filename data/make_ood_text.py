"""Build data/ood/python-docs.txt: an out-of-domain held-out text from Python's own docstrings.

WikiText is encyclopedic prose; API documentation is a different domain, so a model that only
adapted to WikiText during uptraining shows it here. The text comes from the standard library's
docstrings (Python Software Foundation License), modules in a fixed order, so the file is
reproducible for a given Python version:  python data/make_ood_text.py
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path

MODULES = (
    "argparse", "ast", "bisect", "calendar", "collections", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email.message", "enum", "fractions", "functools", "glob", "gzip", "hashlib", "heapq",
    "html", "http.client", "inspect", "io", "itertools", "json", "logging", "pathlib", "pprint", "queue",
    "random", "re", "shutil", "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "typing", "unittest", "urllib.parse", "zipfile",
)
MAX_CHARS = 150_000


def module_text(name: str) -> str:
    module = importlib.import_module(name)
    parts = [inspect.getdoc(module) or ""]
    for attr in sorted(getattr(module, "__all__", None) or dir(module)):
        obj = getattr(module, attr, None)
        if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        doc = inspect.getdoc(obj)
        if doc and len(doc) > 80:
            parts.append(doc)
    return "\n\n".join(p for p in parts if p)


def main() -> None:
    text = "\n\n".join(module_text(name) for name in MODULES)[:MAX_CHARS]
    out = Path(__file__).resolve().parent / "ood" / "python-docs.txt"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {out} ({len(text):,} characters)")


if __name__ == "__main__":
    main()

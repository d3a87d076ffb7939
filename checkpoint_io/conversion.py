"""A converted folder's ``conversion.json``, read into one typed object: what convert returns, and
what uptrain (the teacher, the blend's source projections), the demo and the benchmarks read back.

Only the fields a reader needs are typed; the full plan (every mapping, versions) stays in the file
for the auditor (convert/report.py writes it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError

MANIFEST = "conversion.json"


@dataclass(frozen=True)
class Conversion:
    """One conversion: where it is (None for a dry run), its source, layout, init and options, the
    dtype it was written in, the KV-cache bytes per token before and after, and the per-layer fit."""

    out: Path | None
    source: Path
    layout: str
    init: str
    options: dict
    dtype: str
    kv_bytes_per_token: dict[str, int]  # {"source": ..., "converted": ...} at the output dtype
    fit: list[dict]

    @classmethod
    def from_manifest(cls, out: Path | None, manifest: dict) -> Conversion:
        return cls(out, Path(manifest["source"]["path"]), manifest["layout"], manifest["init"],
                   dict(manifest["options"]), manifest["dtype"], dict(manifest["kv_cache_bytes_per_token"]),
                   list(manifest.get("fit", [])))

    @classmethod
    def load(cls, folder: str | Path) -> Conversion:
        """The conversion in folder; one line for a folder convert did not write or a damaged manifest."""
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise UserError(f"{folder} is no conversion (it has no {MANIFEST})")
        try:
            return cls.from_manifest(Path(folder), json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"{path} is damaged ({type(err).__name__}: {err}); convert again, or set source to the "
                            "unconverted model") from err

    @classmethod
    def find(cls, folder: str | Path) -> Conversion | None:
        """The conversion in folder, or None when it is no conversion (a source, a GGUF file)."""
        return cls.load(folder) if (Path(folder) / MANIFEST).is_file() else None

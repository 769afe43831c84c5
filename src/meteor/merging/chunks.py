"""The selected data split into the K chunks merge trains one delta each on."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from meteor.io import read_jsonl

log = logging.getLogger(__name__)

CHUNK_BY = ("file", "category", "source")


def load_chunks(selected_dir: str | Path, chunk_by: str = "file"
                ) -> tuple[dict[str, list[dict]], Counter]:
    """``{chunk name: rows}`` in sorted name order, and rows skipped by reason.

    ``chunk_by="file"``: each ``<chunk>.jsonl`` under ``selected_dir`` is a chunk (ifd_select
    writes one per category by default). ``"category"`` / ``"source"``: all selected rows
    regrouped by that field (e.g. distilled vs refined answers); rows without it are skipped.
    Chunks without rows are dropped (counted as ``empty_chunk``).
    """
    if chunk_by not in CHUNK_BY:
        raise ValueError(f"merge.chunk_by: unknown value {chunk_by!r}; expected one of {CHUNK_BY}")
    selected_dir = Path(selected_dir)
    files = sorted(selected_dir.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no chunk files (*.jsonl) in {selected_dir}")
    skipped: Counter = Counter()
    by_file = {f.stem: read_jsonl(f) for f in files}
    if chunk_by == "file":
        chunks = by_file
    else:
        chunks = {}
        for rows in by_file.values():
            for row in rows:
                value = row.get(chunk_by)
                if not isinstance(value, str) or not value:
                    skipped[f"no_{chunk_by}"] += 1
                    continue
                chunks.setdefault(value, []).append(row)
    out = {}
    for name in sorted(chunks):
        if chunks[name]:
            out[name] = chunks[name]
        else:
            skipped["empty_chunk"] += 1
            log.warning("chunk %s has no rows: no delta for it", name)
    if not out:
        raise ValueError(f"every chunk under {selected_dir} is empty")
    return out, skipped

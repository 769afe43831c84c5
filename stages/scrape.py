"""Stage scrape: questions with accepted answers -> data/scraped/{train,dev,test}.jsonl.

Reads ``scrape`` from params.yaml: the source (``sample``: the bundled data/raw/Posts.xml,
``dump``: a Stack Exchange Posts.xml streamed in constant memory, ``api``: the Stack Exchange API
with $STACKEXCHANGE_KEY if set), the tag -> category table, min_score, workers (processes that
convert a dump's HTML to Markdown; the output does not depend on it) and the hash split.
Writes one JSON Lines file per split (sorted by id) and metrics/scrape.json (kept counts per
category x split, dropped rows by reason).

Run alone: python stages/scrape.py
"""

from __future__ import annotations

from pathlib import Path

from meteor.io import atomic_path, write_json, write_jsonl
from meteor.runtime import Stage
from meteor.scrape import run_scrape, scrape_metrics, split_records
from meteor.scrape.config import ScrapeParams

OUT_DIR = Path("data/scraped")
METRICS = Path("metrics/scrape.json")


def main() -> None:
    stage = Stage("scrape", scrape=ScrapeParams)
    params = stage.params.scrape
    result = run_scrape(params)
    splits = split_records(result.records, params)
    with atomic_path(OUT_DIR, is_dir=True) as tmp_dir:  # all three splits or none
        for name, rows in splits.items():
            write_jsonl(tmp_dir / f"{name}.jsonl", rows)
    metrics = scrape_metrics(result, splits, list(params.categories))
    write_json(METRICS, metrics)
    stage.log.info("kept %s", metrics["kept_total"])
    stage.log.info("dropped %s", metrics["dropped"])


if __name__ == "__main__":
    main()

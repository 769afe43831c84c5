"""Questions with accepted answers from a bundled sample dump, a Stack Exchange dump or the API.

``run_scrape(params)`` picks the source from ``scrape.source`` and returns a
:class:`~meteor.scrape.records.ScrapeResult`; ``split_records`` assigns train/dev/test.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from meteor.scrape.config import ScrapeParams
from meteor.scrape.records import ScrapeResult
from meteor.scrape.split import SPLITS, assign_split

__all__ = ["ScrapeResult", "run_scrape", "split_records", "scrape_metrics"]


def run_scrape(params: ScrapeParams) -> ScrapeResult:
    if params.source in ("sample", "dump"):
        from meteor.scrape.dump import scrape_dump

        path = params.sample_path if params.source == "sample" else params.dump_path
        if not path or not Path(path).is_file():
            key = "sample_path" if params.source == "sample" else "dump_path"
            raise FileNotFoundError(f"scrape.{key}: Stack Exchange dump not found: {path}")
        return scrape_dump(path, categories=params.categories, min_score=params.min_score,
                           source=params.source, workers=params.workers)
    if params.source == "api":
        from meteor.scrape.api import StackExchangeClient, scrape_api

        return scrape_api(params.categories, min_score=params.min_score,
                          client=StackExchangeClient(params.api))
    raise ValueError(
        f"scrape.source: unknown source {params.source!r}; expected sample, dump or api")


def split_records(records: list[dict], params: ScrapeParams) -> dict[str, list[dict]]:
    """Records by split, each list sorted by id."""
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for record in sorted(records, key=lambda r: r["id"]):
        name = assign_split(record["id"], dev=params.split.dev, test=params.split.test,
                            salt=params.split.salt)
        splits[name].append(record)
    return splits


def scrape_metrics(result: ScrapeResult, splits: dict[str, list[dict]],
                   categories: list[str]) -> dict:
    """Counts per category x split (with totals) and dropped rows by reason."""
    counts = {cat: {name: 0 for name in (*SPLITS, "total")} for cat in categories}
    for name, rows in splits.items():
        for cat, n in Counter(r["category"] for r in rows).items():
            counts[cat][name] += n
            counts[cat]["total"] += n
    totals = {name: len(rows) for name, rows in splits.items()}
    totals["total"] = sum(totals.values())
    return {
        "source": result.source,
        "rows_read": result.rows_read,
        "kept": counts,
        "kept_total": totals,
        "dropped": dict(sorted(result.dropped.items())),
        "dropped_total": sum(result.dropped.values()),
        "unused_answers": result.unused_answers,
    }

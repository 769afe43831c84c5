"""Benchmark: stream synthetic Stack Exchange dumps through the dump parser; show flat memory.

Writes two synthetic ``Posts.xml`` files into a temporary directory (a small one and a large one,
sizes in MB as arguments): 97% off-topic questions and answers, 3% on-topic questions with
accepted answers (about 2x the density of real Stack Overflow, where ~0.6% of questions carry a
category tag and an accepted answer), 1-2 KB HTML bodies, both tag encodings, 1% of answers
before their questions. Each file is parsed by ``meteor.scrape.dump.scrape_dump`` in a fresh
subprocess, which reports its wall time, the part of it spent converting kept rows' HTML to
Markdown (a cost per kept record, not per byte) and its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``). Prints MB/s and peak RSS per size and their
ratios, so that memory independent of file size shows. Targets: >= 40 MB/s and peak RSS < 300 MB
at any size. The temporary files are deleted afterwards.

Run: python benchmarks/scrape_dump.py [--size-mb 500] [--small-mb 50]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from xml.sax.saxutils import escape

ON_TOPIC_TAGS = [["machine-learning", "python"], ["pytorch", "deep-learning"], ["nlp", "spacy"],
                 ["opencv", "python"], ["scikit-learn"], ["keras", "tensorflow"]]
OFF_TOPIC_TAGS = [["javascript", "reactjs"], ["java", "spring"], ["c#", ".net"], ["css", "html"],
                  ["sql", "mysql"], ["android"], ["php", "laravel"], ["git"]]
WORDS = ("the model loss value array index function return error list string shape tensor data "
         "train test input output layer weight call method class object file path type").split()
ATTR = {'"': "&quot;", "\n": "&#xA;", "\r": "&#xD;", "\t": "&#x9;"}


def html_body(rng: random.Random) -> str:
    """A 1-2 KB Stack Overflow-style body, already escaped for an attribute."""
    size = rng.randint(1000, 2000)
    parts, length = [], 0
    while length < size:
        words = " ".join(rng.choices(WORDS, k=rng.randint(15, 40)))
        part = (f"<pre><code>x = {words.replace(' ', '_')[:80]}(a &lt; b)\n</code></pre>\n"
                if rng.random() < 0.25 else f"<p>{words} <code>{rng.choice(WORDS)}()</code>.</p>\n")
        parts.append(part)
        length += len(part)
    return escape("".join(parts), ATTR)


def tags_attr(tags: list[str], pipes: bool) -> str:
    return escape("|" + "|".join(tags) + "|" if pipes else "".join(f"<{t}>" for t in tags), ATTR)


def write_synthetic_dump(path: Path, size_mb: float, seed: int = 0) -> int:
    """Write a dump of about ``size_mb`` MB; returns the number of on-topic questions written."""
    rng = random.Random(seed)
    bodies = [html_body(rng) for _ in range(256)]
    target, written, qid, on_topic = size_mb * 1e6, 0, 1, 0
    with open(path, "w", encoding="utf-8") as f:
        f.write('<?xml version="1.0" encoding="utf-8"?>\n<posts>\n')
        while written < target:
            is_on_topic = rng.random() < 0.03
            on_topic += is_on_topic
            tags = rng.choice(ON_TOPIC_TAGS if is_on_topic else OFF_TOPIC_TAGS)
            accepted = qid + 1 if is_on_topic or rng.random() < 0.5 else None
            q = (f'  <row Id="{qid}" PostTypeId="1"'
                 + (f' AcceptedAnswerId="{accepted}"' if accepted else "")
                 + f' CreationDate="2020-01-01T00:00:00.000" Score="{rng.randint(-1, 50)}"'
                 f' ViewCount="123" Body="{rng.choice(bodies)}" OwnerUserId="{qid % 5000}"'
                 f' Title="Question {qid} about {rng.choice(WORDS)}"'
                 f' Tags="{tags_attr(tags, qid % 2 == 0)}" AnswerCount="2" CommentCount="1"'
                 ' ContentLicense="CC BY-SA 4.0" />\n')
            answers = [f'  <row Id="{qid + k}" PostTypeId="2" ParentId="{qid}"'
                       f' CreationDate="2020-01-02T00:00:00.000" Score="{rng.randint(0, 30)}"'
                       f' Body="{rng.choice(bodies)}" OwnerUserId="{(qid + k) % 5000}"'
                       ' CommentCount="0" ContentLicense="CC BY-SA 4.0" />\n' for k in (1, 2)]
            rows = answers + [q] if rng.random() < 0.01 else [q] + answers
            for row in rows:
                f.write(row)
                written += len(row)
            qid += 3
        f.write("</posts>\n")
    return on_topic


def child(path: str) -> None:
    """Runs in the subprocess: parse one dump and report time, counts and peak RSS as JSON."""
    import resource

    from meteor.params import ScrapeParams
    from meteor.scrape import records
    from meteor.scrape.dump import scrape_dump

    convert_s = 0.0
    make_record = records.make_record

    def timed_make_record(**kwargs):  # measure the HTML -> Markdown share of the time
        nonlocal convert_s
        t = time.perf_counter()
        record = make_record(**kwargs)
        convert_s += time.perf_counter() - t
        return record

    records.make_record = timed_make_record
    rss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = scrape_dump(path, categories=ScrapeParams().categories)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "seconds": seconds, "convert_seconds": convert_s, "records": len(result.records),
        "rows": result.rows_read,
        "rss_after_imports_mb": rss_before_kb / 1024,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KB on Linux
    }))


def measure(path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(path)], check=True,
                         capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    stats["mb"] = path.stat().st_size / 1e6
    stats["mb_per_s"] = stats["mb"] / stats["seconds"]
    stats["parse_mb_per_s"] = stats["mb"] / (stats["seconds"] - stats["convert_seconds"])
    return stats


def describe(label: str, stats: dict) -> str:
    ms_per_record = 1000 * stats["convert_seconds"] / max(stats["records"], 1)
    return (f"{label}: {stats['mb']:.0f} MB, {stats['rows']} rows, {stats['records']} kept, "
            f"{stats['seconds']:.1f} s -> {stats['mb_per_s']:.1f} MB/s end to end; parsing alone "
            f"{stats['parse_mb_per_s']:.1f} MB/s, HTML->Markdown {stats['convert_seconds']:.1f} s "
            f"({ms_per_record:.1f} ms/record); peak RSS {stats['peak_rss_mb']:.0f} MB "
            f"(after imports {stats['rss_after_imports_mb']:.0f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description="Benchmark the streamed Posts.xml parser.")
    ap.add_argument("--size-mb", type=float, default=500, help="size of the large dump (MB)")
    ap.add_argument("--small-mb", type=float, default=50, help="size of the small dump (MB)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return

    print(f"load average before: {os.getloadavg()}, CPUs: {os.cpu_count()}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="scrape_bench_") as tmp:
        for label, size in (("small", args.small_mb), ("large", args.size_mb)):
            path = Path(tmp) / f"Posts_{label}.xml"
            start = time.perf_counter()
            on_topic = write_synthetic_dump(path, size)
            print(f"{label}: wrote {path.stat().st_size / 1e6:.0f} MB ({on_topic} on-topic "
                  f"questions) in {time.perf_counter() - start:.1f} s")
            results[label] = stats = measure(path)
            path.unlink()
            print(describe(label, stats))
    small, large = results["small"], results["large"]
    print(f"size ratio large/small: {large['mb'] / small['mb']:.1f}x; "
          f"peak RSS ratio: {large['peak_rss_mb'] / small['peak_rss_mb']:.2f}x; "
          f"throughput ratio: {large['mb_per_s'] / small['mb_per_s']:.2f}x")
    peak_ok = max(small["peak_rss_mb"], large["peak_rss_mb"]) < 300
    for key, what in (("mb_per_s", "end to end"), ("parse_mb_per_s", "parsing alone")):
        speed_ok = min(small[key], large[key]) >= 40
        print(f"targets {what} (>= 40 MB/s, peak RSS < 300 MB): "
              f"{'met' if speed_ok and peak_ok else 'NOT met'}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()

"""Benchmark: stream synthetic Stack Exchange dumps through the dump parser; show flat memory.

Writes two synthetic ``Posts.xml`` files into a temporary directory (a small one and a large one,
sizes in MB as arguments): 97% off-topic questions and answers, 3% on-topic questions with
accepted answers (about 2x the density of real Stack Overflow, where ~0.6% of questions carry a
category tag and an accepted answer), 1-2 KB HTML bodies, both tag encodings, 1% of answers
before their questions. Each file is parsed by ``meteor.scrape.dump.scrape_dump`` in a fresh
subprocess: the small one with a conversion pool (``--workers``, 0 = one per CPU), the large one
both in-process (workers=1) and with the pool. Each run reports its wall time, MB/s, peak RSS of
the parsing process and of the largest worker (``getrusage`` ``ru_maxrss``), the CPU time of the
parent and of the workers, and the HTML->Markdown share: the time spent in ``make_record`` for an
in-process run, the workers' share of all CPU time for a pool run. Targets: >= 40 MB/s and peak
RSS < 300 MB at any size. The temporary files are deleted afterwards.

Other jobs on the machine skew wall-clock numbers, so the load average is printed with each run,
as are MB per CPU second of the parsing process (what end-to-end speed tends to on an idle machine
whose other cores keep up with the conversion), and the conversion itself is also compared in
one process: plain ``markdownify(html)`` (what the scraper did before) against
``html_to_markdown`` on the same bodies, as a ratio.

Run: python benchmarks/scrape_dump.py [--size-mb 500] [--small-mb 50] [--workers 0]
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


def child(path: str, workers: int) -> None:
    """Runs in the subprocess: parse one dump and report time, counts and peak RSS as JSON."""
    import resource

    from meteor.scrape.config import ScrapeParams
    from meteor.scrape import records
    from meteor.scrape.dump import resolve_workers, scrape_dump

    convert_s = 0.0
    make_record = records.make_record

    def timed_make_record(**kwargs):  # the HTML -> Markdown time (of this process only)
        nonlocal convert_s
        t = time.perf_counter()
        record = make_record(**kwargs)
        convert_s += time.perf_counter() - t
        return record

    records.make_record = timed_make_record
    rss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    result = scrape_dump(path, categories=ScrapeParams().categories, workers=workers)
    seconds = time.perf_counter() - start
    me, workers_usage = (resource.getrusage(who)
                         for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(json.dumps({
        "workers": resolve_workers(workers),
        "seconds": seconds, "convert_seconds": convert_s, "records": len(result.records),
        "rows": result.rows_read,
        "cpu_seconds": me.ru_utime + me.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime,
        "worker_cpu_seconds": workers_usage.ru_utime + workers_usage.ru_stime,
        "rss_after_imports_mb": rss_before_kb / 1024,
        "peak_rss_mb": me.ru_maxrss / 1024,  # KB on Linux
        "worker_peak_rss_mb": workers_usage.ru_maxrss / 1024,  # the largest reaped worker
    }))


def measure(path: Path, workers: int) -> dict:
    load = os.getloadavg()[0]
    out = subprocess.run([sys.executable, __file__, "--child", str(path), "--workers",
                          str(workers)], check=True, capture_output=True, text=True,
                         env={**os.environ, "TQDM_DISABLE": "1"})
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    stats["load"] = (load + os.getloadavg()[0]) / 2
    stats["mb"] = path.stat().st_size / 1e6
    stats["mb_per_s"] = stats["mb"] / stats["seconds"]
    if stats["workers"] == 1:
        stats["convert_share"] = stats["convert_seconds"] / stats["seconds"]
        stats["parse_mb_per_s"] = stats["mb"] / (stats["seconds"] - stats["convert_seconds"])
    else:  # conversion ran in the workers: their share of all the CPU time spent
        stats["convert_share"] = stats["worker_cpu_seconds"] / (
            stats["worker_cpu_seconds"] + stats["cpu_seconds"])
    return stats


def describe(label: str, stats: dict) -> str:
    text = (f"{label}: {stats['mb']:.0f} MB, {stats['rows']} rows, {stats['records']} kept, "
            f"workers={stats['workers']}, load {stats['load']:.1f}: {stats['seconds']:.1f} s -> "
            f"{stats['mb_per_s']:.1f} MB/s end to end; CPU parent {stats['cpu_seconds']:.1f} s "
            f"({stats['mb'] / stats['cpu_seconds']:.1f} MB per parent CPU second: the bound when "
            f"no other job competes), workers {stats['worker_cpu_seconds']:.1f} s; ")
    if stats["workers"] == 1:
        ms_per_record = 1000 * stats["convert_seconds"] / max(stats["records"], 1)
        text += (f"parsing alone {stats['parse_mb_per_s']:.1f} MB/s, HTML->Markdown "
                 f"{stats['convert_seconds']:.1f} s = {stats['convert_share']:.0%} of the time "
                 f"({ms_per_record:.1f} ms/record); ")
    else:
        text += f"HTML->Markdown {stats['convert_share']:.0%} of all CPU time; "
    return text + (f"peak RSS {stats['peak_rss_mb']:.0f} MB (after imports "
                   f"{stats['rss_after_imports_mb']:.0f} MB), largest worker "
                   f"{stats['worker_peak_rss_mb']:.0f} MB")


def compare_conversion(n_bodies: int = 200, rounds: int = 5) -> None:
    """Plain markdownify vs html_to_markdown on the same bodies in this process, best of rounds."""
    from html import unescape

    from meteor.scrape.html import (
        MARKDOWN_OPTIONS,
        FencedCodeConverter,
        collapse_blank_lines,
        html_to_markdown,
    )

    rng = random.Random(1)
    bodies = [unescape(html_body(rng)) for _ in range(n_bodies)]

    def plain(html: str) -> str:  # like markdownify(html): a new converter and soup per call
        return collapse_blank_lines(FencedCodeConverter(**MARKDOWN_OPTIONS).convert(html)).strip()

    same = all(plain(body) == html_to_markdown(body) for body in bodies)
    best = {"plain markdownify": float("inf"), "html_to_markdown": float("inf")}
    for _ in range(rounds):  # interleaved, so both see the same machine load
        for name, convert in (("plain markdownify", plain), ("html_to_markdown", html_to_markdown)):
            start = time.perf_counter()
            for body in bodies:
                convert(body)
            best[name] = min(best[name], time.perf_counter() - start)
    old, new = (1000 * best[k] / n_bodies for k in best)
    print(f"conversion in one process (best of {rounds}, {n_bodies} bodies): plain markdownify "
          f"{old:.2f} ms/body, html_to_markdown {new:.2f} ms/body -> {old / new:.2f}x faster; "
          f"same output: {same}")


def main() -> None:
    ap = argparse.ArgumentParser(description="Benchmark the streamed Posts.xml parser.")
    ap.add_argument("--size-mb", type=float, default=500, help="size of the large dump (MB)")
    ap.add_argument("--small-mb", type=float, default=50, help="size of the small dump (MB)")
    ap.add_argument("--workers", type=int, default=0,
                    help="conversion processes of the pool runs (0 = one per CPU)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.workers)
        return

    print(f"load average before: {os.getloadavg()}, CPUs: {os.cpu_count()}")
    compare_conversion()
    results = {}
    with tempfile.TemporaryDirectory(prefix="scrape_bench_") as tmp:
        for label, size, runs in (("small", args.small_mb, [args.workers]),
                                  ("large", args.size_mb, [1, args.workers])):
            path = Path(tmp) / f"Posts_{label}.xml"
            start = time.perf_counter()
            on_topic = write_synthetic_dump(path, size)
            print(f"{label}: wrote {path.stat().st_size / 1e6:.0f} MB ({on_topic} on-topic "
                  f"questions) in {time.perf_counter() - start:.1f} s")
            for workers in runs:
                results[label, workers] = stats = measure(path, workers)
                print(describe(label, stats))
            path.unlink()
    small, large = results["small", args.workers], results["large", args.workers]
    serial = results["large", 1]
    print(f"size ratio large/small: {large['mb'] / small['mb']:.1f}x; "
          f"peak RSS ratio: {large['peak_rss_mb'] / small['peak_rss_mb']:.2f}x; "
          f"throughput ratio: {large['mb_per_s'] / small['mb_per_s']:.2f}x")
    print(f"large dump, pool of {large['workers']} vs in-process: "
          f"{large['mb_per_s'] / serial['mb_per_s']:.2f}x the throughput")
    peak_ok = max(max(r["peak_rss_mb"], r["worker_peak_rss_mb"]) for r in results.values()) < 300
    speed_ok = min(small["mb_per_s"], large["mb_per_s"]) >= 40
    print(f"targets with the pool (>= 40 MB/s end to end, every process's peak RSS < 300 MB): "
          f"{'met' if speed_ok and peak_ok else 'NOT met'}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()

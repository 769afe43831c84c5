"""Teacher fan-out: 200 calls to a loopback OpenAI-compatible server with 50 ms latency per call,
sequential (max_concurrency=1) vs concurrent (16), then a warm-cache re-run.

    python benchmarks/teacher_fanout.py [--calls 200] [--latency 0.05] [--concurrency 16] [--in-process]

Prints both times, their ratio (target >= 10x), the fraction of the ideal concurrent time
calls * latency / concurrency that was reached (target >= 70 %), and the warm re-run's server
calls (must be 0). Ratios are measured within this run; absolute times depend on the machine.

The fake server runs in its own process by default, as a real endpoint would: in this process it
would compete with the client for the GIL. ``--in-process`` shows that effect.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))
from fake_openai_server import FakeOpenAIServer, Faults, make_questions  # noqa: E402

from meteor.teacher.config import TeacherParams  # noqa: E402
from meteor.teacher import make_teacher  # noqa: E402
from meteor.utils import setup_logging  # noqa: E402


@contextmanager
def fake_server(latency_s: float, in_process: bool):
    """Yield (base_url, calls()) for a fake server in this process or in a child process."""
    if in_process:
        with FakeOpenAIServer(Faults(latency_s=latency_s)) as server:
            yield server.base_url, lambda: server.calls
        return
    proc = subprocess.Popen([sys.executable, str(TESTS / "fake_openai_server.py"),
                             "--latency", str(latency_s)], stdout=subprocess.PIPE, text=True)
    try:
        base_url = proc.stdout.readline().strip()
        if not base_url:
            raise SystemExit("the fake server did not start")
        stats_url = base_url.removesuffix("/v1") + "/stats"

        def calls() -> int:
            with urllib.request.urlopen(stats_url, timeout=10) as resp:
                return json.load(resp)["calls"]

        yield base_url, calls
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def timed_run(base_url: str, calls, cache_dir: str, concurrency: int, n: int):
    """Wall seconds, this process's CPU seconds and server calls to answer n questions."""
    teacher = make_teacher(TeacherParams(backend="openai", model="fake-model", base_url=base_url,
                                         cache_dir=cache_dir, max_concurrency=concurrency))
    teacher.progress = False  # keep the printed numbers readable
    questions = make_questions(n)
    calls_before = calls()
    start, cpu_start = time.perf_counter(), time.process_time()
    results = teacher.answer(questions, [None] * n)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    teacher.close()
    failed = sum(not r.ok for r in results)
    if failed:
        raise SystemExit(f"{failed} of {n} calls failed; the benchmark needs a clean run")
    return elapsed, cpu, calls() - calls_before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per call")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--in-process", action="store_true", help="run the server in this process")
    args = parser.parse_args()
    setup_logging("WARNING")
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # the openai client's per-request lines

    with fake_server(args.latency, args.in_process) as (base_url, calls), \
            tempfile.TemporaryDirectory() as sequential_cache, \
            tempfile.TemporaryDirectory() as concurrent_cache:
        t_seq, cpu_seq, calls_seq = timed_run(base_url, calls, sequential_cache, 1, args.calls)
        t_par, cpu_par, calls_par = timed_run(base_url, calls, concurrent_cache, args.concurrency,
                                              args.calls)
        t_warm, _, calls_warm = timed_run(base_url, calls, concurrent_cache, args.concurrency,
                                          args.calls)

    ideal = args.calls * args.latency / args.concurrency
    where = "in this process" if args.in_process else "in a child process"
    print(f"{args.calls} calls, {args.latency * 1000:.0f} ms latency each, server {where}")
    # Client CPU close to wall time means the client (GIL, openai request building) is the limit.
    print(f"concurrency 1:  {t_seq:6.2f} s  ({calls_seq} calls, client CPU {cpu_seq:.2f} s)")
    print(f"concurrency {args.concurrency}: {t_par:6.2f} s  ({calls_par} calls, client CPU {cpu_par:.2f} s)")
    print(f"speed-up: {t_seq / t_par:.1f}x (target >= 10x)")
    print(f"fraction of ideal {ideal:.3f} s: {ideal / t_par:.0%} (target >= 70%)")
    print(f"warm-cache re-run: {t_warm:.3f} s, {calls_warm} server calls (must be 0)")


if __name__ == "__main__":
    main()

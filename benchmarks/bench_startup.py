#!/usr/bin/env python
"""How long `n2n` takes to start: `n2n --help`, `n2n --version` and a usage error, against
`python -c pass` (the interpreter alone) and `python -c "import torch"` (what every command paid
before torch was imported lazily).

Runs are interleaved (one of each per round) so a busy machine slows all of them alike; the
median of each is reported with its ratio to `python -c pass`. Writes
``benchmarks/results/startup.json``. Target: under 0.3 s for help, version and usage errors on
a quiet machine.

    python benchmarks/bench_startup.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "startup.json"


def _n2n() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "n2n")
    if not os.path.exists(exe):
        sys.exit(f"error: {exe} not found: install the package (pip install -e .) into this Python first")
    return exe


def cases() -> dict:
    n2n = _n2n()
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "n2n --version": [n2n, "--version"],
        "n2n --help": [n2n, "--help"],
        "n2n widen --help": [n2n, "widen", "--help"],
        "n2n widen --nope (usage error)": [n2n, "widen", "--nope"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    }


def wall(argv: list) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "100"})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    runs = cases()
    for argv in runs.values():  # warm the page cache and the .pyc files
        wall(argv)
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, argv in runs.items():
            times[name].append(wall(argv))
    base = statistics.median(times["python -c pass"])
    report = {
        "rounds": args.rounds,
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "median_s": {name: round(statistics.median(t), 4) for name, t in times.items()},
        "ratio_to_python": {name: round(statistics.median(t) / base, 2) for name, t in times.items()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    width = max(map(len, runs))
    for name in runs:
        print(f"{name:<{width}}  {report['median_s'][name]:.3f} s  ({report['ratio_to_python'][name]:.1f}x python)")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

"""How long the machine keeps a process waiting: round trips to PostgreSQL and Redis, and a 5 ms
sleep's overrun, in a loop, with nothing else of ours running.

Usage: .venv/bin/python bench/stalls.py [--seconds 40]

The latency `bench/pollers.py` measures includes these stalls; on a shared machine they, not
the API's work, can set its p99. PostgreSQL: KMA_DATABASE_URL, else the machine's on
127.0.0.1:5432; Redis: KMA_BROKER_URL, else db 7 of the machine's. Prints the p50, p99 and the
worst of each, with the load average; the last line of stdout is the result as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.db import plain_url
from bench.upload_export import LOCAL_POSTGRES

SLEEP = 0.005


def cpu_times() -> list[int]:
    """The machine's CPU time by kind, in ticks since boot (the `cpu` line of /proc/stat:
    user, nice, system, idle, iowait, irq, softirq, steal, ...); [] where there is none."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            return [int(ticks) for ticks in stat.readline().split()[1:]]
    except OSError:
        return []


def steal_share(before: list[int], after: list[int]) -> float | None:
    """The share of the machine's CPU time between two `cpu_times()` that its hypervisor gave
    to others (steal): time our processes wanted a core and did not get one."""
    if len(before) < 8 or len(after) < 8:
        return None
    total = sum(after[:8]) - sum(before[:8])
    return round((after[7] - before[7]) / total, 3) if total else None


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=40.0)
    args = parser.parse_args(argv)
    database_url = plain_url(os.environ.get("KMA_DATABASE_URL") or LOCAL_POSTGRES)
    broker_url = os.environ.get("KMA_BROKER_URL") or "redis://127.0.0.1:6379/7"
    samples: dict[str, list[float]] = {"postgresql": [], "redis": [], "sleep_overrun": []}
    worst_at: dict[str, tuple[float, str]] = {name: (0.0, "") for name in samples}
    load_before = os.getloadavg()
    ticks_before = cpu_times()
    with psycopg.connect(database_url, autocommit=True) as database:
        broker = redis.Redis.from_url(broker_url)
        until = time.monotonic() + args.seconds
        while time.monotonic() < until:
            started = time.perf_counter()
            database.execute("SELECT 1").fetchall()
            queried = time.perf_counter()
            broker.ping()
            pinged = time.perf_counter()
            time.sleep(SLEEP)
            slept = time.perf_counter()
            now = datetime.now(UTC).strftime("%H:%M:%S.%f")[:12]
            for name, seconds in (
                ("postgresql", queried - started),
                ("redis", pinged - queried),
                ("sleep_overrun", slept - pinged - SLEEP),
            ):
                samples[name].append(seconds)
                if seconds > worst_at[name][0]:
                    worst_at[name] = (seconds, now)
    load_after = os.getloadavg()
    steal = steal_share(ticks_before, cpu_times())
    result = {
        name: {
            "p50_ms": round(percentile(values, 50) * 1000, 2),
            "p99_ms": round(percentile(values, 99) * 1000, 1),
            "max_ms": round(worst_at[name][0] * 1000, 1),
            "max_at_utc": worst_at[name][1],
        }
        for name, values in samples.items()
    }
    for name, figures in result.items():
        print(f"{name:<14} p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms, "
              f"max {figures['max_ms']} ms at {figures['max_at_utc']}")  # fmt: skip
    print(f"load average   {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(f"CPU stolen     {steal if steal is None else f'{steal:.0%}'} (by the hypervisor)")
    summary = {
        **result,
        "rounds": len(samples["redis"]),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "steal_share": steal,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

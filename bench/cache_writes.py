"""The generation cache's writes and reads alone: CPU per row, the worker's and the database's.

Usage: .venv/bin/python bench/cache_writes.py [--rows 5120] [--repeats 8]

On a scratch database of the machine's PostgreSQL (created migrated, dropped at the end), writes
`--rows` cache rows a time, `--repeats` times, the way a chunk of 256 examples in full mode with
the default config makes them (half greedy rows of one answer, half rows of 16 samples), once
with `INSERT ... ON CONFLICT` over one JSON parameter (`PUT_GENERATIONS`, how every write went
before COPY, and still the fallback when a key is taken) and once with `SqlGenerationStore.put_many`
(COPY); then reads them back with `get_many`, half of the keys found. Per row it reports the CPU
time of this process (the worker's share) and of the database backend serving it (read from
/proc, so PostgreSQL must run on this machine), and the wall time. The last line of stdout is the
result as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.audit.repository import PUT_GENERATIONS, SqlGenerationStore  # noqa: E402
from app.db import make_engine, migrate  # noqa: E402
from bench.upload_export import LOCAL_POSTGRES, database_url_in  # noqa: E402

Rows = Mapping[bytes, list[str]]


def rows(tag: str, count: int) -> dict[bytes, list[str]]:
    return {
        hashlib.sha256(f"{tag}/{i}".encode()).digest(): [" forty-two"] * (16 if i % 2 else 1)
        for i in range(count)
    }


def backend_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    name: str, action: Callable[[int], object], backend: int, count: int, repeats: int
) -> dict[str, float | str]:
    client = wall = 0.0
    server = backend_cpu(backend)
    for repeat in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        action(repeat)
        client += time.process_time() - started_cpu
        wall += time.perf_counter() - started
    total = count * repeats
    result: dict[str, float | str] = {
        "statement": name,
        "client_us_per_row": round(client / total * 1e6, 2),
        "server_us_per_row": round((backend_cpu(backend) - server) / total * 1e6, 2),
        "wall_us_per_row": round(wall / total * 1e6, 2),
    }
    print(
        f"{name:<28} worker {result['client_us_per_row']:>6} us/row, "
        f"database {result['server_us_per_row']:>6} us/row, wall {result['wall_us_per_row']:>6}",
        file=sys.stderr,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=5120, help="rows per write")
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args(argv)
    name = f"kma_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(LOCAL_POSTGRES, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    results = []
    try:
        url = database_url_in(LOCAL_POSTGRES, name)
        migrate(url)
        engine = make_engine(url)
        with engine.connect() as connection:
            connection = connection.execution_options(isolation_level="AUTOCOMMIT")
            store = SqlGenerationStore(connection)
            raw = store.connection
            backend = raw.info.backend_pid
            count, repeats = args.rows, args.repeats

            def insert(repeat: int) -> None:
                items = rows(f"insert/{repeat}", count)
                payload = json.dumps([(k.hex(), t) for k, t in items.items()], ensure_ascii=False)
                raw.execute(PUT_GENERATIONS, ("model", payload))

            def copy(repeat: int) -> None:
                store.put_many("model", rows(f"copy/{repeat}", count))

            def read(repeat: int) -> None:
                found = list(rows(f"copy/{repeat}", count))[::2]
                missing = list(rows(f"missing/{repeat}", count // 2))
                assert len(store.get_many(found + missing)) == len(found)

            results.append(measure("INSERT ... ON CONFLICT", insert, backend, count, repeats))
            results.append(measure("COPY (put_many)", copy, backend, count, repeats))
            results.append(measure("get_many (half found)", read, backend, count, repeats))
        engine.dispose()
    finally:
        with psycopg.connect(LOCAL_POSTGRES, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    load = os.getloadavg()
    print(json.dumps({"rows": args.rows, "repeats": args.repeats, "load": load, "runs": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

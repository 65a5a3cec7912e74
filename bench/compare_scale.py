"""Compare two students on a 1,000,000-example dataset through a real `kma api` process, and
measure its memory: the transition table, a page of examples side by side, an export.

Usage: .venv/bin/python bench/compare_scale.py [--examples 1000000] [--keep]

The dataset and two succeeded jobs with a verdict for every example are written straight into
PostgreSQL (generate_series): job A puts example i in category i mod 4, job B in (i div 3)
mod 4, so every cell of the transition table is known in advance and checked. Then, through the
API: `GET /v1/comparisons` (the table, counted in SQL), the first page of `GET
/v1/comparisons/examples?known_by=A&unknown_by=B`, `GET /v1/comparisons/export` with the same
filter (streamed, every line counted) and the page. PostgreSQL: KMA_DATABASE_URL when set, else
a fresh `kma_bench_*` database on the machine's PostgreSQL (dropped at the end), else an
embedded one. Redis: KMA_BROKER_URL, else db 10 of the machine's, else an embedded one (no
worker runs). The last line of stdout is the result as JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.audit.schemas import AuditConfig, Category  # noqa: E402
from bench.upload_export import (  # noqa: E402
    MB,
    STUDENT,
    MemorySampler,
    api_key,
    api_process,
    broker,
    database,
    machine,
    run_in_work_dir,
)

CATEGORIES = [c.value for c in Category]
REDIS_DB = 10


def category_a(i: int) -> str:
    return CATEGORIES[i % 4]


def category_b(i: int) -> str:
    return CATEGORIES[(i // 3) % 4]


def insert(database_url: str, examples: int) -> tuple[str, str]:
    """The dataset and the two succeeded jobs, in the default workspace; the jobs' ids."""
    config = AuditConfig().model_dump_json()
    audit = (
        "json_build_object('category', {category}, 'flagged', {category} = 'Unknown', "
        "'p_greedy', 0.0, 'p_sample', 0.0, 'student_answer', 'Answer ' || i, "
        "'agreement', 1.0, 'suggested_action', 'keep', 'suggested_answer', null, "
        "'generations', 10)::jsonb"
    )
    categories = "(ARRAY['HighlyKnown', 'MaybeKnown', 'WeaklyKnown', 'Unknown'])"
    by_job = {"a": f"{categories}[1 + i %% 4]", "b": f"{categories}[1 + (i / 3) %% 4]"}
    dataset_id = uuid.uuid4()
    jobs = {name: uuid.uuid4() for name in by_job}
    with psycopg.connect(database_url) as conn:
        (workspace_id,) = conn.execute(
            "SELECT id FROM workspace WHERE name = 'default'"
        ).fetchone() or (None,)
        conn.execute(
            "INSERT INTO dataset (id, workspace_id, name, format, num_examples, created_at) "
            "VALUES (%s, %s, 'bench comparison', 'qa', %s, now())",
            (dataset_id, workspace_id, examples),
        )
        conn.execute(
            "INSERT INTO example (dataset_id, position, line, record_id, raw) "
            "SELECT %s, i, i + 1, 'q' || i, json_build_object('id', 'q' || i, "
            "'question', 'What is fact ' || i || '?', 'answer', 'Answer ' || i) "
            "FROM generate_series(0, %s - 1) AS i",
            (dataset_id, examples),
        )
        for name, category in by_job.items():
            conn.execute(
                "INSERT INTO job (id, workspace_id, dataset_id, status, student, config, total, "
                "created_at, started_at, finished_at) VALUES (%s, %s, %s, 'succeeded', %s, %s, "
                "%s, now(), now(), now())",
                (
                    jobs[name],
                    workspace_id,
                    dataset_id,
                    f'{{"name": "{STUDENT}", "engine": "hf", "model": "student-{name}"}}',
                    config,
                    examples,
                ),
            )
            conn.execute(
                "INSERT INTO verdict (job_id, position, category, flagged, conflict, audit, "
                f"answers) SELECT %s, i, {category}, {category} = 'Unknown', false, "
                f"{audit.format(category=category)}, '{{}}'::jsonb "
                "FROM generate_series(0, %s - 1) AS i",
                (jobs[name], examples),
            )
        conn.execute("ANALYZE example")
        conn.execute("ANALYZE verdict")
    return str(jobs["a"]), str(jobs["b"])


@dataclass
class Result:
    examples: int
    insert_s: float
    comparison_s: float
    examples_page_s: float
    export_s: float
    export_lines: int
    export_rows_per_s: float
    page_s: float
    api_baseline_rss_mb: float
    api_peak_rss_mb_polled: dict[str, float]
    api_vm_hwm_mb: float
    database: str
    broker: str
    machine: dict[str, Any] = field(default_factory=dict)


def timed(client: httpx.Client, path: str, params: dict[str, Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    response = client.get(path, params=params)
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"{path} answered {response.status_code}: {response.text[:2000]}")
    return response, seconds


def run(examples: int, work_dir: Path, keep: bool) -> Result:
    with ExitStack() as stack:
        database_url, database_source = stack.enter_context(database(work_dir, keep))
        broker_url, broker_source = stack.enter_context(broker(work_dir, REDIS_DB))
        print(f"database: {database_source}; broker: {broker_source}", file=sys.stderr)
        headers = {"Authorization": f"Bearer {api_key(database_url)}"}
        started = time.perf_counter()
        a, b = insert(database_url, examples)
        insert_s = time.perf_counter() - started
        print(f"inserted {examples:,} examples and 2 jobs in {insert_s:.1f} s", file=sys.stderr)
        server, base_url = stack.enter_context(
            api_process(database_url, broker_url, work_dir / "api.log")
        )
        sampler = stack.enter_context(MemorySampler(server.pid))
        baseline = sampler.rss()
        client = stack.enter_context(httpx.Client(base_url=base_url, timeout=None, headers=headers))
        jobs = {"jobs": f"{a},{b}"}
        gap = {**jobs, "known_by": a, "unknown_by": b}

        sampler.phase = "comparison"
        response, comparison_s = timed(client, "/v1/comparisons", jobs)
        expected = Counter((category_a(i), category_b(i)) for i in range(examples))
        counts = response.json()["transitions"][0]["counts"]
        if {(x, y): n for x, row in counts.items() for y, n in row.items() if n} != expected:
            raise RuntimeError(f"the transition table is wrong: {counts}")
        print(f"comparison: {comparison_s:.1f} s", file=sys.stderr)

        sampler.phase = "examples"
        response, examples_page_s = timed(client, "/v1/comparisons/examples", {**gap, "limit": 200})
        if len(response.json()["items"]) != 200:
            raise RuntimeError("the first page of examples is not full")

        sampler.phase = "export"
        lines = 0
        started = time.perf_counter()
        with client.stream("GET", "/v1/comparisons/export", params=gap) as streamed:
            announced = int(streamed.headers["X-Kma-Record-Count"])
            for chunk in streamed.iter_bytes():
                lines += chunk.count(b"\n")
        export_s = time.perf_counter() - started
        wanted = sum(category_a(i) != "Unknown" and category_b(i) == "Unknown"
                     for i in range(examples))  # fmt: skip
        if not lines == announced == wanted:
            raise RuntimeError(f"export: {lines} lines, {announced} announced, {wanted} wanted")
        print(f"export: {lines:,} lines in {export_s:.1f} s", file=sys.stderr)

        sampler.phase = "page"
        _, page_s = timed(client, "/v1/comparisons/report.html", jobs)
        time.sleep(0.2)
        return Result(
            examples=examples,
            insert_s=insert_s,
            comparison_s=comparison_s,
            examples_page_s=examples_page_s,
            export_s=export_s,
            export_lines=lines,
            export_rows_per_s=lines / export_s,
            page_s=page_s,
            api_baseline_rss_mb=baseline / MB,
            api_peak_rss_mb_polled={k: v / MB for k, v in sampler.peaks.items()},
            api_vm_hwm_mb=sampler.vm_hwm() / MB,
            database=database_source,
            broker=broker_source,
            machine=machine(database_url),
        )


def table(result: Result) -> str:
    polled = ", ".join(f"{k} {v:.0f}" for k, v in result.api_peak_rss_mb_polled.items())
    rows = [
        ("examples", f"{result.examples:,}"),
        ("GET /v1/comparisons", f"{result.comparison_s:.2f} s"),
        ("first page of examples", f"{result.examples_page_s:.2f} s"),
        ("export (known by A, not B)", f"{result.export_lines:,} lines in {result.export_s:.1f} "
         f"s, {result.export_rows_per_s:,.0f} rows/s"),
        ("page", f"{result.page_s:.2f} s"),
        ("API RSS after start-up", f"{result.api_baseline_rss_mb:.0f} MB"),
        ("API peak RSS, polled", f"{polled} (MB)"),
        ("API VmHWM at end", f"{result.api_vm_hwm_mb:.0f} MB"),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--examples", type=int, default=1_000_000)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir and the database")
    args = parser.parse_args(argv)
    if args.examples < 12:
        parser.error("--examples must be at least 12")
    return run_in_work_dir(
        lambda work_dir: run(args.examples, work_dir, args.keep), table, args.keep, ["api.log"]
    )


if __name__ == "__main__":
    sys.exit(main())

"""Audit throughput per engine and mode: examples/s, generations/s, and adaptive's savings.

    .venv/bin/python bench/audit_throughput.py                     # tiny student, hf and vllm
    .venv/bin/python bench/audit_throughput.py --engines vllm --student Qwen/Qwen2.5-0.5B \\
        --dataset ../shared/data/entityquestions/test.jsonl --limit 2000   # on a GPU

Each engine is loaded once, then audits the dataset in adaptive and in full mode (no cache), in
one process. Prints a table and, as the last line, the results as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.audit.schemas import AuditConfig  # noqa: E402
from app.students.schemas import Student  # noqa: E402
from kma.tiny_student import ensure_student, write_dataset  # noqa: E402
from workers.engines import load_engine  # noqa: E402
from workers.local_audit import audit_file, read_dataset  # noqa: E402
from workers.runner import TimedEngine  # noqa: E402


def device() -> str:
    import torch

    if torch.cuda.is_available():
        return str(torch.cuda.get_device_name(0))
    return f"CPU ({platform.processor() or platform.machine()})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--engines", default="hf,vllm", help="comma-separated")
    parser.add_argument("--student", help="model (default: the tiny student)")
    parser.add_argument("--dataset", help="JSONL (default: 60 known + 40 unseen tiny facts)")
    parser.add_argument("--limit", type=int, help="audit only the first N records")
    parser.add_argument("--modes", default="adaptive,full")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kma-bench-"))
    student = args.student or str(ensure_student(REPO / ".cache" / "tiny-student"))
    dataset = Path(args.dataset) if args.dataset else work / "teacher.jsonl"
    if not args.dataset:
        write_dataset(dataset, n_trained=60, n_unseen=40)
    records = read_dataset(dataset)[: args.limit]

    results: list[dict[str, Any]] = []
    for engine_name in args.engines.split(","):
        started = time.perf_counter()
        loaded = load_engine(engine_name, student)
        load_s = time.perf_counter() - started
        try:
            for mode in args.modes.split(","):
                engine = TimedEngine(loaded)
                started = time.perf_counter()
                report = audit_file(
                    records,
                    engine,
                    AuditConfig(mode=mode),
                    work / f"{engine_name}-{mode}",
                    student=Student(name=student, engine=engine_name, model=student),
                    chunk_size=len(records),
                )
                seconds = time.perf_counter() - started
                results.append(
                    {
                        "engine": engine_name,
                        "mode": mode,
                        "examples": len(records),
                        "generations": report.generations,
                        "engine_calls": engine.calls,
                        "engine_s": round(engine.seconds, 2),
                        "seconds": round(seconds, 2),
                        "examples_per_s": round(len(records) / seconds, 1),
                        "generations_per_s": round(report.generations / seconds, 1),
                        "load_s": round(load_s, 1),
                        "categories": {str(k): v for k, v in report.categories.items() if v},
                    }
                )
        finally:
            loaded.close()

    print(f"\nstudent {student}, {len(records)} examples, on {device()}")
    print(f"{'engine':<7} {'mode':<9} {'gens':>7} {'calls':>5} {'s':>7} {'ex/s':>7} {'gen/s':>8}")
    for r in results:
        print(
            f"{r['engine']:<7} {r['mode']:<9} {r['generations']:>7} {r['engine_calls']:>5} "
            f"{r['seconds']:>7} {r['examples_per_s']:>7} {r['generations_per_s']:>8}"
        )
    print(json.dumps({"device": device(), "student": student, "results": results}))


if __name__ == "__main__":
    main()

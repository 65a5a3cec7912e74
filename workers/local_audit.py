"""`kma audit`: one dataset, audited in this process, written to a folder. No server needed."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from app.audit.domain import draw_exemplar_sets, export_record, find_conflicts, summarize
from app.audit.schemas import AuditConfig, Report
from app.datasets.domain import AUTO, Record, load_records
from app.students.schemas import Student
from workers.engines.base import Engine
from workers.runner import RunStats, audit_batch

OUTPUT_FILES = ("annotated.jsonl", "filtered.jsonl", "report.json", "conflicts.jsonl")


def read_dataset(path: Path, record_format: str = AUTO) -> list[Record]:
    """Every record of the file, each with its format; raises DatasetError naming each bad line."""
    with path.open("rb") as f:
        return load_records(iter(lambda: f.read(1 << 20), b""), record_format)


def audit_file(
    records: list[Record],
    engine: Engine,
    config: AuditConfig,
    out_dir: Path,
    *,
    student: Student,
    chunk_size: int = 512,
    on_progress: Callable[[int], None] = lambda done: None,
) -> Report:
    """Audit every record and write the four output files (OUTPUT_FILES); returns the report.

    The files appear only once all of them are complete: they are written into a temporary
    folder beside `out_dir` and moved in at the end.
    """
    started = time.monotonic()
    examples = [r.example for r in records]
    sets = draw_exemplar_sets(examples, config)
    verdicts = []
    stats = RunStats()
    for start in range(0, len(examples), chunk_size):
        batch = audit_batch(examples[start : start + chunk_size], sets, engine, config)
        verdicts.extend(batch.verdicts)
        stats.add(batch.stats)
        on_progress(len(batch.verdicts))

    report = Report(
        **summarize(examples, verdicts).model_dump(),
        partial=False,
        total=len(records),
        generations=stats.greedy_generations + stats.sampled_generations,
        generations_cached=0,
        mode=config.mode,
        student=student,
        config=config,
        seconds=round(time.monotonic() - started, 3),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".kma-", dir=out_dir))
    try:
        with (
            (staging / "annotated.jsonl").open("w") as ann,
            (staging / "filtered.jsonl").open("w") as filt,
        ):
            for record, verdict in zip(records, verdicts, strict=True):
                annotated = export_record(
                    record.raw, verdict.audit, "annotate", config.idk_text, record.format
                )
                ann.write(json.dumps(annotated, ensure_ascii=False) + "\n")
                kept = export_record(
                    record.raw, verdict.audit, "suggested", config.idk_text, record.format
                )
                if kept is not None:
                    filt.write(json.dumps(kept, ensure_ascii=False) + "\n")
        (staging / "report.json").write_text(report.model_dump_json(indent=2) + "\n")
        with (staging / "conflicts.jsonl").open("w") as conflicts:
            for conflict in find_conflicts(examples, verdicts):
                conflicts.write(conflict.model_dump_json() + "\n")
        for name in OUTPUT_FILES:
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report

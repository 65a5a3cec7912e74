"""`kma audit`: audit one dataset in this process, no server."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.audit.schemas import AuditConfig
from app.datasets.domain import AUTO, RECORD_FORMATS, DatasetError
from app.students.schemas import ENGINE_NAMES, RegisteredStudent, Student
from kma.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    format_categories,
    format_validation_error,
    parse_options,
)


def cmd_audit(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from workers.engines import load_student, resolve_engine_name
    from workers.local_audit import OUTPUT_FILES, audit_file, read_dataset

    try:
        config = AuditConfig(**parse_options(args.config))
    except ValueError as exc:  # ValidationError is a ValueError
        message = format_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
        print(f"kma audit: invalid --config:\n  {message}", file=sys.stderr)
        return EXIT_USAGE
    try:
        records = read_dataset(Path(args.file), args.format)
    except OSError as exc:
        print(f"kma audit: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    except DatasetError as exc:
        print(f"kma audit: {args.file}: {exc}", file=sys.stderr)
        return EXIT_USAGE

    engine_name = resolve_engine_name(args.engine)
    try:
        # Checked as the registry checks a student: here the user names the model and server.
        local = RegisteredStudent.model_validate(
            {
                "engine": engine_name,
                "model": args.student,
                "revision": args.revision,
                "base_url": args.base_url,
                "api_key_env": args.api_key_env,
            }
        )
    except ValidationError as exc:
        print(f"kma audit: invalid student:\n  {format_validation_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    student = Student(
        name=args.student, engine=engine_name, model=args.student, revision=args.revision
    )
    print(f"loading {args.student} on the {engine_name} engine", file=sys.stderr)
    try:
        engine = load_student(local)
    except ValueError as exc:  # the key's variable is not set
        print(f"kma audit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with tqdm(total=len(records), unit="ex", desc="auditing", file=sys.stderr) as bar:
            report = audit_file(
                records,
                engine,
                config,
                Path(args.out),
                student=student,
                chunk_size=args.chunk_size,
                on_progress=bar.update,
            )
    finally:
        engine.close()
    print(format_categories(report), file=sys.stderr)
    print(f"wrote {', '.join(OUTPUT_FILES)} into {args.out}", file=sys.stderr)
    return EXIT_OK


def add_audit_command(commands: Any) -> None:
    audit = commands.add_parser(
        "audit",
        help="audit one dataset locally, no server",
        description="Audit a teacher dataset against a student in this process. Writes "
        "annotated.jsonl, filtered.jsonl, report.json and conflicts.jsonl into --out.",
    )
    audit.add_argument("file", help="teacher dataset, JSONL")
    audit.add_argument(
        "--format",
        choices=[AUTO, *RECORD_FORMATS],
        default=AUTO,
        help="record format (default: auto, the first record's format, expected on every line);"
        " the outputs are written in the same format",
    )
    audit.add_argument("--student", required=True, help="model name or Hugging Face folder")
    audit.add_argument("--revision", help="model revision")
    audit.add_argument("--engine", choices=ENGINE_NAMES, default="auto")
    audit.add_argument(
        "--base-url",
        help="the OpenAI-compatible server of --engine openai, e.g. http://host:8000/v1",
    )
    audit.add_argument(
        "--api-key-env",
        metavar="NAME",
        help="the environment variable holding the --base-url server's key (default: no key)",
    )
    audit.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method option, e.g. samples=8 or mode=full (repeatable)",
    )
    audit.add_argument("--out", required=True, help="folder for the three output files")
    audit.add_argument("--chunk-size", type=int, default=512, help="examples per batch")
    audit.set_defaults(run=cmd_audit)

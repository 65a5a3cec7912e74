"""The `kma` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.audit.schemas import AuditConfig
from app.datasets.domain import DatasetError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs as a dict; values are read as JSON when they parse, else as text."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--config takes key=value, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def format_validation_error(exc: ValidationError) -> str:
    return "\n  ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()
    )


def cmd_audit(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from workers.engines import load_engine, resolve_engine_name
    from workers.local_audit import audit_file, read_dataset

    try:
        config = AuditConfig(**parse_options(args.config))
    except ValueError as exc:  # ValidationError is a ValueError
        message = format_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
        print(f"kma audit: invalid --config:\n  {message}", file=sys.stderr)
        return EXIT_USAGE
    try:
        records = read_dataset(Path(args.file))
    except OSError as exc:
        print(f"kma audit: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    except DatasetError as exc:
        print(f"kma audit: {args.file}: {exc}", file=sys.stderr)
        return EXIT_USAGE

    engine_name = resolve_engine_name(args.engine)
    print(f"loading {args.student} on the {engine_name} engine", file=sys.stderr)
    engine = load_engine(engine_name, args.student, revision=args.revision)
    with tqdm(total=len(records), unit="ex", desc="auditing", file=sys.stderr) as bar:
        report = audit_file(
            records,
            engine,
            config,
            Path(args.out),
            engine_name=engine_name,
            chunk_size=args.chunk_size,
            on_progress=bar.update,
        )
    print(format_categories(report), file=sys.stderr)
    print(f"wrote {args.out}/annotated.jsonl, filtered.jsonl, report.json", file=sys.stderr)
    return EXIT_OK


def format_categories(report: dict[str, Any]) -> str:
    total = report["num_examples"] or 1
    rows = [f"{'category':<12} {'examples':>9} {'share':>7}"]
    for name, count in report["categories"].items():
        rows.append(f"{name:<12} {count:>9} {count / total:>7.1%}")
    rows.append(f"{'flagged':<12} {report['flagged']:>9} {report['flagged'] / total:>7.1%}")
    rows.append(f"conflicts (student consistent, teacher different): {len(report['conflicts'])}")
    rows.append(f"generations: {report['generations']}")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kma", description="Knowledge-mismatch audit for distillation datasets."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    audit = commands.add_parser(
        "audit",
        help="audit one dataset locally, no server",
        description="Audit a teacher dataset against a student in this process. Writes "
        "annotated.jsonl, filtered.jsonl and report.json into --out.",
    )
    audit.add_argument("file", help="teacher dataset, JSONL")
    audit.add_argument("--student", required=True, help="model name or Hugging Face folder")
    audit.add_argument("--revision", help="model revision")
    audit.add_argument("--engine", choices=["auto", "hf", "vllm"], default="auto")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())

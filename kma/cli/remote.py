"""`kma submit`, `kma rescore`, `kma status`, `kma review`, `kma download`, `kma compare`: the
command line of a running kma server.

Exit codes a pipeline can rely on:
  0  done: submitted or rescored (or estimated, with --dry-run), or (with --wait) the job
     succeeded; the decisions stored; the file downloaded; the jobs compared
  1  the job failed
  2  the input was refused (invalid dataset, options or decisions, a student not registered on
     the server), or a usage error
  3  the job was cancelled
  4  the server could not be reached, or answered an error (e.g. no such job), or a download
     arrived incomplete (connection broken, fewer records than announced): no file is written
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx

from app.audit.domain import EXPORT_POLICIES
from app.audit.schemas import JUDGING_OPTIONS
from app.comparisons.domain import label
from app.exports.domain import EXPORT_FORMATS
from app.reviews.domain import UNREVIEWED
from kma.cli.common import (
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_SERVER,
    EXIT_USAGE,
    format_comparison,
    format_estimate,
    parse_options,
)
from kma.client import Client, IncompleteExport, KmaError

EXIT_BY_STATUS = {"succeeded": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}


def describe_error(exc: KmaError) -> str:
    detail = exc.detail
    if isinstance(detail, dict) and "errors" in detail:
        lines = [str(detail.get("message", "invalid dataset"))]
        for error in detail["errors"]:
            field = f", field '{error['field']}'" if error.get("field") else ""
            lines.append(f"  line {error['line']}{field}: {error['message']}")
        if detail.get("more_errors"):
            lines.append(f"  ... and {detail['more_errors']} more")
        return "\n".join(lines)
    if isinstance(detail, list):  # FastAPI's validation errors
        return "\n".join(
            f"  {'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg')}" for e in detail
        )
    return str(detail)


def follow(client: Client, job: dict[str, Any], poll_seconds: float = 1.0) -> dict[str, Any]:
    """Poll the job to its end with a progress bar (examples done, ETA, categories) on stderr."""
    from tqdm import tqdm

    with tqdm(
        total=job["progress"]["total"], unit="ex", desc=job["status"], file=sys.stderr
    ) as bar:

        def show(state: dict[str, Any]) -> None:
            progress = state["progress"]
            counts = {k: v for k, v in progress["categories"].items() if v}
            eta = state.get("eta_seconds")
            bar.set_description(state["status"], refresh=False)
            bar.set_postfix(counts | ({"eta": f"{eta:.0f}s"} if eta is not None else {}), False)
            bar.update(progress["done"] - bar.n)
            bar.refresh()

        return client.wait(job["id"], poll_seconds=poll_seconds, on_progress=show)


def finished(job: dict[str, Any]) -> int:
    status = job["status"]
    print(f"job {job['id']} {status}", file=sys.stderr)
    if job.get("error"):
        print(f"  {job['error']}", file=sys.stderr)
    return EXIT_BY_STATUS[status]


def cmd_submit(args: argparse.Namespace) -> int:
    client = Client(args.server)
    config = parse_options(args.config)
    dataset = client.upload_dataset(args.file, format=args.format, name=args.name)
    print(
        f"uploaded {dataset['num_examples']} examples ({dataset['format']}) "
        f"as dataset {dataset['id']}",
        file=sys.stderr,
    )
    if args.dry_run:
        try:
            estimate = client.estimate(
                dataset["id"], args.student, config=config, webhook_url=args.webhook_url
            )
        finally:
            client.delete_dataset(dataset["id"])
        print("dry run: nothing was submitted, and the upload is deleted", file=sys.stderr)
        print(format_estimate(estimate))
        return EXIT_OK
    job = client.create_job(
        dataset["id"], args.student, config=config, webhook_url=args.webhook_url
    )
    print(job["id"])  # stdout: for JOB=$(kma submit ...)
    sys.stdout.flush()
    if not args.wait:
        return EXIT_OK
    return finished(follow(client, job))


def cmd_rescore(args: argparse.Namespace) -> int:
    client = Client(args.server)
    job = client.rescore(
        args.job_id, config=parse_options(args.config), webhook_url=args.webhook_url
    )
    print(f"job {job['id']} rescores job {args.job_id}", file=sys.stderr)
    print(job["id"])  # stdout: for JOB=$(kma rescore ...)
    sys.stdout.flush()
    if not args.wait:
        return EXIT_OK
    job = follow(client, job)
    generations = job["generations"]
    print(
        f"  generations: {generations['new']} new, {generations['cached']} from the stored "
        f"answers; reviews carried: {job['reviews_carried']}, not carried: "
        f"{job['reviews_not_carried']}",
        file=sys.stderr,
    )
    return finished(job)


def cmd_status(args: argparse.Namespace) -> int:
    client = Client(args.server)
    job = client.get_job(args.job_id)
    if args.wait and job["status"] not in EXIT_BY_STATUS:
        job = follow(client, job)
    print(json.dumps(job, indent=2))
    return EXIT_BY_STATUS.get(job["status"], EXIT_OK)


def cmd_download(args: argparse.Namespace) -> int:
    client = Client(args.server)
    out = Path(args.output or f"{args.job_id}.{args.policy}{DOWNLOAD_SUFFIXES[args.format]}")
    records = client.download(
        args.job_id, out, policy=args.policy, format=args.format, unreviewed=args.unreviewed
    )
    print(f"wrote {records} records to {out}", file=sys.stderr)
    return EXIT_OK


DOWNLOAD_SUFFIXES = {"jsonl": ".jsonl", "parquet": ".parquet", "hf": ".hf"}
"""What `kma download` names its output by default; `hf` is a folder."""


class UsageError(ValueError):
    """Arguments that do not fit together."""


def cmd_review(args: argparse.Namespace) -> int:
    client = Client(args.server)
    decision = "override" if args.answer is not None else args.decision
    if args.from_file is not None:
        if args.position is not None or decision is not None:
            raise UsageError("give a POSITION and a decision, or --from FILE, not both")
        items, lines = read_decisions(args.from_file)
        try:
            result = client.review_many(args.job_id, items)
        except KmaError as exc:
            raise KmaError(exc.status, by_line(exc.detail, lines)) from exc
        reviews = result["reviews"]
        print(
            f"stored {result['updated']} decisions; {reviews['reviewed']} flagged examples "
            f"reviewed, {reviews['unreviewed']} to go",
            file=sys.stderr,
        )
        print(json.dumps(result, indent=2))
        return EXIT_OK
    if args.position is None or decision is None:
        raise UsageError("give a POSITION and one of --accept, --reject, --override ANSWER")
    example = client.review(
        args.job_id, args.position, decision, answer=args.answer, note=args.note
    )
    print(json.dumps(example, indent=2))
    return EXIT_OK


def read_decisions(path: str) -> tuple[list[dict[str, Any]], list[int]]:
    """The decisions of a JSONL file (`-`: standard input), one object a line, and the line
    each came from."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    items, lines = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}, line {number}: not valid JSON: {exc.msg}") from None
        if not isinstance(item, dict):
            raise UsageError(f"{path}, line {number}: must be a JSON object")
        items.append(item)
        lines.append(number)
    if not items:
        raise UsageError(f"{path} holds no decisions")
    return items, lines


def by_line(detail: Any, lines: list[int]) -> Any:
    """The server's errors on `items[i]` said of the file's lines instead."""
    if not isinstance(detail, list):
        return detail
    said = []
    for error in detail:
        loc = list(error.get("loc", []))
        if loc[:2] == ["body", "items"] and len(loc) > 2 and isinstance(loc[2], int):
            field = ".".join(str(step) for step in loc[3:])
            loc = [f"line {lines[loc[2]]}" + (f", field '{field}'" if field else "")]
        said.append({**error, "loc": loc})
    return said


def cmd_compare(args: argparse.Namespace) -> int:
    client = Client(args.server)
    job_ids: list[str] = args.job_ids
    letters = {label(i): job_id for i, job_id in enumerate(job_ids)}

    def job(named: str) -> str:
        """A job of the comparison, by its id or its letter (A for the first, ...)."""
        return letters.get(named.upper(), named)

    known_by = [job(named) for named in args.known_by]
    unknown_by = [job(named) for named in args.unknown_by]
    categories = []
    for value in args.category:
        named, _, names = value.partition(":")
        categories.append(f"{job(named)}:{names}")
    if (known_by or unknown_by or categories or args.disagree) and not args.output:
        print("kma compare: the filters choose what --output writes; name it", file=sys.stderr)
        return EXIT_USAGE
    comparison = client.compare(job_ids)
    print(format_comparison(comparison))
    print(f"\npage: {args.server.rstrip('/')}{comparison.links.report_html}")
    if args.output:
        lines = client.download_comparison(
            job_ids,
            args.output,
            known_by=known_by,
            unknown_by=unknown_by,
            categories=categories,
            disagree=args.disagree,
        )
        print(f"wrote {lines} records to {args.output}", file=sys.stderr)
    return EXIT_OK


def run(command: Any, args: argparse.Namespace) -> int:
    """Run a client command, turning what can go wrong into a message and an exit code."""
    try:
        code: int = command(args)
        return code
    except IncompleteExport as exc:
        print(f"kma {args.command}: {exc}", file=sys.stderr)
        return EXIT_SERVER
    except KmaError as exc:
        print(f"kma {args.command}: the server answered {exc.status}:", file=sys.stderr)
        print(describe_error(exc), file=sys.stderr)
        return EXIT_REFUSED if exc.status == 422 else EXIT_SERVER
    except httpx.HTTPError as exc:
        print(f"kma {args.command}: cannot reach {args.server}: {exc}", file=sys.stderr)
        return EXIT_SERVER
    except ValueError as exc:  # a bad --config pair
        print(f"kma {args.command}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except OSError as exc:
        print(f"kma {args.command}: {exc}", file=sys.stderr)
        return EXIT_REFUSED


def add_remote_commands(commands: Any) -> None:
    """The subcommands that talk to a server, with their options."""
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument(
        "--server",
        default=os.environ.get("KMA_SERVER_URL", "http://127.0.0.1:8000"),
        help="the kma server (default: $KMA_SERVER_URL or http://127.0.0.1:8000)",
    )
    epilog = __doc__.split("\n\n", 1)[1] if __doc__ else None

    def add(name: str, command: Any, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = commands.add_parser(
            name,
            parents=[server],
            help=help,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.set_defaults(run=lambda args: run(command, args))
        return parser

    submit = add("submit", cmd_submit, "upload a dataset and start an audit on a server")
    submit.add_argument("file", help="teacher dataset, JSONL")
    submit.add_argument(
        "--student",
        required=True,
        help="the name of a student registered on the server (GET /v1/students)",
    )
    submit.add_argument("--format", default="auto", help="auto, qa, messages, alpaca, sharegpt")
    submit.add_argument("--name", help="dataset name (default: the file name)")
    submit.add_argument("--config", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--webhook-url", help="POSTed the job's JSON when it ends")
    follow_or_estimate = submit.add_mutually_exclusive_group()
    follow_or_estimate.add_argument("--wait", action="store_true", help="follow the job to its end")
    follow_or_estimate.add_argument(
        "--dry-run",
        action="store_true",
        help="print what the job would take (generations, cache hits, time) and submit "
        "nothing; the upload is deleted",
    )

    rescore = add(
        "rescore",
        cmd_rescore,
        "judge a succeeded job's stored answers again with other judging options",
    )
    rescore.add_argument("job_id")
    rescore.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"any of {', '.join(JUDGING_OPTIONS)}; those left out keep the job's",
    )
    rescore.add_argument("--webhook-url", help="POSTed the new job's JSON when it ends")
    rescore.add_argument("--wait", action="store_true", help="follow the new job to its end")

    status = add("status", cmd_status, "a job's state as JSON")
    status.add_argument("job_id")
    status.add_argument("--wait", action="store_true", help="follow the job to its end first")

    review = add("review", cmd_review, "accept, reject or override flagged examples' relabels")
    review.add_argument("job_id")
    review.add_argument("position", nargs="?", type=int, help="the example's, 0-based")
    decision = review.add_mutually_exclusive_group()
    decision.add_argument(
        "--accept", dest="decision", action="store_const", const="accept", help="the relabel"
    )
    decision.add_argument(
        "--reject",
        dest="decision",
        action="store_const",
        const="reject",
        help="the teacher's answer stays",
    )
    decision.add_argument("--override", dest="answer", metavar="ANSWER", help="this answer")
    review.add_argument("--note", help="why, for the next person to read")
    review.add_argument(
        "--from",
        dest="from_file",
        metavar="FILE",
        help='decisions, one JSON object a line: {"position": 3, "decision": "accept" | '
        '"reject" | "override", "answer": "..." (override only), "note": "..."}; all stored or '
        "none; - reads standard input",
    )
    review.set_defaults(decision=None)

    download = add("download", cmd_download, "download a job's dataset")
    download.add_argument("job_id")
    download.add_argument("--policy", default="suggested", choices=EXPORT_POLICIES)
    download.add_argument(
        "--unreviewed",
        choices=UNREVIEWED,
        help="with --policy reviewed: a flagged example no one decided on is written with its "
        "suggestion (the server's default), dropped, or kept as the teacher wrote it",
    )
    download.add_argument(
        "--format",
        default="jsonl",
        choices=EXPORT_FORMATS,
        help="jsonl, parquet, or hf: a folder datasets.load_from_disk opens",
    )
    download.add_argument(
        "-o", "--output", help="file, or folder for hf (default: JOB_ID.POLICY.jsonl|parquet|hf)"
    )

    compare = add(
        "compare", cmd_compare, "compare succeeded jobs of different students on one dataset"
    )
    compare.add_argument("job_ids", nargs="+", metavar="JOB", help="2 to 10 job ids")
    compare.add_argument(
        "-o", "--output", help="write the examples the filters keep here, as JSONL"
    )
    job_help = "a job id, or its letter (A: the first named, B: the second, ...)"
    compare.add_argument(
        "--known-by", action="append", default=[], metavar="JOB",
        help=f"only examples this job knows (any category but Unknown); {job_help}",
    )  # fmt: skip
    compare.add_argument(
        "--unknown-by", action="append", default=[], metavar="JOB",
        help=f"only examples this job does not know (Unknown); {job_help}",
    )  # fmt: skip
    compare.add_argument(
        "--category", action="append", default=[], metavar="JOB:CATEGORY[,CATEGORY]",
        help="only examples this job put in one of these categories",
    )  # fmt: skip
    compare.add_argument(
        "--disagree", action="store_true", help="only examples some students know, others not"
    )

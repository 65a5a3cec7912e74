"""The `kma` command line's parser, every subcommand on it, and `main`."""

from __future__ import annotations

import argparse
import os

from app.logs import configure_logging
from kma.cli.audit import add_audit_command
from kma.cli.keys import add_keys_commands
from kma.cli.remote import add_remote_commands
from kma.cli.server import add_server_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kma", description="Knowledge-mismatch audit for distillation datasets."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_audit_command(commands)
    add_server_commands(commands)
    add_remote_commands(commands)
    add_keys_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("serve", "api", "worker", "migrate"):
        configure_logging(os.environ.get("KMA_LOG_LEVEL", "INFO"))
    code: int = args.run(args)
    return code

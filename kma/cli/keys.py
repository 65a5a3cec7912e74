"""`kma keys create|list|revoke`: the API keys, made and revoked in the database directly.

Run it where the service's settings are (`KMA_DATABASE_URL`, or the embedded default's data
folder). A new key is printed once, alone on stdout; only its hash is stored.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy.orm import Session

from app.db import make_engine, migrate
from app.errors import NotFound
from app.settings import get_settings
from app.workspaces import service as workspaces
from app.workspaces.domain import DEFAULT_WORKSPACE
from kma.cli.common import EXIT_OK, EXIT_USAGE
from kma.cli.server import services


@contextmanager
def database_session() -> Iterator[Session]:
    """A session on the service's database (the embedded one started if need be), migrated."""
    with services(get_settings()) as (database_url, _):
        migrate(database_url)
        engine = make_engine(database_url)
        try:
            with Session(engine) as session:
                yield session
        finally:
            engine.dispose()


def cmd_create(args: argparse.Namespace) -> int:
    with database_session() as session:
        key, secret = workspaces.create_key(session, args.name, args.workspace)
        session.commit()
    print(f"created key {key.prefix}… ({key.name}) in workspace {key.workspace}", file=sys.stderr)
    print(secret)
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    with database_session() as session:
        keys = workspaces.list_keys(session)
    print(f"{'id':<36}  {'prefix':<10}  {'workspace':<16}  {'name':<20}  state")
    for key in keys:
        state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
        print(f"{key.id!s:<36}  {key.prefix:<10}  {key.workspace:<16}  {key.name:<20}  {state}")
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace) -> int:
    with database_session() as session:
        try:
            key = workspaces.revoke_key(session, args.key)
        except NotFound as exc:
            print(f"kma keys revoke: {exc.detail}", file=sys.stderr)
            return EXIT_USAGE
        session.commit()
    print(f"revoked key {key.prefix}… ({key.name}) of workspace {key.workspace}", file=sys.stderr)
    return EXIT_OK


def add_keys_commands(commands: Any) -> None:
    keys = commands.add_parser("keys", help="make, list and revoke API keys", description=__doc__)
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="make a key; prints it on stdout, once")
    create.add_argument("--name", required=True, help="what the key is for, e.g. ci-pipeline")
    create.add_argument(
        "--workspace",
        default=DEFAULT_WORKSPACE,
        help=f"the workspace it opens, made if new (default: {DEFAULT_WORKSPACE})",
    )
    create.set_defaults(run=cmd_create)
    listing = actions.add_parser("list", help="every key: id, prefix, workspace, state")
    listing.set_defaults(run=cmd_list)
    revoke = actions.add_parser("revoke", help="revoke a key; it answers 401 at once")
    revoke.add_argument("key", help="the key's id or prefix (from `kma keys list`)")
    revoke.set_defaults(run=cmd_revoke)

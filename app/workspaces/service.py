"""Workspaces and keys: make, find, list and revoke keys; authenticate a request's key."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.db import AsyncConnections
from app.errors import NotFound
from app.models import ApiKey, Workspace, utcnow
from app.workspaces import repository
from app.workspaces.domain import (
    DEFAULT_WORKSPACE,
    hash_key,
    new_key,
    new_webhook_secret,
    shown_prefix,
)
from app.workspaces.schemas import KeyRead


def ensure_workspace(session: Session, name: str) -> Workspace:
    workspace = repository.get_workspace_by_name(session, name)
    if workspace is None:
        workspace = Workspace(name=name, webhook_secret=new_webhook_secret())
        session.add(workspace)
        session.flush()
    return workspace


def create_key(
    session: Session, name: str, workspace: str = DEFAULT_WORKSPACE
) -> tuple[KeyRead, str]:
    """A new key of the workspace (made if new); returns it with the key, shown this once."""
    owner = ensure_workspace(session, workspace)
    secret = new_key()
    key = ApiKey(
        workspace_id=owner.id, name=name, prefix=shown_prefix(secret), key_hash=hash_key(secret)
    )
    session.add(key)
    session.flush()
    return _read(key, owner), secret


KEY_CACHE_SECONDS = 5.0
"""How long a process goes on trusting a key it found active without asking the database
again: a key revoked elsewhere (`kma keys revoke`) is refused by every API process within
this time; one revoked in the process itself, at once."""
KEY_CACHE_SIZE = 10_000
"""Keys remembered at most; past it, the process forgets them all and looks them up again."""


@dataclass(frozen=True)
class Caller:
    """Who a request acts for: a workspace, and the key it came with (none when anonymous)."""

    workspace: Workspace
    key_id: uuid.UUID | None = None
    key_name: str | None = None


class KeyCache:
    """The keys found active in the last `seconds`, by hash, with who they stand for.

    The workspace is a copy that belongs to no session, so that requests on any thread may
    share it. Unknown keys are not kept: a new key works at once.
    """

    def __init__(self, seconds: float, size: int) -> None:
        self.seconds = seconds
        self.size = size
        self._found: dict[bytes, tuple[float, Caller]] = {}
        self._revoked: set[bytes] = set()
        self._lock = threading.Lock()  # a revocation never lands between `put`'s check and store

    def get(self, key_hash: bytes) -> Caller | None:
        found = self._found.get(key_hash)
        if found is None:
            return None
        expires_at, caller = found
        if expires_at < time.monotonic():
            self._found.pop(key_hash, None)
            return None
        return caller

    def put(self, key_hash: bytes, key: ApiKey, workspace: Workspace) -> Caller:
        snapshot = Workspace(
            id=workspace.id,
            name=workspace.name,
            webhook_secret=workspace.webhook_secret,
            created_at=workspace.created_at,
        )
        caller = Caller(snapshot, key.id, key.name)
        with self._lock:
            if key_hash in self._revoked:
                return caller  # a lookup that began before the revocation committed: not kept
            if len(self._found) >= self.size:
                self._found.clear()
            self._found[key_hash] = (time.monotonic() + self.seconds, caller)
        return caller

    def revoke(self, key_hash: bytes) -> None:
        """Never trust the key again without asking the database (revoked keys stay revoked)."""
        with self._lock:
            self._revoked.add(key_hash)
            self._found.pop(key_hash, None)


active_keys = KeyCache(KEY_CACHE_SECONDS, KEY_CACHE_SIZE)


def authenticate(session: Session, secret: str) -> Caller | None:
    """An active key and its workspace; None for an unknown or revoked key.

    Looked up in the database at most every `KEY_CACHE_SECONDS` per key and process.
    """
    key_hash = hash_key(secret)
    cached = active_keys.get(key_hash)
    if cached is not None:
        return cached
    found = repository.find_active_key(session, key_hash)
    if found is None:
        return None
    return active_keys.put(key_hash, *found)


async def authenticate_on_loop(connections: AsyncConnections, secret: str) -> Caller | None:
    """`authenticate` without a worker thread or a session: the cache, else one query."""
    key_hash = hash_key(secret)
    cached = active_keys.get(key_hash)
    if cached is not None:
        return cached
    found = await repository.fetch_active_key(connections, key_hash)
    if found is None:
        return None
    return active_keys.put(key_hash, *found)


def anonymous_workspace(session: Session) -> Workspace:
    """Who a request without a key acts as, where the operator allows that."""
    return ensure_workspace(session, DEFAULT_WORKSPACE)


def list_keys(session: Session) -> list[KeyRead]:
    return [_read(key, workspace) for key, workspace in repository.list_keys(session)]


def revoke_key(session: Session, ref: str) -> KeyRead:
    """Revoke the key whose id or shown prefix is `ref`; requests with it answer 401 at once in
    this process, and within `KEY_CACHE_SECONDS` in the others."""
    match = [ApiKey.prefix == ref]
    with contextlib.suppress(ValueError):  # not an id: a prefix only
        match.append(ApiKey.id == uuid.UUID(ref))
    keys = session.scalars(select(ApiKey).where(or_(*match))).all()
    if len(keys) != 1:
        raise NotFound(f"no key is {ref!r}" if not keys else f"{ref!r} names several keys")
    key = keys[0]
    key.revoked_at = key.revoked_at or utcnow()
    active_keys.revoke(key.key_hash)
    workspace = repository.get_workspace(session, key.workspace_id)
    assert workspace is not None
    return _read(key, workspace)


def first_key(session: Session) -> str | None:
    """A key for the default workspace when the database has none yet: the first start."""
    if repository.any_key(session):
        return None
    return create_key(session, "first key")[1]


def _read(key: ApiKey, workspace: Workspace) -> KeyRead:
    return KeyRead(
        id=key.id,
        name=key.name,
        workspace=workspace.name,
        prefix=key.prefix,
        created_at=key.created_at,
        revoked_at=key.revoked_at,
    )

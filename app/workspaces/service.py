"""Workspaces and keys: make, find, list and revoke keys; authenticate a request's key."""

from __future__ import annotations

import contextlib
import uuid

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

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


def authenticate(session: Session, secret: str) -> tuple[ApiKey, Workspace] | None:
    """An active key and its workspace; None for an unknown or revoked key."""
    return repository.find_active_key(session, hash_key(secret))


def anonymous_workspace(session: Session) -> Workspace:
    """Who a request without a key acts as, where the operator allows that."""
    return ensure_workspace(session, DEFAULT_WORKSPACE)


def list_keys(session: Session) -> list[KeyRead]:
    return [_read(key, workspace) for key, workspace in repository.list_keys(session)]


def revoke_key(session: Session, ref: str) -> KeyRead:
    """Revoke the key whose id or shown prefix is `ref`; requests with it answer 401 at once."""
    match = [ApiKey.prefix == ref]
    with contextlib.suppress(ValueError):  # not an id: a prefix only
        match.append(ApiKey.id == uuid.UUID(ref))
    keys = session.scalars(select(ApiKey).where(or_(*match))).all()
    if len(keys) != 1:
        raise NotFound(f"no key is {ref!r}" if not keys else f"{ref!r} names several keys")
    key = keys[0]
    key.revoked_at = key.revoked_at or utcnow()
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

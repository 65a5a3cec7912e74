"""Workspace and key queries."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import bindparam, exists, select
from sqlalchemy.orm import Session

from app.db import AsyncConnections, compiled
from app.models import ApiKey, Workspace


def get_workspace_by_name(session: Session, name: str) -> Workspace | None:
    return session.scalars(select(Workspace).where(Workspace.name == name)).first()


def get_workspace(session: Session, workspace_id: uuid.UUID) -> Workspace | None:
    return session.get(Workspace, workspace_id)


def find_active_key(session: Session, key_hash: bytes) -> tuple[ApiKey, Workspace] | None:
    row = session.execute(
        select(ApiKey, Workspace)
        .join(Workspace, Workspace.id == ApiKey.workspace_id)
        .where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
    ).first()
    return (row[0], row[1]) if row else None


ACTIVE_KEY = compiled(
    select(
        ApiKey.id,
        ApiKey.name,
        Workspace.id,
        Workspace.name,
        Workspace.webhook_secret,
        Workspace.created_at,
    )
    .join(Workspace, Workspace.id == ApiKey.workspace_id)
    .where(ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked_at.is_(None))
)


async def fetch_active_key(
    connections: AsyncConnections, key_hash: bytes
) -> tuple[ApiKey, Workspace] | None:
    """`find_active_key` on the event loop; the key and workspace belong to no session."""
    rows = await connections.fetch(ACTIVE_KEY, {"key_hash": key_hash})
    if not rows:
        return None
    key_id, key_name, workspace_id, name, webhook_secret, created_at = rows[0]
    workspace = Workspace(
        id=workspace_id, name=name, webhook_secret=webhook_secret, created_at=created_at
    )
    return ApiKey(id=key_id, name=key_name, workspace_id=workspace_id), workspace


def list_keys(session: Session) -> Sequence[tuple[ApiKey, Workspace]]:
    rows = session.execute(
        select(ApiKey, Workspace)
        .join(Workspace, Workspace.id == ApiKey.workspace_id)
        .order_by(ApiKey.created_at)
    )
    return [(key, workspace) for key, workspace in rows]


def any_key(session: Session) -> bool:
    return bool(session.scalar(select(exists().select_from(ApiKey))))

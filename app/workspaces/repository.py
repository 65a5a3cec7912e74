"""Workspace and key queries."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

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


def list_keys(session: Session) -> Sequence[tuple[ApiKey, Workspace]]:
    rows = session.execute(
        select(ApiKey, Workspace)
        .join(Workspace, Workspace.id == ApiKey.workspace_id)
        .order_by(ApiKey.created_at)
    )
    return [(key, workspace) for key, workspace in rows]


def any_key(session: Session) -> bool:
    return bool(session.scalar(select(exists().select_from(ApiKey))))

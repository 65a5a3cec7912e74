"""Workspace and key I/O."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, Field


class KeyRead(BaseModel):
    id: uuid.UUID
    name: str
    workspace: str
    prefix: str = Field(description="The key's first characters; the key itself is not stored.")
    created_at: datetime
    revoked_at: datetime | None


class WorkspaceRead(BaseModel):
    name: str
    webhook_secret: str = Field(
        description="Signs this workspace's webhooks: HMAC-SHA256 over the body, in the header "
        "X-Kma-Signature."
    )
    created_at: datetime

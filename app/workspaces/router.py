"""The workspace of the request's key."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import WorkspaceDep
from app.errors import AUTH
from app.workspaces.schemas import WorkspaceRead

router = APIRouter(prefix="/workspace", tags=["workspace"], responses=AUTH)


@router.get("", summary="Get this key's workspace")
def get_workspace(workspace: WorkspaceDep) -> WorkspaceRead:
    """The workspace's name and the secret that signs its webhooks."""
    return WorkspaceRead.model_validate(workspace, from_attributes=True)

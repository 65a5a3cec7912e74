"""Dependency aliases the routers share, and who a request acts for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.db import session_scope
from app.errors import TooManyRequests, Unauthorized
from app.models import ApiKey, Workspace
from app.queue import Queue, get_queue
from app.ratelimit import rate_limiter
from app.settings import Settings, get_settings
from app.workspaces import service as workspaces

SessionDep = Annotated[Session, Depends(session_scope)]
QueueDep = Annotated[Queue, Depends(get_queue)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

bearer = HTTPBearer(auto_error=False, description="An API key: `kma keys create`.")


@dataclass(frozen=True)
class Caller:
    """Who a request acts for: a workspace, and the key it came with (None when anonymous)."""

    workspace: Workspace
    key: ApiKey | None


def current_caller(
    session: SessionDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Caller:
    """The request's API key and its workspace, counted against the key's rate limit."""
    if credentials is None:
        if settings.allow_anonymous:
            return Caller(workspaces.anonymous_workspace(session), None)
        raise Unauthorized("send an API key: Authorization: Bearer <key>")
    found = workspaces.authenticate(session, credentials.credentials)
    if found is None:
        raise Unauthorized("the API key is unknown or revoked")
    key, workspace = found
    if settings.broker_url:
        limiter = rate_limiter(settings.broker_url, settings.rate_limit_per_minute)
        wait = limiter.wait_seconds(str(key.id))
        if wait is not None:
            raise TooManyRequests(
                f"more than {settings.rate_limit_per_minute} requests a minute with this key",
                {"Retry-After": str(wait)},
            )
    return Caller(workspace, key)


CallerDep = Annotated[Caller, Depends(current_caller)]


def current_workspace(caller: CallerDep) -> Workspace:
    """The workspace of the request's API key."""
    return caller.workspace


WorkspaceDep = Annotated[Workspace, Depends(current_workspace)]

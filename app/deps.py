"""Dependency aliases the routers share, and who a request acts for."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import contextmanager
from typing import Annotated, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.db import AsyncConnections, session_scope
from app.errors import TooManyRequests, Unauthorized
from app.models import Workspace
from app.queue import Queue, get_queue
from app.ratelimit import async_rate_limiter, rate_limiter
from app.settings import Settings, get_settings
from app.workspaces import service as workspaces
from app.workspaces.service import Caller

T = TypeVar("T")


def overridden(app: FastAPI, dependency: Callable[..., T]) -> Callable[..., T]:
    """The dependency as the app's routes get it (its override, in tests), for code that runs
    outside injection: middleware."""
    return app.dependency_overrides.get(dependency, dependency)


async def request_settings(request: Request) -> Settings:
    """`get_settings()`, or its override. A coroutine: FastAPI would run a plain function in a
    worker thread, a hop that costs more than reading the settings."""
    return overridden(request.app, get_settings)()


async def request_session(request: Request) -> AsyncIterator[Session]:
    """The request's session, from `session_scope` (or its override), made and closed on the
    event loop: FastAPI would take a worker thread for each. A session connects at its first
    query and gives the connection back at commit, so only a close that has a transaction to
    roll back (a round trip to the database) goes to a worker thread."""
    scope = contextmanager(overridden(request.app, session_scope))()
    session = scope.__enter__()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(scope.__exit__, None, None, None)
        else:
            scope.__exit__(None, None, None)


SessionDep = Annotated[Session, Depends(request_session)]
QueueDep = Annotated[Queue, Depends(get_queue)]
SettingsDep = Annotated[Settings, Depends(request_settings)]

bearer = HTTPBearer(auto_error=False, description="An API key: `kma keys create`.")
CredentialsDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]

UPLOAD_CALLER = "upload_caller"
"""Where in a request's state `app.main.UploadGuard` leaves the caller it authenticated."""


NO_KEY = "send an API key: Authorization: Bearer <key>"
UNKNOWN_KEY = "the API key is unknown or revoked"


def authorize(
    session: Session, settings: Settings, credentials: HTTPAuthorizationCredentials | None
) -> Caller:
    """The request's API key and its workspace, counted against the key's rate limit; 401 for
    no key (unless anonymous requests are allowed) or an unknown or revoked one, 429 past the
    limit."""
    if credentials is None:
        if settings.allow_anonymous:
            return Caller(workspaces.anonymous_workspace(session))
        raise Unauthorized(NO_KEY)
    found = workspaces.authenticate(session, credentials.credentials)
    if found is None:
        raise Unauthorized(UNKNOWN_KEY)
    if settings.broker_url:
        limiter = rate_limiter(settings.broker_url, settings.rate_limit_per_minute)
        refuse_past_limit(settings, limiter.wait_seconds(str(found.key_id)))
    return found


async def authorize_on_loop(
    connections: AsyncConnections,
    settings: Settings,
    credentials: HTTPAuthorizationCredentials | None,
) -> Caller:
    """`authorize` without a worker thread or a session: the key from the cache or
    `connections`, counted in Redis by an asyncio client. Not for anonymous requests, which
    may make the default workspace."""
    if credentials is None:
        assert not settings.allow_anonymous, "anonymous requests are authorized in a session"
        raise Unauthorized(NO_KEY)
    found = await workspaces.authenticate_on_loop(connections, credentials.credentials)
    if found is None:
        raise Unauthorized(UNKNOWN_KEY)
    if settings.broker_url:
        limiter = async_rate_limiter(settings.broker_url, settings.rate_limit_per_minute)
        refuse_past_limit(settings, await limiter.wait_seconds(str(found.key_id)))
    return found


def refuse_past_limit(settings: Settings, wait: int | None) -> None:
    if wait is not None:
        raise TooManyRequests(
            f"more than {settings.rate_limit_per_minute} requests a minute with this key",
            {"Retry-After": str(wait)},
        )


async def authorize_early(request: Request, settings: Settings) -> Caller:
    """`authorize` a request before its route runs (in middleware), in the session its route
    would get."""
    credentials = await bearer(request)
    return await run_in_threadpool(_authorize_in_session, request.app, settings, credentials)


def _authorize_in_session(
    app: FastAPI, settings: Settings, credentials: HTTPAuthorizationCredentials | None
) -> Caller:
    with contextmanager(overridden(app, session_scope))() as session:
        caller = authorize(session, settings, credentials)
        session.commit()  # the default workspace, if an anonymous request made it
    return caller


def current_caller(
    request: Request, session: SessionDep, settings: SettingsDep, credentials: CredentialsDep
) -> Caller:
    """Who the request acts for (`authorize`); an upload's was found before its body was read."""
    uploader: Caller | None = getattr(request.state, UPLOAD_CALLER, None)
    return uploader or authorize(session, settings, credentials)


CallerDep = Annotated[Caller, Depends(current_caller)]


def current_workspace(caller: CallerDep) -> Workspace:
    """The workspace of the request's API key."""
    return caller.workspace


WorkspaceDep = Annotated[Workspace, Depends(current_workspace)]

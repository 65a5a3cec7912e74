"""Dependency aliases the routers share."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from sqlalchemy.orm import Session

from app.db import session_scope
from app.queue import Queue, get_queue
from app.settings import Settings, get_settings

SessionDep = Annotated[Session, Depends(session_scope)]
QueueDep = Annotated[Queue, Depends(get_queue)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

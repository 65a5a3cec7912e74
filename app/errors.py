"""Errors that carry their HTTP status, and how routes document them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from pydantic import BaseModel


class HTTPError(Exception):
    """An error a service raises that the API answers with `status_code` and `{"detail": ...}`."""

    status_code: ClassVar[int] = 500

    def __init__(self, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}

    def content(self) -> dict[str, Any]:
        """The JSON body of the answer."""
        return {"detail": self.detail}


class Unauthorized(HTTPError):
    status_code = 401

    def __init__(self, detail: str) -> None:
        super().__init__(detail, {"WWW-Authenticate": "Bearer"})

    def content(self) -> dict[str, Any]:
        """The JSON body of the answer."""
        return {"detail": self.detail}


class NotFound(HTTPError):
    status_code = 404


class Conflict(HTTPError):
    status_code = 409


class Unprocessable(HTTPError):
    status_code = 422


class TooManyRequests(HTTPError):
    status_code = 429


class InvalidField(Unprocessable):
    """A request body field refused by a check its schema cannot make (it needs a setting, the
    dataset or DNS), answered in FastAPI's validation-error shape, as the routes document 422.
    """

    def __init__(self, field: Sequence[str], detail: str) -> None:
        super().__init__(detail)
        self.loc = ["body", *field]

    def content(self) -> dict[str, Any]:
        return {"detail": [{"type": "value_error", "loc": self.loc, "msg": self.detail}]}


class InvalidQuery(InvalidField):
    """A query parameter refused by a check its type cannot make, in the same shape."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__([name], detail)
        self.loc = ["query", name]


class ServiceUnavailable(HTTPError):
    status_code = 503


class ErrorRead(BaseModel):
    detail: str


Responses = dict[int | str, dict[str, Any]]
"""Documented error answers of a route, for OpenAPI."""

NOT_FOUND: Responses = {404: {"model": ErrorRead, "description": "No such resource."}}
AUTH: Responses = {
    401: {"model": ErrorRead, "description": "No API key, or an unknown or revoked one."},
    429: {"model": ErrorRead, "description": "Too many requests with this key; see Retry-After."},
}

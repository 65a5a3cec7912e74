"""Errors that carry their HTTP status, and how routes document them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, Field


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


class InvalidFields(Unprocessable):
    """Request fields refused by checks their schema cannot make (they need a setting, the
    database or DNS), answered in FastAPI's validation-error shape, as the routes document 422:
    each error with its place (`loc`, such as `["body", "items", 3, "position"]`) and reason.
    """

    def __init__(self, errors: Sequence[tuple[Sequence[str | int], str]]) -> None:
        super().__init__("; ".join(message for _, message in errors))
        self.errors = [
            {"type": "value_error", "loc": list(loc), "msg": message} for loc, message in errors
        ]

    def content(self) -> dict[str, Any]:
        return {"detail": self.errors}


class InvalidField(InvalidFields):
    """One request body field refused."""

    def __init__(self, field: Sequence[str], detail: str) -> None:
        super().__init__([(["body", *field], detail)])


class InvalidQuery(InvalidFields):
    """A query parameter refused by a check its type cannot make, in the same shape."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__([(["query", name], detail)])


class ServiceUnavailable(HTTPError):
    status_code = 503


class ErrorRead(BaseModel):
    detail: str


class FieldErrorRead(BaseModel):
    loc: list[str | int] = Field(description="Where: `body`, `query`, ..., then the field.")
    msg: str
    type: str


class ValidationErrorRead(BaseModel):
    """FastAPI's answer to a request that fails validation (422)."""

    detail: list[FieldErrorRead]


Responses = dict[int | str, dict[str, Any]]
"""Documented error answers of a route, for OpenAPI."""

UNPARSABLE: Responses = {
    400: {
        "model": ErrorRead,
        "description": "The body could not be parsed (JSON that is not UTF-8, a form that is not"
        " multipart).",
    }
}
NOT_FOUND: Responses = {404: {"model": ErrorRead, "description": "No such resource."}}
UNAVAILABLE: Responses = {
    503: {
        "model": ErrorRead,
        "description": "The API or its database is busy, or the database unreachable; retry"
        " after `Retry-After` seconds.",
    }
}
AUTH: Responses = {
    401: {"model": ErrorRead, "description": "No API key, or an unknown or revoked one."},
    429: {"model": ErrorRead, "description": "Too many requests with this key; see Retry-After."},
}


def as_json(responses: Responses) -> Responses:
    """The answers documented as JSON on a route whose own answer is not (a page): FastAPI
    documents a `model` in the media type of the route's answer."""
    return {
        status: {
            "description": response["description"],
            "content": {
                "application/json": {
                    "schema": {"$ref": f"#/components/schemas/{response['model'].__name__}"}
                }
            },
        }
        for status, response in responses.items()
    }

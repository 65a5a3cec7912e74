"""API keys: made from the system's randomness, stored only as their SHA-256."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid

KEY_PREFIX = "kma_"
DEFAULT_WORKSPACE = "default"
KEY_FILE = "api-key"
"""Under the data folder: the first key `kma serve` makes, which the local commands read."""


def new_key() -> str:
    """A new API key: 256 random bits, URL-safe, with a prefix that says what it is."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> bytes:
    """What is stored and looked up: a key has 256 bits of entropy, so a plain SHA-256 serves
    (no password hashing needed), and a stolen table gives no key."""
    return hashlib.sha256(key.encode()).digest()


def shown_prefix(key: str) -> str:
    """The part of a key a list may show: enough to tell keys apart, too little to use."""
    return key[: len(KEY_PREFIX) + 6]


def new_webhook_secret() -> str:
    return secrets.token_urlsafe(32)


PAGE_LINK_SECONDS = 7 * 24 * 3600
"""How long a report page's link opens it without a key."""


def page_link_token(secret: str, page: uuid.UUID | str, now: float) -> str:
    """An `access` token for a page, signed with its workspace's secret: a link a person can
    open in a browser, which sends no key. `page` is a job's id (its report) or what a page of
    several jobs shows, e.g. a comparison. Expires on the hour, so a job polled over an hour
    keeps one link."""
    expires = (int(now) // 3600 + 1) * 3600 + PAGE_LINK_SECONDS
    return f"{expires}.{_page_mac(secret, page, expires)}"


def page_link_opens(secret: str, page: uuid.UUID | str, token: str, now: float) -> bool:
    expires, _, mac = token.partition(".")
    if not expires.isdigit() or int(expires) < now:
        return False
    return hmac.compare_digest(mac, _page_mac(secret, page, int(expires)))


def _page_mac(secret: str, page: uuid.UUID | str, expires: int) -> str:
    message = f"report-page:{page}:{expires}".encode()
    return hmac.digest(secret.encode(), message, hashlib.sha256).hex()

"""Webhook signatures: HMAC-SHA256 over the exact body, hex, in the `X-Kma-Signature` header.

A receiver checks it with `verify(body, header, secret)`.
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "X-Kma-Signature"


def sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, signature: str, secret: str) -> bool:
    return hmac.compare_digest(sign(body, secret), signature)

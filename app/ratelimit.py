"""Requests per API key per minute, counted in Redis so that every API process shares one count.

A fixed one-minute window: simple, and at most twice the limit across a window's edge.
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache

import redis

from app.queue import redis_client

log = logging.getLogger(__name__)


COUNT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return count
"""
"""Count a request in its window's counter, which expires after the window: one command, where
a pipeline of INCR and EXPIRE takes twice the client's time."""


class RateLimiter:
    def __init__(self, client: redis.Redis, per_minute: int) -> None:
        self.client = client
        self.per_minute = per_minute
        self.count = client.register_script(COUNT)

    def wait_seconds(self, key_id: str) -> int | None:
        """Seconds until the key may ask again; None while it is under its limit.

        With Redis away, requests go through: the limit protects the service, and refusing
        everyone because the counter is down would not.
        """
        now = time.time()
        counter = f"kma:rate:{key_id}:{int(now // 60)}"
        try:
            count = int(self.count(keys=[counter], args=[120]))
        except redis.RedisError as exc:
            log.warning("rate limit not counted (%s)", exc)
            return None
        if count <= self.per_minute:
            return None
        return max(1, 60 - int(now) % 60)


@lru_cache
def rate_limiter(broker_url: str, per_minute: int) -> RateLimiter:
    return RateLimiter(redis_client(broker_url), per_minute)

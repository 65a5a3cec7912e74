"""Requests per API key per minute, counted in Redis so that every API process shares one count.

A fixed one-minute window: simple, and at most twice the limit across a window's edge.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from functools import lru_cache

import redis
import redis.asyncio

from app.queue import redis_client, redis_url

log = logging.getLogger(__name__)


COUNT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return count
"""
"""Count a request in its window's counter, which expires after the window: one command, where
a pipeline of INCR and EXPIRE takes twice the client's time."""

COUNTER_SECONDS = 120


def window(key_id: str, now: float) -> str:
    """The counter of the key's requests in the minute of `now`."""
    return f"kma:rate:{key_id}:{int(now // 60)}"


def wait_after(count: int, per_minute: int, now: float) -> int | None:
    """Seconds until the window that counted `count` requests ends; None within the limit."""
    if count <= per_minute:
        return None
    return max(1, 60 - int(now) % 60)


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
        try:
            count = int(self.count(keys=[window(key_id, now)], args=[COUNTER_SECONDS]))
        except redis.RedisError as exc:
            log.warning("rate limit not counted (%s)", exc)
            return None
        return wait_after(count, self.per_minute, now)


@lru_cache
def rate_limiter(broker_url: str, per_minute: int) -> RateLimiter:
    return RateLimiter(redis_client(broker_url), per_minute)


class AsyncRateLimiter:
    """`RateLimiter` on the event loop, for requests that take no worker thread (a job's poll):
    the same counters, the same answers."""

    def __init__(self, client: redis.asyncio.Redis, per_minute: int) -> None:
        self.client = client
        self.per_minute = per_minute
        self.count = client.register_script(COUNT)

    async def wait_seconds(self, key_id: str) -> int | None:
        now = time.time()
        try:
            count = int(await self.count(keys=[window(key_id, now)], args=[COUNTER_SECONDS]))
        except redis.RedisError as exc:
            log.warning("rate limit not counted (%s)", exc)
            return None
        return wait_after(count, self.per_minute, now)


_loop_limiters: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[str, int], AsyncRateLimiter]
] = weakref.WeakKeyDictionary()


def async_rate_limiter(broker_url: str, per_minute: int) -> AsyncRateLimiter:
    """The running event loop's limiter (a Redis client belongs to the loop that made it)."""
    limiters = _loop_limiters.setdefault(asyncio.get_running_loop(), {})
    limiter = limiters.get((broker_url, per_minute))
    if limiter is None:
        client = redis.asyncio.Redis.from_url(
            redis_url(broker_url), socket_timeout=2, socket_connect_timeout=2
        )
        limiter = limiters[broker_url, per_minute] = AsyncRateLimiter(client, per_minute)
    return limiter


async def close_async_rate_limiters() -> None:
    """Close the running event loop's Redis clients (the API's shutdown)."""
    for limiter in _loop_limiters.pop(asyncio.get_running_loop(), {}).values():
        await limiter.client.aclose()

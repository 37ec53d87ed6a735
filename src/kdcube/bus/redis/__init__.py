"""The Redis bus: a durable queue, relay and state shared by many processes."""

from kdcube.bus.redis.bus import RedisBus, open_redis_bus
from kdcube.bus.redis.queue import RedisQueue
from kdcube.bus.redis.relay import RedisRelay
from kdcube.bus.redis.state import RedisState

__all__ = ["RedisBus", "RedisQueue", "RedisRelay", "RedisState", "open_redis_bus"]

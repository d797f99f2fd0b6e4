"""The seed's low-level objects (``import pygpukit.lowlevel as rust``)."""

from .runtime._lru_pool import Block as Block
from .runtime._lru_pool import MemoryPool as MemoryPool
from .runtime._lru_pool import PoolStats as PoolStats

__all__ = ("Block", "MemoryPool", "PoolStats")

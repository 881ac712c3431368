"""Keeping a long-lived Beam process's memory bounded: freed memory goes back to the system.

A score worker handles one shard after another; each shard's Arrow buffers, numpy arrays and torch
tensors are freed when the shard is done, yet glibc keeps up to 8 malloc arenas per core and Arrow's
mimalloc pool keeps its segments, so a worker's resident memory settles hundreds of MB above what it
holds. With Arrow on the system allocator, two arenas and a trim after each shard, it stays near what
the current shard needs (measured in bench/score.py).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

import pyarrow as pa

__all__ = ["bound_process_memory", "release_memory"]

log = logging.getLogger("popcast.memory")
_M_ARENA_MAX = -8   # glibc mallopt parameter (malloc.h)
_ARENAS = 2
_libc = None


def _glibc():
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
            _libc = libc if libc is not None and hasattr(libc, "malloc_trim") else False
        except OSError:
            _libc = False
    return _libc or None


def bound_process_memory() -> None:
    """Once per process, before its big allocations: Arrow allocates with the system allocator and glibc
    uses at most _ARENAS arenas. Harmless to call again; a no-op where glibc is absent."""
    if pa.default_memory_pool().backend_name != "system":
        pa.set_memory_pool(pa.system_memory_pool())
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_ARENA_MAX, _ARENAS)


def release_memory() -> None:
    """Return freed heap memory to the system (after a shard, or after the driver drops the catalog)."""
    pa.default_memory_pool().release_unused()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)

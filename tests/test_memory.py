"""pipelines/memory.py: a long-lived worker hands freed memory back to the system."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipelines.memory import bound_process_memory, release_memory


def test_arrow_uses_the_system_allocator_and_freed_buffers_leave_the_pool() -> None:
    bound_process_memory()
    assert pa.default_memory_pool().backend_name == "system"
    before = pa.total_allocated_bytes()
    table = pa.table({"x": pa.array(np.arange(2_000_000, dtype=np.int64)).cast(pa.float64())})
    assert pa.total_allocated_bytes() >= before + table.nbytes
    del table
    release_memory()
    assert pa.total_allocated_bytes() <= before
    bound_process_memory()   # idempotent
    assert pa.default_memory_pool().backend_name == "system"

"""Hand the heap memory that XLA has just freed back to the operating system.

Compiling a step function on XLA:CPU allocates hundreds of MB (LLVM, buffer assignment) and frees
them; glibc keeps freed blocks in its arenas, so the next step's buffers, allocated by other threads,
come on top of them and the process peak is compile + run instead of the larger of the two.
``malloc_trim(0)`` returns them. Measured on the bench's workload (d) (MiniLM full fine-tuning, peak
resident set of the first step): book-keeping 1975 -> 1674 MB, non-private 1371 -> 1243 MB. A no-op
where the C library has no ``malloc_trim``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to hand back this way
        return None


def release_freed() -> bool:
    """``malloc_trim(0)``: True where it ran."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True

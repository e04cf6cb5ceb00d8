"""Settings of the host process that a CPU model's speed depends on.

XLA's CPU runtime allocates the outputs and the temporary buffer of every call with ``malloc``.
glibc serves large blocks with fresh ``mmap`` s (on a worker thread's own arena, a block over
64 MiB always, whatever ``MALLOC_MMAP_MAX_`` says) and hands the top of its heap back to the
kernel once more than its trim threshold is free. Every 4 KiB page of such a block is a page
fault on first touch, answered with a zeroed page: on the 2-core machine of BUILD_NOTES.md two
threads wrote 24 MiB of fresh pages in 7 ms and the same pages, once faulted in, in 0.5 ms;
a TW-2D layer of 768 x 3072 at 90% takes 2.2 ms for all its work.
:func:`keep_freed_memory` makes glibc keep freed memory and reuse it.
"""

from __future__ import annotations

import ctypes
import sys
import warnings

# mallopt parameters (glibc's <malloc.h>).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int


def _mallopt():
    """glibc's ``mallopt``, or None where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 -- glibc only
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def _jax_started() -> bool:
    """Whether JAX has made its backends (and with them the CPU client's worker threads)."""
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # another JAX: say nothing rather than guess
        return False


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep the memory a program frees and reuse it, instead of handing
    it back to the kernel and faulting fresh pages in on the next call.

    The same as ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`` in the
    environment: every thread allocates from the main heap, no block is ``mmap`` ed on its own, and
    up to 2 GiB of free memory stays at the heap's top. The cost: memory, as the process keeps the
    heap of its largest call and its holes (the BERT example's training and timing peaked at 5.8 GB
    resident with it, 4.1 GB without). On the 2-core machine of
    BUILD_NOTES.md it took the BERT example's packed forward from 19,000 page faults per call to
    none (and the dense one from 34,000), and the TW-2D layer of 768 x 3072 at 75% from 2.1-2.4x
    to 3.6x the dense dot in ``python -m jax_tw.bench`` ("Freed memory kept" there).

    Call it first, before JAX's first computation: threads that have allocated already keep their
    own arenas (a ``RuntimeWarning`` says so when JAX is already running). Returns whether it was
    applied: ``False`` where the C library is not glibc (nothing is changed there).
    """
    mallopt = _mallopt()
    if mallopt is None:
        return False
    if _jax_started():
        warnings.warn("jax_tw.host.keep_freed_memory(): JAX is already running; its threads that "
                      "have allocated keep their own glibc arenas, whose large blocks are still "
                      "fresh mmaps. Call it before the first JAX computation.", RuntimeWarning,
                      stacklevel=2)
    return _keep(mallopt)


def _keep(mallopt) -> bool:
    """The settings of :func:`keep_freed_memory`; whether glibc took them all."""
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return all([mallopt(param, value) == 1 for param, value in settings])


def malloc_setting(keep: bool) -> str:
    """For a script's timings (``python -m jax_tw.bench``, the BERT example): with ``keep``,
    :func:`keep_freed_memory` unless JAX is already running (as when a test calls the script's
    ``main``); returns the setting the timings ran under, in words."""
    if not keep:
        return "as the environment set it up"
    if _jax_started():
        return "as it was (JAX was already running)"
    mallopt = _mallopt()
    if mallopt is None:
        return "as it was (the C library is not glibc)"
    return "freed memory kept (jax_tw.host.keep_freed_memory)" if _keep(mallopt) else \
        "as it was (mallopt refused a setting)"

"""Is this exception an out-of-memory error?

One pure function, so that the batch-size search, the precision probe and the
DataLoader benchmark all agree on what "did not fit" means, and so that it can be
tested on a machine without a GPU. It never imports torch: torch's own
``OutOfMemoryError`` is recognised by class name, which also covers
``torch.cuda.OutOfMemoryError`` (an alias) and builds where torch is absent.
"""

from __future__ import annotations

__all__ = ["is_oom"]

#: Class names that mean OOM wherever they sit in an exception's MRO.
_OOM_CLASS_NAMES = frozenset({"OutOfMemoryError"})

#: Lower-case fragments of ``RuntimeError`` messages that mean the allocation failed.
#: Older torch raises a bare RuntimeError for CUDA OOM; the other back-ends (HIP, XPU,
#: MPS, the CPU allocator, Habana) still do.
_OOM_FRAGMENTS = (
    # CUDA / HIP / XPU / MPS caching allocators, "CUDA error: out of memory" from the
    # driver, and "Allocation on device 0 would exceed allowed memory. (out of memory)".
    "out of memory",
    # cuDNN and cuBLAS failing to allocate their workspace or handle.
    "_status_alloc_failed",
    # cuDNN answers NOT_SUPPORTED when it cannot get workspace under memory pressure;
    # accelerate's find_executable_batch_size treats it as OOM too. The cost: a truly
    # unsupported configuration also reads as OOM, but then the smallest batch fails
    # as well and the search reports this message instead of guessing.
    "cudnn_status_not_supported",
    # cuDNN v9 with benchmark off, when no engine config fits in the memory left under
    # the cap: "GET was unable to find an engine to execute this computation". Same
    # trade-off as NOT_SUPPORTED above.
    "unable to find an engine",
    # DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes.
    "can't allocate memory",
    # Habana HPU: "FATAL ERROR :: MODULE:PT_DEVMEM Allocation failed".
    "pt_devmem allocation failed",
)


def _is_oom_itself(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    if any(cls.__name__ in _OOM_CLASS_NAMES for cls in type(exc).__mro__):
        return True
    # Only RuntimeError (and subclasses such as torch.AcceleratorError) carries these
    # texts; a ValueError that mentions memory is a user's mistake, not an OOM.
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(fragment in text for fragment in _OOM_FRAGMENTS)
    return False


def is_oom(exc: BaseException) -> bool:
    """True when ``exc`` means an allocation failed (device or host memory).

    Also looks one level down the chain (``__cause__`` then ``__context__``), because
    wrappers such as a DataLoader worker or our own trial runner often re-raise an OOM
    as another exception. Deeper links are not followed: an error two steps removed
    from an OOM is more likely a consequence of the clean-up than of the allocation.
    """
    if _is_oom_itself(exc):
        return True
    return any(
        inner is not None and _is_oom_itself(inner)
        for inner in (exc.__cause__, exc.__context__)
    )

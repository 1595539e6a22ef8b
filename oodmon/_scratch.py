"""Per-thread scratch buffers for the ``[N, K]`` temporaries of the scores.

glibc hands a large freed block (4 MB for 1024 x 1000 float32 logits) back to the operating
system, so every fresh temporary of that size costs a page fault per 4 KB, which takes longer
than the arithmetic: with the allocator's defaults, ``ocs_kl`` cost 7.9x one ``log_softmax``
pass in ``benchmarks/scores.py``, against 2.6x with the allocator pinned. A server does not
tune its allocator, so the scores write their temporaries into buffers kept per thread and
reused. Only on the CPU (CUDA's caching allocator already reuses memory), never where autograd
would record a graph (``out=`` does not), and only up to :data:`MAX_ELEMENTS` per buffer.

A buffer is valid until the next call on the same thread asks for the same slot: a score uses
it for its own arithmetic and returns a fresh ``[N]`` tensor.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

__all__ = ["MAX_ELEMENTS", "MIN_ELEMENTS", "scratch"]

#: Largest buffer kept (elements); a larger batch allocates as usual. 16 MiB of float32.
MAX_ELEMENTS = 1 << 22
#: Smaller temporaries come from the heap without page faults (glibc maps blocks from 128 KiB
#: up), and there the lookup would cost more than it saves: 128 KiB of float32.
MIN_ELEMENTS = 1 << 15

_local = threading.local()


def scratch(like: Tensor, slot: str) -> Tensor | None:
    """An uninitialised tensor shaped like ``like`` for this thread's ``slot``, or None.

    None means "allocate as usual": small, too large, not on the CPU, or under autograd.
    """
    n = like.numel()
    if n < MIN_ELEMENTS or n > MAX_ELEMENTS or like.device.type != "cpu":
        return None
    if like.requires_grad and torch.is_grad_enabled():
        return None
    buffers: dict[tuple[str, torch.dtype], Tensor] | None = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    key = (slot, like.dtype)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < n:
        buffer = buffers[key] = torch.empty(n, dtype=like.dtype)
    return buffer[:n].view(like.shape)

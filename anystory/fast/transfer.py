"""Device ↔ host transfers of the encode results and the recorded maps: one transfer for many tensors,
landing in page-locked host buffers prepared in the background."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import torch


class PinnedStaging:
    """Page-locked host buffers for the device → host transfer of G_i^l, one prepared ahead per size.

    A subject's G_i^l (tens of MB for SDXL at 512²) is kept on the host while ComfyUI caches the encode.
    Through fresh pageable memory most of its transfer time goes to the page faults of the new buffer;
    through page-locked memory they are gone — but page-locking a new buffer costs as much. So each
    :meth:`take` hands out a buffer allocated in the background after the previous take of that size
    (allocation releases the GIL) and starts the next one: every encode after the first finds its buffer
    ready. One spare buffer per recent size stays allocated (page-locked host memory the size of one subject's
    G_i^l; bench/README.md has the measured sizes and times)."""

    def __init__(self, keep_sizes: int = 2, alloc: Optional[Callable] = None):
        self.keep_sizes = int(keep_sizes)
        self.alloc = alloc or (lambda numel, dtype: torch.empty(numel, dtype=dtype, pin_memory=True))
        self._pending: dict = {}
        self._pool = None

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        key = (int(numel), dtype)
        fut = self._pending.pop(key, None)
        buf = None
        if fut is not None:
            try:
                buf = fut.result()
            except Exception:  # noqa: BLE001 — allocate here instead
                buf = None
        if buf is None:
            buf = self.alloc(key[0], dtype)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anystory-pinned")
        self._pending[key] = self._pool.submit(self.alloc, key[0], dtype)
        while len(self._pending) > self.keep_sizes:  # a spare for the most recent sizes only
            self._pending.pop(next(iter(self._pending)))
        return buf


def move_together(tensors: list, device, copy: bool = False, staging: Optional[PinnedStaging] = None) -> list:
    """``tensors`` (one dtype) on ``device`` after ONE transfer, each a view of it: a copy per tensor would
    wait for the device each time. Returned as they are when all are already there (unless ``copy``).
    From a GPU to the CPU with ``staging``, the transfer lands in one of its page-locked buffers."""
    device = torch.device(device)
    if not copy and all(t.device == device for t in tensors):
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    host = None
    if staging is not None and device.type == "cpu" and flat.is_cuda:
        try:
            host = staging.take(flat.numel(), flat.dtype)
        except RuntimeError:  # page-locked memory refused (e.g. a container's memlock limit): pageable
            host = None
    if host is not None:
        host.copy_(flat, non_blocking=True)
        torch.cuda.current_stream(flat.device).synchronize()
        flat = host
    else:
        flat = flat.to(device)
    out, at = [], 0
    for t in tensors:
        out.append(flat[at:at + t.numel()].view(t.shape))
        at += t.numel()
    return out

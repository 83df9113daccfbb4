"""``inspect --check-data``: the one check the header-only gate cannot make. Reads every stored tensor once,
shard by shard, through the mmap in bounded slices, and reports NaN or Inf values in weights and scales and
tensors that are all zeros (a zero-filled download or a botched conversion). Memory stays flat: a slice of
at most ``chunk`` values is converted to float32 at a time and the pages read are clean file pages."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from dsv3tools.checkpoint.reader import Checkpoint

CHUNK = 1 << 24  # values per float32 slice: 64 MiB
FIX_DATA = "re-download the shard (dsv3tools download), or re-run the conversion that wrote it"


def _scan(t: torch.Tensor, chunk: int) -> tuple[int, int, bool]:
    """(NaN count, Inf count, all zeros) of one tensor, ``chunk`` values at a time."""
    flat = t.reshape(-1)
    nan = inf = 0
    zero = True
    floating = t.dtype.is_floating_point
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk]
        if floating:
            part = part.float()
            nan += int(torch.isnan(part).sum())
            inf += int(torch.isinf(part).sum())
        zero = zero and not bool(part.ne(0).any())
    return nan, inf, zero


def check_data(
    path: str | Path, progress: Callable[[int], None] | None = None, chunk: int = CHUNK
) -> dict[str, list[str]]:
    """``{"problems": [...], "zero_tensors": [...]}``: one line per tensor holding NaN/Inf (a problem: the
    forward would propagate it) and the names of all-zero tensors (reported, not failed: a router bias of
    a model trained without the aux-loss-free balance can be zero). ``progress(nbytes)`` after each tensor."""
    problems: list[str] = []
    zeros: list[str] = []
    with Checkpoint(path, validate=False) as ck:
        for shard in ck.shards:
            for name in ck.names_in(shard):
                nan, inf, zero = _scan(ck.get(name), chunk)
                if nan or inf:
                    problems.append(
                        f"{ck.path / shard}: tensor {name} holds {nan} NaN and {inf} Inf values; {FIX_DATA}"
                    )
                if zero and ck.info(name).nbytes:
                    zeros.append(name)
                if progress is not None:
                    progress(ck.info(name).nbytes)
            ck.close()  # drop this shard's map before the next one
    return {"problems": problems, "zero_tensors": zeros}

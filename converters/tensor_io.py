"""Zero-copy tensor reads for the converters: each stored tensor is a view on a private (copy-on-write)
mmap of its shard, located from the shard header, so copying a tensor to an output shard never
materialises it in anonymous memory and nothing can write to the input. A few shard maps stay open
(least recently used first out); a map is unmapped once the last view on it is gone."""

from __future__ import annotations

import mmap
import struct
from collections import OrderedDict
from pathlib import Path

import torch

from dsv3tools.checkpoint import TensorInfo
from dsv3tools.errors import DSV3Error
from dsv3tools.writer import TORCH_DTYPES


class ShardReader:
    """Read tensors of one checkpoint folder by their header facts (``TensorInfo``)."""

    def __init__(self, folder: Path, infos: dict[str, TensorInfo], keep_open: int = 2):
        self.folder = Path(folder)
        self.infos = infos
        self.keep_open = keep_open
        self._maps: OrderedDict[str, tuple[mmap.mmap, int]] = OrderedDict()

    def _map(self, shard: str) -> tuple[mmap.mmap, int]:
        hit = self._maps.get(shard)
        if hit is not None:
            self._maps.move_to_end(shard)
            return hit
        path = self.folder / shard
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, struct.error, ValueError) as e:
            raise DSV3Error(f"{path}: cannot read ({e}); re-download it") from None
        self._maps[shard] = (mm, 8 + n)
        while len(self._maps) > self.keep_open:
            self._maps.popitem(last=False)  # unmapped when the last tensor view on it is released
        return mm, 8 + n

    def get(self, name: str) -> torch.Tensor:
        """The stored tensor ``name`` as a view on the mapped shard (no copy)."""
        info = self.infos[name]
        mm, base = self._map(info.shard)
        a, b = info.offsets
        if base + b > len(mm):
            raise DSV3Error(f"{self.folder / info.shard}: truncated at tensor {name}; re-download it")
        dtype = TORCH_DTYPES[info.dtype]
        if b == a:
            return torch.empty(info.shape, dtype=dtype)
        raw = torch.frombuffer(mm, dtype=torch.uint8, count=b - a, offset=base + a)
        return raw.view(dtype).view(info.shape)

    def close(self) -> None:
        self._maps.clear()

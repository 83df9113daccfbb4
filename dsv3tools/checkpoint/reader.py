"""Reading a checkpoint: config, index and shard headers as the validation gate
(:mod:`dsv3tools.checkpoint.validate`) parsed and checked them, lazy tensor access through a private mmap
of each shard (views: only the pages used become resident) and per-linear format detection."""

from __future__ import annotations

import mmap
import struct
from collections import defaultdict
from pathlib import Path

import torch

from dsv3tools.checkpoint.layout import Weight, detect_format, layer_of
from dsv3tools.checkpoint.safetensors_rules import TensorInfo, read_header
from dsv3tools.checkpoint.validate import (
    MANIFEST,
    expected_weights,
    stored_as,
    validate_checkpoint,
)
from dsv3tools.checkpoint.writer import TORCH_DTYPES
from dsv3tools.errors import DSV3Error, ValidationError

__all__ = ["Checkpoint", "MappedShard", "TensorInfo", "map_shard", "read_header", "tensor_view"]


MappedShard = tuple[mmap.mmap, int]  # the shard's private map, byte offset of its data


def map_shard(path: Path) -> MappedShard:
    """A private (copy-on-write) map of a shard whose header :func:`read_header` validated."""
    try:
        with open(path, "rb") as f:
            (hlen,) = struct.unpack("<Q", f.read(8))
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), 8 + hlen
    except (OSError, struct.error, ValueError) as e:
        raise DSV3Error(f"{path}: cannot open ({e}); re-download it") from None


def tensor_view(mapped: MappedShard, info: TensorInfo) -> torch.Tensor:
    """The stored tensor as a view on the map: nothing is read until its values are used, and only the
    pages used become resident (``safe_open().get_tensor`` made most of each tensor resident on open)."""
    mm, base = mapped
    dtype = TORCH_DTYPES[info.dtype]
    a, b = info.offsets
    if a == b:
        return torch.empty(info.shape, dtype=dtype)
    raw = torch.frombuffer(mm, dtype=torch.uint8, count=b - a, offset=base + a)
    if (base + a) % dtype.itemsize:  # unaligned in the file (safetensors itself aligns): copy
        raw = raw.clone()
    return raw.view(dtype).view(info.shape)


class Checkpoint:
    """A checkpoint folder opened lazily: headers on demand, tensors through mmap."""

    def __init__(self, path: str | Path, validate: bool = True):
        """Runs the validation gate first (cached per folder); ``validate=False`` (inspect) raises only for
        broken files, index or config and leaves the inventory to :meth:`problems`."""
        self.path = Path(path)
        gate = validate_checkpoint(self.path, inventory=validate)
        if gate.kind != "hf":
            raise DSV3Error(
                f"{self.path}: a resharded folder ({MANIFEST}); run it under torchrun "
                f"(torchrun --nproc-per-node N -m dsv3tools generate --model {self.path}) or pass its source"
            )
        self.config = gate.config
        self.weight_map = dict(gate.weight_map)
        self.shards = sorted(set(self.weight_map.values()))
        self._headers: dict[str, dict[str, TensorInfo]] = dict(gate.headers)
        self._handles: dict[str, MappedShard] = {}
        self._inventory = list(gate.inventory)

    # ---- headers ---------------------------------------------------------------------------------
    def header(self, shard: str) -> dict[str, TensorInfo]:
        if shard not in self._headers:
            self._headers[shard] = read_header(self.path / shard)
        return self._headers[shard]

    def info(self, name: str) -> TensorInfo:
        shard = self.weight_map.get(name)
        if shard is None:
            raise DSV3Error(f"{self.path}: tensor {name} is not in the index; the checkpoint is incomplete")
        info = self.header(shard).get(name)
        if info is None:
            raise DSV3Error(f"{self.path / shard}: tensor {name} is listed in the index but not in the shard")
        return info

    def infos(self) -> dict[str, TensorInfo]:
        """Every stored tensor's header facts (reads every shard header, no data)."""
        out: dict[str, TensorInfo] = {}
        for shard in self.shards:
            out.update(self.header(shard))
        return out

    def names_in(self, shard: str) -> list[str]:
        """Tensor names of one shard in file order."""
        return [n for n, _ in sorted(self.header(shard).items(), key=lambda kv: kv[1].offsets[0])]

    def names_by_layer(self) -> dict[int | None, list[str]]:
        out: dict[int | None, list[str]] = defaultdict(list)
        for name in self.weight_map:
            out[layer_of(name)].append(name)
        return dict(out)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    # ---- data --------------------------------------------------------------------------------------
    def get(self, name: str) -> torch.Tensor:
        """One tensor as a view on a private map of its shard (:func:`tensor_view`)."""
        info = self.info(name)
        mapped = self._handles.get(info.shard)
        if mapped is None:
            mapped = self._handles[info.shard] = map_shard(self.path / info.shard)
        return tensor_view(mapped, info)

    def linear_format(self, prefix: str) -> str | None:
        return detect_format(self.weight_map, prefix)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- validation (the gate's inventory rules, :mod:`dsv3tools.checkpoint.validate`) ----------------
    def expected(self) -> list[Weight]:
        """Weights the config implies; a folder marked ``"dsv3tools_part": "mtp"`` (split-mtp) holds only the MTP layers."""
        return expected_weights(self.config)

    def storage_of(self, w: Weight) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Expected on-disk tensors of ``w`` in the format it is actually stored in (default: config's)."""
        name = f"{w.name}.weight"
        infos = {name: self.info(name)} if name in self.weight_map else {}
        return stored_as(self.config, self.weight_map, infos, w)

    def problems(self) -> list[str]:
        """Every mismatch between the stored tensors and the config (names, shapes, dtypes, scale grids)."""
        return list(self._inventory)

    def validate(self) -> None:
        """Raise :class:`ValidationError` with the first problem (and how many more) if the inventory is off."""
        probs = self.problems()
        if probs:
            raise ValidationError(probs)

"""Reading a checkpoint: config, index, shard headers (parsed without touching tensor data), lazy tensor
access through a private mmap of each shard (views: only the pages used become resident), per-linear
format detection, and validation against the config."""

from __future__ import annotations

import json
import mmap
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from dsv3tools.checkpoint.layout import (
    DTYPE_BYTES,
    Weight,
    detect_format,
    layer_of,
    model_weights,
    nbytes,
    storage,
)
from dsv3tools.checkpoint.writer import TORCH_DTYPES
from dsv3tools.config import ModelConfig
from dsv3tools.errors import DSV3Error

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Header facts of one stored tensor."""

    name: str
    shard: str
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check it against the file size; errors name the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise DSV3Error(f"{path}: truncated safetensors file ({size} bytes); re-download it")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise DSV3Error(
                    f"{path}: corrupted safetensors header (length {n}, file {size} bytes); re-download it"
                )
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise DSV3Error(f"{path}: shard file is missing; re-download it (dsv3tools download)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DSV3Error(f"{path}: corrupted safetensors header (not JSON); re-download it") from None
    infos: dict[str, TensorInfo] = {}
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = meta["dtype"], tuple(int(x) for x in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise DSV3Error(
                f"{path}: corrupted header entry for tensor {name}; re-download the shard"
            ) from None
        if dtype not in DTYPE_BYTES or b - a != nbytes(dtype, shape):
            raise DSV3Error(
                f"{path}: tensor {name} has inconsistent dtype/shape/offsets; re-download the shard"
            )
        infos[name] = TensorInfo(name, path.name, dtype, shape, (a, b))
        end = max(end, b)
    if 8 + n + end > size:
        raise DSV3Error(
            f"{path}: truncated: header needs {8 + n + end} bytes, file has {size}; re-download it"
        )
    return infos


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

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise DSV3Error(
                f"{self.path}: no such checkpoint folder; pass --model DIR (or set DSV3TOOLS_MODEL)"
            )
        self.config = ModelConfig.from_file(self.path / "config.json")
        self.weight_map = self._read_index()
        self.shards = sorted(set(self.weight_map.values()))
        self._headers: dict[str, dict[str, TensorInfo]] = {}
        self._handles: dict[str, MappedShard] = {}

    def _read_index(self) -> dict[str, str]:
        idx = self.path / INDEX_NAME
        if idx.is_file():
            try:
                wm = json.loads(idx.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DSV3Error(f"{idx}: corrupted index (no weight_map); re-download it") from None
            for shard in sorted(set(wm.values())):
                if not (self.path / shard).is_file():
                    raise DSV3Error(
                        f"{idx}: names {shard}, which is missing; re-download it (dsv3tools download)"
                    )
            return dict(wm)
        single = self.path / SINGLE_NAME
        if single.is_file():
            return {name: SINGLE_NAME for name in read_header(single)}
        raise DSV3Error(f"{self.path}: no {INDEX_NAME} or {SINGLE_NAME}; not a safetensors checkpoint")

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

    # ---- validation ------------------------------------------------------------------------------
    def expected(self) -> list[Weight]:
        """Weights the config implies; a folder marked ``"dsv3tools_part": "mtp"`` (split-mtp) holds only the MTP layers."""
        weights = model_weights(self.config)
        if self.config.raw.get("dsv3tools_part") == "mtp":
            weights = [w for w in weights if w.layer is not None and w.layer >= self.config.num_hidden_layers]
        return weights

    def storage_of(self, w: Weight) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Expected on-disk tensors of ``w`` in the format it is actually stored in (default: config's)."""
        fmt = self.linear_format(w.name) if w.linear else None
        if fmt == "bf16" and self.info(f"{w.name}.weight").dtype == "F8_E4M3":
            fmt = "fp8"  # an FP8 weight whose scale is missing: report the missing scale
        if fmt is None:
            fmt = self.config.quant.method if self.config.quant.method != "none" else "bf16"
        return storage(w, fmt, self.config.quant.block, self.config.quant.group_size)

    def problems(self) -> list[str]:
        """Every mismatch between the stored tensors and the config (names, shapes, dtypes, scale grids)."""
        infos = self.infos()
        probs = [
            f"{n}: listed in the index under {s} but stored in {infos[n].shard}"
            for n, s in self.weight_map.items()
            if n in infos and infos[n].shard != s
        ]
        probs += [
            f"{n}: listed in the index but missing from {s}"
            for n, s in self.weight_map.items()
            if n not in infos
        ]
        seen: set[str] = set()
        for w in self.expected():
            for name, (dtype, shape) in self.storage_of(w).items():
                seen.add(name)
                info = infos.get(name)
                if info is None:
                    hint = " (FP8 weight without its scale)" if name.endswith("_scale_inv") else ""
                    probs.append(f"{name}: missing{hint}")
                    continue
                if info.shape != shape:
                    probs.append(f"{name}: shape {list(info.shape)}, expected {list(shape)}")
                ok = {dtype} | (
                    {"BF16", "F16", "F32"}
                    if dtype in ("BF16", "F32") and not name.endswith("_scale_inv")
                    else set()
                )
                if info.dtype not in ok:
                    probs.append(f"{name}: dtype {info.dtype}, expected {dtype}")
        probs += [f"{n}: unexpected tensor for this config" for n in sorted(set(infos) - seen)]
        return probs

    def validate(self) -> None:
        """Raise DSV3Error with the first problem (and how many more) if the checkpoint is inconsistent."""
        probs = self.problems()
        if probs:
            more = f" (+{len(probs) - 1} more; run dsv3tools inspect)" if len(probs) > 1 else ""
            raise DSV3Error(f"{self.path}: {probs[0]}{more}")

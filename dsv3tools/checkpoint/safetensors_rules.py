"""The file-level rules of the validation gate (:mod:`dsv3tools.checkpoint.validate`): a safetensors
shard exactly as the safetensors library reads it, a JSON object file, a file name that must stay inside
its folder, and an index. Each rule returns its problem lines (file or tensor, what is wrong, the fix)
instead of raising, so the gate can report every failure; :func:`read_header` is the raising form."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from dsv3tools.checkpoint.layout import DTYPE_BYTES, nbytes
from dsv3tools.errors import ValidationError

INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER = 100_000_000  # safetensors' own limit on the header length
FIX_SHARD = "re-download the shard (dsv3tools download)"
FIX_INDEX = f"re-download {INDEX_NAME}"


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


class _Duplicate(ValueError):
    pass


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict:
    """``json`` object hook: a name given twice is an error (json would keep the last silently)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        raise _Duplicate(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def _is_count(v: object) -> bool:
    return type(v) is int and v >= 0  # bool is a subclass of int, not the type


# ---- one safetensors file ----------------------------------------------------------------------------
def _load_header(path: Path) -> tuple[dict, int, int] | str:
    """(header object, header length, file size), or the problem line."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return f"{path}: truncated ({size} bytes, shorter than the 8-byte header length); {FIX_SHARD}"
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER:
                return (
                    f"{path}: header length {n:,} is over safetensors' limit of {MAX_HEADER:,}; {FIX_SHARD}"
                )
            if 8 + n > size:
                return (
                    f"{path}: header length {n:,} runs past the end of the file ({size:,} bytes); {FIX_SHARD}"
                )
            text = f.read(n).decode("utf-8")
        header = json.loads(text, object_pairs_hook=_unique_pairs)
    except FileNotFoundError:
        return f"{path}: missing; {FIX_SHARD}"
    except UnicodeDecodeError:
        return f"{path}: header is not UTF-8 text; {FIX_SHARD}"
    except _Duplicate as e:
        return f"{path}: tensor {e} appears twice in the header; {FIX_SHARD}"
    except json.JSONDecodeError:
        return f"{path}: header is not JSON; {FIX_SHARD}"
    except OSError as e:
        return f"{path}: cannot be read ({e.strerror}); check its permissions or {FIX_SHARD}"
    if not isinstance(header, dict):
        return f"{path}: header is a JSON {type(header).__name__}, not an object; {FIX_SHARD}"
    return header, n, size


def _entry(path: Path, name: str, meta: object) -> TensorInfo | str:
    """One header entry checked like safetensors' ``TensorInfo``, or the problem line."""
    if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= meta.keys():
        return f"{path}: tensor {name}: entry needs dtype, shape and data_offsets; {FIX_SHARD}"
    dtype, shape, offs = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        return (
            f"{path}: tensor {name}: unknown dtype {dtype!r} (known: {', '.join(DTYPE_BYTES)}); {FIX_SHARD}"
        )
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        return f"{path}: tensor {name}: shape {shape!r} is not a list of non-negative integers; {FIX_SHARD}"
    if not isinstance(offs, list) or len(offs) != 2 or not all(_is_count(o) for o in offs):
        return f"{path}: tensor {name}: data_offsets {offs!r} are not two non-negative integers; {FIX_SHARD}"
    a, b = offs
    if b < a or b - a != nbytes(dtype, tuple(shape)):
        return (
            f"{path}: tensor {name}: data_offsets [{a}, {b}] hold {b - a} bytes, but {dtype} {shape} needs "
            f"{nbytes(dtype, tuple(shape))}; {FIX_SHARD}"
        )
    return TensorInfo(name, path.name, dtype, tuple(shape), (a, b))


def parse_header(path: Path) -> tuple[dict[str, TensorInfo], list[str]]:
    """A shard's tensors and every way its header breaks the safetensors rules (empty when valid)."""
    loaded = _load_header(path)
    if isinstance(loaded, str):
        return {}, [loaded]
    header, n, size = loaded
    probs: list[str] = []
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        probs.append(f"{path}: __metadata__ must map strings to strings; {FIX_SHARD}")
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        got = _entry(path, name, entry)
        if isinstance(got, str):
            probs.append(got)
        else:
            infos[name] = got
    if probs:
        return infos, probs
    pos, prev = 0, None
    for info in sorted(infos.values(), key=lambda i: i.offsets):
        a, b = info.offsets
        if a < pos:
            probs.append(f"{path}: tensor {info.name}'s data overlaps tensor {prev}'s; {FIX_SHARD}")
        elif a > pos:
            probs.append(
                f"{path}: {a - pos} bytes before tensor {info.name} belong to no tensor; {FIX_SHARD}"
            )
        pos, prev = max(pos, b), info.name
    data = size - 8 - n
    if not probs and pos > data:
        probs.append(f"{path}: truncated: its tensors need {pos:,} data bytes, it has {data:,}; {FIX_SHARD}")
    elif not probs and pos < data:
        probs.append(f"{path}: {data - pos:,} bytes after the last tensor belong to no tensor; {FIX_SHARD}")
    return infos, probs


def read_header(path: Path) -> dict[str, TensorInfo]:
    """A shard's tensors; raises :class:`ValidationError` if the header breaks a safetensors rule."""
    infos, probs = parse_header(Path(path))
    if probs:
        raise ValidationError(probs)
    return infos


# ---- file names, the index, the config -----------------------------------------------------------
def _allowed_root(folder: Path) -> Path:
    """Where the folder's files may resolve to: the folder, or for a Hugging Face cache snapshot
    (``models--X/snapshots/REV``) its repo folder, which holds the ``blobs/`` the snapshot links to."""
    real = folder.resolve()
    return real.parent.parent if real.parent.name == "snapshots" else real


def file_problem(folder: Path, fname: object, where: Path) -> str | None:
    """Why ``fname`` (named by ``where``) is not a plain file of the folder, or None."""
    bad = f"{where}: names {fname!r}"
    if not isinstance(fname, str) or not fname or fname in (".", ".."):
        return f"{bad}, not a file name; {FIX_INDEX}"
    if "/" in fname or "\\" in fname or os.path.isabs(fname):
        return f"{bad}, a path (files must sit in the checkpoint folder); {FIX_INDEX}"
    path = folder / fname
    if not path.is_file():
        return f"{bad}, which is missing; {FIX_SHARD}"
    if path.is_symlink() and not path.resolve().is_relative_to(_allowed_root(folder)):
        return f"{folder / fname}: a symlink to {path.resolve()}, outside the checkpoint folder; replace it with the file"
    return None


def read_json_object(path: Path, fix: str) -> tuple[dict | None, str | None]:
    """A JSON object file, or the problem line (names given twice are a problem)."""
    try:
        d = json.loads(path.read_text(), object_pairs_hook=_unique_pairs)
    except FileNotFoundError:
        return None, f"{path}: missing; {fix}"
    except _Duplicate as e:
        return None, f"{path}: {e} appears twice; {fix}"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, f"{path}: not valid JSON; {fix}"
    except OSError as e:
        return None, f"{path}: cannot be read ({e.strerror}); {fix}"
    if not isinstance(d, dict):
        return None, f"{path}: a JSON {type(d).__name__}, not an object; {fix}"
    return d, None


def read_index(folder: Path, index: Path) -> tuple[dict[str, str], list[str]]:
    """The index's ``weight_map`` and every rule it breaks (names, plain file names in the folder)."""
    d, prob = read_json_object(index, FIX_INDEX)
    if prob:
        return {}, [prob]
    wm = d.get("weight_map")
    if not isinstance(wm, dict):
        return {}, [f"{index}: no weight_map object; {FIX_INDEX}"]
    probs = [
        problem for f in sorted(set(map(str, wm.values()))) if (problem := file_problem(folder, f, index))
    ]
    probs += [
        f"{index}: tensor {n} maps to {f!r}, not a file name; {FIX_INDEX}"
        for n, f in wm.items()
        if not isinstance(f, str)
    ]
    return dict(wm), probs

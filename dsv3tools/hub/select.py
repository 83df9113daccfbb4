"""``download --include``: which repo files a subset (config, main, mtp, layers:A-B) needs, resolved through
the checkpoint's index and config without fetching any weights."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Protocol

from dsv3tools.checkpoint.layout import layer_of
from dsv3tools.errors import DSV3Error

DEFAULT_REPO = "deepseek-ai/DeepSeek-V3"

INDEX = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".onnx")
_LAYERS_RE = re.compile(r"^layers:(\d+)(?:-(\d+))?$")


class Named(Protocol):
    name: str


def is_weight(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


def parse_include(values: list[str] | None) -> list[str]:
    """Normalize ``--include`` values (``all``, ``config``, ``main``, ``mtp``, ``layers:A-B``); checks syntax."""
    out: list[str] = []
    for raw in values or ["all"]:
        for v in (p.strip() for p in raw.split(",")):
            m = _LAYERS_RE.match(v)
            if v in ("all", "config", "main", "mtp"):
                out.append(v)
            elif m:
                a, b = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
                if a > b:
                    raise DSV3Error(f"--include {v}: first layer is after the last; write layers:{b}-{a}")
                out.append(f"layers:{a}-{b}")
            else:
                raise DSV3Error(f"--include {v!r}: unknown subset; use all, config, main, mtp or layers:A-B")
    return list(dict.fromkeys(out))


def _layer_ranges(include: list[str], config: dict) -> list[tuple[float, float]]:
    """Layer ranges selected by the weight subsets; main uses -1 for non-layer tensors."""
    n = int(config.get("num_hidden_layers", 0))
    k = int(config.get("num_nextn_predict_layers", 0))
    ranges: list[tuple[float, float]] = []
    for inc in include:
        if inc == "main":
            ranges.append((-1, n - 1))
        elif inc == "mtp":
            if k < 1:
                raise DSV3Error(
                    "config.json: num_nextn_predict_layers is 0, so there is no MTP layer; drop --include mtp"
                )
            ranges.append((n, n + k - 1))
        elif inc.startswith("layers:"):
            a, b = (int(x) for x in inc[len("layers:") :].split("-"))
            if b >= n + k:
                raise DSV3Error(
                    f"--include {inc}: the checkpoint has layers 0..{n + k - 1}; pick a range inside it"
                )
            ranges.append((a, b))
    return ranges


def shards_for(index: dict, config: dict, include: list[str]) -> set[str]:
    """Shards of ``index`` that hold a tensor selected by the weight subsets in ``include``."""
    ranges = _layer_ranges(include, config)
    out = set()
    for name, shard in index.get("weight_map", {}).items():
        layer = layer_of(name)
        key = -1 if layer is None else layer
        if any(a <= key <= b for a, b in ranges):
            out.add(shard)
    return out


def select(files: Sequence[Named], include: list[str], load: Callable[[str], dict]) -> list:
    """Files for ``include``; ``load(name)`` reads config.json or the index when a subset needs them."""
    if "all" in include:
        return list(files)
    chosen = {f.name for f in files if not is_weight(f.name)}
    if any(i != "config" for i in include):
        names = {f.name for f in files}
        if INDEX in names:
            shards = shards_for(load(INDEX), load("config.json"), include)
            missing = sorted(shards - names)
            if missing:
                raise DSV3Error(
                    f"{INDEX}: names shard {missing[0]} that the repo lacks; the repo is incomplete at this revision"
                )
            chosen |= shards
        else:
            chosen |= {f.name for f in files if is_weight(f.name)}  # single-file checkpoint: take it whole
    return [f for f in files if f.name in chosen]

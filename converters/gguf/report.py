"""``inspect x.gguf``: what a GGUF model holds, from its headers (no tensor data is read): the architecture and
family member its metadata describes, its files, tensor count, and per GGML type and per component (embed,
attention, indexer, dense MLP, routed experts, shared experts, router, norms, head, MTP) the tensors,
parameters, bytes and bits per weight; plus every validation problem. :func:`check_gguf_data` reads every
tensor once (one tensor or expert dequantized at a time) for ``--check-data``."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from dsv3tools.checkpoint.inspect import COMPONENTS
from dsv3tools.checkpoint.layout import model_weights

from .plan import GGUFTensor
from .read import GGUFModel, can_dequantize, open_gguf


def _component(t: GGUFTensor, components: dict[str, str]) -> str:
    """The layout's component of the tensor's (first) HF source, with every norm outside MTP as ``norm``."""
    src = t.sources[0]
    comp = components[src]
    return "norm" if comp != "mtp" and src.endswith("norm.weight") else comp


def _bpw(nbytes: int, params: int) -> float:
    return round(8 * nbytes / params, 4) if params else 0.0


def _by_component(gm: GGUFModel) -> tuple[dict[str, dict], dict[str, dict]]:
    """({component: params, bytes, bits/weight, types}, {type: tensors, params, bytes}) over present tensors."""
    cfg = gm.config
    components = {w.name: w.component for w in model_weights(cfg)}
    comp_rows: dict[str, dict] = defaultdict(
        lambda: {"params": 0, "bytes": 0, "tensors": 0, "types": Counter()}
    )
    type_rows: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "params": 0, "bytes": 0})
    for t in gm.plan:
        rt = gm.tensors.get(t.name)
        if rt is None:
            continue
        row = comp_rows[_component(t, components)]
        typ = type_rows[rt.tensor_type.name]
        for r in (row, typ):
            r["params"] += int(rt.n_elements)
            r["bytes"] += int(rt.n_bytes)
            r["tensors"] += 1
        row["types"][rt.tensor_type.name] += 1
    comps = {
        c: {
            "params": comp_rows[c]["params"],
            "bytes": comp_rows[c]["bytes"],
            "bits_per_weight": _bpw(comp_rows[c]["bytes"], comp_rows[c]["params"]),
            "types": dict(comp_rows[c]["types"]),
        }
        for c in COMPONENTS
        if c in comp_rows
    }
    types = {k: dict(v, bits_per_weight=_bpw(v["bytes"], v["params"])) for k, v in sorted(type_rows.items())}
    return comps, types


def _file_type(meta: dict) -> str | None:
    ft = meta.get("general.file_type")
    try:
        return gguf.LlamaFileType(ft).name.removeprefix("MOSTLY_") if ft is not None else None
    except ValueError:
        return str(ft)


def inspect_gguf(path: str | Path) -> dict:
    """The inspect report of a GGUF model as a JSON-able dict (``format`` is ``gguf``)."""
    gm = open_gguf(path, inventory=False)  # unreadable files raise; the inventory's problems are reported
    cfg, meta = gm.config, gm.meta
    comps, types = _by_component(gm)
    params = sum(c["params"] for c in comps.values())
    nbytes = sum(int(t.n_bytes) for t in gm.tensors.values())
    p_mtp = comps.get("mtp", {}).get("params", 0)
    return {
        "path": str(gm.path),
        "format": "gguf",
        "architecture": gm.arch,
        "family": cfg.family,
        "model_type": cfg.raw.get("model_type"),
        "name": meta.get("general.name"),
        "file_type": _file_type(meta),
        "files": [str(f) for f in gm.files],
        "num_files": len(gm.files),
        "num_tensors": len(gm.tensors),
        "bytes_total": nbytes,
        "file_bytes": sum(f.stat().st_size for f in gm.files),
        "params_total": params,
        "params_main": params - p_mtp,
        "params_mtp": p_mtp,
        "bits_per_weight": _bpw(sum(c["bytes"] for c in comps.values()), params),
        "types": types,
        "components": comps,
        "num_layers": cfg.num_hidden_layers,
        "mtp_layers": cfg.mtp_layers,
        "tokenizer": {
            "model": meta.get("tokenizer.ggml.model"),
            "pre": meta.get("tokenizer.ggml.pre"),
            "tokens": meta.get("tokenizer.ggml.tokens"),
        },
        "config": dict(cfg.raw),
        "kv_cache_bytes_per_token": cfg.kv_cache_bytes_per_token(),
        "kv_cache_values_per_token_per_layer": cfg.kv_cache_values_per_token_per_layer(),
        "problems": list(gm.problems),
    }


def check_gguf_data(path: str | Path, progress: Callable[[int], None] = lambda n: None) -> dict:
    """Every tensor read once, one tensor (one expert of a stack) dequantized at a time: NaN/Inf values are
    problems, all-zero tensors a warning (the shape of ``inspect --check-data``'s result)."""
    gm = open_gguf(path, inventory=False)
    problems, zeros = [], []
    for name, rt in gm.tensors.items():
        if not can_dequantize(rt.tensor_type):
            continue
        bad = nonzero = 0
        slices = range(rt.data.shape[0]) if len(rt.data.shape) == 3 else [None]
        for i in slices:
            data = rt.data if i is None else rt.data[i]
            values = gguf.quants.dequantize(data, rt.tensor_type)
            bad += int(np.count_nonzero(~np.isfinite(values)))
            nonzero += int(np.count_nonzero(values))
        progress(int(rt.n_bytes))
        if bad:
            problems.append(
                f"{gm.file_of[name]}: tensor {name} holds {bad} NaN/Inf values; re-download the file, or re-run "
                "the conversion that wrote it"
            )
        elif not nonzero:
            zeros.append(name)
    return {"problems": problems, "zero_tensors": zeros}

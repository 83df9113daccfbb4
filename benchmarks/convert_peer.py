"""``benchmarks/convert.py --peer llmcompressor``: ours against llm-compressor's ``model_free_ptq`` on the
same bf16 real-shape input, in one run: bf16 -> FP8_BLOCK (``convert --to fp8``) and bf16 -> NVFP4A16
(``convert --to nvfp4 --int4-scope all``).

llm-compressor 0.14 pins transformers <= 5.17 and compressed-tensors 0.19, so it runs in a virtualenv of
its own (``--peer-python``), in a subprocess, like ours; both are timed end to end (interpreter start and
imports included) with the peak RSS of ``convert.timed`` (largest process and polled process tree). The peer
gets the same ``ignore`` list our output's config carries, so both quantize the same linears. The FP8_BLOCK
outputs are then compared tensor for tensor (our ``weight_scale_inv`` against its ``weight_scale``).

The input: ``synth --preset real-shape --dtype bf16``, one MoE layer at real linear shapes (8 routed experts, a
vocabulary of 8192, no MTP layer), about 1.2 GB.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from convert import drop_cache, emit, timed  # benchmarks/ is sys.path[0] when convert.py runs
from safetensors import safe_open

PEER_SCRIPT = """
import json, sys
from llmcompressor import model_free_ptq
src, out, scheme, ignore, workers = sys.argv[1:6]
model_free_ptq(src, out, scheme=scheme, ignore=json.loads(ignore), max_workers=int(workers), device="cpu")
"""
# ours -> (convert arguments, the model_free_ptq scheme)
CASES = {
    "fp8": (["--to", "fp8"], "FP8_BLOCK"),
    "nvfp4": (["--to", "nvfp4", "--int4-scope", "all"], "NVFP4A16"),
}


def ensure_bf16(path: Path, experts: int) -> Path:
    if not (path / "config.json").is_file():
        from dsv3tools.checkpoint.synth import synthesize

        over = {"vocab_size": 8192, "first_k_dense_replace": 0, "num_nextn_predict_layers": 0}
        synthesize(path, preset="real-shape", dtype="bf16", layers=1, experts=experts, overrides=over)
    return path


def peer_ignore(model: Path) -> list[str]:
    """The unquantized Linear modules of our ``--int4-scope all`` output, as its config lists them, and the
    embedding (which no target of ours quantizes)."""
    from dsv3tools.checkpoint.reader import Checkpoint
    from dsv3tools.quant.ct_config import int4_ignore

    # model_free_ptq matches tensor names, not Linear modules: the embedding must be named too
    return [*int4_ignore(Checkpoint(model).config, "all"), r"re:.*embed_tokens$"]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(folder / shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open has no __iter__)
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    if a.dtype == b.dtype:
        if a.element_size() == 1:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        return bool(torch.equal(a, b))
    return bool(torch.equal(a.float(), b.float()))  # e.g. float32 scales against bf16 ones: same values?


def compare_fp8(ours: Path, peer: Path, source: Path) -> dict:
    """Tensor for tensor: our ``X.weight_scale_inv`` is the peer's ``X.weight_scale``. For every quantized
    weight whose codes differ, the codes are re-derived from the bf16 source with the *peer's* scale
    (``cast(w / s)``, the quotient in float32 as ours, or in bf16 as compressed-tensors divides bf16
    tensors): ``explained_*`` count the weights whose every code equals the peer's that way."""
    a, b, src = tensors(ours), tensors(peer), tensors(source)
    rename = {k: k.removesuffix("_scale_inv") + "_scale" if k.endswith("_scale_inv") else k for k in a}
    diff = [k for k in a if rename[k] in b and not same(a[k], b[rename[k]])]
    row = {"tensors_ours": len(a), "tensors_peer": len(b), "identical": len(a) - len(diff)}
    row["only_ours"] = sorted(k for k in a if rename[k] not in b)[:5]
    row["only_peer"] = sorted(set(b) - set(rename.values()))[:5]
    row["identical"] -= len([k for k in a if rename[k] not in b])
    row["n_differ"] = len(diff)
    row["differ"] = [
        {"name": k, "ours": str(a[k].dtype), "peer": str(b[rename[k]].dtype), **delta(a[k], b[rename[k]])}
        for k in diff[:4]
    ]
    weights = [k for k in diff if k.endswith(".weight") and a[k].dtype == torch.float8_e4m3fn]
    row["weights_differ"] = len(weights)
    for how in ("float32", "bfloat16"):
        row[f"explained_by_peer_scale_{how}_division"] = sum(
            _fp8_explained(src[k], b[k], b[k + "_scale"], getattr(torch, how)) for k in weights
        )
    row["scales_equal_after_bf16_rounding"] = sum(
        bool(torch.equal(a[k + "_scale_inv"].to(b[k + "_scale"].dtype), b[k + "_scale"])) for k in weights
    )
    return row


def _fp8_explained(w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> bool:
    """Are ``codes`` ``cast_e4m3(w / scale)`` of the bf16 weight ``w`` with ``scale`` (the peer's), the
    quotient taken in ``dtype`` (float32: ours; bfloat16: compressed-tensors' ``_quantize`` on bf16 tensors,
    which rounds the quotient to bf16 before the e4m3 cast)?"""
    from dsv3tools.quant.reference import FP8_MAX, expand_scale

    q = (w.to(dtype) / expand_scale(scale, tuple(w.shape)).to(dtype)).float().clamp(-FP8_MAX, FP8_MAX)
    return bool(torch.equal(q.to(torch.float8_e4m3fn).view(torch.uint8), codes.view(torch.uint8)))


def compare_nvfp4(ours: Path, peer: Path, source: Path) -> dict:
    """NVFP4A16 tensor for tensor. Where a weight's codes or scales differ, they are re-derived from the bf16
    source by our own ``nvfp4_quant`` with the *peer's* global scale: ``explained`` counts the weights that
    then equal the peer's bytes (the only recipe difference being which linears share a global scale)."""
    from dsv3tools.quant.fp4 import nvfp4_quant

    a, b, src = tensors(ours), tensors(peer), tensors(source)
    diff = [k for k in a if k in b and not same(a[k], b[k])]
    row = {"tensors_ours": len(a), "tensors_peer": len(b), "only_ours": sorted(set(a) - set(b))[:5]}
    row.update(only_peer=sorted(set(b) - set(a))[:5], identical=len(a) - len(diff) - len(set(a) - set(b)))
    row["n_differ"] = len(diff)
    row["global_scales_differ"] = sorted(k for k in diff if k.endswith("weight_global_scale"))
    modules = sorted({k.rsplit(".", 1)[0] for k in diff})
    explained = 0
    for m in modules:
        packed, scale = nvfp4_quant(src[m + ".weight"], b[m + ".weight_global_scale"])
        explained += same(packed, b[m + ".weight_packed"]) and same(scale, b[m + ".weight_scale"])
    row.update(modules_differ=len(modules), explained_by_peer_global_scale=explained)
    return row


def delta(a: torch.Tensor, b: torch.Tensor) -> dict:
    if a.shape != b.shape:
        return {"shapes": [list(a.shape), list(b.shape)]}
    x, y = a.float(), b.float()
    return {"max_abs": (x - y).abs().max().item(), "n_differ": int((x != y).sum())}


def bench_peer(workdir: Path, peer_python: str, experts: int, workers: int) -> None:
    model = ensure_bf16(workdir / f"rs1bf16e{experts}", experts)
    ignore = json.dumps(peer_ignore(model))
    files = list(model.glob("model-*.safetensors"))
    base = {"input_gb": sum(f.stat().st_size for f in files) / 1e9, "shards": len(files), "workers": workers}
    for to, (args, scheme) in CASES.items():
        ours_out, peer_out = workdir / f"ours-{to}", workdir / f"peer-{to}"
        for d in (ours_out, peer_out):
            shutil.rmtree(d, ignore_errors=True)
        drop_cache(model)
        cmd = [sys.executable, "-m", "dsv3tools", "convert", "--model", str(model), *args]
        ours = timed([*cmd, "--out", str(ours_out), "--workers", str(workers), "--json"])
        drop_cache(model)
        peer = timed(
            [peer_python, "-c", PEER_SCRIPT, str(model), str(peer_out), scheme, ignore, str(workers)]
        )
        row = dict(
            base, ours=to, peer=scheme, ours_s=ours["s"], peer_s=peer["s"], time_ratio=ours["s"] / peer["s"]
        )
        row.update(ours_rss_gib=ours["rss"], peer_rss_gib=peer["rss"], rss_ratio=ours["rss"] / peer["rss"])
        row.update(ours_rss_tree_gib=ours["rss_tree"], peer_rss_tree_gib=peer["rss_tree"])
        row.update((compare_fp8 if to == "fp8" else compare_nvfp4)(ours_out, peer_out, model))
        emit(row)
        for d in (ours_out, peer_out):
            shutil.rmtree(d, ignore_errors=True)

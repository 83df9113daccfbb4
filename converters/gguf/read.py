"""Reading a GGUF model back (SPEC sec. 12): the validation gate for a ``.gguf`` (or its gguf-split shards),
the :class:`~dsv3tools.config.ModelConfig` rebuilt from the GGUF metadata alone, and the tensors mapped back
to HF logical weights, dequantized one tensor (one expert) at a time through ``gguf.quants.dequantize``, so
every type gguf can decode (K-quants and IQ types included) reads back.

The GGUF <-> HF name table is the exporter's (:func:`.plan.plan_tensors` run on the rebuilt config): each
GGUF tensor the plan names must be in the file with the plan's shape; ``attn_k_b`` / ``attn_v_b`` are
recombined into ``kv_b_proj`` (head ``h``: its k_nope rows, transposed back, then its v rows) and
``ffn_*_exps`` are unstacked into one weight per expert. It works on what llama.cpp's ``convert_hf_to_gguf.py``
writes too (the exporter matches it key for key).

The config comes from the ``<arch>.*`` keys (arch ``deepseek2``, or ``deepseek32`` with the
``attention.indexer.*`` keys). What GGUF cannot hold, and what is assumed instead:

- ``rope_scaling.mscale``: GGUF keeps only ``yarn_log_multiplier = 0.1 * mscale_all_dim``; ``mscale`` is
  taken equal to ``mscale_all_dim`` (true for every family member, and the forward then needs only
  ``mscale_all_dim``). YaRN's ``extrapolation_factor`` / ``attention_factor`` are not read (the family has
  none). Float keys are float32 in GGUF; they are read back as their shortest decimal (``1e-06``, not
  ``9.99999997e-07``), which is what config.json held for every released value.
- ``moe_layer_freq`` (1), ``topk_method`` (``noaux_tc``, the ``exp_probs_b`` bias), ``indexer_rope_interleave``
  (False) are not in GGUF and take those values; ``tie_word_embeddings`` is whether ``output.weight`` is absent;
  ``bos_token_id`` / ``eos_token_id`` come from ``tokenizer.ggml.*`` (0 / 1 when the file has no tokenizer).
- The member: ``deepseek2`` does not say V3, V3.1 (its ue8m0 block scales are gone once written as GGUF),
  Kimi-K2 or Moonlight. The config's model_type is ``deepseek_v32`` for ``deepseek32``, ``kimi_k2`` when the
  tokenizer's ``tokenizer.ggml.pre`` is llama.cpp's ``kimi-k2``, else ``deepseek_v3`` (Moonlight is then
  recognised by its missing ``q_lora_rank``, as from its config.json).
- ``quantization_config``: none; the weights are dequantized (F32 / F16 / BF16 tensors stay as stored).
- GGUFs from before llama.cpp's MLA split (one ``attn_kv_b``, no ``key_length_mla``) are refused by name.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from dsv3tools.checkpoint.layout import model_weights
from dsv3tools.config import ModelConfig
from dsv3tools.errors import DSV3Error, ValidationError

from .files import model_file, split_files
from .plan import DEEPSEEK2, DEEPSEEK32, GGUFArch, GGUFOptions, GGUFTensor, plan_tensors

Q = gguf.GGMLQuantizationType
# the family's GGUF architectures (the exporter's table) and the config.json model_type each reads back as
ARCHS: dict[str, tuple[GGUFArch, str]] = {
    DEEPSEEK2.name: (DEEPSEEK2, "deepseek_v3"),
    DEEPSEEK32.name: (DEEPSEEK32, "deepseek_v32"),
}
# llama.cpp pre-tokenizer names that identify a member deepseek2 itself does not name
PRE_MODEL_TYPES = {"kimi-k2": "kimi_k2"}
FIX = "re-download it, or re-run the conversion that wrote it"
OUTPUT = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"  # absent: the head is the embedding (tied)
KV_B = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ATTN_KV_B].rpartition(".")[2] + ".weight"  # pre-MLA-split layout
_REQUIRED = object()


def _decimal(v: float) -> float:
    """A float32 metadata value as its shortest decimal (what config.json held)."""
    return float(np.format_float_positional(np.float32(v), unique=True, trim="-"))


def _reader(path: Path) -> gguf.GGUFReader:
    """The file's header parsed by gguf's own reader over a private (copy-on-write) map."""
    try:
        reader = gguf.GGUFReader(path, "c")
    except Exception as e:  # gguf's parser raises anything (ValueError, IndexError, KeyError...) on bad bytes
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DSV3Error(
            f"{path}: not a readable GGUF file ({why}); it is truncated or corrupt: {FIX}"
        ) from None
    return reader  # a tensor running past the end of the file fails the parse (its data view is short)


def metadata(reader: gguf.GGUFReader, where: str) -> dict[str, Any]:
    """Scalar and string metadata (float32 values as their shortest decimal); arrays as their length."""
    out: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if not f.types or key.startswith("GGUF."):
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            out[key] = len(f.data)
            continue
        try:
            v = f.contents()
        except UnicodeDecodeError:
            raise DSV3Error(f"{where}: metadata key {key} is not valid UTF-8; {FIX}") from None
        out[key] = _decimal(v) if f.types[0] == gguf.GGUFValueType.FLOAT32 else v
    return out


class _Keys:
    """``<arch>.<key>`` (or a gguf ``{arch}.…`` template) lookups; a missing required key is an error naming
    the file and the key."""

    def __init__(self, meta: dict[str, Any], arch: str, where: str):
        self.meta, self.arch, self.where = meta, arch, where

    def __call__(self, key: str, default: Any = _REQUIRED) -> Any:
        full = key.format(arch=self.arch) if "{arch}" in key else f"{self.arch}.{key}"
        if full in self.meta:
            return self.meta[full]
        if default is _REQUIRED:
            raise DSV3Error(
                f"{self.where}: metadata key {full} is missing; re-convert with dsv3tools convert --to gguf "
                "or a current llama.cpp convert_hf_to_gguf.py"
            )
        return default

    def has(self, key: str) -> bool:
        return f"{self.arch}.{key}" in self.meta

    def number(self, key: str, default: Any = _REQUIRED, kind: type = int) -> Any:
        """A numeric key (``kind`` int: an integer), checked before any arithmetic on it."""
        v = self(key, default)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or v == int(v))
        if v is not None and not ok:
            raise DSV3Error(
                f"{self.where}: metadata key {self.arch}.{key} must be a {kind.__name__}, got {v!r}"
            )
        return v


def _rope_scaling(k: _Keys) -> dict | None:
    kind = k("rope.scaling.type", None)
    if kind in (None, "none"):
        return None
    rs: dict[str, Any] = {
        "type": kind,
        "factor": k("rope.scaling.factor"),
        "original_max_position_embeddings": k("rope.scaling.original_context_length"),
    }
    for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        if k.has(f"rope.scaling.{key}"):
            rs[name] = k(f"rope.scaling.{key}")
    log_mul = k.number("rope.scaling.yarn_log_multiplier", None, float)
    if log_mul is not None:  # = 0.1 * mscale_all_dim; mscale assumed equal (module docstring)
        rs["mscale_all_dim"] = rs["mscale"] = float(f"{log_mul / 0.1:.7g}")
    return rs


def _check_arch(meta: dict[str, Any], names: set[str], where: str) -> str:
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise DSV3Error(
            f"{where}: GGUF architecture {arch!r} is not in the DeepSeek-V3 family ({', '.join(ARCHS)}); "
            "dsv3tools reads only those"
        )
    k = _Keys(meta, arch, where)
    if not k.has("attention.key_length_mla") and any(n.endswith(KV_B) for n in names):
        raise DSV3Error(
            f"{where}: written before llama.cpp's MLA layout (one attn_kv_b, no key_length_mla); re-convert it "
            "with dsv3tools convert --to gguf or a current convert_hf_to_gguf.py"
        )
    gating = k("expert_gating_func", int(gguf.ExpertGatingFuncType.SOFTMAX))
    if gating != gguf.ExpertGatingFuncType.SIGMOID:
        raise DSV3Error(
            f"{where}: expert_gating_func {gating} (softmax routing: DeepSeek-V2/V2.5) is not supported: "
            "dsv3tools handles the DeepSeek-V3 family (sigmoid routing)"
        )
    return arch


def config_from_metadata(meta: dict[str, Any], names: set[str], where: str) -> ModelConfig:
    """The model config from GGUF metadata alone (``names``: the file's tensor names, for tied embeddings
    and the pre-MLA layout check); the module docstring lists what is assumed."""
    arch = _check_arch(meta, names, where)
    k = _Keys(meta, arch, where)
    nextn = k.number("nextn_predict_layers", 0)
    rope_dim = k.number("rope.dimension_count")
    spec, model_type = ARCHS[arch]
    if spec is DEEPSEEK2:  # names no member; the tokenizer may
        model_type = PRE_MODEL_TYPES.get(meta.get("tokenizer.ggml.pre"), model_type)
    d: dict[str, Any] = {
        "model_type": model_type,
        "hidden_size": k("embedding_length"),
        "intermediate_size": k("feed_forward_length"),
        "moe_intermediate_size": k("expert_feed_forward_length"),
        "num_hidden_layers": k.number("block_count") - nextn,
        "first_k_dense_replace": k("leading_dense_block_count", 0),
        "n_routed_experts": k("expert_count"),
        "n_shared_experts": k("expert_shared_count", 0),
        "num_experts_per_tok": k("expert_used_count"),
        "n_group": k("expert_group_count", 1),
        "topk_group": k("expert_group_used_count", 1),
        "routed_scaling_factor": k("expert_weights_scale", 1.0),
        "norm_topk_prob": bool(k("expert_weights_norm", False)),
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "num_attention_heads": k("attention.head_count"),
        "q_lora_rank": k("attention.q_lora_rank", None),
        "kv_lora_rank": k("attention.kv_lora_rank"),
        "qk_nope_head_dim": k.number("attention.key_length_mla") - rope_dim,
        "qk_rope_head_dim": rope_dim,
        "v_head_dim": k("attention.value_length_mla"),
        "vocab_size": k("vocab_size", meta.get("tokenizer.ggml.tokens")),
        "rms_norm_eps": k("attention.layer_norm_rms_epsilon"),
        "rope_theta": k("rope.freq_base", 10000.0),
        "rope_scaling": _rope_scaling(k),
        "max_position_embeddings": k("context_length"),
        "tie_word_embeddings": OUTPUT not in names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id", 0),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id", 1),
        "num_nextn_predict_layers": nextn,
    }
    if d["vocab_size"] is None:
        raise DSV3Error(
            f"{where}: neither {arch}.vocab_size nor tokenizer.ggml.tokens says the vocabulary size"
        )
    for key, attr in spec.kv:  # deepseek32: the DSA indexer's head count, head dim and top-k
        d[attr] = k(key)
    return ModelConfig.from_dict(d, where)


@dataclass
class GGUFModel:
    """An opened GGUF model: its files, metadata, rebuilt config, tensors by name and the export plan they
    must match (``problems``: every mismatch, one line each)."""

    path: Path
    files: list[Path]
    meta: dict[str, Any]
    config: ModelConfig
    tensors: dict[str, Any]  # name -> gguf ReaderTensor
    file_of: dict[str, Path]
    plan: list[GGUFTensor]
    problems: list[str] = field(default_factory=list)

    @property
    def arch(self) -> str:
        return self.meta["general.architecture"]


def _split_problems(readers: list[gguf.GGUFReader], files: list[Path]) -> list[str]:
    """Each file is split ``i`` of ``len(files)`` by its own ``split.*`` keys (a plain file has none)."""
    probs = []
    for i, (r, f) in enumerate(zip(readers, files, strict=True)):
        no, count = r.get_field("split.no"), r.get_field("split.count")
        if len(files) == 1 and (count is None or count.contents() == 1):
            continue
        if no is None or count is None or (no.contents(), count.contents()) != (i, len(files)):
            probs.append(f"{f}: not split {i + 1} of {len(files)} by its split.no / split.count keys; {FIX}")
    total = readers[0].get_field("split.tensors.count")
    held = sum(len(r.tensors) for r in readers)
    if total is not None and total.contents() != held:
        probs.append(
            f"{files[0]}: split.tensors.count says {total.contents()} tensors, the splits hold {held}"
        )
    return probs


def _inventory(gm: GGUFModel) -> list[str]:
    """Every planned tensor present with its shape and a type gguf can dequantize; nothing else present."""
    probs, planned = [], set()
    for t in gm.plan:
        planned.add(t.name)
        rt = gm.tensors.get(t.name)
        if rt is None:
            probs.append(
                f"{gm.path}: tensor {t.name} is missing (from {t.sources[0]}); the GGUF is incomplete"
            )
            continue
        shape = tuple(reversed(rt.shape.tolist()))
        if shape != tuple(t.shape):
            probs.append(
                f"{gm.file_of[t.name]}: tensor {t.name} has shape {list(shape)}, the metadata implies "
                f"{list(t.shape)}; {FIX}"
            )
        if not can_dequantize(rt.tensor_type):
            probs.append(
                f"{gm.file_of[t.name]}: tensor {t.name} is {rt.tensor_type.name}, which gguf.quants cannot "
                "dequantize; upgrade gguf or re-quantize it to a supported type"
            )
    extra = [n for n in gm.tensors if n not in planned]
    if extra:
        more = f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""
        probs.append(f"{gm.file_of[extra[0]]}: unexpected tensor {extra[0]}{more} for {gm.arch}; {FIX}")
    return probs


@functools.cache
def can_dequantize(qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether ``gguf.quants.dequantize`` decodes ``qtype`` (probed on one zero block)."""
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    try:
        gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
    except (NotImplementedError, ValueError, TypeError):
        return False
    return True


def _fingerprint(files: list[Path]) -> tuple:
    """(path, size, mtime, inode) per file: a rewritten file is opened again."""
    out = []
    for f in files:
        st = f.stat()
        out.append((str(f.absolute()), st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def open_gguf(path: str | Path, inventory: bool = True) -> GGUFModel:
    """Open and check a GGUF model from its headers (SPEC sec. 14): readable files, complete splits, a family
    architecture with the metadata of a config, and (``inventory``) every tensor the config implies, with its
    shape and a decodable type, and nothing else. Raises :class:`DSV3Error` for a file that cannot be read,
    :class:`ValidationError` (one line per problem) for the inventory; cached per file state."""
    first = model_file(path)
    files = split_files(first)
    gm = _open(_fingerprint(files))
    if inventory and gm.problems:
        raise ValidationError(list(gm.problems))
    return gm


@functools.lru_cache(maxsize=4)
def _open(fingerprint: tuple) -> GGUFModel:
    files = [Path(f[0]) for f in fingerprint]
    readers = [_reader(f) for f in files]
    tensors: dict[str, Any] = {}
    file_of: dict[str, Path] = {}
    probs = _split_problems(readers, files)
    for r, f in zip(readers, files, strict=True):
        for t in r.tensors:
            if t.name in tensors:
                probs.append(f"{f}: tensor {t.name} is also in {file_of[t.name]}; {FIX}")
            tensors[t.name], file_of[t.name] = t, f
    meta = metadata(readers[0], str(files[0]))
    cfg = config_from_metadata(meta, set(tensors), str(files[0]))
    try:
        plan = plan_tensors(cfg, GGUFOptions(mtp=cfg.num_nextn_predict_layers > 0))
    except DSV3Error as e:
        raise DSV3Error(
            f"{files[0]}: {meta['general.architecture']} tensors cannot be mapped back yet ({e})"
        ) from None
    gm = GGUFModel(files[0], files, meta, cfg, tensors, file_of, plan)
    gm.problems = probs + _inventory(gm)
    return gm


# ---- values ------------------------------------------------------------------------------------------------
def tensor_values(rt: Any, index: int | None, dtype: torch.dtype) -> torch.Tensor:
    """A stored tensor (or its ``index``-th slice along the first dim: one expert) as torch: F32 / F16 / BF16
    as views on the file's map (exact, nothing copied), any other type dequantized by ``gguf.quants`` into
    ``dtype``."""
    data = rt.data if index is None else rt.data[index]
    q = rt.tensor_type
    if q in (Q.F32, Q.F16):
        return torch.from_numpy(data)
    if q == Q.BF16:
        return torch.from_numpy(data.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(gguf.quants.dequantize(data, q)).to(dtype)


def _kv_b(cfg: ModelConfig, k_b: torch.Tensor, v_b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``kv_b_proj [heads * (nope + v), kv_lora_rank]`` from ``attn_k_b [heads, rank, nope]`` and
    ``attn_v_b [heads, v, rank]``."""
    if k_b.dtype != v_b.dtype:
        k_b, v_b = k_b.to(dtype), v_b.to(dtype)
    kv = torch.cat([k_b.transpose(1, 2), v_b], dim=1)
    return kv.reshape(cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)


def hf_tensors(gm: GGUFModel, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF tensor name, values) for every weight of the model, one tensor (one expert) at a time, in file
    plan order. Quantized matrices are dequantized into ``dtype``; quantized tensors the exporter keeps F32
    by rule (norms, router, biases) into float32."""
    cfg = gm.config
    linear = {w.name for w in model_weights(cfg) if w.linear}
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for t in gm.plan:
        rt = gm.tensors[t.name]
        target = dtype if t.quantizable else torch.float32
        if len(t.sources) > 1:  # stacked routed experts
            for e, src in enumerate(t.sources):
                yield f"{src}.weight", tensor_values(rt, e, target)
            continue
        src = t.sources[0]
        if t.part is not None:
            halves.setdefault(src, {})[t.part] = tensor_values(rt, None, target)
            if len(halves[src]) == 2:
                parts = halves.pop(src)
                yield f"{src}.weight", _kv_b(cfg, parts["k_b"], parts["v_b"], target)
            continue
        values = tensor_values(rt, None, target)
        yield (f"{src}.weight" if src in linear else src), values
        if cfg.tie_word_embeddings and src == "model.embed_tokens.weight":
            yield "lm_head.weight", values

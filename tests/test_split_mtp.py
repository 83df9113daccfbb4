"""split-mtp / merge-mtp: byte-identical round trip, both halves validate, the MTP parameter count of the
full layout from a dry run, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv3tools.checkpoint.inspect import inspect_checkpoint
from dsv3tools.checkpoint.layout import layer_of
from dsv3tools.checkpoint.reader import Checkpoint
from dsv3tools.checkpoint.synth import synthesize
from tests.conftest import raw_tensors, run_cli


def test_split_then_merge_is_byte_identical(tiny_fp8: Path, tmp_path: Path) -> None:
    out = tmp_path / "split"
    r = run_cli("split-mtp", "--model", tiny_fp8, "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    orig_cfg = json.loads((tiny_fp8 / "config.json").read_text())
    n = orig_cfg["num_hidden_layers"]  # tiny: layers 0..2, MTP layer 3 (the real model: 0..60 and 61)
    main, mtp = out / "main", out / "mtp"
    # main: no MTP tensor, num_nextn_predict_layers 0, passes validation
    main_cfg = json.loads((main / "config.json").read_text())
    assert main_cfg == dict(orig_cfg, num_nextn_predict_layers=0)
    assert Checkpoint(main).problems() == [] and inspect_checkpoint(main)["problems"] == []
    main_raw = raw_tensors(main)
    assert all((layer_of(t) or 0) < n for t in main_raw)
    # mtp: exactly layer n, the original config plus the marker, passes validation
    mtp_cfg = json.loads((mtp / "config.json").read_text())
    assert mtp_cfg == dict(orig_cfg, dsv3tools_part="mtp")
    mtp_raw = raw_tensors(mtp)
    orig = raw_tensors(tiny_fp8)
    assert set(mtp_raw) == {t for t in orig if layer_of(t) == n}
    assert Checkpoint(mtp).problems() == [] and inspect_checkpoint(mtp)["problems"] == []
    assert inspect_checkpoint(mtp)["params_mtp"] == res["mtp_params"] > 0
    assert {**main_raw, **mtp_raw} == orig
    assert (mtp / "tokenizer.json").read_bytes() == (tiny_fp8 / "tokenizer.json").read_bytes()
    # merge: every tensor byte-identical, the original config restored
    merged = tmp_path / "merged"
    r = run_cli("merge-mtp", "--main", main, "--mtp", mtp, "--out", merged, "--json")
    assert r.returncode == 0, r.stderr
    assert raw_tensors(merged) == orig
    assert json.loads((merged / "config.json").read_text()) == orig_cfg
    assert Checkpoint(merged).problems() == []
    # the MTP part cannot be merged with itself or split again
    r = run_cli("merge-mtp", "--main", mtp, "--mtp", mtp, "--out", tmp_path / "bad")
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("split-mtp", "--model", main, "--out", tmp_path / "bad2")
    assert r.returncode == 2 and "num_nextn_predict_layers" in r.stderr
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()


def test_split_dry_run_on_the_full_layout(tmp_path: Path) -> None:
    full = tmp_path / "full"
    synthesize(full, preset="full", sparse=True)
    out = tmp_path / "full-split"
    r = run_cli("split-mtp", "--model", full, "--out", out, "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["mtp_layers"] == [61]
    assert res["mtp_params"] == 13_463_426_304
    assert res["mtp_params_unique"] == 11_610_068_224
    assert res["main"]["bytes"] + res["mtp"]["bytes"] == 688_574_839_360
    assert res["main"]["tensors"] + res["mtp"]["tensors"] == 91_991
    assert not out.exists()


def test_merge_rejects_parts_of_different_checkpoints(
    tiny_fp8: Path, tiny_bf16: Path, tmp_path: Path
) -> None:
    from dsv3tools.converters.mtp_split import merge_mtp, split_mtp
    from dsv3tools.errors import DSV3Error

    split_mtp(tiny_fp8, tmp_path / "a")
    split_mtp(tiny_bf16, tmp_path / "b")
    with pytest.raises(DSV3Error, match="configs differ in quantization_config"):
        merge_mtp(tmp_path / "a" / "main", tmp_path / "b" / "mtp", tmp_path / "m")
    plan = merge_mtp(tmp_path / "a" / "main", tmp_path / "a" / "mtp", tmp_path / "m", dry_run=True)
    assert plan["bytes"] == sum(i.nbytes for i in Checkpoint(tiny_fp8).infos().values())
    assert not (tmp_path / "m").exists()

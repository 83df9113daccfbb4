"""``inspect --check-data``: a NaN planted in an FP8 weight and an Inf in a bf16 norm are reported with
their tensor (exit 2); an all-zero tensor is listed as a warning; the scan works in bounded slices."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

from dsv3tools.checkpoint.data_check import check_data


def _plant(folder: Path, name: str, value: bytes, fill: bool = False) -> None:
    """Overwrite the first value of tensor ``name`` with ``value`` (or all of its bytes with it)."""
    shard = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]
    path = folder / shard
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    a, b = json.loads(raw[8 : 8 + n])[name]["data_offsets"]
    start = 8 + n + a
    if fill:
        raw[start : 8 + n + b] = value * ((b - a) // len(value))
    else:
        raw[start + 5 * len(value) : start + 6 * len(value)] = value
    path.write_bytes(bytes(raw))


def test_planted_nan_inf_and_zeros(tiny_fp8: Path, tmp_path: Path, cli) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(tiny_fp8, ck)
    fp8 = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    norm = "model.layers.1.post_attention_layernorm.weight"
    zero = "model.layers.0.mlp.gate_proj.weight"
    _plant(ck, fp8, b"\x7f")  # e4m3fn NaN
    _plant(ck, norm, struct.pack("<H", 0x7F80))  # bf16 +Inf
    _plant(ck, zero, b"\x00", fill=True)
    r = cli("inspect", "--model", ck, "--check-data", "--json")
    assert r.returncode == 2, r.stderr
    out = json.loads(r.stdout)
    assert len(out["problems"]) == 2
    assert any(fp8 in p and "1 NaN and 0 Inf" in p for p in out["problems"])
    assert any(norm in p and "0 NaN and 1 Inf" in p for p in out["problems"])
    assert out["zero_tensors"] == [zero]
    assert r.stderr.count("\n") == 1 and (fp8 in r.stderr or norm in r.stderr)
    small = check_data(ck, chunk=1000)  # many slices per tensor: the same findings
    assert sorted(small["problems"]) == sorted(out["problems"]) and small["zero_tensors"] == [zero]


def test_clean_checkpoint_passes(tiny_fp8: Path, cli) -> None:
    r = cli("inspect", "--model", tiny_fp8, "--check-data", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["problems"] == []

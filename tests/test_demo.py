"""``dsv3tools demo`` end to end (offline): every step runs and the summary holds the checks it promises."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_cli


def test_demo_runs_offline_and_reports(tmp_path: Path) -> None:
    r = run_cli("demo", "--workdir", tmp_path / "demo", "--json", env={"HF_HUB_OFFLINE": "1"}, timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(r.stdout)
    assert s["inspect"]["problems"] == [] and s["inspect"]["format"] == "fp8"
    assert s["split_mtp"]["merge_identical"] is True
    assert s["reshard"]["logits_equal"] is True and s["reshard"]["max_rel_diff"] <= 1e-5
    assert s["convert_int4"]["complete"] is True
    assert 0 < s["compare"]["kl_mean"] < 0.1 and s["compare"]["top1_agreement"] > 0.9
    assert 0.0 <= s["eval"]["fp8"] <= 1.0 and 0.0 <= s["eval"]["int4"] <= 1.0
    assert s["mtp_bench"]["lossless"] is True
    assert s["mtp_bench"]["alpha"] > s["mtp_bench"]["alpha_untrained_mtp"]
    assert abs(s["mtp_bench"]["tau"] - (1 + s["mtp_bench"]["alpha"])) < 1e-9

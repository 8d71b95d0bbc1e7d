"""The GHN-3 benchmark (``ghn_onnx.benchmarks.ghn3``) on the smallest fixture: every stage timed,
end to end = convert + batch + forward, the speedup taken against the recorded reference."""

from __future__ import annotations

import json

import pytest

from ghn_onnx.benchmarks import ghn3


def test_bench_ghn3_on_vit_mini(shared_dir, monkeypatch):
    monkeypatch.setenv("GHN_ONNX_SHARED", str(shared_dir))
    root = ghn3.fixtures_dir()
    if not (root / "config.json").is_file():
        pytest.fail(f"GHN-3 parity fixtures not found at {root}: set GHN_ONNX_SHARED", pytrace=False)
    result = ghn3.bench_ghn3(rounds=2, models=("vit_mini",), exports=())
    recorded = json.loads((root / "config.json").read_text())["models"]
    assert set(result["models"]) == {"vit_mini"}
    vit = result["models"]["vit_mini"]
    assert vit["ghn"] == "GHN-3-T" and vit["nodes"] == 34
    assert vit["reference_s"] == recorded["vit_mini"]["runtime_s"]["end_to_end_median"]
    assert vit["speedup"] == pytest.approx(vit["reference_s"] / vit["end_to_end_s"])
    for m in result["models"].values():
        assert all(m[f"{s}_s"] > 0 for s in ghn3.STAGES)
        assert m["end_to_end_s"] < m["with_load_s"]
    table = ghn3.format_table(result).splitlines()
    assert len(table) == 2 + 1 and any(row.startswith("| vit_mini | GHN-3-T | 34 |") for row in table)

"""The GPU check's CPU smoke mode: the same builders at tiny sizes, the same comparison against `seedsift generate`.

It measures nothing here; it proves that the script a GPU session runs in its few minutes builds both pipelines,
runs both sides and writes its table. The seedsift side joins the session's Ray instead of starting one.
"""

from __future__ import annotations

import json
import sys

from tests.conftest import REPO_ROOT


def test_gpu_check_smoke_builds_sd15_and_sdxl_and_compares_both_sides(ray_session, tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))
    address = ray_session.get_runtime_context().gcs_address
    assert gpu_check.main(["--smoke", "--results", str(tmp_path), "--address", address]) == 0
    result = json.loads((tmp_path / "gpu-check-smoke.json").read_text())
    assert [row["pipeline"] for row in result["rows"]] == ["sd15", "sdxl"]
    for row in result["rows"]:
        # Same prompts, seeds and settings on both sides: the same images (a batch-size kernel path may move a
        # pixel by one level).
        identical, matched = row["identical images"].split(" ")[0].split("/")
        assert int(matched) == row["images"] == 12 and int(identical) >= 10, row
        assert row["seedsift first image s"] > 0 and row["images/s ratio"] > 0
    assert "GPU check (smoke" in (tmp_path / "gpu-check-smoke.md").read_text()

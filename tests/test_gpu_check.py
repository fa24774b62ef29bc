"""The GPU check's CPU smoke mode: the same builders at tiny sizes, the same comparison against `seedsift generate`.

It measures nothing here; it proves that the script a GPU session runs in its few minutes builds both pipelines,
runs both sides and writes its table. The seedsift side joins the session's Ray instead of starting one.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT


def gpu_check_module():
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))
    return gpu_check


def test_gpu_check_builds_sdxl_that_renders(tmp_path):
    """The SDXL builder (two text encoders, size conditioning) at its smoke size: a pipeline seedsift renders."""
    from actors.models import diffusion, families
    from actors.models.seeds import batch_noise

    gpu_check_module().build_pipeline("sdxl", str(tmp_path / "sdxl"), smoke=True)
    adapter = diffusion.load_adapter(str(tmp_path / "sdxl"), "full")
    assert adapter.family is families.SDXL
    embeds = adapter.encode(["a red cube"], 7.5)
    embeds.pop("truncated")
    image = adapter.render(embeds, batch_noise([1], families.latent_shape(str(tmp_path / "sdxl"), 64, 64)),
                           steps=2, guidance_scale=7.5, height=64, width=64)
    assert image.shape == (1, 64, 64, 3) and image.dtype == np.uint8


@pytest.mark.slow  # a plain loop and a seedsift run side by side: about 25 s
def test_gpu_check_smoke_compares_both_sides_on_sd15(ray_session, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    gpu_check = gpu_check_module()
    assert gpu_check.main(["--smoke", "--families", "sd15", "--results", str(tmp_path), "--address", address]) == 0
    result = json.loads((tmp_path / "gpu-check-smoke.json").read_text())
    (row,) = result["rows"]
    assert row["pipeline"] == "sd15"
    # Same prompts, seeds and settings on both sides: the same images (a batch-size kernel path may move a pixel by
    # one level).
    identical, matched = row["identical images"].split(" ")[0].split("/")
    assert int(matched) == row["images"] == 12 and int(identical) >= 10, row
    assert row["seedsift first image s"] > 0 and row["images/s ratio"] > 0
    assert "GPU check (smoke" in (tmp_path / "gpu-check-smoke.md").read_text()
    # Issue 22's part: the kernel call and a PixArt transformer forward, full against sparse step, each timed.
    kernel, forward = result["attention"]
    assert kernel["what"] == "attention call, 256 tokens" and forward["what"].startswith("PixArt transformer")
    assert all(row[key] > 0 for row in (kernel, forward) for key in ("dense ms", "sparse step ms",
                                                                     "re-ttention full step ms"))
    assert "Sparse self-attention (issue 22)" in (tmp_path / "gpu-check-smoke.md").read_text()

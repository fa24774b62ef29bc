"""Tests for the rating stage: weight-free raters, CLIP score on a tiny offline CLIP, spec parsing, RaterStage.

No Ray: RaterStage is called directly with numpy batches shaped like Ray Data's.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers.pre_tokenizers import ByteLevel

from actors.raters.clip import ClipScoreRater
from actors.raters.pixel import colorfulness
from actors.raters.specs import DEFAULT_RATER_SPEC, RATER_NAMES, make_rater, parse_rater_spec, validate_rater_spec
from actors.stages.rater import RaterStage
from tests.conftest import REPO_ROOT
from tests.helpers_clip import build_tiny_clip, byte_symbols, tiny_clip_tokenizer


def random_images(count: int, height: int = 32, width: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("tiny_clip")
    build_tiny_clip(folder)
    return str(folder)


@pytest.fixture(scope="module")
def clip_rater(tiny_clip_folder: str) -> ClipScoreRater:
    return make_rater(f"clip:{tiny_clip_folder}")


# --- weight-free raters ---------------------------------------------------------------------------------------


def test_default_rater_is_colorfulness():
    assert DEFAULT_RATER_SPEC == "colorfulness"
    assert make_rater().name == "colorfulness"
    assert set(RATER_NAMES) == {"colorfulness", "sharpness", "shapes", "clip", "pickscore", "hpsv2", "imagereward"}


def test_colorfulness_is_zero_for_grey_and_larger_for_saturated():
    rater = make_rater("colorfulness")
    flat_grey = np.full((8, 8, 3), 128, dtype=np.uint8)
    # A grey gradient has spatial variation but no chroma, so it must still score 0.
    gradient_grey = np.repeat(np.linspace(0, 255, 64).astype(np.uint8).reshape(8, 8, 1), 3, axis=2)
    saturated = np.zeros((8, 8, 3), dtype=np.uint8)
    saturated[:4, :, 0] = 255
    saturated[4:, :, 2] = 255
    scores = rater.score(np.stack([flat_grey, gradient_grey, saturated]), ["a", "b", "c"])
    assert scores.dtype == np.float32 and scores.shape == (3,)
    assert scores[0] == 0.0 and scores[1] == 0.0
    assert scores[2] > 100.0


def test_colorfulness_matches_hand_computation():
    # One pure red and one pure blue pixel.
    image = np.array([[[255, 0, 0], [0, 0, 255]]], dtype=np.uint8)
    # rg = (255, 0): mean 127.5, std 127.5. yb = (127.5, -255): mean -63.75, std 191.25.
    expected = math.sqrt(127.5**2 + 191.25**2) + 0.3 * math.sqrt(127.5**2 + 63.75**2)
    assert colorfulness(image) == pytest.approx(expected, rel=1e-12)
    assert make_rater("colorfulness").score(image[None], ["x"])[0] == pytest.approx(expected, rel=1e-6)


def test_sharpness_higher_for_checkerboard_than_flat():
    rater = make_rater("sharpness")
    flat = np.full((16, 16, 3), 200, dtype=np.uint8)
    checker = ((np.indices((16, 16)).sum(axis=0) % 2) * 255).astype(np.uint8)
    checker = np.repeat(checker[..., None], 3, axis=2)
    scores = rater.score(np.stack([flat, checker]), ["flat", "checker"])
    assert scores[0] == 0.0
    assert scores[1] > 1000.0


def test_rater_rejects_bad_batches():
    rater = make_rater("colorfulness")
    with pytest.raises(ValueError, match="uint8"):
        rater.score(np.zeros((1, 4, 4, 3), dtype=np.float32), ["x"])
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        rater.score(np.zeros((4, 4, 3), dtype=np.uint8), ["x"])
    with pytest.raises(ValueError, match="one prompt per image"):
        rater.score(np.zeros((2, 4, 4, 3), dtype=np.uint8), ["x"])


# --- tiny CLIP -------------------------------------------------------------------------------------------------


def test_tiny_tokenizer_handles_any_text_and_round_trips(tmp_path):
    tokenizer = tiny_clip_tokenizer()
    assert len(tokenizer) == 514
    # The tokenizers library's byte-level pre-tokenizer emits exactly these 256 symbols.
    assert set(byte_symbols()) == set(ByteLevel.alphabet()) and byte_symbols()[ord("a")] == "a"
    text = "A photo of a Cat, naïve café 日本 🐱\twith tabs"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[1:-1]
    # The CLIP normaliser lower-cases and folds whitespace; punctuation comes back space-separated.
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == text.lower().replace(" ", "").replace(
        "\t", ""
    )
    tokenizer.save_pretrained(tmp_path)
    reloaded = type(tokenizer).from_pretrained(tmp_path)
    assert reloaded(text).input_ids == ids


def test_tiny_clip_build_is_deterministic(tmp_path, tiny_clip_folder):
    build_tiny_clip(tmp_path)
    weights = "model.safetensors"
    assert (tmp_path / weights).read_bytes() == (Path(tiny_clip_folder) / weights).read_bytes()


def test_clip_scores_are_finite_deterministic_and_prompt_dependent(clip_rater, tiny_clip_folder):
    images = random_images(3)
    prompts = ["a red car", "a dog on a beach", "an empty room"]
    scores = clip_rater.score(images, prompts)
    assert scores.dtype == np.float32 and scores.shape == (3,)
    assert np.all(np.isfinite(scores))
    np.testing.assert_array_equal(scores, clip_rater.score(images, prompts))
    # A second rater loaded from the same folder must agree: nothing random at load or score time.
    np.testing.assert_array_equal(scores, make_rater(f"clip:{tiny_clip_folder}").score(images, prompts))
    other = clip_rater.score(images, ["a bowl of soup"] * 3)
    assert np.all(other != scores)


def test_clip_score_is_scaled_cosine_of_the_pair(clip_rater):
    images = random_images(2, height=48, width=40, seed=1)
    prompts = ["a cat", "two dogs"]
    model, processor = clip_rater.model, clip_rater.processor
    text = processor.tokenizer(prompts, padding=True, return_tensors="pt")
    pixels = processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        logits = model(**text, pixel_values=pixels).logits_per_image
    np.testing.assert_allclose(clip_rater.score(images, prompts), torch.diagonal(logits).numpy(), rtol=1e-5)


def test_clip_truncates_long_prompts(clip_rater):
    scores = clip_rater.score(random_images(1), ["word " * 200])
    assert np.isfinite(scores).all()


def test_pickscore_loads_like_clip_with_separate_processor(clip_rater, tiny_clip_folder):
    rater = make_rater(f"pickscore:{tiny_clip_folder},processor={tiny_clip_folder}")
    assert rater.name == f"pickscore:{tiny_clip_folder},processor={tiny_clip_folder}"
    images = random_images(2)
    np.testing.assert_array_equal(rater.score(images, ["a", "b"]), clip_rater.score(images, ["a", "b"]))


# --- specs -----------------------------------------------------------------------------------------------------


def test_parse_rater_spec():
    assert parse_rater_spec("colorfulness").path is None
    parsed = parse_rater_spec(" PickScore:/models/pick , processor = /models/proc ")
    assert (parsed.name, parsed.path, parsed.options) == ("pickscore", "/models/pick", {"processor": "/models/proc"})
    assert parse_rater_spec("clip:openai/clip-vit-base-patch32").path == "openai/clip-vit-base-patch32"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty"),
        ("clip", "needs a model"),
        ("pickscore:", "needs a model"),
        ("colorfulness:/some/path", "takes no path"),
        ("clip:/m,dtype=fp16", "unknown option"),
        ("clip:/m,processor", "not key=value"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        validate_rater_spec(spec)


def test_unknown_rater_lists_known_names():
    with pytest.raises(ValueError, match="unknown rater 'aesthetic'") as info:
        make_rater("aesthetic")
    for name in RATER_NAMES:
        assert name in str(info.value)


def test_validate_rejects_missing_or_wrong_folders(tmp_path):
    for spec in (f"clip:{tmp_path}/missing", "clip:./no_such_model_here", "pickscore:~/no_such_model_here"):
        with pytest.raises(ValueError, match="does not exist"):
            validate_rater_spec(spec)
    with pytest.raises(ValueError, match="no config.json"):
        validate_rater_spec(f"clip:{tmp_path}")
    with pytest.raises(ValueError, match="processor folder .* does not exist"):
        validate_rater_spec(f"pickscore:owner/model,processor={tmp_path}/missing")
    with pytest.raises(ValueError, match="remote URL"):
        validate_rater_spec("clip:s3://bucket/model")
    # Hub ids cannot be checked offline without loading, so they pass validation.
    validate_rater_spec("clip:openai/clip-vit-base-patch32")


def test_validate_never_loads_a_model(monkeypatch, tiny_clip_folder):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("validate_rater_spec must not load a model")

    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.CLIPProcessor, "from_pretrained", refuse)
    validate_rater_spec(f"clip:{tiny_clip_folder}")
    validate_rater_spec(f"pickscore:{tiny_clip_folder},processor={tiny_clip_folder}")


# --- RaterStage ------------------------------------------------------------------------------------------------


def stage_batch() -> dict[str, np.ndarray]:
    images = random_images(4, height=8, width=8, seed=2)
    status = np.array(["ok", "skipped", "ok", "failed"])
    images[status != "ok"] = 0
    return {
        "image": images,
        "prompt": np.array(["p0", "p1", "p2", "p3"], dtype=object),
        "status": status,
        "seed": np.arange(4, dtype=np.int64),
        "error": np.array(["", "", "", "generator: out of memory"]),
    }


def test_stage_scores_ok_rows_and_leaves_others_nan():
    stage = RaterStage("colorfulness", num_threads=torch.get_num_threads())
    batch = stage_batch()
    out = stage(batch)
    expected = make_rater("colorfulness").score(batch["image"][[0, 2]], ["p0", "p2"])
    assert out["score"].dtype == np.float32 and out["score"].shape == (4,)
    np.testing.assert_array_equal(out["score"][[0, 2]], expected)
    assert np.isnan(out["score"][[1, 3]]).all()
    assert list(out["status"]) == ["ok", "skipped", "ok", "failed"]
    assert list(out["error"]) == ["", "", "", "generator: out of memory"]
    np.testing.assert_array_equal(out["seed"], batch["seed"])


def test_stage_adds_error_column_when_missing():
    batch = stage_batch()
    del batch["error"]
    out = RaterStage("sharpness", num_threads=torch.get_num_threads())(batch)
    assert list(out["error"]) == ["", "", "", ""]
    assert np.isfinite(out["score"][[0, 2]]).all()


def test_stage_marks_batch_failed_when_rater_raises():
    class BrokenRater:
        name = "broken"

        def score(self, images, prompts):
            raise RuntimeError("boom on this batch")

    stage = RaterStage("colorfulness", num_threads=torch.get_num_threads())
    stage.rater = BrokenRater()
    batch = stage_batch()
    # "<U2" status: a naive in-place write of "failed" would be truncated to "fa".
    batch["status"] = np.array(["ok", "ok", "ok", "ok"])
    batch["error"] = np.array(["", "", "", ""])
    out = stage(batch)
    assert np.isnan(out["score"]).all()
    assert list(out["status"]) == ["failed"] * 4
    assert all("RuntimeError: boom on this batch" in error and "broken" in error for error in out["error"])


def test_stage_failure_keeps_other_rows_errors():
    class BrokenRater:
        name = "broken"

        def score(self, images, prompts):
            raise ValueError("bad")

    stage = RaterStage("colorfulness", num_threads=torch.get_num_threads())
    stage.rater = BrokenRater()
    out = stage(stage_batch())
    assert list(out["status"]) == ["failed", "skipped", "failed", "failed"]
    assert out["error"][3] == "generator: out of memory"
    assert "bad" in out["error"][0] and "bad" in out["error"][2] and out["error"][1] == ""


def test_a_model_raters_stage_sets_torch_threads(tiny_clip_folder):
    before = torch.get_num_threads()
    try:
        RaterStage(f"clip:{tiny_clip_folder}", num_threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_pixel_raters_stage_never_imports_torch():
    """Its actor starts in about a second: what a run's start-up waits for."""
    code = ("import sys; from actors.stages.rater import RaterStage; import numpy as np; "
            "stage = RaterStage('shapes', num_threads=2); assert 'torch' not in sys.modules, 'torch'")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]


def test_stage_with_clip_rater(tiny_clip_folder):
    batch = stage_batch()
    batch["image"] = random_images(4, seed=3)
    out = RaterStage(f"clip:{tiny_clip_folder}", num_threads=torch.get_num_threads())(batch)
    assert np.isfinite(out["score"][[0, 2]]).all() and np.isnan(out["score"][[1, 3]]).all()

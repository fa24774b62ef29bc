"""HPSv2 and ImageReward raters on tiny checkpoints whose reference scores came from the packages' own code.

No Ray. tests/data/raters/README.md says how the checkpoints and expected.json were made.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from actors.raters import reward_models
from actors.raters.specs import make_rater, validate_rater_spec
from actors.stages.rater import RaterStage
from tests.helpers_clip import tiny_clip_tokenizer
from tests.helpers_raters import DATA, rating_cases, tiny_bert_tokenizer

EXPECTED = json.loads((DATA / "expected.json").read_text())
CHECKPOINTS = {"hpsv2": DATA / "hps_tiny.pt", "imagereward": DATA / "imagereward_tiny.pt"}
CONFIGS = {"hpsv2": DATA / "hps_tiny_config.json", "imagereward": DATA / "imagereward_tiny_config.json"}
# The reference ran float32 on CPU through other attention code, so only rounding differs (measured here: at most
# 9e-8 for HPSv2 and 4e-7 for ImageReward); a wrong layer-norm epsilon or GELU variant moves scores by 6e-5 or more.
TOLERANCE = {"hpsv2": 1e-6, "imagereward": 5e-6}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("reward-tokenizers")
    tiny_clip_tokenizer().save_pretrained(folder / "clip")
    tiny_bert_tokenizer().save_pretrained(folder / "bert")
    return {"hpsv2": str(folder / "clip"), "imagereward": str(folder / "bert")}


def spec(name: str, tokenizers: dict[str, str], checkpoint=None) -> str:
    return f"{name}:{checkpoint or CHECKPOINTS[name]},tokenizer={tokenizers[name]},config={CONFIGS[name]}"


@pytest.mark.parametrize("name", ["hpsv2", "imagereward"])
def test_scores_match_the_reference_packages(name, tokenizers):
    rater = make_rater(spec(name, tokenizers))
    assert rater.name == spec(name, tokenizers)
    for case, (images, prompts) in rating_cases().items():
        scores = rater.score(images, prompts)
        assert scores.dtype == np.float32 and scores.shape == (len(images),)
        expected = np.asarray(EXPECTED[name][case])
        scale = max(1.0, float(np.abs(expected).max()))
        np.testing.assert_allclose(scores, expected, rtol=0, atol=TOLERANCE[name] * scale, err_msg=case)


@pytest.mark.parametrize("name", ["hpsv2", "imagereward"])
def test_scores_depend_on_the_prompt_and_the_image(name, tokenizers):
    rater = make_rater(spec(name, tokenizers))
    images, prompts = rating_cases()["square"]
    base = rater.score(images, prompts)
    swapped_prompts = rater.score(images, prompts[1:] + prompts[:1])
    swapped_images = rater.score(images[::-1].copy(), prompts)
    assert np.abs(base - swapped_prompts).max() > 1e-4
    assert np.abs(base - swapped_images).max() > 1e-4


@pytest.mark.parametrize("name", ["hpsv2", "imagereward"])
def test_safetensors_copy_scores_the_same(name, tokenizers, tmp_path):
    weights = reward_models.load_state_dict(str(CHECKPOINTS[name]))
    converted = tmp_path / f"{name}.safetensors"
    save_file({key: value.contiguous() for key, value in weights.items()}, str(converted))
    images, prompts = rating_cases()["landscape"]
    original = make_rater(spec(name, tokenizers)).score(images, prompts)
    np.testing.assert_array_equal(make_rater(spec(name, tokenizers, converted)).score(images, prompts), original)


class NotATensor:
    """Any class: unpickling it would mean running code chosen by whoever wrote the file."""


def test_checkpoints_holding_objects_are_refused_without_unpickling(tokenizers, tmp_path):
    weights = reward_models.load_state_dict(str(CHECKPOINTS["hpsv2"]))
    booby_trapped = tmp_path / "trap.pt"
    torch.save({"state_dict": weights, "extra": NotATensor()}, booby_trapped)
    with pytest.raises(ValueError, match="never unpickles arbitrary objects"):
        make_rater(spec("hpsv2", tokenizers, booby_trapped))


def test_a_checkpoint_for_another_model_fails_at_load(tokenizers, tmp_path):
    with pytest.raises(ValueError, match="does not fit this model .*missing"):
        make_rater(spec("imagereward", tokenizers, CHECKPOINTS["hpsv2"]))
    weights = reward_models.load_state_dict(str(CHECKPOINTS["imagereward"]))
    weights.pop(next(key for key in weights if key.startswith("mlp.")))
    partial = tmp_path / "partial.pt"
    torch.save(weights, partial)
    with pytest.raises(ValueError, match="missing: head"):
        make_rater(spec("imagereward", tokenizers, partial))


def test_ddp_prefixed_checkpoints_load(tokenizers, tmp_path):
    weights = reward_models.load_state_dict(str(CHECKPOINTS["hpsv2"]))
    prefixed = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{key}": value for key, value in weights.items()}}, prefixed)
    images, prompts = rating_cases()["square"]
    np.testing.assert_array_equal(make_rater(spec("hpsv2", tokenizers, prefixed)).score(images, prompts),
                                  make_rater(spec("hpsv2", tokenizers)).score(images, prompts))


@pytest.mark.parametrize(
    "bad_spec, message",
    [
        ("hpsv2", "needs a model; write hpsv2:CHECKPOINT_FILE"),
        ("imagereward:/no/such/ImageReward.pt", "checkpoint file .* does not exist"),
        ("hpsv2:s3://bucket/HPS_v2.1_compressed.pt", "remote URL"),
        (f"hpsv2:{DATA / 'hps_tiny_config.json'}", "not a .pt, .pth, .bin, .safetensors file"),
        (f"imagereward:{DATA / 'imagereward_tiny.pt'},processor=/x", "unknown option.*tokenizer, config"),
        (f"imagereward:{DATA / 'imagereward_tiny.pt'},config=/no/such.json", "config file .* does not exist"),
        (f"hpsv2:{DATA / 'hps_tiny.pt'},tokenizer=./no_such_tokenizer", "tokenizer folder .* does not exist"),
    ],
)
def test_bad_specs_fail_before_any_model_loads(bad_spec, message):
    with pytest.raises(ValueError, match=message):
        validate_rater_spec(bad_spec)


def test_a_config_missing_keys_is_named(tokenizers, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"vision": {}}))
    with pytest.raises(ValueError, match="missing text"):
        make_rater(f"imagereward:{CHECKPOINTS['imagereward']},tokenizer={tokenizers['imagereward']},config={config}")


def test_released_architectures_match_the_published_checkpoint_layouts():
    """Every weight of the released HPSv2 (ViT-H-14) and ImageReward checkpoints maps onto the model built here.

    full_keys_*.json list each key and shape of the packages' own full-size models (no weights needed); the
    models here are built on the meta device, so this costs no memory.
    """
    from transformers import CLIPModel

    layouts = {
        "hpsv2": (reward_models.open_clip_to_transformers,
                  lambda: CLIPModel(reward_models.hpsv2_clip_config(reward_models.HPSV2_CONFIG, 49407))),
        "imagereward": (reward_models.blip_to_image_reward,
                        lambda: reward_models.ImageRewardModel(reward_models.IMAGEREWARD_CONFIG)),
    }
    for name, (rename, build) in layouts.items():
        published = json.loads((DATA / f"full_keys_{name}.json").read_text())
        with torch.device("meta"):
            built = build().state_dict()
            fake = {key: torch.empty(shape) for key, shape in published.items()}
        renamed = rename(fake)
        assert set(renamed) == set(built), (name, sorted(set(renamed) ^ set(built))[:10])
        for key, value in renamed.items():
            assert tuple(value.shape) == tuple(built[key].shape), (name, key)


@pytest.mark.parametrize("name", ["hpsv2", "imagereward"])
def test_rater_stage_with_a_checkpoint_rater(name, tokenizers):
    """The rater stage's callable with each checkpoint rater (a whole run with one in a rater actor: the slow tier's
    test_generate.py::test_a_checkpoint_rater_selected_by_name_runs_in_the_rater_actor)."""
    images, prompts = rating_cases()["square"]
    stage = RaterStage(spec(name, tokenizers))
    batch = {"image": images, "prompt": np.array(prompts), "status": np.array(["ok", "failed", "ok"])}
    out = stage(batch)
    np.testing.assert_allclose(out["score"][[0, 2]], np.asarray(EXPECTED[name]["square"])[[0, 2]],
                               atol=TOLERANCE[name] * 2)
    assert np.isnan(out["score"][1]) and list(out["status"]) == ["ok", "failed", "ok"]


# open_clip's own clean-up (basic_clean, then whitespace_clean) gave these outputs for these inputs; with the real
# CLIP BPE, open_clip_token_ids then matched open_clip's tokenize() on all 16 prompts tried (README of tests/data).
OPEN_CLIP_CLEANED = {
    "artist’s “dream”": 'artist\'s "dream"',
    "ＡＢＣ ﬁne ﬂower": "ABC fine flower",
    "fish &amp;amp; chips": "fish & chips",
    "mojibake: cafÃ©": "mojibake: café",
    "  multiple   spaces\tand\nnewlines ": "multiple spaces and newlines",
    "a\u00a0non-breaking space": "a non-breaking space",
    "café crème brûlée — naïve": "café crème brûlée — naïve",
}


@pytest.mark.parametrize("raw, cleaned", OPEN_CLIP_CLEANED.items())
def test_hpsv2_cleans_prompts_like_open_clip(raw, cleaned):
    assert reward_models.open_clip_clean(raw) == cleaned


def test_hpsv2_token_ids_have_open_clips_layout(tokenizers):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizers["hpsv2"])
    ids = reward_models.open_clip_token_ids(tokenizer, ["a cat", "word " * 100], 77)
    body = tokenizer("a cat", add_special_tokens=False).input_ids
    assert ids[0, : len(body) + 2].tolist() == [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]
    assert not ids[0, len(body) + 2 :].any()  # zero padding, as open_clip pads
    assert ids[1, 0] == tokenizer.bos_token_id and ids[1, -1] == tokenizer.eos_token_id  # cut, end token kept


def test_hpsv2_ignores_a_pad_token_that_is_also_text(tokenizers, tmp_path):
    """open_clip exports register "!" as the pad token; it must not split the "!" out of a prompt's words."""
    from transformers import CLIPTokenizer

    exclaiming = tmp_path / "pad-is-bang"
    CLIPTokenizer.from_pretrained(tokenizers["hpsv2"], pad_token="!").save_pretrained(exclaiming)
    images, _ = rating_cases()["square"]
    prompts = ["wow!! a cat", "stop! a dog", "a bird"]
    plain = make_rater(spec("hpsv2", tokenizers)).score(images, prompts)
    np.testing.assert_array_equal(make_rater(spec("hpsv2", {"hpsv2": str(exclaiming)})).score(images, prompts), plain)


def test_hpsv2_unescapes_html_like_open_clip(tokenizers):
    """open_clip's tokenizer unescapes HTML entities before its BPE; transformers' does not, so the rater does."""
    rater = make_rater(spec("hpsv2", tokenizers))
    images, _ = rating_cases()["square"]
    plain = rater.score(images[:2], ["fish & chips", "a <b> tag"])
    escaped = rater.score(images[:2], ["fish &amp; chips", "a &amp;lt;b&amp;gt; tag"])
    np.testing.assert_array_equal(plain, escaped)

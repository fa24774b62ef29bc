"""The evaluate job on a hand-made collect set whose scores are a known function of the noise: no Ray needed.

A predictor rigged to compute that function must come out perfect, its mirror image perfectly wrong, and an
untrained one somewhere in between; a dataset from another pipeline setting is refused.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from actors.models import families
from actors.models.embedded import resolve_model
from actors.models.seeds import candidate_seeds, initial_noise
from actors.predictor.model import NoiseQualityPredictor, PredictorConfig, save_predictor, split_of
from jobs import evaluate
from jobs.pages import evaluation as evaluation_pages
from orchestrator.evaluation import figures

MODEL = "embedded:tiny-sd"
PROMPTS = ["a red cube on a table", "a watercolor fox", "an astronaut riding a horse", "a bowl of ramen",
           "a lighthouse at night", "two dogs playing in the snow"]
CANDIDATES = 8
SETTINGS = {"steps": 1, "guidance": 3.0, "width": 64, "height": 64}
RATER = "colorfulness"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The embedded tiny SD pipeline built into a fresh cache, and its latent shape and scheduler."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SEEDSIFT_CACHE", str(tmp_path_factory.mktemp("seedsift-cache")))
        path = resolve_model(MODEL)
        yield {"path": path, "shape": families.latent_shape(path, SETTINGS["height"], SETTINGS["width"]),
               "scheduler": families.model_identity(path)["scheduler"]}


def known_score(seed: int, shape: tuple) -> float:
    """The "rater" of this test: the mean of channel 0 of the seed's initial noise."""
    return float(initial_noise(seed, shape)[0].mean())


def write_dataset(folder, tiny, **changes) -> str:
    """A collect-shaped OUT/dataset.parquet: 6 prompts x 8 candidates, scores from known_score."""
    settings = {**SETTINGS, "rater": RATER, "model": MODEL, "scheduler": tiny["scheduler"], **changes}
    rows = []
    for number, prompt in enumerate(PROMPTS):
        prompt_id = f"p{number}"
        for index, seed in enumerate(candidate_seeds(0, prompt_id, CANDIDATES)):
            rows.append({"prompt_id": prompt_id, "prompt": prompt, "seed": seed, "candidate_index": index,
                         "score": known_score(seed, tiny["shape"]), **settings, "run_id": "test"})
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), str(folder / "dataset.parquet"))
    return str(folder)


def predictor_config(tiny, split: dict | None = None) -> PredictorConfig:
    return PredictorConfig(
        latent_shape=tuple(tiny["shape"]), text_dim=32, channels=(8, 16), hidden=16, head=(16,),
        pipeline={"model": MODEL, "scheduler": tiny["scheduler"], "family": "sd", **SETTINGS, "rater": RATER},
        rater=RATER, split={"salt": "t", "train": 0.0, "val": 0.0} if split is None else split,
    )


def write_predictor(folder, config: PredictorConfig, sign: float | None = None) -> str:
    """An untrained predictor, or (sign=+1/-1) one rigged to output +/- the noise's channel-0 mean.

    The wide read-out sees the raw noise statistics, whose first entry is the channel-0 mean; with unit scale, zero
    mean and the deep head's last layer at zero (its initial value), the output is exactly sign * that mean.
    """
    torch.manual_seed(0)
    model = NoiseQualityPredictor(config).eval()
    if sign is not None:
        with torch.no_grad():
            model.statistics_mean.zero_()
            model.statistics_scale.fill_(1.0)
            model.statistics_readout.weight.zero_()
            model.statistics_readout.bias.zero_()
            model.statistics_readout.weight[0, 0] = sign
        probe = torch.randn(8, *config.latent_shape)
        output = model(probe, torch.zeros(8, 4, config.text_dim), torch.ones(8, 4)).detach()
        assert torch.allclose(output, sign * probe[:, 0].mean(dim=(1, 2)), atol=1e-5), "the rig no longer holds"
    save_predictor(str(folder), config, model)
    return str(folder)


def run(dataset: str, predictor: str, out: str, *extra: str) -> int:
    return evaluate.main(["--dataset", dataset, "--predictor", predictor, "--out", out, *extra])


@pytest.fixture(scope="module")
def dataset(tiny, tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("collect"), tiny)


def test_rigged_predictor_is_perfect_and_the_report_is_complete(tiny, dataset, tmp_path):
    predictor = write_predictor(tmp_path / "predictor", predictor_config(tiny), sign=1.0)
    out = tmp_path / "report"
    assert run(dataset, predictor, str(out), "--contact-prompts", "2") == 0

    report = json.loads((out / "evaluation.json").read_text())
    assert report["prompts"] == 6 and report["candidates"] == 8 and report["rows"] == 48
    assert (report["model"], report["rater"], report["steps"]) == (MODEL, RATER, 1)
    assert report["spearman_global"] == pytest.approx(1.0)
    assert report["spearman_per_prompt_mean"] == pytest.approx(1.0)
    assert report["spearman_per_prompt_median"] == pytest.approx(1.0)
    assert report["ndcg"] == {"1": pytest.approx(1.0), "3": pytest.approx(1.0)}
    assert report["p_pick_best"] == 1.0 and report["p_pick_best_chance"] == pytest.approx(1 / 8)
    assert report["top1_gain"] > 0 and report["top1_gain_std_units"] > 1.0
    assert [point["n"] for point in report["gain_curve"]] == [1, 2, 4, 8]
    for point in report["gain_curve"]:
        assert point["predictor"] == pytest.approx(point["oracle"])
    assert report["predictor_top1_mean"] > report["random_mean"]
    # Best-of-n only matches a perfect top-1 of 8 by rendering all 8.
    assert report["renders_for_equal_quality"] == pytest.approx(8.0)
    assert report["compute_saved"] == pytest.approx(8.0)
    assert report["scoring_seconds_per_prompt"] >= 0 and report["render_seconds_per_image"] > 0
    assert report["scoring_cost_in_renders"] >= 0
    assert len(report["per_prompt"]) == 6
    # The rig reads no text, so scoring each prompt with another's embedding changes nothing: all gain is kept.
    swap = report["prompt_swap"]
    assert swap["gain_kept"] == pytest.approx(1.0) and swap["same_top1_share"] == 1.0
    assert swap["spearman_per_prompt_mean"] == pytest.approx(1.0)
    partner = figures.swap_partner(6)
    assert sorted(partner) == list(range(6)) and all(i != j for i, j in enumerate(partner))

    contact = report["contact_sheet"]
    assert contact["file"] == "contact_sheet.png" and len(contact["rows"]) == 2
    for row in contact["rows"]:
        assert row["pick_score"] >= row["candidate0_score"]
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.size == evaluation_pages.contact_sheet_size(2)

    # One step: nothing to preview, so the cost curve has random, the predictor and best-of-n only.
    cost = report["cost_curve"]
    assert {p["policy"] for p in cost["points"]} == {"random", "predictor", "best_of_n"}
    assert cost["best_of_n_steps"] == 8 and [p["steps"] for p in cost["points"] if p["policy"] == "best_of_n"] == [
        1, 2, 4, 8]
    predictor_point = next(p for p in cost["points"] if p["policy"] == "predictor")
    assert predictor_point["reaches_best_of_n"] and predictor_point["share_of_best_of_n_steps"] == pytest.approx(1 / 8)

    page = (out / "report.html").read_text()
    assert page.count("<svg") == 3 and 'src="contact_sheet.png"' in page
    assert "NaN" not in (out / "evaluation.json").read_text()


def test_reversed_predictor_is_perfectly_wrong(tiny, dataset, tmp_path):
    predictor = write_predictor(tmp_path / "predictor", predictor_config(tiny), sign=-1.0)
    out = tmp_path / "report"
    assert run(dataset, predictor, str(out), "--contact-prompts", "0", "--k", "2") == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert report["spearman_per_prompt_mean"] == pytest.approx(-1.0)
    assert set(report["ndcg"]) == {"2", "3"} and report["ndcg"]["2"] < 0.5
    assert report["p_pick_best"] == 0.0 and report["top1_gain"] < 0
    # Worse than a random seed: best-of-1 already matches it.
    assert report["renders_for_equal_quality"] == pytest.approx(1.0)
    assert report["contact_sheet"] is None and not (out / "contact_sheet.png").exists()
    assert (out / "report.html").read_text().count("<svg") == 3


def test_cost_curve_previews_the_predictors_best_candidates(tiny, tmp_path, capsys):
    dataset = write_dataset(tmp_path / "collect", tiny, steps=2)  # two steps: a one-step preview fits
    predictor = write_predictor(tmp_path / "predictor", predictor_config(tiny), sign=1.0)
    out = tmp_path / "report"
    assert run(dataset, predictor, str(out), "--contact-prompts", "0", "--previews", "1x1,4x1,8x1") == 0
    cost = json.loads((out / "evaluation.json").read_text())["cost_curve"]
    previews = {(p["m"], p["t"]): p for p in cost["points"] if p["policy"] == "preview"}
    assert sorted(previews) == [(1, 1), (4, 1), (8, 1)]
    assert [previews[(m, 1)]["steps"] for m in (1, 4, 8)] == [1 + 1, 4 + 1, 8 + 1]  # M x T + (steps - T)
    # A preview of one candidate keeps the predictor's top-1: the same images, the same mean score.
    predictor_point = next(p for p in cost["points"] if p["policy"] == "predictor")
    assert previews[(1, 1)]["mean_score"] == pytest.approx(predictor_point["mean_score"])
    for point in previews.values():
        assert cost["best_of_n_mean"] >= point["mean_score"] and 0 <= point["p_pick_best"] <= 1
    assert "preview 8x1" in (out / "report.html").read_text()
    for bad, message in (("9x1", "M must be 1 to N=8"), ("2x2", "T 1 to 1"), ("two", "expected MxT")):
        capsys.readouterr()
        assert run(dataset, predictor, str(out), "--contact-prompts", "0", "--previews", bad) == 2
        assert message in capsys.readouterr().err


def test_untrained_predictor_figures_are_in_range(tiny, dataset, tmp_path):
    predictor = write_predictor(tmp_path / "predictor", predictor_config(tiny))
    out = tmp_path / "report"
    assert run(dataset, predictor, str(out), "--contact-prompts", "0") == 0
    report = json.loads((out / "evaluation.json").read_text())
    for key in ("spearman_global", "spearman_per_prompt_mean", "spearman_per_prompt_median"):
        assert -1.0 <= report[key] <= 1.0
    assert all(0.0 <= value <= 1.0 for value in report["ndcg"].values())
    assert 0.0 <= report["p_pick_best"] <= 1.0
    curve = report["gain_curve"]
    assert all(point["oracle"] >= point["predictor"] - 1e-12 for point in curve)
    assert [point["oracle"] for point in curve] == sorted(point["oracle"] for point in curve)
    saved = report["renders_for_equal_quality"]
    assert saved is None or 1.0 <= saved <= 8.0


def test_test_split_keeps_only_held_out_prompts(tiny, dataset, tmp_path):
    split = {"salt": "half", "train": 0.4, "val": 0.1}
    held_out = [f"p{i}" for i in range(len(PROMPTS)) if split_of(f"p{i}", "half", 0.4, 0.1) == "test"]
    assert 0 < len(held_out) < len(PROMPTS)  # this salt splits the six prompts; pick another if the hash changes
    predictor = write_predictor(tmp_path / "predictor", predictor_config(tiny, split), sign=1.0)
    out = tmp_path / "report"
    assert run(dataset, predictor, str(out), "--contact-prompts", "0") == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert sorted(row["prompt_id"] for row in report["per_prompt"]) == held_out
    assert report["prompts_by_split"]["test"] == len(held_out)
    assert run(dataset, predictor, str(tmp_path / "all"), "--contact-prompts", "0", "--split", "all") == 0
    assert json.loads((tmp_path / "all" / "evaluation.json").read_text())["prompts"] == 6


def test_other_steps_are_evaluated_with_a_warning_but_another_rater_is_refused(tiny, tmp_path, capsys):
    predictor = write_predictor(tmp_path / "predictor", predictor_config(tiny), sign=1.0)
    other = write_dataset(tmp_path / "collect-steps", tiny, steps=3)
    out = tmp_path / "report"
    assert run(other, predictor, str(out), "--contact-prompts", "0") == 0  # measuring the weakening is the point
    report = json.loads((out / "evaluation.json").read_text())
    assert report["warnings"] == ["settings differ from the predictor's training (steps: predictor 1, dataset 3)"]

    other_rater = write_dataset(tmp_path / "collect-rater", tiny, rater="sharpness")
    assert run(other_rater, predictor, str(tmp_path / "refused"), "--contact-prompts", "0") == 2
    message = capsys.readouterr().err
    assert "rater: predictor 'colorfulness', dataset 'sharpness'" in message and "measures nothing" in message
    assert not (tmp_path / "refused" / "evaluation.json").exists()


def test_split_follows_whether_the_dataset_is_the_training_set(tiny, dataset, tmp_path, caplog):
    from jobs.train import dataset_digest, read_dataset

    split = {"salt": "half", "train": 0.4, "val": 0.1}
    own = predictor_config(tiny, split)
    own.training_set = {"digest": dataset_digest(read_dataset(dataset)), "rows": 48}
    assert run(dataset, write_predictor(tmp_path / "own", own, sign=1.0), str(tmp_path / "a"),
               "--contact-prompts", "0") == 0
    report = json.loads((tmp_path / "a" / "evaluation.json").read_text())
    assert report["split"] == "test" and report["prompts"] < 6 and "training set" in report["split_reason"]
    assert "evaluating" in caplog.text and "--split all" in caplog.text  # a subset is never silent

    foreign = predictor_config(tiny, split)
    foreign.training_set = {"digest": "another-dataset", "rows": 10}
    assert run(dataset, write_predictor(tmp_path / "foreign", foreign, sign=1.0), str(tmp_path / "b"),
               "--contact-prompts", "0") == 0
    report = json.loads((tmp_path / "b" / "evaluation.json").read_text())
    assert report["split"] == "all" and report["prompts"] == 6


def test_contact_sheet_font_draws_cjk_and_accents():
    from PIL import Image, ImageDraw

    from jobs.pages.fonts import font_path, text_font

    if font_path() is None or "cjk" not in font_path().lower():
        pytest.skip("no CJK font installed here (Debian: fonts-noto-cjk)")

    def glyph(char: str) -> bytes:
        image = Image.new("L", (40, 40), 0)
        ImageDraw.Draw(image).text((4, 4), char, fill=255, font=text_font(24))
        return image.tobytes()

    # A font without these glyphs draws the same box for each; a real font draws different shapes.
    assert len({glyph(c) for c in ("日", "本", "語", "é", "ü")}) == 5


def test_bad_inputs_exit_2_with_the_fix(tiny, dataset, tmp_path, capsys):
    predictor = write_predictor(tmp_path / "predictor", predictor_config(tiny, split={}), sign=1.0)
    assert run(dataset, predictor, str(tmp_path / "a"), "--contact-prompts", "0") == 2
    assert "--split all" in capsys.readouterr().err
    assert run(str(tmp_path / "nowhere"), predictor, str(tmp_path / "b")) == 2
    assert "seedsift collect" in capsys.readouterr().err
    assert run(dataset, str(tmp_path / "no-predictor"), str(tmp_path / "c")) == 2
    assert "config.json" in capsys.readouterr().err
    assert run(dataset, predictor, str(tmp_path / "d"), "--k", "0") == 2

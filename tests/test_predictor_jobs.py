"""collect -> train -> evaluate -> generate with the predictor and budget policies, end to end on a real local Ray."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from actors.models import diffusion, families
from actors.models.embedded import resolve_model
from actors.models.seeds import batch_noise, candidate_seeds
from actors.predictor.model import PredictorMismatch
from jobs import evaluate, reproduce, train
from jobs.collect import write_dataset
from orchestrator.flow import pipeline
from orchestrator.output.storage import Output
from orchestrator.run.config import ConfigError, GenerateConfig
from orchestrator.run.predictor_files import EMBEDDED_PREDICTORS, load_predictor
from tests.helpers_manifest import manifest_frame

PROMPTS = [f"{thing} in the style of {style}" for thing in ("a fox", "a red car", "a lighthouse", "a bowl of soup")
           for style in ("watercolour", "pixel art", "a photograph", "an oil painting")]  # 16
SETTINGS = dict(steps=2, guidance=3.0, batch_size=8, generator_cpus=1, rater="colorfulness", seed=3)


def manifest(out: str) -> pd.DataFrame:
    return manifest_frame(out)


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    """A small collect (16 prompts x 6 candidates) and a small predictor trained on it by the train job."""
    folder = tmp_path_factory.mktemp("predictor-jobs")
    corpus = folder / "prompts.txt"
    corpus.write_text("\n".join(PROMPTS) + "\n")
    collect_out = str(folder / "collect")
    summary = pipeline.run(GenerateConfig(prompts=str(corpus), out=collect_out, candidates=6, keep=6,
                                          all_candidates=True, save_images=False, **SETTINGS))
    rows = write_dataset(Output(collect_out))
    predictor = str(folder / "predictor")
    code = train.main(["--dataset", collect_out, "--out", predictor, "--epochs", "4", "--patience", "4",
                       "--val", "0.25", "--test", "0.25", "--channels", "8,16", "--hidden", "16", "--head", "16",
                       "--prompts-per-batch", "4"])
    assert code == 0
    return {"folder": folder, "corpus": str(corpus), "collect": collect_out, "predictor": predictor,
            "summary": summary, "rows": rows}


def test_collect_renders_every_candidate_and_writes_the_training_set(trained):
    assert trained["summary"]["images"] == 16 * 6 and trained["rows"] == 16 * 6
    dataset = pd.read_parquet(Path(trained["collect"]) / "dataset.parquet")
    assert set(dataset.columns) >= {"prompt_id", "prompt", "seed", "score", "model", "rater", "steps"}
    for prompt_id, group in dataset.groupby("prompt_id"):
        assert list(group.sort_values("candidate_index").seed) == candidate_seeds(3, prompt_id, 6)
    assert dataset.score.notna().all() and dataset.score.std() > 0
    assert not list((Path(trained["collect"]) / "images").glob("**/*.png"))  # --no-images


def test_predictor_is_safetensors_plus_json_recording_its_pipeline(trained):
    folder = Path(trained["predictor"])
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["latent_shape"] == [4, 32, 32] and config["text_dim"] == 32
    assert config["pipeline"]["model"] == "embedded:tiny-sd" and config["pipeline"]["steps"] == 2
    assert config["rater"] == "colorfulness"
    assert {"train", "val", "residual_std", "residual_ratio", "best_epoch"} <= set(config["metrics"])
    assert len(config["spread_quantiles"]) == 50


def test_loading_into_another_pipeline_fails_clearly(trained, tiny_pixart_path):
    with pytest.raises(PredictorMismatch, match="trained for a sd pipeline, this one is pixart"):
        load_predictor(trained["predictor"], tiny_pixart_path, 64, 64)
    with pytest.raises(PredictorMismatch, match=r"shape \(4, 32, 32\), this run draws \(4, 64, 64\)"):
        load_predictor(trained["predictor"], resolve_model("embedded:tiny-sd"), 128, 128)


def test_generate_refuses_a_mismatched_predictor_before_compute(trained):
    config = GenerateConfig(prompts=trained["corpus"], out=str(trained["folder"] / "bad"), policy="predictor",
                            predictor=trained["predictor"], candidates=6, keep=1, width=128, height=128, **SETTINGS)
    with pytest.raises(ConfigError, match="does not fit this pipeline"):
        pipeline.run(config)
    assert not (trained["folder"] / "bad" / "manifest").exists()


def test_generate_and_evaluate_refuse_a_damaged_predictor_before_compute(trained, tmp_path, capsys):
    damaged = {"truncated-weights": ("model.safetensors", lambda data: data[: len(data) // 2],
                                     "model.safetensors does not load"),
               "config-missing-a-field": ("config.json", lambda data: json.dumps(
                   {k: v for k, v in json.loads(data).items() if k != "channels"}).encode(),
                   "config.json is not a seedsift predictor config")}
    for name, (file_name, damage, message) in damaged.items():
        folder = tmp_path / name
        folder.mkdir()
        for original in Path(trained["predictor"]).iterdir():
            data = original.read_bytes()
            (folder / original.name).write_bytes(damage(data) if original.name == file_name else data)
        out = tmp_path / f"out-{name}"
        config = GenerateConfig(prompts=trained["corpus"], out=str(out), policy="predictor", predictor=str(folder),
                                candidates=6, keep=1, **SETTINGS)
        with pytest.raises(ConfigError, match=message):
            pipeline.run(config)
        assert not out.exists()  # refused before run.json or any manifest was written
        assert evaluate.main(["--dataset", trained["collect"], "--predictor", str(folder), "--out",
                              str(tmp_path / f"report-{name}")]) == 2
        assert message in capsys.readouterr().err


def test_evaluate_reports_on_held_out_prompts(trained):
    report = trained["folder"] / "report"
    assert evaluate.main(["--dataset", trained["collect"], "--predictor", trained["predictor"], "--out", str(report),
                          "--contact-prompts", "1"]) == 0
    figures = json.loads((report / "evaluation.json").read_text())
    assert figures["split"] == "test" and 0 < figures["prompts"] < 16
    for key in ("spearman_per_prompt_mean", "top1_gain_std_units", "p_pick_best", "gain_curve", "ndcg"):
        assert key in figures
    assert (report / "report.html").exists() and (report / "contact_sheet.png").exists()


def best_seeds(predictor_folder: str, prompt: str, prompt_id: str, candidates: int, keep: int) -> set[int]:
    """The `keep` best of a prompt's candidate seeds by the predictor, recomputed in this process."""
    model_path = resolve_model("embedded:tiny-sd")
    predictor = load_predictor(predictor_folder, model_path, 64, 64)
    pipe = diffusion.load_adapter(model_path, "text")
    embeds = pipe.encode([prompt], SETTINGS["guidance"])
    seeds = candidate_seeds(SETTINGS["seed"], prompt_id, candidates)
    scores = predictor.score_candidates(batch_noise(seeds, families.latent_shape(model_path, 64, 64)),
                                        {k: v[0] for k, v in embeds.items() if k != "truncated"})
    return {seeds[i] for i in np.argsort(-scores)[:keep]}


def test_corpus_predictor_and_output_in_object_storage(trained, s3_bucket, tmp_path):
    """Everything on S3 through the loopback endpoint: a jsonl corpus (two lines quarantined), the predictor (the
    driver reads it once and ships it to the scorer actors, so any node can use it) and the output. Each prompt
    keeps the k seeds the predictor ranks best; rows locate their images under the output; a row reproduces from S3;
    the credentials, from the standard AWS variables, never land in an output file."""
    import s3fs

    fs = s3fs.S3FileSystem()  # the loopback endpoint, from the standard AWS variables
    remote = f"{s3_bucket}/predictors/small"
    for name in ("config.json", "model.safetensors"):
        fs.put_file(str(Path(trained["predictor"]) / name), f"{remote}/{name}")
    lines = [json.dumps({"id": f"id-{i}", "prompt": p}) for i, p in enumerate(PROMPTS)] + ["{broken", '"   "']
    corpus = f"{s3_bucket}/in/prompts.jsonl"
    fs.pipe_file(corpus, "\n".join(lines).encode())
    out = f"{s3_bucket}/runs/predictor"
    summary = pipeline.run(GenerateConfig(prompts=corpus, out=out, policy="predictor", predictor=remote,
                                          candidates=6, keep=2, **SETTINGS))
    assert summary["images"] == 16 * 2 and summary["prompts_quarantined"] == 2
    rows = manifest(out)
    ok = rows[rows.status == "ok"]
    assert ok.predicted_score.notna().all() and set(ok.prompt_id) == {f"id-{i}" for i in range(16)}
    difficulty = summary["prompt_difficulty"]
    assert difficulty["prompts"] == 16 and len(difficulty["hardest_prompts"]) == 10
    for prompt_id, group in list(ok.groupby("prompt_id"))[:4]:
        assert set(group.seed) == best_seeds(trained["predictor"], group.prompt.iloc[0], prompt_id, 6, 2)
    for uri in ok.image_uri[:4]:
        assert uri.startswith(f"{out}/images/")
        assert Image.open(io.BytesIO(fs.cat_file(uri))).size == (64, 64)
    # run.json names the predictor by its digest and never carries its weights, nor any credential.
    run = json.loads(fs.cat_file(f"{out}/run.json"))
    assert run["fingerprint_fields"]["predictor"] and len(json.dumps(run)) < 10_000
    for key in ("summary.json", "run.json"):
        assert "testing-secret-value" not in fs.cat_file(f"{out}/{key}").decode()
    row = ok.iloc[0]
    target = tmp_path / "from-s3.png"
    assert reproduce.main(["--manifest", out, "--prompt-id", row.prompt_id, "--seed", str(int(row.seed)), "--out",
                           str(target)]) == 0
    original = np.asarray(Image.open(io.BytesIO(fs.cat_file(row.image_uri))), np.int16)
    assert np.abs(original - np.asarray(Image.open(target), np.int16)).max() <= 1

    with pytest.raises(ConfigError, match="no model.safetensors there"):
        fs.rm(f"{remote}/model.safetensors")
        pipeline.run(GenerateConfig(prompts=corpus, out=out + "-missing", policy="predictor", predictor=remote,
                                    candidates=6, keep=1, **SETTINGS))


def test_budget_policy_spends_the_budget_unevenly_under_one_fingerprint(trained):
    """--budget-images 32 over 16 prompts is --budget 2.0: the same rule, spent unevenly. 0.1 recorded the
    fingerprint taken before --budget-images was turned into renders per prompt in run.json, and the one taken
    after in the rows and the summary; the derived budget now lives in the plan."""
    out = str(trained["folder"] / "generate-budget-images")
    config = GenerateConfig(prompts=trained["corpus"], out=out, policy="budget", predictor=trained["predictor"],
                            candidates=6, keep=4, budget_images=32, **SETTINGS)
    per_prompt = GenerateConfig(prompts=trained["corpus"], out=out, policy="budget", predictor=trained["predictor"],
                                candidates=6, keep=4, budget=2.0, **SETTINGS)
    assert pipeline.prepare(per_prompt)[0].budget_rule == pipeline.prepare(config)[0].with_budget(16).budget_rule
    summary = pipeline.run(config)
    counts = manifest(out).groupby("prompt_id").size()
    assert counts.min() >= 1 and counts.max() <= 4 and counts.nunique() > 1
    assert summary["budget"]["renders_per_prompt_target"] == 2.0
    # Calibrated on the predictor's recorded spreads, not on this corpus: close to the budget, not exact.
    assert 1.0 <= summary["budget"]["renders_per_prompt_spent"] <= 3.0
    run_file = json.loads((Path(out) / "run.json").read_text())
    assert set(manifest(out).run_id) == {run_file["fingerprint"]} == {summary["run_id"]}
    assert config.budget is None  # the configuration was not written back
    again = pipeline.run(config)  # and a rerun accepts its own output
    assert again["this_run"]["images"] == 0 and again["images"] == summary["images"]


def test_embedded_default_predictor_fits_the_embedded_pipeline():
    folder = EMBEDDED_PREDICTORS["tiny-sd"]
    predictor = load_predictor(str(folder), resolve_model("embedded:tiny-sd"), 64, 64)
    assert predictor.config.rater == "colorfulness" and predictor.config.pipeline["steps"] == 4
    held_out = json.loads((folder / "evaluation.json").read_text())
    assert held_out["split"] == "test" and held_out["spearman_per_prompt_mean"] >= 0.4
    assert held_out["top1_gain_std_units"] >= 0.5
    assert (folder / "model.safetensors").stat().st_size < 2 * 1024 * 1024


def test_sdxl_collect_train_evaluate_generate_and_reproduce(ray_session, tiny_sdxl_path, tmp_path):
    """The SDXL recipe at toy size: pooled embeddings and size conditioning travel from scorer to generator."""
    corpus = tmp_path / "prompts.txt"
    corpus.write_text("\n".join(PROMPTS[:12]) + "\n")
    settings = {**SETTINGS, "model": tiny_sdxl_path}
    collect_out = str(tmp_path / "collect")
    pipeline.run(GenerateConfig(prompts=str(corpus), out=collect_out, candidates=4, keep=4, all_candidates=True,
                                save_images=False, **settings))
    assert write_dataset(Output(collect_out)) == 12 * 4
    predictor = str(tmp_path / "predictor")
    assert train.main(["--dataset", collect_out, "--out", predictor, "--epochs", "2", "--patience", "2",
                       "--val", "0.25", "--test", "0.25", "--channels", "8,16", "--hidden", "16", "--head", "16",
                       "--prompts-per-batch", "4"]) == 0
    config = json.loads((Path(predictor) / "config.json").read_text())
    # Both CLIP encoders' token embeddings, side by side, are what the predictor pools over.
    assert config["text_dim"] == 64 and config["pipeline"]["family"] == "sdxl"
    report = tmp_path / "report"
    assert evaluate.main(["--dataset", collect_out, "--predictor", predictor, "--out", str(report),
                          "--contact-prompts", "1"]) == 0
    assert json.loads((report / "evaluation.json").read_text())["prompts"] > 0
    assert (report / "contact_sheet.png").exists()

    out = str(tmp_path / "generate")
    summary = pipeline.run(GenerateConfig(prompts=str(corpus), out=out, policy="predictor", predictor=predictor,
                                          candidates=4, keep=1, **settings))
    rows = manifest(out)
    assert summary["images"] == 12 and rows.status.eq("ok").all() and rows.predicted_score.notna().all()
    assert set(rows.scheduler) == {"EulerDiscreteScheduler"}

    # One manifest row rebuilds the stored image, in a fresh process's text and render pipelines.
    row = rows.iloc[0]
    target = tmp_path / "again.png"
    assert reproduce.main(["--manifest", out, "--prompt-id", row.prompt_id, "--seed", str(int(row.seed)),
                           "--out", str(target)]) == 0
    original = np.asarray(Image.open(row.image_uri), dtype=np.int16)
    rebuilt = np.asarray(Image.open(target), dtype=np.int16)
    assert original.std() > 1.0 and np.abs(original - rebuilt).max() <= 1

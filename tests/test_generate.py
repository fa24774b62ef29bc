"""The generate job end to end on a real local Ray: tiny SD and PixArt pipelines, local folders and loopback S3."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from actors.models.families import latent_shape
from actors.models.seeds import candidate_seeds
from jobs import reproduce
from orchestrator.flow import pipeline
from orchestrator.run.config import ConfigError, GenerateConfig
from tests.conftest import FINISHED_PROMPTS, REPO_ROOT, finished_settings
from tests.helpers_manifest import manifest_frame

PROMPTS = ["a red cube on a table", "a watercolor fox", "   ", "an astronaut riding a horse",
           "a bowl of ramen", "a lighthouse at night"]


def write_txt(path, prompts, extra: bytes = b"") -> str:
    path.write_bytes("\n".join(prompts).encode() + b"\n" + extra)
    return str(path)


def manifest(out: str):
    return manifest_frame(out)


def small_config(prompts: str, out: str, **overrides) -> GenerateConfig:
    values = dict(prompts=prompts, out=out, candidates=4, keep=2, steps=2, batch_size=4, guidance=3.0,
                  generator_cpus=1)
    values.update(overrides)
    return GenerateConfig(**values)


def copy_of(finished: dict, folder) -> dict:
    """A copy of the session's finished output and its corpus, for a test that grows or changes them."""
    import shutil

    shutil.copytree(finished["out"], folder / "out")
    shutil.copy(finished["corpus"], folder / "prompts.txt")
    return {"out": str(folder / "out"), "corpus": str(folder / "prompts.txt")}


def test_generate_writes_k_images_per_prompt_with_manifest(finished):
    """The session's finished run (conftest: 8 prompts, 2 of 4 candidates kept, 1 step, shards of 4 rows)."""
    rows = manifest(str(finished["out"]))
    ok = rows[rows.status == "ok"]
    assert len(rows) == len(ok) == 8 * 2 and ok.image_uri.notna().all()
    for prompt_id, group in ok.groupby("prompt_id"):
        # The random policy keeps the first k candidates, so seeds are the derived ones, in order.
        assert sorted(group.candidate_index) == [0, 1]
        assert list(group.sort_values("candidate_index").seed) == candidate_seeds(0, prompt_id, 2)
    for column in ("model", "scheduler", "steps", "guidance", "width", "height", "score", "prompt"):
        assert ok[column].notna().all(), column
    assert set(ok.width) == {64} and set(ok.height) == {64} and set(ok.scheduler) == {"DDIMScheduler"}
    for uri in ok.image_uri:
        image = Image.open(uri)
        assert image.size == (64, 64) and image.mode == "RGB"
    assert not ok.duplicated(["prompt_id", "seed"]).any()


def test_summary_counts_and_compute(finished):
    summary = finished["summary"]
    on_disk = json.loads((finished["out"] / "summary.json").read_text())
    assert on_disk == summary
    assert summary["prompts"] == 8 and summary["images"] == 16 and summary["failures"] == 0
    assert summary["prompts_quarantined"] == 0
    assert summary["denoising_steps_spent"] == 16 * 1
    assert summary["denoising_steps_best_of_n"] == 8 * 4 * 1
    assert summary["this_run"]["images_per_s"] > 0


def test_rerun_skips_committed_work_and_grown_corpus_renders_only_new(finished, tmp_path):
    """A rerun over a grown corpus whose second line was also edited renders the new prompt and the edited line's
    new text only, and says that the edited line's earlier rows stay (0.2 kept them silently). (A rerun over an
    unchanged corpus, which renders nothing and starts no Ray, is test_a_rerun_with_nothing_new....)"""
    from orchestrator.flow.console import summary_lines

    grown = copy_of(finished, tmp_path)
    before = manifest(grown["out"])
    lines = Path(grown["corpus"]).read_text().splitlines()
    lines[1] = "an edited second prompt about herons"
    Path(grown["corpus"]).write_text("\n".join(lines + ["a new prompt about owls"]) + "\n")  # edited, then grown
    summary = pipeline.run(finished_settings(grown["corpus"], grown["out"]))
    assert summary["this_run"]["images"] == 4 and summary["this_run"]["rows"] == 4
    assert summary["this_run"]["skipped_already_committed"] == len(before)
    assert summary["outdated_corpus_lines"] == {"lines": 1, "sources": ["prompts.txt:2"]}
    assert any(line.startswith("1 corpus line changed or went away after rendering (first: prompts.txt:2)")
               for line in summary_lines(summary))
    rows = manifest(grown["out"])
    assert len(rows) == len(before) + 4
    assert set(rows[rows.source == "prompts.txt:2"].prompt) == {FINISHED_PROMPTS[1], lines[1]}
    assert not rows.duplicated(["prompt_id", "seed"]).any()
    key = ["source", "prompt_id", "seed", "status", "image_key", "score"]
    committed = set(before[key].astype(str).itertuples(index=False))
    assert committed <= set(rows[key].astype(str).itertuples(index=False))  # committed rows untouched


def test_changed_configuration_is_refused_before_compute(finished, tmp_path):
    changed = copy_of(finished, tmp_path)
    with pytest.raises(ConfigError, match=r"steps: 1 -> 3"):
        pipeline.run(dataclasses.replace(finished_settings(changed["corpus"], changed["out"]), steps=3))


def test_reproduce_rebuilds_a_stored_image(finished, tmp_path):
    row = manifest(str(finished["out"])).query("status == 'ok'").iloc[3]
    target = tmp_path / "again.png"
    code = reproduce.main(["--manifest", str(finished["out"]), "--prompt-id", row.prompt_id, "--seed",
                           str(int(row.seed)), "--out", str(target)])
    assert code == 0
    original = np.asarray(Image.open(row.image_uri), dtype=np.int16)
    rebuilt = np.asarray(Image.open(target), dtype=np.int16)
    # A batch of one may take another kernel path than the generator's batch: one uint8 level at most.
    assert np.abs(original - rebuilt).max() <= 1
    assert (original != rebuilt).mean() < 0.001


@pytest.mark.slow  # a full run with a model rater actor: about 15 CPU-seconds
def test_a_checkpoint_rater_selected_by_name_runs_in_the_rater_actor(ray_session, tmp_path):
    """A checkpoint rater named in the run's configuration is built and run inside the rater actor like any other;
    each row records the spec that scored it. (HPSv2 here; both checkpoint raters through the rater stage's callable,
    and their scores against the reference packages: tests/test_reward_models.py.)"""
    from tests.helpers_clip import tiny_clip_tokenizer
    from tests.helpers_raters import DATA

    tiny_clip_tokenizer().save_pretrained(tmp_path / "clip-tokenizer")
    corpus = write_txt(tmp_path / "p.txt", PROMPTS[:2])
    spec = (f"hpsv2:{DATA / 'hps_tiny.pt'},tokenizer={tmp_path / 'clip-tokenizer'},"
            f"config={DATA / 'hps_tiny_config.json'}")
    out = str(tmp_path / "hpsv2")
    summary = pipeline.run(small_config(corpus, out, rater=spec, keep=1))
    rows = manifest(out)
    assert summary["images"] == 2 and rows.status.eq("ok").all(), rows.error.tolist()
    assert np.isfinite(rows.score).all() and set(rows.rater) == {spec}


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--candidates", "2", "--keep", "3"], "--keep 3 is more than --candidates 2"),
        (["--candidates", "0"], "--candidates must be between 1 and"),
        (["--model", "/no/such/model"], "no such folder"),
        (["--rater", "aesthetic"], "unknown rater"),
        (["--width", "-64"], "--width must be a positive multiple of 8"),
    ],
)
def test_cli_refuses_bad_configuration_before_compute(tmp_path, flags, message):
    result = run_cli("generate", "--prompts", "examples/parti-sample.tsv", "--out", str(tmp_path / "o"), *flags)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o" / "manifest").exists()


def test_cli_refuses_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_cli("generate", "--prompts", "examples/parti-sample.tsv", "--out", str(blocker / "out"))
    assert result.returncode == 2 and "is not writable" in result.stderr


def test_cli_lists_jobs():
    result = run_cli("--help")
    assert result.returncode == 0 and "generate" in result.stdout and "reproduce" in result.stdout


def test_a_block_of_only_quarantined_rows_keeps_string_columns(tiny_sd_path):
    """All-None columns would become Arrow's null type and break the merge with other blocks downstream."""
    from actors.stages.scorer import ScorerStage
    from actors.stages.settings import ScoringPlan

    plan = ScoringPlan(model=tiny_sd_path, run_seed=0, candidates=4, keep=2, policy="random", guidance=3.0,
                       height=64, width=64, latent_shape=latent_shape(tiny_sd_path, 64, 64), prompts_per_call=2)
    scorer = ScorerStage(plan)
    # A block of quarantined rows (no prompt), then a block of good rows (no error).
    for prompts, errors in (([None, ""], ["invalid UTF-8", "prompt is empty"]), (["a cat", "a dog"], [None, None])):
        status = "quarantined" if errors[0] else "ok"
        batch = {"prompt_id": np.array(["p1", "p2"], dtype=object), "prompt": np.array(prompts, dtype=object),
                 "source": np.array(["a:1", "a:2"], dtype=object), "status": np.array([status] * 2, dtype=object),
                 "error": np.array(errors, dtype=object), "shard": np.array(["a/000000"] * 2, dtype=object),
                 "shard_row": np.array([0, 1]), "shard_rows": np.array([2, 2]), "shard_base": np.array([0, 0]),
                 "shard_frame": np.array(["{}", "{}"], dtype=object), "prompt_key": np.array([1, 2], np.uint64),
                 "text_key": np.array([3, 4], np.uint64)}
        out = scorer(batch)
        for column in ("prompt", "error"):
            assert pa.array(list(out[column])).type == pa.string(), (column, prompts)


def test_one_actor_yields_in_generator_batches_what_the_two_stages_give(tiny_sd_path):
    """actors/stages/local.py: a scorer block of 3 prompts, 2 rows kept each, leaves the one actor as generator
    batches of 4 and 2 rows, equal column by column (images to the bit) to the scorer's rows rendered by a
    GeneratorStage."""
    from actors.stages.generator import GeneratorStage
    from actors.stages.local import ScoreAndRenderStage
    from actors.stages.scorer import ScorerStage
    from actors.stages.settings import RenderPlan, ScoringPlan

    shape = latent_shape(tiny_sd_path, 64, 64)
    scoring = ScoringPlan(model=tiny_sd_path, run_seed=0, candidates=4, keep=2, policy="random", guidance=3.0,
                          height=64, width=64, latent_shape=shape, prompts_per_call=3)
    rendering = RenderPlan(model=tiny_sd_path, steps=2, guidance=3.0, height=64, width=64, latent_shape=shape,
                           scheduler="default", rater="colorfulness", rates_images=True)
    prompts = ["a red cube", "a blue ball", "a green cone"]
    batch = {"prompt_id": np.array(["p1", "p2", "p3"], dtype=object), "prompt": np.array(prompts, dtype=object),
             "source": np.array(["a:1", "a:2", "a:3"], dtype=object), "status": np.array(["ok"] * 3, dtype=object),
             "error": np.array([None] * 3, dtype=object), "shard": np.array(["a/000000"] * 3, dtype=object),
             "shard_row": np.arange(3), "shard_rows": np.full(3, 3), "shard_base": np.zeros(3, np.int64),
             "shard_frame": np.array(["{}"] * 3, dtype=object), "prompt_key": np.arange(1, 4, dtype=np.uint64),
             "text_key": np.arange(4, 7, dtype=np.uint64)}
    parts = list(ScoreAndRenderStage(scoring, rendering, rows_per_batch=4)(batch))
    assert [len(part["status"]) for part in parts] == [4, 2]

    scored = ScorerStage(scoring, light=False)(batch)
    generator = GeneratorStage(rendering)
    expected = [generator({name: values[start:start + 4] for name, values in scored.items()}) for start in (0, 4)]
    for got, want in zip(parts, expected):
        assert sorted(got) == sorted(want) and "prompt_embeds" not in got
        for name in want:
            if want[name].dtype == object:
                assert [repr(v) for v in got[name]] == [repr(v) for v in want[name]], name
            else:
                np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert all((part["status"] == "ok").all() for part in parts)


def test_a_rerun_with_nothing_new_and_an_empty_corpus_start_no_ray(finished, tmp_path):
    """Every corpus row committed (a scheduled rerun that finds nothing new), or no row at all: the job says so and
    ends before Ray or any model starts (its private Ray folder stays empty)."""
    import shutil

    from tests.helpers_ray import private_ray_env

    out = tmp_path / "out"
    shutil.copytree(finished["out"], out)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    for corpus, target, images in ((finished["corpus"], out, 16), (str(empty), tmp_path / "new", 0)):
        env = private_ray_env()
        result = subprocess.run([sys.executable, "-m", "jobs.cli", "generate", "--prompts", corpus, "--out",
                                 str(target), "--candidates", "4", "--keep", "2", "--steps", "1", "--guidance", "3.0",
                                 "--batch-size", "4", "--generator-cpus", "1", "--shard-size", "4"],
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "nothing to render" in result.stderr and f"done: {images} images" in result.stdout, result.stderr
        assert not os.listdir(env["RAY_TMPDIR"])  # no Ray session was started
        assert json.loads((target / "summary.json").read_text())["this_run"]["rows"] == 0

"""The solver search (orchestrator/search/solver_search.py, the search-solver job): a real search on the tiny
pipeline in the session's Ray, its resume, its refusals, and (slow tier) a real kill of the CLI and its rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from actors.models.unified_solver import ScheduleFile, SolverSchedule, StepDecision
from orchestrator.run.config import ConfigError
from orchestrator.search.solver_search import EVALUATIONS_FILE, SearchSettings, SolverSearch, mutant, repaired
from tests.conftest import REPO_ROOT

PROMPTS = ("a red circle", "two blue squares", "a green triangle above a red square", "three yellow circles",
           "one blue circle")
SMALL = dict(model="embedded:tiny-sd", steps=3, prompts=PROMPTS[:3], holdout=PROMPTS[3:], seeds_per_prompt=1,
             guidance=3.0, height=32, width=32, reference_steps=8, population=4, offspring=3, proposals=3,
             generations=2, seed=5)


def evaluations(out) -> list[dict]:
    return [json.loads(line) for line in (out / EVALUATIONS_FILE).read_text().splitlines()]


def test_a_search_improves_on_its_baselines_resumes_to_the_same_result_and_writes_a_usable_file(
        ray_session, tmp_path):
    from orchestrator.run.config import GenerateConfig
    from orchestrator.run.plan import build_plan

    settings = SearchSettings(**{**SMALL, "holdout": ()}, rater="colorfulness")  # held out: the slow test below
    out = tmp_path / "search"
    result = SolverSearch(settings, str(out)).run()
    found = ScheduleFile.from_dict(json.loads((out / "schedule.json").read_text()))
    assert found.to_dict() == result and found.calls == 3
    records = evaluations(out)
    assert len({r["digest"] for r in records}) == len(records) == result["figures"]["search"]["evaluations"]
    trail = result["figures"]["search"]["trail"]
    assert [t["generation"] for t in trail] == [0, 1, 2]
    assert trail[1]["proposed"] == 3 * 3 and trail[1]["evaluated"] == 3  # the surrogate ranked 9, 3 were evaluated
    objectives = [t["best_objective"] for t in trail]
    assert objectives == sorted(objectives, reverse=True)  # the best so far never gets worse
    assert objectives[-1] < objectives[0]  # and the search found better than the baselines (seeded: repeatable)
    assert "holdout" not in result["figures"]
    assert result["objective"]["guard"].startswith("mean colorfulness score")
    assert result["objective"]["training"]["score"] is not None
    # A kill after some evaluations: the rerun evaluates only what is missing and ends where this search ended.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "search").mkdir()
    for name in ("settings.json", "reference.safetensors"):
        (resumed / "search" / name).write_bytes((out / "search" / name).read_bytes())
    (resumed / EVALUATIONS_FILE).write_text("\n".join(json.dumps(r) for r in records[:5]) + "\n")
    again = SolverSearch(settings, str(resumed)).run()
    assert again["schedule"] == result["schedule"] and again["digest"] == result["digest"]
    assert sorted(r["digest"] for r in evaluations(resumed)) == sorted(r["digest"] for r in records)
    # The result runs in generate's plan as --scheduler schedule:PATH, for this model and K only.
    config = dict(prompts="unused.txt", out=str(tmp_path / "run"), candidates=2, keep=1, steps=3,
                  scheduler=f"schedule:{out / 'schedule.json'}")
    assert build_plan(GenerateConfig(**config)).scheduler == found.label
    with pytest.raises(ConfigError, match="searched for 3 model calls"):
        build_plan(GenerateConfig(**{**config, "steps": 4}))
    # Other settings into the same folder are refused, not mixed.
    with pytest.raises(ConfigError, match="holds a search with other settings .seed."):
        SolverSearch(SearchSettings(**{**SMALL, "holdout": (), "seed": 6}, rater="colorfulness"), str(out)).run()


def test_mutants_stay_runnable_and_a_repaired_schedule_keeps_its_calls():
    base = SolverSchedule(tuple(StepDecision(t, order=min(2, i + 1), derivative="unip", corrector=i < 4)
                                for i, t in enumerate([999, 799, 599, 399, 199])))
    rng = np.random.default_rng(0)
    seen, final_corrector = set(), 0
    for _ in range(300):
        child = base
        for _ in range(3):  # lines of descent, so the final corrector is turned on and off again
            child = mutant(child, rng, 999.0)
            assert child.calls == 5 and child.problems() == [], child
            seen.add(child.digest)
            final_corrector += child.final_corrector
    assert len(seen) > 300  # the search space is explored, not one neighbour
    assert 20 < final_corrector < 600  # the last step's corrector (4 steps + its call) is explored, not the rule
    broken = repaired([StepDecision(500, "noise", 3, "dpm", True), StepDecision(600, "noise", 3, "unip", False)])
    assert broken.problems() == [] and broken.steps[1].timestep < broken.steps[0].timestep
    assert broken.steps[0].order == 1 and broken.steps[-1] == StepDecision(broken.steps[1].timestep, "data", 1,
                                                                           "unip", False)
    # With the final corrector the last step ends above zero: it keeps its prediction and a possible order.
    ending = repaired([StepDecision(500, "noise", 3, "dpm", True), StepDecision(600, "noise", 3, "unip", True)])
    assert ending.problems() == [] and ending.steps[-1] == StepDecision(499.0, "noise", 2, "unip", True)


def test_search_settings_that_cannot_work_are_refused_before_any_model_loads(tmp_path, capsys):
    from jobs import search_solver

    with pytest.raises(ConfigError, match="--reference-steps 3 must be more than --steps 3"):
        SearchSettings(**{**SMALL, "reference_steps": 3}).check()
    with pytest.raises(ConfigError, match="--steps must be 2 to 50"):
        SearchSettings(**{**SMALL, "steps": 1}).check()
    flags = ["--model", "embedded:tiny-sd", "--steps", "3", "--prompts", str(REPO_ROOT / "examples" /
             "shapes-train.txt"), "--out", str(tmp_path / "out")]
    assert search_solver.main([*flags, "--rater", "clip:/no/such/folder"]) == 2
    assert "--rater clip:/no/such/folder" in capsys.readouterr().err
    assert search_solver.main([*flags, "--train-prompts", "5000"]) == 2
    assert "the search needs --train-prompts 5000" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written by a refused search


@pytest.mark.slow
def test_a_killed_search_reruns_to_completion_without_evaluating_anything_twice(ray_session, tmp_path, capfd):
    """The CLI in its own process (and its own Ray) killed mid-search; the same command rerun through its entry in
    this process, on the session's Ray (the kill is the subject, not the rerun's process), resumes and finishes."""
    from jobs import search_solver

    corpus = tmp_path / "prompts.txt"
    corpus.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "search"
    argv = ["--model", "embedded:tiny-sd", "--steps", "3",
            "--prompts", str(corpus), "--out", str(out), "--train-prompts", "3", "--holdout-prompts", "2",
            "--seeds-per-prompt", "1", "--reference-steps", "8", "--population", "4", "--offspring", "3",
            "--proposals", "3", "--generations", "2", "--height", "32", "--width", "32", "--seed", "5",
            "--rater", "colorfulness"]
    command = [sys.executable, "-m", "jobs.cli", "search-solver", *argv]
    # The session's model cache (SEEDSIFT_CACHE, set by ray_session), as the rerun here uses.
    first = subprocess.Popen(command, cwd=REPO_ROOT, start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
        if (out / EVALUATIONS_FILE).exists() and len(evaluations(out)) >= 5:
            break
        time.sleep(0.05)
    assert first.poll() is None, "the search ended before it could be killed"
    done_at_kill = len(evaluations(out))
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (out / "schedule.json").exists()
    capfd.readouterr()
    status = search_solver.main(argv)
    said = "".join(capfd.readouterr())
    assert status == 0, said[-2000:]
    assert f"resuming the search in {out}: {done_at_kill} evaluations done" in said, said[-2000:]
    records = evaluations(out)
    assert len({r["digest"] for r in records}) == len(records) == 10  # 4 + 2 generations of 3, none twice
    result = ScheduleFile.from_dict(json.loads((out / "schedule.json").read_text()))
    assert result.calls == 3
    holdout = result.figures["holdout"]  # the result's figures on the held-out prompts, beside the baselines'
    assert set(holdout) == {"searched", "dpm++", "unipc", "dpm++3m", "unipc-3"}
    assert all("score" in line and line["rmse"] > 0 for line in holdout.values())
    assert {"searched_minus_this", "paired_se"} <= set(holdout["dpm++"])

"""A user's first hour: corpora as they come, a console that speaks images, a report to look at, solver choice.

Jobs run as a user runs them (the CLI in a subprocess, a pseudo-terminal for the console), on the tiny SD pipeline.
"""

from __future__ import annotations

import bz2
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import REPO_ROOT
from tests.helpers_manifest import manifest_frame
from tests.helpers_ray import private_ray_env, session_ray_env

NOISE = ("INFO", "Running Dataset", "logging_progress", "core_worker", "torchvision", "Token authentication",
         "RayDeprecationWarning", "DeprecationWarning", "Loading weights", "MapBatches")
FAST = ["--candidates", "2", "--keep", "1", "--steps", "2", "--guidance", "3.0", "--batch-size", "4",
        "--generator-cpus", "1"]


def cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI in a subprocess: with a Ray of its own, as a user's local run, unless `env` says otherwise."""
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env or private_ray_env())


def in_a_terminal(*args: str, timeout: float = 300) -> tuple[int, str]:
    """Run the CLI in a pseudo-terminal (util-linux `script`), as a user at a terminal sees it."""
    command = " ".join([sys.executable, "-m", "jobs.cli", *args])
    result = subprocess.run(["script", "-qfec", f"stty cols 120 rows 40; {command}", "/dev/null"], cwd=REPO_ROOT,
                            capture_output=True, timeout=timeout, env=private_ray_env())
    return result.returncode, result.stdout.decode(errors="replace").replace("\r", "\n")


# --- corpora as they come ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory) -> Path:
    """One folder holding the common shapes of public prompt sets, each with two prompts."""
    folder = tmp_path_factory.mktemp("corpora") / "prompts"
    folder.mkdir()
    # DrawBench's header, as its own CSV has it.
    (folder / "drawbench.csv").write_text("Prompts,Category\na red colored car.,Colors\n"
                                          "\"A storefront with 'Hello World' written on it.\",Text\n")
    with gzip.open(folder / "lines.txt.gz", "wt") as handle:
        handle.write("a lighthouse at dusk\nan owl reading a newspaper\n")
    with gzip.open(folder / "objects.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"id": "j1", "prompt": "a teapot in the rain"}) + "\n"
                     + json.dumps({"id": "j2", "prompt": "two foxes on a bench"}) + "\n")
    with bz2.open(folder / "more.tsv.bz2", "wt") as handle:
        handle.write("Prompt\tCategory\na bowl of ramen\tFood\na castle made of ice\tPlaces\n")
    parquets = folder / "parquet"
    parquets.mkdir()
    pq.write_table(pa.table({"image_id": [1, 2], "caption": ["a kite over a beach", "a violin on a chair"]}),
                   parquets / "coco.parquet")
    pq.write_table(pa.table({"TEXT": ["a robot painting", "a market at night"], "uid": ["u1", "u2"]}),
                   parquets / "laion.parquet")
    import zstandard

    (folder / "extra.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b"a cactus with a hat\n"))
    return folder


@pytest.mark.slow
def test_common_corpora_run_end_to_end_from_one_folder(mixed_corpus, tmp_path):
    """A local run (the CLI with a Ray of its own) over a folder of every common corpus shape, with --json: stdout
    is nothing but the JSON summary, and none of Ray's or the libraries' noise reaches stderr."""
    out = tmp_path / "out"
    result = cli("generate", "--prompts", str(mixed_corpus), "--out", str(out), *FAST, "--json", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)  # nothing but the JSON on stdout
    assert summary["images"] == 13 and summary["output"].endswith("/out"), summary
    assert not any(noise in result.stderr for noise in NOISE), result.stderr[-2000:]
    rows = manifest_frame(str(out))
    assert (rows.status == "ok").all(), rows[rows.status != "ok"][["source", "error"]]
    assert len(rows) == summary["images"]
    by_file = rows.source.str.rsplit(":", n=1).str[0].value_counts().to_dict()
    assert by_file == {"drawbench.csv": 2, "lines.txt.gz": 2, "objects.jsonl.gz": 2, "more.tsv.bz2": 2,
                       "parquet/coco.parquet": 2, "parquet/laion.parquet": 2, "extra.txt.zst": 1}
    # Id columns found by name, case ignored; in a folder, each id is its file's (qualified by the file's name).
    assert {"objects.jsonl.gz#j1", "objects.jsonl.gz#j2", "parquet/laion.parquet#u1",
            "parquet/laion.parquet#u2"} <= set(rows.prompt_id), sorted(rows.prompt_id)
    assert "A storefront with 'Hello World' written on it." in set(rows.prompt)


def test_a_corpus_without_a_prompt_column_fails_in_seconds_with_one_line(tmp_path):
    corpus = tmp_path / "bench.csv"
    corpus.write_text("Description,Category\na red car,Colors\n")
    started = time.time()
    result = cli("generate", "--prompts", str(corpus), "--out", str(tmp_path / "out"))
    elapsed = time.time() - started
    assert result.returncode == 2 and elapsed < 10, (result.returncode, elapsed)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "bench.csv line 1: no prompt column (found: Description, Category)" in lines[0]
    assert "--prompt-column" in lines[0]
    assert not (tmp_path / "out").exists()  # and no Ray: nothing was started
    # The flag names the column, and a name that is not there is one line too.
    named = cli("generate", "--prompts", str(corpus), "--out", str(tmp_path / "out"), "--prompt-column", "Topic")
    assert named.returncode == 2 and "no column 'Topic' (--prompt-column" in named.stderr


# --- the console --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def twelve(tmp_path_factory) -> Path:
    corpus = tmp_path_factory.mktemp("console") / "prompts.txt"
    corpus.write_text("\n".join(f"a small robot number {i} waving" for i in range(11)) + "\n日本語の猫\n\n   \n")
    return corpus


def test_an_unexpected_failure_is_one_line_with_status_1_and_its_traceback_in_the_log(tmp_path, monkeypatch, capfd):
    """Whatever else breaks inside a run (a bug, Ray itself) ends in one console line with status 1, saying that the
    same command resumes and where the traceback is; the traceback goes to that log, not to the console."""
    from jobs import generate
    from orchestrator.flow import pipeline

    def broken(config, console):
        raise RuntimeError("a bug deep inside\nwith a second line")

    monkeypatch.setattr(pipeline, "run", broken)
    corpus = tmp_path / "p.txt"
    corpus.write_text("a red cube\n")
    status = generate.main(["--prompts", str(corpus), "--out", str(tmp_path / "out")])
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 1, err
    assert lines[-1].startswith("seedsift: the job failed (RuntimeError: a bug deep inside);"), err
    assert f"output {tmp_path / 'out'}: what it committed is kept; rerun the same command" in lines[-1], err
    assert "Traceback" not in err, err
    log = Path(lines[-1].rsplit("the traceback is in ", 1)[1].rstrip(")"))
    logged = log.read_text()
    assert "Traceback" in logged and "with a second line" in logged
    log.unlink()


def test_a_job_that_ends_before_ray_leaves_no_empty_log_in_the_temp_folder(tmp_path, monkeypatch, capfd):
    """The quiet console sends the driver's stderr to a file of the temp folder until Ray starts: a job that ends
    before (refused input or configuration) removes it unless something was written to it; 0.2 left one empty file
    a run."""
    import tempfile

    from jobs import generate

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    corpus = tmp_path / "p.txt"
    corpus.write_text("a red cube\n")
    assert generate.main(["--prompts", str(corpus), "--out", str(tmp_path / "out"), "--candidates", "0"]) == 2
    assert generate.main(["--prompts", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out")]) == 2
    err = capfd.readouterr().err
    assert "--candidates must be between 1" in err and "missing.txt" in err, err
    assert list(temp.iterdir()) == []


def test_seedsifts_own_warnings_reach_the_quiet_console_and_its_log(tmp_path):
    """0.2 sent them, with the libraries' noise, to the log file only: a run waiting for a busy output (--wait), or
    rendering on CPU for want of a GPU, said nothing on the console. A process of its own: pytest's log capture
    would stand in for the handlers a job sets up."""
    script = (
        "import logging\n"
        "from orchestrator.flow.console import Console\n"
        "with Console() as console:\n"
        "    logging.getLogger('seedsift').warning('an output is in use; waiting for it')\n"
        "    logging.getLogger('transformers').error('a library line')\n"
        "    print(console.log_file)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "seedsift: WARNING: an output is in use; waiting for it" in result.stderr, result.stderr
    assert "a library line" not in result.stderr, result.stderr
    log = Path(result.stdout.strip()).read_text()
    assert "waiting for it" in log and "a library line" in log, log


def test_the_console_shows_images_done_and_a_short_summary_not_ray(twelve, tmp_path):
    """The generate command as a user at a terminal runs it: the console, then the report it wrote."""
    out = tmp_path / "out"
    code, screen = in_a_terminal("generate", "--prompts", str(twelve), "--out", str(out), *FAST, "--shard-size", "4",
                                 timeout=600)
    assert code == 0, screen[-3000:]
    assert re.search(r"images: 100%\|.*\| 12/12 \[.*(img/s|s/img), failed=0 quarantined=1\]", screen), screen[-2000:]
    assert "done: 12 images for 12 prompts" in screen
    assert "1 quarantined (1 prompt is empty or whitespace only)" in screen
    assert ("denoising steps: 24 spent; rendering all 2 candidates and keeping the best would spend 48, and score "
            "higher: no saving at equal quality is claimed") in screen
    assert f"report: {out}/report.html" in screen
    check_report(out, images=12)
    for noise in NOISE:
        assert noise not in screen, noise
    assert "Ray's logs, and this driver's, are in" in screen
    logs = re.search(r"are in (\S+)", screen).group(1)
    assert "Running Dataset" in Path(logs, "seedsift-driver.log").read_text() or os.listdir(logs)


@pytest.mark.slow
def test_verbose_shows_rays_logs(ray_session, twelve, tmp_path):
    """--verbose lets Ray's INFO lines through to stderr; the summary still goes to stdout. (--json's quiet half is
    checked by the mixed-corpus run.) The CLI joins the session's Ray, as an --address run joins a cluster."""
    loud = cli("generate", "--prompts", str(twelve), "--out", str(tmp_path / "b"), *FAST, "--verbose", timeout=600,
               env=session_ray_env())
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert "INFO" in loud.stderr and "done: 12 images" in loud.stdout


# --- the report --------------------------------------------------------------------------------------------


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.links += [value for name, value in attrs if name in ("src", "href") and value]

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> _Links:
    page = _Links()
    page.feed(path.read_text())
    return page


def check_report(out: Path, images: int) -> None:
    """OUT/report.html and its shard pages link every committed image and name every quarantined row (its source
    and reason); non-ASCII prompts are shown; the front page stays small."""
    rows = manifest_frame(str(out))
    front = parse(out / "report.html")
    pages = [parse(p) for p in sorted((out / "report").rglob("*.html"))]
    linked = set(front.links) | {str((p_path.parent / link).resolve().relative_to(out.resolve()))
                                 for p_path, page in zip(sorted((out / "report").rglob("*.html")), pages)
                                 for link in page.links if link.startswith("../../images")}
    ok = rows[rows.status == "ok"]
    assert len(ok) == images
    assert set(ok.image_key) <= linked  # every committed image is linked, from the front page or a shard page
    text = " ".join(front.text + [t for page in pages for t in page.text])
    for source, error in rows[rows.status == "quarantined"][["source", "error"]].itertuples(index=False):
        assert source in text and error in text
    assert "日本語の猫" in text
    assert (out / "report.html").stat().st_size < 200_000


def test_collect_writes_its_training_set_and_a_report_of_every_candidate(ray_session, tmp_path, capsys):
    """The collect job's own entry (in this process, on the session's Ray): every candidate rendered and rated,
    dataset.parquet of the ok rows, and the report over all of them, quarantined rows named."""
    from jobs import collect

    corpus = tmp_path / "p.jsonl"
    corpus.write_text("\n".join([json.dumps({"prompt": f"a paper boat number {i}"}) for i in range(6)]
                                + ["{broken", json.dumps({"prompt": ""}), json.dumps({"prompt": "日本語の猫"})]) + "\n")
    out = tmp_path / "out"
    assert collect.main(["--prompts", str(corpus), "--out", str(out), *FAST, "--shard-size", "4", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 14 and summary["dataset_rows"] == 14 and summary["prompts_quarantined"] == 2
    dataset = pq.read_table(out / "dataset.parquet")
    assert dataset.num_rows == 14 and set(dataset["candidate_index"].to_pylist()) == {0, 1}
    check_report(out, images=14)


@pytest.mark.browser
def test_the_report_renders_in_a_real_browser(ray_session, tmp_path):
    """Opt-in (`-m browser`): headless Chromium from the Debian packages screenshots the page."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    from jobs.pages.report import write_report
    from orchestrator.flow import pipeline
    from orchestrator.output.storage import Output
    from orchestrator.run.config import GenerateConfig

    corpus = tmp_path / "p.txt"
    corpus.write_text("\n".join(["a watercolor fox", "a red cube", "   ", "une crêpe au café", "東京の夜景"]) + "\n")
    out = tmp_path / "out"
    pipeline.run(GenerateConfig(prompts=str(corpus), out=str(out), candidates=2, keep=2, steps=2, guidance=3.0,
                                generator_cpus=1))
    write_report(Output(str(out)))
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900",
                    f"--screenshot={shot}", f"file://{out / 'report.html'}"], check=True, timeout=120,
                   capture_output=True)
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (900, 1200)
    assert image.std() > 10  # more than a blank page: text, histograms and thumbnails
    if os.environ.get("SEEDSIFT_SCREENSHOT"):  # how the README's screenshot is made
        shutil.copy(shot, os.environ["SEEDSIFT_SCREENSHOT"])


# --- solvers ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "scheduler", "rater"),
                         [("tiny_sd_path", "euler-a", "colorfulness"), ("tiny_pixart_path", "unipc", "clip")])
def test_a_chosen_solver_is_recorded_and_reproduced(ray_session, tmp_path, request, model, scheduler, rater):
    """A stochastic solver on SD, a multistep one on PixArt; the PixArt run also rates with a CLIP model (a model
    rater, loaded in its own actor), and every row records the rater spec that scored it."""
    from jobs import reproduce
    from orchestrator.flow import pipeline
    from orchestrator.run.config import ConfigError, GenerateConfig
    from tests.helpers_clip import build_tiny_clip

    if rater == "clip":
        build_tiny_clip(tmp_path / "tiny-clip")
        rater = f"clip:{tmp_path / 'tiny-clip'}"
    corpus = tmp_path / "p.txt"
    corpus.write_text("a watercolor fox\na lighthouse at night\n")
    settings = dict(prompts=str(corpus), out=str(tmp_path / "out"), model=request.getfixturevalue(model),
                    candidates=2, keep=2, steps=3, guidance=3.0, generator_cpus=1, rater=rater)
    summary = pipeline.run(GenerateConfig(**settings, scheduler=scheduler))
    rows = manifest_frame(settings["out"])
    assert summary["images"] == 4 and rows.status.eq("ok").all() and np.isfinite(rows.score).all()
    assert set(rows.scheduler) == {scheduler} and set(rows.rater) == {rater}
    row = rows.iloc[1]
    target = tmp_path / "again.png"
    assert reproduce.main(["--manifest", settings["out"], "--prompt-id", row.prompt_id, "--seed", str(int(row.seed)),
                           "--out", str(target)]) == 0
    original = np.asarray(Image.open(row.image_uri), np.int16)
    assert np.abs(original - np.asarray(Image.open(target), np.int16)).max() <= 1
    with pytest.raises(ConfigError, match=f"scheduler: '{scheduler}' -> 'ddim'"):
        pipeline.run(GenerateConfig(**settings, scheduler="ddim"))


def test_a_failure_is_summarised_by_the_exception_under_rays_wrappers():
    from ray.exceptions import RayTaskError

    from jobs.common import failure_summary

    inner = ValueError("the index actor died\nsecond line")
    wrapped = RayTaskError("submit", "Traceback (most recent call last):\n  ...\nValueError: the index actor died",
                           inner)
    assert failure_summary(wrapped) == "ValueError: the index actor died"
    text_only = RayTaskError("submit", "\x1b[36mray::MapWorker\x1b[39m (pid=1)\nTraceback ...\n"
                             "ray.exceptions.ActorDiedError: The actor died unexpectedly\n\nThe above exception "
                             "was the direct cause of the following exception:\n\nray.exceptions.UserCodeException: "
                             "Failed to process a block\n\nTo change retry attempts, configure it.", None)
    assert failure_summary(text_only) == "ray.exceptions.ActorDiedError: The actor died unexpectedly"
    assert "\x1b" not in failure_summary(text_only)

"""Command-line flags shared by the jobs that run the pipeline (generate, collect), and their error handling.

Used by the job entry points only: it turns flags into a validated GenerateConfig.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import NoReturn

from orchestrator.run.config import DEFAULT_MODEL, ConfigError, GenerateConfig


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--prompts", required=True,
        help="corpus: .txt, .jsonl, .csv, .tsv or .parquet (optionally .gz .bz2 .xz .zst); a file, folder or glob; "
             "local or s3://")
    add("--prompt-column", default=None,
        help="column (or JSON field) holding the prompt (default: the first of prompt, prompts, caption, text)")
    add("--id-column", default=None, help="column holding the prompt id (default: prompt_id, id or uid if present)")
    add("--out", required=True, help="output folder or s3:// prefix")
    add("--model", default=DEFAULT_MODEL, help="diffusers pipeline folder or hub id (default: %(default)s)")
    add("--candidates", "-n", type=int, default=4, help="candidate seeds scored per prompt (N)")
    add("--keep", "-k", type=int, default=1, help="seeds rendered per prompt (k <= N)")
    add("--policy", default="random",
        help="selection policy: random, predictor (top k), budget, or preview (the predictor's best --preview "
             "candidates run --preview-steps steps, their previews are rated and the best one continues)")
    add("--preview", type=int, default=None, help="preview policy: candidates previewed per prompt (default 4)")
    add("--preview-steps", type=int, default=None,
        help="preview policy: denoising steps of each preview (default a quarter of --steps)")
    add("--budget", type=float, default=None, help="budget policy: average renders per prompt (at most --keep)")
    add("--budget-images", type=int, default=None, help="budget policy: total renders for the corpus")
    add("--predictor", default=None,
        help="predictor folder, local or s3:// (--policy predictor/budget); the driver reads it and sends it to the scorers")
    add("--steps", type=int, default=20, help="denoising steps")
    add("--scheduler", default="default",
        help="solver: default (the pipeline's own), ddim, euler, euler-a, dpm++, dpm++-karras, unipc; "
             "schedule:PATH (a searched schedule.json, see seedsift search-solver), or searched (the one shipped "
             "for embedded:shapes at --steps 4, 6 or 8)")
    add("--attention", default="full",
        help="the denoiser's self-attention: full; sparse (each query attends to a band of --attention-density of "
             "the keys on all but --attention-full-steps); re-ttention (the same, corrected from the last full step "
             "by Re-ttention's ratio and residual caches)")
    add("--attention-density", type=float, default=0.031,
        help="sparse and re-ttention: the share of keys each query attends to on sparse steps (default 0.031)")
    add("--attention-full-steps", default="paper",
        help="sparse and re-ttention: the steps with full attention, 'paper' (the first quarter of the steps, then "
             "every quarter-th: 0-4, 5, 10, 15 of 20) or step numbers such as 0,1,2,3,4,10")
    add("--guidance", type=float, default=None,
        help="classifier-free guidance scale (default 7.5; 5 for embedded:shapes, the scale it was tuned at)")
    add("--width", type=int, default=None, help="image width (default: the pipeline's native size)")
    add("--height", type=int, default=None, help="image height (default: the pipeline's native size)")
    add("--batch-size", type=int, default=4, help="images per generator call")
    add("--generators", type=int, default=1, help="generator actors (one per GPU on a GPU cluster)")
    add("--scorers", type=int, default=1, help="scorer actors")
    add("--rater", default=None,
        help="colorfulness, sharpness, shapes, clip:PATH, pickscore:PATH, ... (default colorfulness; shapes for "
             "embedded:shapes)")
    add("--seed", type=int, default=0, help="the run's base seed; candidate seeds derive from it")
    add("--limit", type=int, default=None, help="take only the first N corpus rows")
    add("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray instance)")
    add("--generator-gpus", type=float, default=None, help="GPUs per generator (default: 1 if the cluster has GPUs)")
    add("--generator-cpus", type=float, default=None, help="CPUs per generator; also its torch threads")
    add("--scorer-cpus", type=float, default=0.5, help="CPUs per scorer actor")
    add("--rater-gpus", type=float, default=0.0, help="GPU fraction per rater actor (model raters on GPU nodes)")
    add("--image-format", default="png", help="png, jpeg or webp")
    add("--sample", type=float, default=None, help="keep a stable fraction of the prompts (hash of prompt id)")
    add("--image-output", default="files", choices=("files", "shards"),
        help="files: one object per image; shards: WebDataset tars, about --shard-images images each")
    add("--shard-size", type=int, default=10_000,
        help="corpus rows per manifest shard (fixed for the life of an output; default %(default)s)")
    add("--shard-images", type=int, default=1000, help="images per WebDataset tar with --image-output shards")
    add("--dedup-buckets", type=int, default=None,
        help="duplicate-index buckets (default: sized from the output; one lives in the duplicate filter, more are "
             "an actor each)")
    add("--wait", action="store_true", help="if another run holds the output, wait for it instead of refusing")
    add("--lease-seconds", type=float, default=120.0,
        help="a run's lease on the output expires this long after its last heartbeat (default %(default)s)")
    add_storage_options(parser)
    add("--verbose", action="store_true", help="show Ray's and the model libraries' logs instead of a progress bar")
    add("--json", action="store_true", help="print the full summary as JSON instead of the short one")


def storage_options(text: str) -> dict:
    """--storage-options, the one parser every job uses: a JSON object of fsspec options, else argparse's exit 2."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg}); pass an object like '{{\"anon\": false}}'")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of fsspec options, got {type(value).__name__}; "
                                         "pass an object like '{\"anon\": false}'")
    return value


def add_storage_options(parser) -> None:
    parser.add_argument("--storage-options", type=storage_options, default="{}",
                        help="JSON fsspec storage options (default: the AWS credential chain)")


def config_from_args(args: argparse.Namespace, **overrides) -> GenerateConfig:
    values = {name: getattr(args, name) for name in GenerateConfig.__dataclass_fields__ if hasattr(args, name)}
    # Flags left out take the model's own defaults (a shipped model's tuned settings), else the configuration's.
    from actors.models.embedded import model_defaults

    for name, value in model_defaults(args.model).items():
        if values.get(name) is None:
            values[name] = value
    values = {name: value for name, value in values.items()
              if value is not None or GenerateConfig.__dataclass_fields__[name].default is None}
    values.update(overrides)
    return GenerateConfig(**values)


def check_prompts(config: GenerateConfig) -> None:
    """The corpus's files and their prompt columns, checked in a second (pipeline.prepare checks them again)."""
    from orchestrator.corpus.listing import Columns, check_corpus, list_corpus

    check_corpus(list_corpus(config.prompts, config.storage_options, config.out), Columns(config.prompt_column, config.id_column),
                 config.storage_options)


def finished(summary: dict, console) -> int:
    """A finished run's exit status: 0, or EXIT_INPUT with one line per damaged corpus file (its rows before the
    damage were delivered; the file stays reported as a failed row until it is replaced)."""
    from orchestrator.corpus.reader import DAMAGED_FILE

    damaged = [reason for reason in summary.get("failure_reasons") or {} if DAMAGED_FILE in reason]
    for reason in damaged:
        console.say(f"seedsift: {reason}; the rows before it are delivered: replace the file and rerun the same "
                    "command")
    return EXIT_INPUT if damaged else 0


EXIT_FAILED = 1  # anything else: a bug or a failure of Ray itself; the traceback is in the driver's log
EXIT_INPUT = 2  # configuration or input: fix the command or the corpus
EXIT_STORAGE = 3  # the output stayed unreachable or full after retries: rerun the same command to resume
EXIT_BUSY = 4  # another run holds the output: wait, or rerun with --wait


WRAPPERS = ("RayTaskError", "UserCodeException", "RayActorError")
EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit))(?::|$)")


def failure_summary(exc: BaseException) -> str:
    """`Type: first line` of the exception at the bottom of a failure, through Ray's wrappers and without colours.

    A RayTaskError keeps the worker's exception in `cause`; when that is only another wrapper (Ray Data's
    UserCodeException), the worker's traceback survives as text, and its first exception line is the root cause
    (for a Ray Data actor that called a killed actor: `ray.exceptions.ActorDiedError: The actor died ...`).
    """
    chain, seen = [exc], {id(exc)}
    while True:
        inner = getattr(chain[-1], "cause", None) or chain[-1].__cause__
        if not isinstance(inner, BaseException) or id(inner) in seen:
            break
        chain.append(inner)
        seen.add(id(inner))

    def lines(error: BaseException) -> list[str]:
        return [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]

    deepest = chain[-1]
    own = f"{type(deepest).__name__}: {next(iter(lines(deepest)), '')}"[:300]
    if not any(wrapper in type(deepest).__name__ for wrapper in WRAPPERS):
        return own
    for error in chain:  # a worker's traceback as text: its first exception line is the root cause
        for line in lines(error):
            match = EXCEPTION_LINE.match(line)
            if match and match.group(1) not in WRAPPERS:
                return line[:300]
    return own


def run_job(body: Callable[[], int], output: str | None = None) -> int:
    """Run a job body; what a user can cause or meet prints one clear line and a documented exit status.

    Inside a quiet Console the line goes to the console (the terminal), not to the log the rest of stderr goes to.
    """
    from orchestrator.corpus.listing import CorpusError
    from orchestrator.flow.console import Console
    from orchestrator.output.lease import LeaseLost, OutputBusy

    if not logging.getLogger().handlers:
        # seedsift's own progress at INFO; the libraries' INFO (botocore's credential chain, ...) is noise here.
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        logging.getLogger("seedsift").setLevel(logging.INFO)
    stream = Console.ACTIVE.stream if Console.ACTIVE is not None else sys.stderr
    try:
        return body()
    except (ConfigError, CorpusError) as exc:
        print(f"seedsift: {exc}", file=stream)
        return EXIT_INPUT
    except (OutputBusy, LeaseLost) as exc:
        print(f"seedsift: {exc}", file=stream)
        return EXIT_BUSY
    except OSError as exc:  # StorageError, and any other storage failure that reached the job
        print(f"seedsift: {exc}", file=stream)
        return EXIT_STORAGE
    except Exception as exc:  # noqa: BLE001 - anything else (a bug, a lost head node): one line, the traceback logged
        import traceback

        log = Console.ACTIVE.log_file if Console.ACTIVE is not None else None
        if log:
            with open(log, "a") as handle:
                traceback.print_exc(file=handle)
        else:  # no quiet console (--verbose, or a job without one): the traceback is the output
            traceback.print_exc()
        kept = f"output {output}: what it committed is kept; " if output else ""
        print(f"seedsift: the job failed ({failure_summary(exc)}); {kept}rerun the same command to resume "
              f"(the traceback is in {log or 'the output above'})", file=stream)
        return EXIT_FAILED


def exit_without_teardown(status: int) -> NoReturn:
    """End a finished read-only job with `os._exit`, after flushing what it printed and logged.

    Arrow's C++ thread pools (Parquet reads, its S3 client) can still hold a joinable thread while the interpreter
    tears modules down; the process then aborts with "terminate called without an active exception" and status
    134 although the job's work and output are complete (apache/arrow#34314; seen once in 19 `verify` runs on one
    output). A job that has printed its result has nothing left to finalise, so it skips the teardown.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)

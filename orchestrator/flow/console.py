"""What a run shows its user: one progress bar in images, one short summary, and nothing of Ray's internals.

Used by the generate and collect jobs (never by library calls of pipeline.run). Ray's and transformers' INFO and
warnings go to the log files in Ray's session folder, whose path is printed once; `--verbose` shows them instead.
On a terminal the bar is tqdm's; elsewhere (`ray job logs`, a cron log) it is a status line every 30 s, so logs
stay readable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings

STATUS_EVERY_S = 30.0


def quiet(verbose: bool) -> None:
    """Before Ray or any model library is imported: keep their noise out of the console unless --verbose."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        return
    # The model libraries' banners and progress bars (Ray's own go to its log folder, see Console).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*RayDeprecationWarning.*")
    logging.basicConfig(level=logging.WARNING, format="seedsift: %(levelname)s: %(message)s")
    for name in ("ray", "ray.data", "ray._private", "ray.runtime_env", "filelock", "transformers", "diffusers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("seedsift").setLevel(logging.WARNING)


def quiet_ray_data() -> None:
    """After `import ray`: no per-operator bars, no execution plan in the console."""
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Committed images against the expected total (None: unknown), with rate, ETA, failures and quarantined."""

    def __init__(self, total: int | None, done: int = 0, exact: bool = True, stream=None):
        self.total, self.done, self.exact = total, done, exact
        self.failed = self.quarantined = 0
        self.started = time.time()
        self.new = 0
        self.stream = stream or sys.stderr
        self._bar = None
        self._last_line = 0.0
        if getattr(self.stream, "isatty", lambda: False)():
            import shutil

            from tqdm import tqdm

            # A terminal that reports no size (a pty without a window) gets a sensible width, not an empty bar.
            size = shutil.get_terminal_size(fallback=(100, 24))
            self._bar = tqdm(total=total, initial=done, unit="img", desc="images", file=self.stream,
                             ncols=size.columns, nrows=size.lines, smoothing=0.1)

    def update(self, images: int, failed: int, quarantined: int, per_prompt: int) -> None:
        """Add this batch's counts (quarantined prompts lower the expected total by what they would have made)."""
        self.new += images
        self.done += images
        self.failed += failed
        self.quarantined += quarantined
        if self.total is not None:
            self.total = max(self.done, self.total - quarantined * per_prompt)
        if self._bar is not None:
            if self.total is not None and self._bar.total != self.total:
                self._bar.total = self.total
            self._bar.set_postfix_str(f"failed={self.failed} quarantined={self.quarantined}", refresh=False)
            self._bar.update(images)
        elif time.time() - self._last_line >= STATUS_EVERY_S:
            self.line()

    def line(self) -> None:
        """One status line, for logs that are not a terminal."""
        self._last_line = time.time()
        elapsed = time.time() - self.started
        rate = self.new / elapsed if elapsed > 0 else 0.0
        total = "?" if self.total is None else f"{'' if self.exact else '~'}{self.total:,}"
        eta = ""
        if self.total is not None and rate > 0:
            eta = f", about {_duration(max(0, self.total - self.done) / rate)} left"
        print(f"seedsift: images {self.done:,}/{total}, {rate:.2f}/s{eta}; {self.failed} failed, "
              f"{self.quarantined} quarantined", file=self.stream, flush=True)

    def close(self) -> None:
        """The run read the whole corpus: what it holds now is the total, but for failed rows left to retry."""
        self.total, self.exact = self.done + self.failed, True
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()
            self._bar.close()
        else:
            self.line()


def summary_lines(summary: dict, report: str | None = None) -> list[str]:
    """The end of a run in a few lines: what was made, what failed and why, what it cost, where it is."""
    run = summary["this_run"]
    lines = [f"done: {summary['images']:,} images for {summary['prompts']:,} prompts in the output "
             f"({run['images']:,} made by this run in {_duration(run['wall_time_s'])}, "
             f"{run['images_per_s']:.2f} images/s)"]
    failures = f"{summary['failures']:,} failed"
    if summary.get("failure_reasons"):
        failures += " (" + "; ".join(f"{n} {r}" for r, n in list(summary["failure_reasons"].items())[:2]) + ")"
    quarantined = f"{summary['prompts_quarantined']:,} quarantined"
    if summary.get("quarantine_reasons"):
        quarantined += " (" + "; ".join(f"{n} {r}" for r, n in list(summary["quarantine_reasons"].items())[:3]) + ")"
    lines.append(f"{failures}; {quarantined}")
    outdated = summary.get("outdated_corpus_lines") or {}
    if outdated.get("lines"):
        count = outdated["lines"]
        lines.append(f"{count:,} corpus line{'' if count == 1 else 's'} changed or went away after rendering (first: "
                     f"{outdated['sources'][0]}): new versions are rendered, and the earlier rows and images stay in "
                     "the output; summary.json's outdated_corpus_lines names them")
    if summary["denoising_steps_best_of_n"]:
        lines.append(steps_line(summary))
    for warning in summary.get("warnings") or []:
        lines.append(f"warning: {warning}")
    where = f"output: {summary['output']}"
    if report:
        where += f"   report: {report}"
    lines.append(where + f"   summary: {summary['output']}/summary.json")
    return lines


def steps_line(summary: dict) -> str:
    """Steps spent, and what they compare with: a saving only at equal quality (see pipeline.savings)."""
    n, spent = summary["candidates_per_prompt"], summary["denoising_steps_spent"]
    best = summary["denoising_steps_best_of_n"]
    saving = summary.get("savings") or {}
    line = f"denoising steps: {spent:,} spent"
    if saving.get("equal_quality_steps"):
        scores = saving.get("scores") or {}
        return (line + f"; best-of-n matching the predictor's pick would spend {saving['equal_quality_steps']:,} "
                f"({saving['renders_for_equal_quality']:.2f} renders a prompt, from its evaluation.json): "
                f"{saving['saved_at_equal_quality']:.0%} saved at equal quality. Rendering all {n} and keeping the "
                f"best would spend {best:,} and score higher ({scores.get('oracle_best_of_n_mean', float('nan')):.3g} "
                f"against {scores.get('predictor_top1_mean', float('nan')):.3g} on held-out prompts)")
    return (line + f"; rendering all {n} candidates and keeping the best would spend {best:,}, and score higher: no "
            "saving at equal quality is claimed without the predictor's evaluation.json")


def _ray_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


class Console:
    """The console of one job: quiet by default, --verbose for everything, --json for the full summary.

    Quiet means that what other code writes to the process's stderr (Ray's C++ core, library warnings) is sent to
    a log file, Ray's session log folder once Ray has started, while the console keeps the terminal it had; seedsift's
    own warnings (an output in use and waited for, generators on CPU for want of a GPU, a predictor trained at
    other settings) go to both. Use it as a context manager: the process's stderr is given back at the end.
    """

    ACTIVE: Console | None = None

    def __init__(self, verbose: bool = False, as_json: bool = False):
        self.verbose, self.as_json = verbose, as_json
        self.stream = sys.stderr
        self._saved_fd = None
        self._noise = None
        self._temporary = False  # the noise goes to a file of its own in the temp folder (until Ray starts)
        self._warnings = None  # the handler that shows seedsift's own warnings on the console while quiet

    def __enter__(self) -> Console:
        quiet(self.verbose)
        if not self.verbose:
            import tempfile

            sys.stderr.flush()
            self._saved_fd = os.dup(2)
            self.stream = os.fdopen(os.dup(2), "w", buffering=1)
            self._noise = tempfile.NamedTemporaryFile("ab", prefix="seedsift-driver-", suffix=".log", delete=False)
            os.dup2(self._noise.fileno(), 2)
            self._temporary = True
            self._warnings = logging.StreamHandler(self.stream)
            self._warnings.setLevel(logging.WARNING)
            self._warnings.setFormatter(logging.Formatter("seedsift: %(levelname)s: %(message)s"))
            logging.getLogger("seedsift").addHandler(self._warnings)  # and, as before, the log through the root
        Console.ACTIVE = self
        self._ray_was_up = _ray_up()  # without importing Ray: a job that fails early never needs it
        return self

    def __exit__(self, *exc) -> None:
        Console.ACTIVE = None
        if self._warnings is not None:
            logging.getLogger("seedsift").removeHandler(self._warnings)
            self._warnings = None
        if _ray_up() and not self._ray_was_up:
            sys.modules["ray"].shutdown()  # here, so what Ray prints while stopping goes to the log too
        if self._saved_fd is not None:
            sys.stderr.flush()
            os.dup2(self._saved_fd, 2)
            os.close(self._saved_fd)
            self._saved_fd = None
        if self.stream is not sys.stderr:
            self.stream.close()
            self.stream = sys.stderr
        if self._noise is not None:
            self._noise.close()
            # Ray never took the log over and nothing was said there: no empty file of the temp folder is left
            # behind by every job that ends before Ray starts (refused input or configuration).
            if self._temporary:
                with contextlib.suppress(OSError):  # already gone (a temp cleaner): nothing to leave or remove
                    if os.path.getsize(self._noise.name) == 0:
                        os.remove(self._noise.name)
            self._noise = None

    @property
    def log_file(self) -> str | None:
        """Where this driver's own stderr goes while quiet (Ray's session log folder once Ray has started)."""
        return self._noise.name if self._noise is not None else None

    def say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def ray_started(self) -> None:
        """Move the driver's noise into Ray's session log folder and say once where the logs are."""
        if self.verbose:
            return
        quiet_ray_data()
        try:
            import ray

            logs = ray._private.worker._global_node.get_logs_dir_path()
        except Exception:  # noqa: BLE001 - a client connection has no local node: the logs stay where they are
            self.say(f"seedsift: logs: {self._noise.name}")
            self._temporary = False  # named to the user: kept
            return
        target = os.path.join(logs, "seedsift-driver.log")
        with open(self._noise.name, "rb") as source, open(target, "ab") as log:
            log.write(source.read())
        moved = open(target, "ab")
        os.dup2(moved.fileno(), 2)
        self._noise.close()
        os.remove(self._noise.name)
        self._noise, self._temporary = moved, False
        self.say(f"seedsift: Ray's logs, and this driver's, are in {logs}")

    def progress(self, total: int | None, done: int, exact: bool) -> Progress:
        return Progress(total, done, exact, stream=self.stream)

    def finish(self, summary: dict, report: str | None = None) -> None:
        import json

        if self.as_json:
            print(json.dumps(summary, indent=2))
        else:
            print("\n".join(summary_lines(summary, report)))

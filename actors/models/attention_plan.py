"""Which self-attention a run's denoiser uses (issue 22): the plan, read by the configuration before anything heavy
is imported; actors/models/attention.py runs it."""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("full", "sparse", "re-ttention")
ABLATIONS = ("ratio", "residual")  # one correction alone: the benchmark's ablation, not a command-line choice
DEFAULT_DENSITY = 0.031  # the paper's sparsest setting: 3.1 % of the keys
PAPER = "paper"


def paper_full_steps(steps: int) -> tuple[int, ...]:
    """The paper's schedule, scaled to `steps`: the first quarter of the steps full, then every quarter-th step
    (20 steps: 0-4, 5, 10, 15; 8 of 20 full)."""
    period = max(1, round(steps / 4))
    return tuple(i for i in range(steps) if i < period or i % period == 0)


@dataclass(frozen=True)
class AttentionPlan:
    """How a run's denoiser attends: the mode, the kept share of keys and which steps are full (resolved for the
    run's step count). Its `label` is what the fingerprint and every manifest row record; `from_label` reads it."""

    mode: str = "full"
    density: float = DEFAULT_DENSITY
    full_steps: tuple[int, ...] = ()

    @classmethod
    def resolve(cls, mode: str, density: float, full_steps: str, steps: int) -> AttentionPlan:
        """From the flags (`--attention`, `--attention-density`, `--attention-full-steps`); ValueError says why."""
        if mode not in MODES + ABLATIONS:
            raise ValueError(f"--attention {mode!r} is unknown; use one of {', '.join(MODES)}")
        if mode == "full":
            return cls()
        if not 0 < density < 1:
            raise ValueError(f"--attention-density {density} must be above 0 and below 1 (1 is --attention full)")
        if full_steps.strip().lower() == PAPER:
            chosen = paper_full_steps(steps)
        else:
            try:
                chosen = tuple(sorted({int(part) for part in full_steps.split(",") if part.strip()}))
            except ValueError:
                raise ValueError(f"--attention-full-steps {full_steps!r}: expected '{PAPER}' or step numbers such "
                                 "as 0,1,2,3,4,10") from None
            outside = [i for i in chosen if not 0 <= i < steps]
            if outside:
                raise ValueError(f"--attention-full-steps {full_steps!r}: steps {outside} are outside 0..{steps - 1}")
            if 0 not in chosen:
                raise ValueError(f"--attention-full-steps {full_steps!r} must include step 0: the corrections of the "
                                 "sparse steps come from a full step before them")
        return cls(mode, float(density), chosen)

    @property
    def sparse(self) -> bool:
        return self.mode != "full"

    @property
    def label(self) -> str:
        if not self.sparse:
            return "full"
        return f"{self.mode}@{self.density:g}/" + ",".join(str(i) for i in self.full_steps)

    @classmethod
    def from_label(cls, label: str | None) -> AttentionPlan:
        """The plan a manifest row's `attention` records (None, from rows written before it existed: full)."""
        if not label or label == "full":
            return cls()
        try:
            mode, rest = label.split("@", 1)
            density, steps = rest.split("/", 1)
            return cls(mode, float(density), tuple(int(i) for i in steps.split(",")))
        except ValueError:
            raise ValueError(f"attention {label!r} is not a label seedsift wrote") from None

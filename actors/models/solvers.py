"""The solvers a run can choose with --scheduler: names, and the diffusers class and options each stands for.

Read by the configuration (to validate a name before anything heavy is imported) and by actors/models/diffusion.py,
which builds them from a pipeline's own scheduler config.
"""

SCHEDULERS = {
    "default": None,  # the pipeline folder's own scheduler, as shipped
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "dpm++-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
# `--scheduler schedule:PATH`: a searched solver schedule (schedule.json, actors/models/unified_solver.py), run by
# the unified solver; manifest rows record it as `schedule:<digest>` and run.json holds it.
SCHEDULE_PREFIX = "schedule:"
SEARCHED = "searched"  # the schedule shipped for an embedded model at this --steps (actors/models/embedded.py)


def is_schedule_file(scheduler: str) -> bool:
    return scheduler.startswith(SCHEDULE_PREFIX) and len(scheduler) > len(SCHEDULE_PREFIX)


# Solvers that add fresh noise at every step: their renders need a generator per image to be reproducible.
STOCHASTIC_SCHEDULERS = ("euler-a",)

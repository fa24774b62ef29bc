"""Light stages give way to the generators: on a machine they share, the kernel runs a generator first.

Reading, de-duplicating, scoring and rating use a few percent of a core; a generator uses every core it has, and
its torch threads wait for each other at every operator, so a light process that preempts one of them stalls all of
them (measured on 2 cores: a 10 % neighbour at the same priority slowed rendering by 15 %; at nice 10, not at all).
"""

from __future__ import annotations

import os

LIGHT_NICENESS = 10


def give_way_to_generators() -> None:
    """Raise this thread's nice value to LIGHT_NICENESS (threads it starts inherit it); never lowers it, which would
    need privileges, and never fails a stage."""
    try:
        current = os.nice(0)
        if current < LIGHT_NICENESS:
            os.nice(LIGHT_NICENESS - current)
    except OSError:
        pass

"""Selection policies: which of a prompt's N candidate seeds are rendered. Pure functions, no Ray, no torch.

Called by the scorer stage once a prompt's candidates have their predicted scores.
"""

from __future__ import annotations

import numpy as np


def keep_first(count: int, keep: int) -> list[int]:
    """The random policy: seeds are already independent random draws, so the first k are a uniform random choice.

    Keeping a prefix also means a random run's images are a subset of a collect run with the same run seed.
    """
    return list(range(min(keep, count)))


def keep_top_k(scores: np.ndarray, keep: int) -> list[int]:
    """Indices of the k highest predicted scores, best first; ties go to the lower candidate index."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((np.arange(len(scores)), -scores))
    return [int(i) for i in order[:keep]]

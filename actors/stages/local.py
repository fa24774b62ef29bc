"""One actor that scores and renders: the scorer and the generator of a run on one machine without a GPU.

On such a run the two stages share the same cores anyway, and as two actors each imports torch, diffusers and
transformers and loads its half of the pipeline at the same time as the other, on the cores the run has: about
6 s on 2 cores before the first image, against 4 s for the same imports and loads in one process (benchmarks/
README.md, figure 1). Here both are held by one actor: the scorer's part of the pipeline (tokenizers, text
encoders, the predictor) and the generator's (denoiser, VAE, solver) load once each, in one process, and a scorer
block is rendered in generator batches, each leaving the actor as soon as it is rendered, so the sink commits it
as before. Nothing else changes: the rows, seeds, latents and images are those of the two-actor graph.

The pipeline uses it when a run has one generator, one scorer and no GPU on a one-node cluster (a laptop, a CI
machine, a single `ray start --head`); clusters and GPU machines keep the two stages apart, so that scoring never
waits for a GPU's render.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from actors.stages.generator import GeneratorStage
from actors.stages.scorer import ScorerStage
from actors.stages.settings import RenderPlan, ScoringPlan


class ScoreAndRenderStage:
    """Ray Data callable class: a ScorerStage and a GeneratorStage in one actor; yields one batch per
    `rows_per_batch` rows the scorer keeps."""

    def __init__(self, scoring: ScoringPlan, rendering: RenderPlan, *, rows_per_batch: int,
                 predictor_files: list | None = None, manifest=None, committed_shards: frozenset = frozenset(),
                 num_threads: int = 1):
        # The scorer must not lower this process's priority: here it is the generator's too.
        self.scorer = ScorerStage(scoring, predictor_files=predictor_files, manifest=manifest,
                                  committed_shards=committed_shards, num_threads=num_threads, light=False)
        self.generator = GeneratorStage(rendering, num_threads=num_threads)
        self.rows_per_batch = rows_per_batch

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        scored = self.scorer(batch)
        rows = len(scored["status"])
        for start in range(0, max(rows, 1), self.rows_per_batch):  # an empty block still passes through once
            yield self.generator({name: values[start:start + self.rows_per_batch] for name, values in scored.items()})

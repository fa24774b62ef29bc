"""Scorer stage: embeds each prompt with the pipeline's own text encoder, scores its N candidate seeds, keeps k.

Sits between corpus reading and the generators; the kept rows carry the prompt embeddings so generators skip
the text encoder.
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from actors import diffusion
from orchestrator.embedded import resolve_model
from orchestrator.manifest import row_key
from orchestrator.seeds import batch_noise, candidate_seeds
from orchestrator.budget import keep_budget
from orchestrator.selection import keep_first, keep_top_k


class ScorerStage:
    """Ray Data callable class: one instance per scorer actor, holding the text encoder (and the predictor)."""

    def __init__(
        self,
        model: str,
        *,
        run_seed: int,
        candidates: int,
        keep: int,
        policy: str,
        guidance: float,
        height: int,
        width: int,
        predictor_files: list | None = None,
        predictor_source: str = "",
        all_candidates: bool = False,
        budget_rule: dict | None = None,
        num_threads: int = 1,
        done: list | None = None,
    ):
        torch.set_num_threads(max(1, num_threads))
        model_path = resolve_model(model)
        self.pipe = diffusion.load_pipeline(model_path, "text")
        # (prompt_id, seed) pairs already committed by an earlier run of this job: not rendered again.
        self.done = ray.get(done[0]) if done else set()
        self.run_seed = run_seed
        self.candidates = candidates
        self.keep = candidates if all_candidates else keep
        self.policy = "all" if all_candidates else policy
        self.guidance = guidance
        self.latent_shape = diffusion.latent_shape(model_path, height, width)
        self.predictor = None
        self.budget_rule = budget_rule
        if self.policy in ("predictor", "budget"):
            from orchestrator.predictor import predictor_from_files  # only these policies need it

            # A one-item list, so Ray hands over the reference and the bytes are fetched here, once per actor.
            files = ray.get(predictor_files[0])
            self.predictor = predictor_from_files(files, model_path, height, width, source=predictor_source)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _drop_rows(self.score(batch), self.done)

    def score(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = [i for i, status in enumerate(batch["status"]) if status == "ok"]
        embeds = diffusion.encode_prompts(self.pipe, [batch["prompt"][i] for i in ok], self.guidance) if ok else {}
        position = {row: j for j, row in enumerate(ok)}
        out_rows: list[int] = []  # for each output row: the input row it came from
        out_embed_rows: list[int] = []  # and that row's position in `embeds` (-1 for a quarantined row)
        seeds, indices, ranks, predicted, prompt_mean, prompt_std = [], [], [], [], [], []
        for row in range(len(batch["status"])):
            if row not in position:
                out_rows.append(row)
                out_embed_rows.append(-1)
                seeds.append(-1)
                indices.append(-1)
                ranks.append(0)
                predicted.append(np.nan)
                prompt_mean.append(np.nan)
                prompt_std.append(np.nan)
                continue
            prompt_seeds = candidate_seeds(self.run_seed, str(batch["prompt_id"][row]), self.candidates)
            scores = self._predict(prompt_seeds, embeds, position[row])
            chosen = self._choose(scores)
            for rank, index in enumerate(chosen):
                out_rows.append(row)
                out_embed_rows.append(position[row])
                seeds.append(prompt_seeds[index])
                indices.append(index)
                ranks.append(rank)
                predicted.append(np.nan if scores is None else float(scores[index]))
                prompt_mean.append(np.nan if scores is None else float(np.mean(scores)))
                prompt_std.append(np.nan if scores is None else float(np.std(scores)))
        out = {name: batch[name][out_rows] for name in ("prompt_id", "source", "status")}
        # Strings, never None, from here to the sink: a block whose rows all lack a prompt (all quarantined) or an
        # error would otherwise get Arrow's null type, which cannot be merged with a block of strings.
        for name in ("prompt", "error"):
            out[name] = np.array(["" if batch[name][i] is None else str(batch[name][i]) for i in out_rows],
                                 dtype=object)
        out["seed"] = np.asarray(seeds, dtype=np.int64)
        out["candidate_index"] = np.asarray(indices, dtype=np.int32)
        out["rank"] = np.asarray(ranks, dtype=np.int32)
        out["predicted_score"] = np.asarray(predicted, dtype=np.float64)
        out["prompt_predicted_mean"] = np.asarray(prompt_mean, dtype=np.float64)
        out["prompt_predicted_std"] = np.asarray(prompt_std, dtype=np.float64)
        out["truncated"] = np.asarray(
            [bool(embeds["truncated"][j]) if j >= 0 else False for j in out_embed_rows], dtype=bool
        )
        out.update(_gather_embeddings(embeds, out_embed_rows, self.pipe, self.guidance))
        return out

    def _choose(self, scores: np.ndarray | None) -> list[int]:
        if scores is None:
            return keep_first(self.candidates, self.keep)
        if self.policy == "budget":
            rule = self.budget_rule
            return keep_budget(scores, rule["threshold"], self.keep, 1, rule["residual_std"], rule["residual_ratio"])
        return keep_top_k(scores, self.keep)

    def _predict(self, seeds: list[int], embeds: dict[str, np.ndarray], row: int) -> np.ndarray | None:
        """Predicted score of each candidate for one prompt, or None when the policy needs no prediction."""
        if self.predictor is None:
            return None
        noise = batch_noise(seeds, self.latent_shape)
        return self.predictor.score_candidates(noise, {k: v[row] for k, v in embeds.items() if k != "truncated"})


def _gather_embeddings(embeds: dict[str, np.ndarray], rows: list[int], pipe, guidance: float) -> dict[str, np.ndarray]:
    """Embedding columns for the output rows; quarantined rows get zeros of the same shape (Arrow needs one shape)."""
    columns = {}
    if not embeds:
        # A batch with nothing to render still needs the columns; their shape is the pipeline's.
        embeds = diffusion.encode_prompts(pipe, ["placeholder"], guidance)
        rows = [-1] * len(rows)
    for name, values in embeds.items():
        if name == "truncated":
            continue
        placeholder = np.zeros_like(values[0])
        columns[name] = np.stack([values[j] if j >= 0 else placeholder for j in rows]) if rows else values[:0]
    return columns


def _drop_rows(out: dict[str, np.ndarray], done: set) -> dict[str, np.ndarray]:
    """Leave out rows an earlier run already committed, so a resumed run renders only what is missing."""
    if not done:
        return out
    keys = zip(out["prompt_id"], out["seed"], out["source"])
    keep = np.asarray([row_key(str(p), int(s), str(source)) not in done for p, s, source in keys], dtype=bool)
    return {name: values[keep] for name, values in out.items()}

"""Scorer stage: embeds each prompt with the pipeline's own text encoder, scores its N candidate seeds, keeps k.

Sits between the duplicate filter and the generators; the kept rows carry the prompt embeddings so generators
skip the text encoder. A row an earlier run already delivered is not emitted again: it is replaced by one tally
row (status "skipped") so the driver can still account for every corpus row of its shard.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import ray

from actors.models.embedded import resolve_model
from actors.models.seeds import NO_SEED, batch_noise, candidate_seeds
from actors.predictor.selection import keep_first, keep_top_k
from actors.rows import SKIPPED, DeliveredRows, row_key
from actors.stages import trace
from actors.stages.light import give_way_to_generators
from actors.stages.settings import ScoringPlan

PASSED_THROUGH = ("prompt_id", "source", "status", "shard", "shard_row", "shard_rows", "shard_base", "shard_frame",
                  "prompt_key", "text_key")
SCORE_CHUNK = 256  # candidate noises drawn and scored at a time, whatever N is
SHARDS_CACHED = 4  # delivered keys of this many shards are kept: a scorer works on a few shards at a time


class ScorerStage:
    """Ray Data callable class: one instance per scorer actor, holding the text encoder (and the predictor)."""

    def __init__(self, plan: ScoringPlan, *, predictor_files: list | None = None, manifest: DeliveredRows | None = None,
                 committed_shards: frozenset = frozenset(), num_threads: int = 1, light: bool = True):
        trace.mark("scorer", "process", trace.process_started())
        trace.mark("scorer", "init")
        import torch  # here, in the actor: the driver imports this module to build the graph, and needs no torch

        from actors.models import diffusion

        trace.mark("scorer", "imports")
        torch.set_num_threads(max(1, num_threads))
        model_path = resolve_model(plan.model)
        self.plan = plan
        self.adapter = diffusion.load_adapter(model_path, "text")
        self.latent_shape = tuple(plan.latent_shape)
        # Only shards that held committed rows when the run started can have rows to skip.
        self.manifest, self.committed_shards = manifest, committed_shards
        self.delivered: OrderedDict[str, set] = OrderedDict()
        self.predictor = None
        if plan.predictor_source:  # the predictor, budget and (unless it previews all N) preview policies
            from actors.predictor.model import predictor_from_files

            # A one-item list, so Ray hands over the reference and the bytes are fetched here, once per actor.
            files = ray.get(predictor_files[0])
            self.predictor = predictor_from_files(files, model_path, plan.height, plan.width,
                                                  source=plan.predictor_source)
        self.first_call = trace.FirstCall("scorer")
        trace.mark("scorer", "ready")
        if light:  # an actor of its own (not one that also renders, actors/stages/local.py)
            give_way_to_generators()  # once loaded: the first image waits for this load

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.first_call:
            return self._call(batch)

    def _call(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        plan = self.plan
        count = len(batch["status"])
        done = [self._delivered(str(batch["shard"][i])) for i in range(count)]
        todo = []  # rows to embed: ok rows not already fully delivered
        for i in range(count):
            if batch["status"][i] == "ok" and not self._all_delivered(batch, i, done[i]):
                todo.append(i)
        embeds = self.adapter.encode([batch["prompt"][i] for i in todo], plan.guidance) if todo else {}
        position = {row: j for j, row in enumerate(todo)}
        out = _Rows()
        for i in range(count):
            prompt_id, source = str(batch["prompt_id"][i]), str(batch["source"][i])
            if batch["status"][i] != "ok":  # a quarantined corpus row: one row, unless an earlier run delivered it
                if row_key(prompt_id, None, source) in done[i]:
                    out.add(i, status=SKIPPED, planned=1, tally=1)
                else:
                    out.add(i, planned=1)
                continue
            seeds = candidate_seeds(plan.run_seed, prompt_id, plan.candidates)
            if i not in position:  # every planned row delivered: nothing to embed or render
                kept = self._planned_without_scores()
                out.add(i, status=SKIPPED, planned=kept, tally=kept)
                continue
            scores = self._predict(seeds, embeds, position[i])
            chosen = self._choose(scores)
            delivered = [index for index in chosen if row_key(prompt_id, seeds[index], source) in done[i]]
            prompt_fields = {"prompt_mean": np.nan if scores is None else float(np.mean(scores)),
                             "prompt_std": np.nan if scores is None else float(np.std(scores)),
                             "truncated": bool(embeds["truncated"][position[i]])}
            if plan.preview:  # one row for the prompt's previewed candidates; the generator picks the one to keep
                if delivered:
                    out.add(i, status=SKIPPED, planned=1, tally=1)
                    continue
                predicted = [np.nan if scores is None else float(scores[index]) for index in chosen]
                out.add(i, embed_row=position[i], seed=seeds[chosen[0]], candidate_index=chosen[0], planned=1,
                        predicted=predicted[0], preview=([seeds[index] for index in chosen], chosen, predicted),
                        **prompt_fields)
                continue
            if delivered:
                out.add(i, status=SKIPPED, planned=len(chosen), tally=len(delivered))
            for rank, index in enumerate(chosen):
                if index in delivered:
                    continue
                out.add(i, embed_row=position[i], seed=seeds[index], candidate_index=index, rank=rank,
                        planned=len(chosen), predicted=np.nan if scores is None else float(scores[index]), **prompt_fields)
        return out.columns(batch, embeds, self.adapter, plan.guidance, plan.preview)

    def _delivered(self, shard: str) -> set:
        """Row keys an earlier run delivered in this shard (read from the output once per shard)."""
        if self.manifest is None or shard not in self.committed_shards:
            return set()
        if shard not in self.delivered:
            self.delivered[shard] = self.manifest.delivered_keys(shard)
            while len(self.delivered) > SHARDS_CACHED:
                self.delivered.popitem(last=False)
        self.delivered.move_to_end(shard)
        return self.delivered[shard]

    def _planned_without_scores(self) -> int | None:
        """How many rows the policy keeps when that does not depend on the scores (not for the budget policy)."""
        return None if self.plan.policy == "budget" else self.plan.keep

    def _all_delivered(self, batch, i: int, done: set) -> bool:
        """Whether every row this prompt can plan was delivered, known without embedding it: the rows the policy
        keeps regardless of scores (k, or all N) are all in the shard's delivered keys."""
        kept = self._planned_without_scores()
        if not done or kept is None:
            return False
        prompt_id, source = str(batch["prompt_id"][i]), str(batch["source"][i])
        delivered = sum(row_key(prompt_id, seed, source) in done
                        for seed in candidate_seeds(self.plan.run_seed, prompt_id, self.plan.candidates))
        return delivered >= kept

    def _choose(self, scores: np.ndarray | None) -> list[int]:
        """Candidate indices to render (or, for the preview policy, to preview), best first."""
        wanted = self.plan.preview or self.plan.keep
        if scores is None:
            return keep_first(self.plan.candidates, wanted)
        if self.plan.policy == "budget":
            return self.plan.budget_rule.keep(scores, self.plan.keep)
        return keep_top_k(scores, wanted)

    def _predict(self, seeds: list[int], embeds: dict[str, np.ndarray], row: int) -> np.ndarray | None:
        """Predicted score of each candidate for one prompt, or None when the policy needs no prediction."""
        if self.predictor is None:
            return None
        prompt = {k: v[row] for k, v in embeds.items() if k != "truncated"}
        # In chunks: N noises of an SDXL latent are 256 KB each, so 100,000 of them at once would not fit in memory.
        return np.concatenate([self.predictor.score_candidates(batch_noise(seeds[i:i + SCORE_CHUNK], self.latent_shape),
                                                               prompt) for i in range(0, len(seeds), SCORE_CHUNK)])


class _Rows:
    """The scorer's output rows, gathered column by column; each row remembers the input row it came from."""

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, source_row: int, *, status: str | None = None, embed_row: int = -1, seed: int = NO_SEED,
            candidate_index: int = -1, rank: int = 0, planned: int = 1, tally: int = 0, predicted: float = np.nan,
            prompt_mean: float = np.nan, prompt_std: float = np.nan, truncated: bool = False,
            preview: tuple | None = None) -> None:
        self.rows.append(dict(source_row=source_row, status=status, embed_row=embed_row, seed=seed,
                              candidate_index=candidate_index, rank=rank, planned=planned, tally=tally,
                              predicted=predicted, prompt_mean=prompt_mean, prompt_std=prompt_std,
                              truncated=truncated, preview=preview))

    def columns(self, batch: dict[str, np.ndarray], embeds: dict, adapter, guidance: float,
                previewed: int = 0) -> dict[str, np.ndarray]:
        sources = [r["source_row"] for r in self.rows]
        out = {name: np.asarray(batch[name])[sources] for name in PASSED_THROUGH}
        out["status"] = np.array([r["status"] or str(batch["status"][r["source_row"]]) for r in self.rows],
                                 dtype=object)
        # Strings, never None, from here to the sink: a block whose rows all lack a prompt (all quarantined) or an
        # error would otherwise get Arrow's null type, which cannot be merged with a block of strings.
        for name in ("prompt", "error"):
            out[name] = np.array(["" if batch[name][i] is None else str(batch[name][i]) for i in sources], dtype=object)
        out["seed"] = np.array([r["seed"] for r in self.rows], dtype=np.int64)
        for name, key, dtype in (("candidate_index", "candidate_index", np.int32), ("rank", "rank", np.int32),
                                 ("planned", "planned", np.int32), ("tally", "tally", np.int32),
                                 ("predicted_score", "predicted", np.float64),
                                 ("prompt_predicted_mean", "prompt_mean", np.float64),
                                 ("prompt_predicted_std", "prompt_std", np.float64), ("truncated", "truncated", bool)):
            out[name] = np.array([r[key] for r in self.rows], dtype=dtype)
        out.update(_gather_embeddings(embeds, [r["embed_row"] for r in self.rows], adapter, guidance))
        if previewed:  # (rows, M) arrays: every row has them, so all blocks share one schema
            for position, (name, dtype, fill) in enumerate((("preview_seeds", np.int64, NO_SEED),
                                                            ("preview_candidates", np.int32, -1),
                                                            ("preview_predicted", np.float64, np.nan))):
                column = np.full((len(self.rows), previewed), fill, dtype=dtype)
                for j, row in enumerate(self.rows):
                    if row["preview"] is not None:
                        column[j] = row["preview"][position]
                out[name] = column
        return out


def _gather_embeddings(embeds: dict[str, np.ndarray], rows: list[int], adapter, guidance: float) -> dict[str, np.ndarray]:
    """Embedding columns for the output rows; rows with nothing to render get zeros (Arrow needs one shape)."""
    columns = {}
    if not embeds:
        # A batch with nothing to render still needs the columns; their shape is the pipeline's.
        embeds = adapter.encode(["placeholder"], guidance)
        rows = [-1] * len(rows)
    for name, values in embeds.items():
        if name == "truncated":
            continue
        placeholder = np.zeros_like(values[0])
        columns[name] = np.stack([values[j] if j >= 0 else placeholder for j in rows]) if rows else values[:0]
    return columns

"""Training the noise-quality predictor on a collected set: MAE plus a within-prompt ranking loss, split by prompt.

Used by the train job. Noise is re-derived from each row's seed; prompt embeddings come from the pipeline's own
text encoder, computed once per prompt.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from actors.models.seeds import batch_noise
from actors.predictor.metrics import spearman
from actors.predictor.model import NoiseQualityPredictor, PredictorConfig, noise_statistics, split_of

logger = logging.getLogger("seedsift.train")


@dataclass
class TrainingSettings:
    epochs: int = 150
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    prompts_per_batch: int = 16
    rank_weight: float = 1.0  # weight of the within-prompt pairwise ranking loss next to MAE
    patience: int = 25  # epochs without a better validation per-prompt Spearman before stopping
    seed: int = 0
    device: str = "cpu"
    ridge: float = 1000.0  # L2 penalty of the closed-form read-out fit (features are standardised)


@dataclass
class PromptGroups:
    """A collected set arranged by prompt: each prompt's N candidates with their seeds and rated scores."""

    prompt_ids: list[str]
    prompts: list[str]
    seeds: list[np.ndarray]
    scores: list[np.ndarray]
    candidate_index: list[np.ndarray]

    def subset(self, keep: list[int]) -> PromptGroups:
        return PromptGroups(*[[values[i] for i in keep] for values in
                              (self.prompt_ids, self.prompts, self.seeds, self.scores, self.candidate_index)])


def group_by_prompt(table: pa.Table) -> PromptGroups:
    """Rows of a dataset.parquet grouped by prompt, candidates in index order; prompts with < 2 candidates dropped."""
    frame = table.select(["prompt_id", "prompt", "seed", "score", "candidate_index"]).to_pandas()
    frame = frame.dropna(subset=["score"]).sort_values(["prompt_id", "candidate_index"])
    groups = PromptGroups([], [], [], [], [])
    for prompt_id, rows in frame.groupby("prompt_id", sort=True):
        if len(rows) < 2:
            continue
        groups.prompt_ids.append(str(prompt_id))
        groups.prompts.append(str(rows["prompt"].iloc[0]))
        groups.seeds.append(rows["seed"].to_numpy(np.int64))
        groups.scores.append(rows["score"].to_numpy(np.float64))
        groups.candidate_index.append(rows["candidate_index"].to_numpy(np.int64))
    return groups


def split_groups(groups: PromptGroups, salt: str, train: float, val: float) -> dict[str, PromptGroups]:
    labels = [split_of(prompt_id, salt, train, val) for prompt_id in groups.prompt_ids]
    return {name: groups.subset([i for i, label in enumerate(labels) if label == name])
            for name in ("train", "val", "test")}


class Examples:
    """Tensors for one split: noise is derived from seeds once and kept, text embeddings once per prompt."""

    def __init__(self, groups: PromptGroups, embeddings: dict[str, dict[str, np.ndarray]], latent_shape: tuple,
                 score_mean: float, score_std: float):
        self.groups = groups
        self.count = len(groups.prompt_ids)
        self.noise = [batch_noise([int(s) for s in seeds], latent_shape) for seeds in groups.seeds]
        self.tokens = [torch.as_tensor(embeddings[p]["prompt_embeds"]) for p in groups.prompt_ids]
        self.masks = [torch.as_tensor(embeddings[p].get("prompt_attention_mask",
                                                        np.ones(embeddings[p]["prompt_embeds"].shape[0])),
                                      dtype=torch.float32) for p in groups.prompt_ids]
        self.targets = [torch.as_tensor((s - score_mean) / score_std, dtype=torch.float32) for s in groups.scores]

    def batch(self, prompt_positions: list[int], device: str):
        """Stacked tensors for some prompts, all their candidates, plus which prompt each row belongs to."""
        noise, tokens, masks, targets, owner = [], [], [], [], []
        for k, i in enumerate(prompt_positions):
            n = self.noise[i].shape[0]
            noise.append(self.noise[i])
            tokens.append(self.tokens[i].expand(n, -1, -1))
            masks.append(self.masks[i].expand(n, -1))
            targets.append(self.targets[i])
            owner.append(torch.full((n,), k))
        return (torch.cat(noise).to(device), torch.cat(tokens).to(device), torch.cat(masks).to(device),
                torch.cat(targets).to(device), torch.cat(owner).to(device))


def ranking_loss(predicted: torch.Tensor, target: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """Pairwise logistic loss over candidate pairs of the same prompt: order matters, not the prompt's level."""
    same_prompt = owner[:, None] == owner[None, :]
    order = torch.sign(target[:, None] - target[None, :])
    pairs = same_prompt & (order != 0)
    if not pairs.any():
        return predicted.sum() * 0
    margins = (predicted[:, None] - predicted[None, :]) * order
    return F.softplus(-margins[pairs]).mean()


@torch.no_grad()
def predict_groups(model: NoiseQualityPredictor, examples: Examples, device: str) -> list[np.ndarray]:
    model.eval()
    outputs = []
    for i in range(examples.count):
        noise, tokens, masks, _, _ = examples.batch([i], device)
        outputs.append(model(noise, tokens, masks).cpu().numpy().astype(np.float64))
    return outputs


def mean_prompt_spearman(predicted: list[np.ndarray], groups: PromptGroups) -> float:
    values = [spearman(p, a) for p, a in zip(predicted, groups.scores)]
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


@torch.no_grad()
def fit_statistics_readout(model: NoiseQualityPredictor, train_set: Examples, ridge: float) -> None:
    """Closed-form ridge fit of the wide read-out on within-prompt centred noise statistics and targets, then frozen.

    Centring within each prompt fits what ranks a prompt's seeds; the prompt's level is left to the deep part.
    """
    statistics = [noise_statistics(noise).double() for noise in train_set.noise]
    stacked = torch.cat(statistics)
    mean, scale = stacked.mean(dim=0), stacked.std(dim=0).clamp_min(1e-12)
    features = torch.cat([(s - mean) / scale - ((s - mean) / scale).mean(dim=0) for s in statistics])
    targets = torch.cat([(t - t.mean()).double() for t in train_set.targets])
    gram = features.T @ features + ridge * torch.eye(features.shape[1], dtype=torch.float64)
    weights = torch.linalg.solve(gram, features.T @ targets)
    model.statistics_mean.copy_(mean.float())
    model.statistics_scale.copy_(scale.float())
    model.statistics_readout.weight.copy_(weights.float()[None, :])
    model.statistics_readout.bias.zero_()
    model.statistics_readout.requires_grad_(False)


def train(config: PredictorConfig, train_set: Examples, val_set: Examples, settings: TrainingSettings):
    """Fit the wide read-out, then train the deep part with early stopping on validation per-prompt Spearman.

    Training starts from the read-out alone (the deep head's last layer is zero), which is the first candidate for
    the best model, so the deep part is kept only where it improves held-out ranking. Returns (model, history).
    """
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    model = NoiseQualityPredictor(config)
    fit_statistics_readout(model, train_set, settings.ridge)
    model = model.to(settings.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    readout_only = mean_prompt_spearman(predict_groups(model, val_set, settings.device), val_set.groups)
    logger.info("read-out alone: val per-prompt spearman %.3f", readout_only)
    best = {"epoch": -1, "val_spearman": readout_only, "readout_only_val_spearman": readout_only}
    best_state = copy.deepcopy(model.state_dict())
    history = []
    for epoch in range(settings.epochs):
        model.train()
        order = rng.permutation(train_set.count)
        losses = []
        for start in range(0, len(order), settings.prompts_per_batch):
            noise, tokens, masks, target, owner = train_set.batch(list(order[start:start + settings.prompts_per_batch]),
                                                                  settings.device)
            predicted = model(noise, tokens, masks)
            loss = F.l1_loss(predicted, target) + settings.rank_weight * ranking_loss(predicted, target, owner)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        val_spearman = mean_prompt_spearman(predict_groups(model, val_set, settings.device), val_set.groups)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_spearman": val_spearman})
        logger.info("epoch %d loss %.4f val per-prompt spearman %.3f", epoch, np.mean(losses), val_spearman)
        if val_spearman > best["val_spearman"]:
            best = {**best, "epoch": epoch, "val_spearman": val_spearman}
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best["epoch"] >= settings.patience:
            break
    model.load_state_dict(best_state)
    return model.eval(), {"best": best, "history": history}

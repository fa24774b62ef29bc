"""The noise-quality predictor: scores a candidate initial noise for a prompt before anything is rendered.

Used by the scorer stage (predictor policy), the train job and the evaluate job. Stored as safetensors + JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PREDICTOR_FILES = (CONFIG_FILE, WEIGHTS_FILE)
EVALUATION_FILE = "evaluation.json"  # written beside a predictor by `seedsift evaluate` (or shipped with it)


class PredictorMismatch(ValueError):
    """A predictor that cannot be used: malformed, or trained for another pipeline (or size). The driver reads a run's
    predictor before any compute (orchestrator/run/predictor_files.py) and reports this as a configuration error,
    in one line.
    """


@dataclass
class PredictorConfig:
    """Architecture sizes plus what the predictor was trained for; written next to the weights as JSON."""

    latent_shape: tuple[int, int, int]  # (channels, h, w) of the noise it scores
    text_dim: int  # width of the pipeline's text-encoder token embeddings
    channels: tuple[int, ...] = (32, 64, 128)  # noise encoder: one residual stage per entry, each halving h and w
    hidden: int = 256  # width of the noise and text features
    head: tuple[int, ...] = (256, 64)  # MLP head after the concatenated features (the paper: 512 -> 256 -> 64 -> 1)
    dropout: float = 0.1  # on the joint features during training
    attention: int = 0  # width of the prompt-tokens-over-noise-patches attention branch (0: none, as before)
    pipeline: dict = field(default_factory=dict)  # model, family, pipeline class, steps, guidance, width, height
    rater: str = ""
    score_mean: float = 0.0  # the rater's units: predictions are trained on standardised scores
    score_std: float = 1.0
    spread_quantiles: list = field(default_factory=list)  # predicted within-prompt std on training prompts
    split: dict = field(default_factory=dict)  # how prompts were split (salt, fractions): evaluate uses the rest
    training_set: dict = field(default_factory=dict)  # the dataset it was trained on: its digest, rows, location
    metrics: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, text: str) -> PredictorConfig:
        values = json.loads(text)
        values["latent_shape"] = tuple(values["latent_shape"])
        values["channels"] = tuple(values["channels"])
        values["head"] = tuple(values["head"])
        return cls(**values)


class ResidualStage(nn.Module):
    """Two 3x3 convolutions with a skip connection at one resolution, then a stride-2 convolution.

    No normalisation layer: GroupNorm or BatchNorm would remove each sample's feature means and spreads, which are
    exactly what decides global image statistics such as colour.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.SiLU(), nn.Conv2d(in_channels, in_channels, 3, padding=1),
            nn.SiLU(), nn.Conv2d(in_channels, in_channels, 3, padding=1),
        )
        self.down = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features at this resolution, downsampled features for the next stage)."""
        features = x + self.body(x)
        return features, self.down(features)


STATISTIC_RADIUS = 3  # spatial lags (dy, dx) with |dy|, |dx| <= this, one of each +/- pair
STATISTIC_SCALES = (2, 4, 8)


def statistic_lags(radius: int) -> list[tuple[int, int]]:
    """(0, 0) plus one lag of each opposite pair within the radius: (dy, dx) and (-dy, -dx) give the same products."""
    return [(dy, dx) for dy in range(radius + 1) for dx in range(-radius, radius + 1) if dy > 0 or dx >= 0]


def lagged_covariance(centred: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Mean over positions of x[c, y + dy, x + dx] * x[d, y, x]: (B, C, h, w) -> (B, C, C); dy >= 0, any dx."""
    height, width = centred.shape[2], centred.shape[3]
    if dx >= 0:
        shifted, base = centred[:, :, dy:, dx:], centred[:, :, : height - dy, : width - dx]
    else:
        shifted, base = centred[:, :, dy:, : width + dx], centred[:, :, : height - dy, -dx:]
    return torch.einsum("bchw,bdhw->bcd", shifted, base) / (shifted.shape[2] * shifted.shape[3])


def noise_statistics(noise: torch.Tensor) -> torch.Tensor:
    """Second-order statistics of the noise: channel means, local cross-channel covariances at every spatial lag
    within STATISTIC_RADIUS, and covariances of the noise averaged over 2x2, 4x4 and 8x8 tiles.
    (B, C, h, w) -> (B, S), no parameters.

    Why: a decoder turns the final latent into colours through local filters, so global image statistics such as
    colour spread are close to quadratic forms of these covariances. On the embedded testbed a linear model on them
    (radius 3) alone reach a held-out per-prompt Spearman of about 0.6; the conv path may add what is not quadratic.
    """
    batch, channels, height, width = noise.shape
    means = noise.mean(dim=(2, 3))
    centred = noise - means[:, :, None, None]
    upper = torch.triu_indices(channels, channels)
    parts = [means, (means[:, :, None] * means[:, None, :])[:, upper[0], upper[1]]]
    for dy, dx in statistic_lags(STATISTIC_RADIUS):
        covariance = lagged_covariance(centred, dy, dx)
        parts.append(covariance[:, upper[0], upper[1]] if (dy, dx) == (0, 0) else covariance.flatten(1))
    for scale in STATISTIC_SCALES:
        if height % scale or width % scale or height // scale < 2:
            continue
        tiles = torch.nn.functional.avg_pool2d(centred, scale)
        covariance = torch.einsum("bchw,bdhw->bcd", tiles, tiles) / (tiles.shape[2] * tiles.shape[3])
        parts.append(covariance[:, upper[0], upper[1]])
    return torch.cat(parts, dim=1)


class TokensOverPatches(nn.Module):
    """Cross-attention from the prompt's tokens to the noise's patches, each patch with its position.

    Why: whether a seed suits "a red circle to the left of a blue square" or "three triangles" depends on where in
    the noise the denoiser will grow objects; the rest of the predictor pools the noise over space before it meets
    the text, so it can rank seeds only by what is good for every prompt. Here each word looks for the regions of
    this noise that suit it (PAINE's and HPM-Predict's noise-patch / prompt-token attention, in small).
    """

    PATCH = 2  # latent pixels per patch side: a 16x16 latent gives 64 patches

    def __init__(self, latent_shape: tuple[int, int, int], text_dim: int, width: int, heads: int = 4):
        super().__init__()
        channels, height, width_px = latent_shape
        patches = (height // self.PATCH) * (width_px // self.PATCH)
        self.embed = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(),
                                   nn.Conv2d(width, width, self.PATCH, stride=self.PATCH))
        self.position = nn.Parameter(torch.randn(1, patches, width) * 0.02)
        self.query = nn.Linear(text_dim, width)
        self.attend = nn.MultiheadAttention(width, heads, batch_first=True)
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU())

    def forward(self, noise: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, width): what the prompt's words found in this noise, averaged over the real (unpadded) tokens."""
        patches = self.embed(noise).flatten(2).transpose(1, 2) + self.position
        found, _ = self.attend(self.query(tokens), patches, patches, need_weights=False)
        found = self.out(found)
        weights = mask / mask.sum(dim=1, keepdim=True).clamp_min(1)
        return (found * weights.unsqueeze(-1)).sum(dim=1)


def mean_and_std(features: torch.Tensor) -> torch.Tensor:
    """Spatial mean and standard deviation of each channel: (B, C, h, w) -> (B, 2C)."""
    return torch.cat([features.mean(dim=(2, 3)), features.std(dim=(2, 3))], dim=1)


class NoiseQualityPredictor(nn.Module):
    """Residual conv encoder over the noise, attention pooling over token embeddings, optionally prompt tokens
    attending over noise patches, MLP head on all of them, plus a frozen linear read-out of noise statistics."""

    def __init__(self, config: PredictorConfig):
        super().__init__()
        latent_channels = config.latent_shape[0]
        widths = (config.channels[0],) + tuple(config.channels)
        self.stem = nn.Conv2d(latent_channels, widths[0], 3, padding=1)
        self.stages = nn.ModuleList([ResidualStage(a, b) for a, b in zip(widths[:-1], widths[1:])])
        # Statistics pooled at every scale (the finest ones carry pixel-level spread) plus the noise's own
        # second-order statistics. They differ between noises by about 1/sqrt(pixels) of their size, so they are
        # standardised across samples (BatchNorm1d, running statistics saved with the weights) before the head.
        self.statistics_width = noise_statistics(torch.zeros(1, *config.latent_shape)).shape[1]
        pooled_width = 2 * (sum(widths[:-1]) + widths[-1]) + self.statistics_width
        self.noise_norm = nn.BatchNorm1d(pooled_width)
        self.noise_proj = nn.Linear(pooled_width, config.hidden)
        # The wide part: a linear read-out of the noise statistics alone, standardised with fixed training-set
        # moments. The train job fits it in closed form (ridge) and freezes it: it generalises from few prompts
        # where a deep model overfits. The deep part then learns what the read-out misses, from zero.
        self.register_buffer("statistics_mean", torch.zeros(self.statistics_width))
        self.register_buffer("statistics_scale", torch.ones(self.statistics_width))
        self.statistics_readout = nn.Linear(self.statistics_width, 1)
        self.text_query = nn.Parameter(torch.zeros(1, 1, config.text_dim))
        self.text_key = nn.Linear(config.text_dim, config.text_dim)
        self.text_proj = nn.Linear(config.text_dim, config.hidden)
        self.tokens_over_patches = (TokensOverPatches(config.latent_shape, config.text_dim, config.attention)
                                    if config.attention else None)
        layers: list[nn.Module] = [nn.Dropout(config.dropout)]
        width = config.hidden * 3 + config.attention
        for size in config.head:
            layers += [nn.Linear(width, size), nn.SiLU()]
            width = size
        layers.append(nn.Linear(width, 1))
        nn.init.zeros_(layers[-1].weight)  # an untrained deep part adds nothing to the read-out
        nn.init.zeros_(layers[-1].bias)
        self.head = nn.Sequential(*layers)

    def standardised_statistics(self, noise: torch.Tensor) -> torch.Tensor:
        return (noise_statistics(noise) - self.statistics_mean) / self.statistics_scale

    def encode_noise(self, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise features for the head, standardised noise statistics for the wide read-out)."""
        statistics = noise_statistics(noise)
        pooled = [statistics]
        x = self.stem(noise)
        for stage in self.stages:
            features, x = stage(x)
            pooled.append(mean_and_std(features))
        pooled.append(mean_and_std(x))
        standardised = self.noise_norm(torch.cat(pooled, dim=1))
        return self.noise_proj(standardised), (statistics - self.statistics_mean) / self.statistics_scale

    def encode_text(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention pooling with one learned query over the prompt's token embeddings (padding masked out)."""
        logits = (self.text_key(tokens) * self.text_query).sum(-1) / tokens.shape[-1] ** 0.5
        logits = logits.masked_fill(mask == 0, float("-inf"))
        weights = torch.softmax(logits, dim=1).unsqueeze(-1)
        return self.text_proj((weights * tokens).sum(dim=1))

    def forward(self, noise: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Standardised predicted score of each (noise, prompt) pair: noise (B,C,h,w), tokens (B,T,D), mask (B,T)."""
        noise_features, statistics = self.encode_noise(noise)
        text_features = self.encode_text(tokens, mask)
        joint = [noise_features, text_features, noise_features * text_features]
        if self.tokens_over_patches is not None:
            joint.append(self.tokens_over_patches(noise, tokens, mask))
        joint = torch.cat(joint, dim=1)
        return (self.head(joint) + self.statistics_readout(statistics)).squeeze(-1)


class Predictor:
    """A loaded predictor in evaluation mode, scoring in the rater's units."""

    def __init__(self, config: PredictorConfig, model: NoiseQualityPredictor, source: str = ""):
        self.config = config
        self.model = model.eval()
        self.source = source

    @torch.no_grad()
    def score_candidates(self, noise: torch.Tensor, embeds: dict[str, np.ndarray]) -> np.ndarray:
        """Predicted scores of N candidate noises (N,C,h,w) for one prompt (embeds of that prompt: (T,D) arrays)."""
        tokens = torch.as_tensor(embeds["prompt_embeds"], dtype=torch.float32)
        mask = embeds.get("prompt_attention_mask")
        mask = torch.ones(tokens.shape[0]) if mask is None else torch.as_tensor(mask, dtype=torch.float32)
        count = noise.shape[0]
        raw = self.model(noise.float(), tokens.expand(count, -1, -1), mask.expand(count, -1))
        return (raw.numpy() * self.config.score_std + self.config.score_mean).astype(np.float64)


def split_of(prompt_id: str, salt: str, train: float, val: float) -> str:
    """"train", "val" or "test" for a prompt, by a stable hash: a prompt's split never depends on the dataset."""
    digest = hashlib.blake2b(f"{salt}\x1f{prompt_id}".encode("utf-8"), digest_size=8).digest()
    position = int.from_bytes(digest, "big") / 2**64
    if position < train:
        return "train"
    return "val" if position < train + val else "test"


def weights_digest(files: dict[str, bytes]) -> str:
    """Content hash of a predictor's weights: part of a run's fingerprint."""
    return hashlib.blake2b(files[WEIGHTS_FILE], digest_size=8).hexdigest()


def read_config(files: dict[str, bytes], where: str = "") -> PredictorConfig:
    """The PredictorConfig in a predictor's config.json, or PredictorMismatch saying why it is not one."""
    try:
        return PredictorConfig.from_json(files[CONFIG_FILE].decode("utf-8"))
    except (ValueError, KeyError, TypeError) as exc:  # not JSON, or JSON of something else
        raise PredictorMismatch(f"predictor {where}: {CONFIG_FILE} is not a seedsift predictor config "
                                f"({type(exc).__name__}: {exc}); pass the folder a train job wrote") from exc


def check_compatible(config: PredictorConfig, latent_shape: tuple, text_dim: int, family: str, where: str) -> None:
    """Refuse a predictor whose recorded shapes or pipeline family differ from the pipeline it would score for."""
    problems = []
    if tuple(config.latent_shape) != tuple(latent_shape):
        problems.append(f"it scores noise of shape {tuple(config.latent_shape)}, this run draws {tuple(latent_shape)}"
                        " (another model or image size)")
    if config.text_dim != text_dim:
        problems.append(f"it reads {config.text_dim}-wide text embeddings, this pipeline's encoder gives {text_dim}")
    trained_family = config.pipeline.get("family")
    if trained_family and trained_family != family:
        problems.append(f"it was trained for a {trained_family} pipeline, this one is {family}")
    if problems:
        raise PredictorMismatch(f"predictor {where} does not fit this pipeline: " + "; ".join(problems)
                                + ". Train one for this model and size (seedsift collect, then seedsift train).")


def save_predictor(folder: str, config: PredictorConfig, model: NoiseQualityPredictor) -> None:
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(Path(folder, WEIGHTS_FILE)))
    Path(folder, CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2, sort_keys=True))


def predictor_from_files(files: dict[str, bytes], model_path: str | None = None, height: int | None = None,
                         width: int | None = None, source: str = "") -> Predictor:
    """Build the predictor from its files' bytes (safetensors only, never pickle), checked against the pipeline."""
    config = read_config(files, source)
    if model_path is not None:
        from actors.models import families

        shape = families.latent_shape(model_path, height or config.pipeline["height"], width or config.pipeline["width"])
        check_compatible(config, shape, families.text_embedding_dim(model_path), families.family_of(model_path).name,
                         source)
    model = NoiseQualityPredictor(config)
    try:
        model.load_state_dict(load_safetensors(files[WEIGHTS_FILE]))
    except Exception as exc:  # safetensors' own error type for a damaged file, torch's for other shapes or names
        raise PredictorMismatch(f"predictor {source}: {WEIGHTS_FILE} does not load into the model its {CONFIG_FILE} "
                                f"describes ({type(exc).__name__}: {str(exc)[:300]}); the folder is damaged or "
                                "mixes two trainings") from exc
    return Predictor(config, model, source=source)

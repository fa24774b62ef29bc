"""The train job: fits the noise-quality predictor to a collected set and saves it as safetensors plus JSON.

Run as `seedsift train --dataset COLLECT_OUT --out PREDICTOR_DIR`; on a cluster submit it with
`ray job submit --entrypoint-num-gpus 1` so the driver (which trains) lands on a GPU node.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jobs.common import run_job
from orchestrator.output.dataset import dataset_digest, dataset_identity, read_dataset
from orchestrator.output.storage import Output
from orchestrator.run.config import ConfigError

logger = logging.getLogger("seedsift.train")
SPLIT_SALT = "seedsift-split-v1"


def summarise_split(predicted: list[np.ndarray], groups, score_mean: float, score_std: float) -> dict:
    """Held-out figures in the rater's units: per-prompt Spearman, top-1 gain, residual spread."""
    from actors.predictor.metrics import spearman, top1_gain

    in_units = [p * score_std + score_mean for p in predicted]
    correlations = [spearman(p, a) for p, a in zip(in_units, groups.scores)]
    gains = [top1_gain(p, a) for p, a in zip(in_units, groups.scores)]
    residuals = np.concatenate([(a - a.mean()) - (p - p.mean()) for p, a in zip(in_units, groups.scores)])
    return {
        "prompts": len(groups.prompt_ids),
        "per_prompt_spearman": float(np.nanmean(correlations)),
        "top1_gain": float(np.mean([g["gain"] for g in gains])),
        "top1_gain_std_units": float(np.nanmean([g["gain_std_units"] for g in gains])),
        "residual_std": float(residuals.std()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="seedsift train", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="a collect job's --out (or its dataset.parquet)")
    parser.add_argument("--out", required=True, help="predictor folder to write (local or s3://)")
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--ridge", type=float, default=1000.0, help="L2 penalty of the closed-form read-out")
    parser.add_argument("--dropout", type=float, default=0.1, help="on the joint features during training")
    parser.add_argument("--rank-weight", type=float, default=1.0, help="within-prompt ranking loss weight")
    parser.add_argument("--patience", type=int, default=25, help="early stopping on validation Spearman")
    parser.add_argument("--prompts-per-batch", type=int, default=16)
    parser.add_argument("--val", type=float, default=0.15, help="fraction of prompts for early stopping")
    parser.add_argument("--test", type=float, default=0.15, help="fraction of prompts held out for evaluate")
    parser.add_argument("--channels", default="32,64,128", help="noise encoder widths, one stage each")
    parser.add_argument("--hidden", type=int, default=256, help="width of the noise and text features")
    parser.add_argument("--head", default="256,64", help="MLP head widths after the joint features")
    parser.add_argument("--attention", type=int, default=0,
                        help="width of the branch where prompt tokens attend over noise patches (0: none)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    def body() -> int:
        import torch

        from actors.models import diffusion, families
        from actors.models.embedded import resolve_model
        from actors.predictor.budget import fit_residual_model, record_spread_quantiles
        from actors.predictor.model import PredictorConfig
        from actors.predictor.training import (
            Examples,
            TrainingSettings,
            group_by_prompt,
            predict_groups,
            split_groups,
            train,
        )

        if not 0 < args.val < 1 or not 0 <= args.test < 1 or args.val + args.test >= 1:
            raise ConfigError("--val and --test are fractions of the prompts and must leave some for training")
        started = time.time()
        table = read_dataset(args.dataset)
        identity = dataset_identity(table)
        model_path = resolve_model(identity["model"])
        latent_shape = families.latent_shape(model_path, identity["height"], identity["width"])
        groups = group_by_prompt(table)
        split = {"salt": SPLIT_SALT, "train": 1 - args.val - args.test, "val": args.val}
        parts = split_groups(groups, split["salt"], split["train"], split["val"])
        if len(parts["train"].prompt_ids) < 2 or len(parts["val"].prompt_ids) < 1:
            raise ConfigError(f"the dataset has {len(groups.prompt_ids)} prompts: too few to split; collect more")
        train_scores = np.concatenate(parts["train"].scores)
        score_mean, score_std = float(train_scores.mean()), float(train_scores.std() or 1.0)
        # The predictor reads the prompt's tokens and their mask: only those are kept in memory.
        text = diffusion.load_adapter(model_path, "text")
        embedded = text.embed_each(groups.prompts, identity["guidance"],
                                   keys=("prompt_embeds", "prompt_attention_mask"))
        embeddings = dict(zip(groups.prompt_ids, embedded))
        examples = {name: Examples(part, embeddings, latent_shape, score_mean, score_std)
                    for name, part in parts.items() if part.prompt_ids}
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        config = PredictorConfig(
            latent_shape=tuple(latent_shape),
            text_dim=families.text_embedding_dim(model_path),
            channels=tuple(int(c) for c in args.channels.split(",")),
            hidden=args.hidden,
            head=tuple(int(c) for c in args.head.split(",")),
            dropout=args.dropout,
            attention=args.attention,
            pipeline={**identity, "family": families.family_of(model_path).name},
            rater=identity["rater"],
            score_mean=score_mean,
            score_std=score_std,
            split=split,
            training_set={"digest": dataset_digest(table), "rows": table.num_rows,
                          "prompts": len(groups.prompt_ids)},
        )
        settings = TrainingSettings(epochs=args.epochs, learning_rate=args.learning_rate, rank_weight=args.rank_weight,
                                    weight_decay=args.weight_decay, ridge=args.ridge,
                                    patience=args.patience, prompts_per_batch=args.prompts_per_batch, seed=args.seed,
                                    device=device)
        model, history = train(config, examples["train"], examples["val"], settings)
        model = model.cpu()
        train_predictions = predict_groups(model, examples["train"], "cpu")
        val_predictions = predict_groups(model, examples["val"], "cpu")
        val_in_units = [p * score_std + score_mean for p in val_predictions]
        # For the budget policy: spreads and residual error on held-out (validation) prompts, in the rater's units.
        config.spread_quantiles = record_spread_quantiles(val_in_units)
        residual_std, residual_ratio = fit_residual_model(val_in_units, parts["val"].scores)
        config.metrics = {
            "train": summarise_split(train_predictions, parts["train"], score_mean, score_std),
            "val": summarise_split(val_predictions, parts["val"], score_mean, score_std),
            "residual_std": residual_std,
            "residual_ratio": residual_ratio,
            "best_epoch": history["best"]["epoch"],
            "readout_only_val_spearman": history["best"]["readout_only_val_spearman"],
            "epochs_run": len(history["history"]),
            "candidates_per_prompt": int(np.median([len(s) for s in groups.seeds])),
            "train_seconds": round(time.time() - started, 1),
            "device": device,
        }
        _save(args.out, config, model)
        print(json.dumps({"predictor": args.out, "metrics": config.metrics}, indent=2))
        return 0

    return run_job(body)


def _save(out: str, config, model) -> None:
    """Save locally, or save to a temporary folder and upload the two files for an s3:// destination."""
    from actors.predictor.model import CONFIG_FILE, WEIGHTS_FILE, save_predictor

    if "://" not in out:
        save_predictor(out, config, model)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_predictor(folder, config, model)
        output = Output(out)
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            output.write_bytes(name, Path(folder, name).read_bytes())


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())

"""What evaluate checks and selects before it measures: the dataset and the predictor come from one pipeline, which
prompts to evaluate (the predictor's held-out split), and only prompts with every candidate rated."""

from __future__ import annotations

import logging
import math
import os

import numpy as np

from orchestrator.run.config import ConfigError

logger = logging.getLogger("seedsift.evaluate")

# Pipeline settings a predictor records and a dataset must share: its images come from exactly that pipeline.
CHECKED_SETTINGS = ("model", "width", "height")
# Settings that may differ: the predictor still scores the same noise, but its ranking may weaken; measuring how
# much is what evaluating on such a set is for, so these are warnings, recorded in evaluation.json.
WARNED_SETTINGS = ("scheduler", "steps", "guidance")


def _same_setting(key: str, recorded, collected) -> bool:
    if key == "guidance":
        return math.isclose(float(recorded), float(collected), rel_tol=1e-9, abs_tol=1e-9)
    if key == "model" and recorded != collected and "://" not in f"{recorded}{collected}":
        # Two spellings of one local folder are one model; an embedded name or hub id must match exactly.
        folders = [os.path.expanduser(str(recorded)), os.path.expanduser(str(collected))]
        return all(os.path.isdir(folder) for folder in folders) and os.path.samefile(*folders)
    return str(recorded) == str(collected)


def check_same_pipeline(identity: dict, config, dataset: str, predictor: str) -> list[str]:
    """Refuse a dataset whose images come from another model, size or rater than the predictor was trained on;
    return warnings for other steps, guidance or scheduler (evaluated anyway: that is how to measure them)."""
    problems, unchecked, warnings = [], [], []
    recorded = dict(config.pipeline)
    recorded["rater"] = config.rater or None
    for key in CHECKED_SETTINGS + ("rater",) + WARNED_SETTINGS:
        if recorded.get(key) is None:
            unchecked.append(key)
        elif not _same_setting(key, recorded[key], identity[key]):
            message = f"{key}: predictor {recorded[key]!r}, dataset {identity[key]!r}"
            (warnings if key in WARNED_SETTINGS else problems).append(message)
    for warning in warnings:
        logger.warning("the dataset was collected at other settings than the predictor was trained at (%s): its "
                       "ranking may be weaker; these figures measure how much", warning)
    if problems:
        raise ConfigError(
            f"--dataset {dataset} was not collected with the pipeline --predictor {predictor} was trained for ("
            + "; ".join(problems) + "). Its scores rate other images, so evaluating this predictor on them measures "
            "nothing it will be used for. Collect a dataset with the predictor's settings, or pass a predictor "
            "trained on this dataset's.")
    if unchecked:
        logger.warning("predictor %s does not record %s; cannot check that the dataset matches them",
                       predictor, ", ".join(unchecked))
    return [f"settings differ from the predictor's training ({w})" for w in warnings]


def choose_split(split: str, config, table) -> tuple[str, str]:
    """`auto`: the held-out split on the predictor's own training set, every prompt on any other; with why."""
    from orchestrator.output.dataset import dataset_digest

    if split != "auto":
        return split, f"--split {split}"
    recorded = (config.training_set or {}).get("digest")
    if recorded and recorded == dataset_digest(table):
        return "test", "the dataset is the predictor's training set: only its held-out test prompts"
    if recorded:
        return "all", "the dataset is not the predictor's training set: every prompt"
    return "test", "the predictor records no training set (trained by an older seedsift): its test split"


def select_prompts(groups, config, split: str, predictor: str):
    """The prompts to evaluate: the predictor's held-out test split, or all; plus the dataset's count per split."""
    from actors.predictor.model import split_of

    recorded = config.split or {}
    counts = None
    labels = None
    if {"salt", "train", "val"} <= set(recorded):
        labels = [split_of(pid, str(recorded["salt"]), float(recorded["train"]), float(recorded["val"]))
                  for pid in groups.prompt_ids]
        counts = {name: labels.count(name) for name in ("train", "val", "test")}
    if split == "all":
        if counts and counts["train"] + counts["val"]:
            logger.warning("--split all: %d of the %d prompts fall in the predictor's train or validation split; "
                           "if its training set had them, their figures are optimistic",
                           counts["train"] + counts["val"], len(labels))
        return groups, counts
    if labels is None:
        raise ConfigError(f"--predictor {predictor} records no train/val/test split (salt, train, val), so its "
                          "held-out prompts are unknown; pass --split all for a dataset collected apart from training")
    test = [i for i, label in enumerate(labels) if label == "test"]
    if not test:
        raise ConfigError(
            f"none of the dataset's {len(labels)} prompts is in the predictor's held-out test split (test fraction "
            f"{1 - float(recorded['train']) - float(recorded['val']):.2f}); collect more prompts, or pass --split all "
            "for a dataset collected apart from training")
    return groups.subset(test), counts


def complete_prompts(groups):
    """Prompts that have every candidate 0..N-1 rated (N the most any prompt has); the gain curve needs prefixes."""
    if not groups.prompt_ids:
        raise ConfigError("the dataset has no prompt with at least 2 rated candidates; collect with --candidates 2+")
    count = max(len(s) for s in groups.seeds)
    keep = [i for i, index in enumerate(groups.candidate_index) if np.array_equal(index, np.arange(count))]
    dropped = len(groups.prompt_ids) - len(keep)
    if not keep:
        raise ConfigError(f"no prompt has all {count} candidates rated (failed renders); rerun the collect job, "
                          "which renders only what is missing")
    if dropped:
        logger.warning("%d prompts miss some of their %d candidates (failed renders) and are left out", dropped, count)
    return groups.subset(keep), dropped

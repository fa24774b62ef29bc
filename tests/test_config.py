"""Configuration is validated before any compute, with messages that name the fix."""

import dataclasses

import pytest

from orchestrator.run.config import ConfigError, GenerateConfig, fingerprint_of


def config(**overrides):
    return GenerateConfig(**({"prompts": "p.txt", "out": "/tmp/out"} | overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"keep": 5, "candidates": 4}, "--keep 5 is more than --candidates 4"),
        ({"candidates": 0}, "--candidates must be between 1 and 1,000,000"),
        ({"candidates": 1_000_001, "keep": 1}, "--candidates must be between 1 and 1,000,000"),
        ({"width": -64}, "--width must be a positive multiple of 8"),
        ({"height": 60}, "--height must be a positive multiple of 8"),
        ({"policy": "best"}, "--policy 'best' is unknown"),
        ({"model": "/no/such/folder"}, "no such folder"),
        ({"model": "embedded:huge"}, "unknown embedded model"),
        ({"steps": 0}, "--steps must be at least 1"),
    ],
)
def test_bad_configuration_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(**overrides).validate()


def fingerprint(cfg: GenerateConfig) -> str:
    return fingerprint_of(cfg.fingerprint_fields())


def test_good_configuration_and_fingerprint():
    good = config()
    good.validate()
    assert fingerprint(good) == fingerprint(config(out="/elsewhere", limit=3))  # where and how much: not identity
    assert fingerprint(good) != fingerprint(config(steps=21))
    # A corpus-derived value never enters it: --budget-images is what the user asked for, not its per-prompt share.
    budget = dict(policy="budget", budget_images=100, keep=4)
    assert "budget_per_prompt" not in config(**budget).fingerprint_fields()


def test_configuration_is_frozen_once_built():
    good = config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        good.width = 64  # derived values live in the run plan, never written back here


def test_invalid_configuration_cannot_be_built():
    with pytest.raises(ConfigError, match="--shard-size must be at least 1"):
        config(shard_size=0)
    with pytest.raises(ConfigError, match="--image-output 'tar' is unknown"):
        config(image_output="tar")


def test_secrets_never_in_public_dict_or_repr():
    secret = config(storage_options={"key": "AKIAEXAMPLE", "secret": "hunter2"})
    assert "hunter2" not in repr(secret)
    assert "hunter2" not in str(secret.public_dict())


@pytest.mark.parametrize("job", ["generate", "collect", "evaluate", "manifest", "report", "reproduce", "verify"])
@pytest.mark.parametrize(("text", "reason"), [("{bad", "not valid JSON"), ("[1]", "expected a JSON object")])
def test_every_job_parses_storage_options_one_way_and_exits_2(job, text, reason, capsys):
    """One --storage-options parser for all jobs (jobs/common.storage_options): bad JSON, or JSON that is no object,
    is an input error (exit 2, one line naming the flag) before anything starts, never a traceback."""
    import importlib

    with pytest.raises(SystemExit) as ended:
        importlib.import_module(f"jobs.{job}").main(["--storage-options", text])
    assert ended.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --storage-options" in last and reason in last, last


def test_storage_options_reach_the_job_as_a_dict():
    import argparse

    from jobs.common import add_run_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    args = parser.parse_args(["--prompts", "p.txt", "--out", "/tmp/out", "--storage-options", '{"anon": true}'])
    assert config_from_args(args).storage_options == {"anon": True}
    assert config_from_args(parser.parse_args(["--prompts", "p.txt", "--out", "/tmp/o"])).storage_options == {}

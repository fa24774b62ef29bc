"""Configuration is validated before any compute, with messages that name the fix."""

import pytest

from orchestrator.config import ConfigError, GenerateConfig


def config(**overrides):
    return GenerateConfig(**({"prompts": "p.txt", "out": "/tmp/out"} | overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"keep": 5, "candidates": 4}, "--keep 5 is more than --candidates 4"),
        ({"candidates": 0}, "--candidates must be at least 1"),
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


def test_good_configuration_and_fingerprint():
    good = config()
    good.validate()
    assert good.fingerprint() == config(out="/elsewhere", limit=3).fingerprint()  # where and how much: not identity
    assert good.fingerprint() != config(steps=21).fingerprint()


def test_secrets_never_in_public_dict_or_repr():
    secret = config(storage_options={"key": "AKIAEXAMPLE", "secret": "hunter2"})
    assert "hunter2" not in repr(secret)
    assert "hunter2" not in str(secret.public_dict())

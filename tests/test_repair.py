"""A damaged output is named, repaired and finished: a truncated shard object, a damaged part, garbage run.json.

`seedsift verify` names the damaged object, `generate` refuses before Ray with the same name (exit 2),
`verify --repair` moves it aside (never deletes it), and the same command then redoes the rows it held:
exactly once afterwards, every image present, nothing orphaned.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs import cli, verify
from orchestrator.flow import pipeline
from orchestrator.output.manifest import Manifest
from orchestrator.output.storage import Output
from tests.conftest import FINISHED_ROWS as ROWS
from tests.conftest import finished_settings as settings


def generate_cli(corpus: str, out: str) -> list[str]:
    return ["generate", "--prompts", corpus, "--out", out, "--candidates", "4", "--keep", "2", "--steps", "1",
            "--guidance", "3.0", "--batch-size", "4", "--generator-cpus", "1", "--shard-size", "4"]


def copy_of(finished: dict, tmp_path: Path) -> Output:
    import shutil

    target = tmp_path / "out"
    shutil.copytree(finished["out"], target)
    return Output(str(target))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.slow  # two more runs each: in CI's second tier
@pytest.mark.parametrize("damage", ["shard", "run-json"])
def test_damaged_output_is_named_repaired_and_finished(finished, tmp_path, capfd, damage):
    output = copy_of(finished, tmp_path)
    root = Path(output.uri)
    shards = sorted((root / "manifest" / "shards").rglob("*.parquet"))
    assert len(shards) == 2
    if damage == "shard":
        damaged_key = output.key_of(str(shards[0]))
        truncate(shards[0])
        images_before = len(list((root / "images").rglob("*.png")))
    else:
        damaged_key = "run.json"
        (root / "run.json").write_text("{ not json")

    report = verify.verify_output(output)
    assert report["damaged_object_keys"] == [damaged_key] and not report["clean"]
    assert verify.main(["--out", output.uri]) == 1
    capfd.readouterr()
    # generate refuses before Ray, in one line naming the object and the repair (the console writes to the terminal).
    assert cli.main(generate_cli(finished["corpus"], output.uri)) == 2
    message = capfd.readouterr().err.strip().splitlines()
    assert len(message) == 1 and damaged_key in message[0] and "--repair" in message[0], message

    assert verify.main(["--out", output.uri, "--repair"]) == 0
    repaired = json.loads(capfd.readouterr().out)
    assert repaired["moved"] == [damaged_key]
    assert (root / repaired["moved_to"] / damaged_key).is_file()  # kept, never deleted
    assert not (root / damaged_key).exists()

    summary = pipeline.run(settings(finished["corpus"], output.uri))
    redone = 0 if damage == "run-json" else ROWS // 2  # the damaged shard's rows, its 4 prompts x 2
    assert summary["this_run"]["images"] == redone
    after = verify.verify_output(output)
    assert after["strict_clean"] and after["committed_rows"] == ROWS, after
    if damage == "shard":
        assert len(list((root / "images").rglob("*.png"))) == images_before  # rewritten in place, no strays
    assert len(Manifest(output).complete_sizes()) == 2


def test_repair_of_a_clean_output_moves_nothing(finished, tmp_path, capfd):
    output = copy_of(finished, tmp_path)
    assert verify.main(["--out", output.uri, "--repair"]) == 0
    assert json.loads(capfd.readouterr().out)["moved"] == []
    assert verify.verify_output(output)["strict_clean"]

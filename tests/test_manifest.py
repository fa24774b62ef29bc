"""Manifest schema, safe keys and content-named parts."""

import pytest

from orchestrator.output.images import file_image_key, safe_key
from orchestrator.output.manifest import MANIFEST_COLUMNS, manifest_table, part_key

REQUIRED = ["prompt_id", "prompt", "seed", "candidate_index", "predicted_score", "score", "image_key", "model",
            "scheduler", "steps", "guidance", "width", "height", "status", "error"]


def test_schema_has_the_promised_columns():
    assert set(REQUIRED) <= set(MANIFEST_COLUMNS)


@pytest.mark.parametrize("hostile", ["../../etc/passwd", "..", "a/b", "/abs", "C:\\x", "", "é", "a" * 500])
def test_safe_key_never_escapes(hostile):
    key = safe_key(hostile)
    assert "/" not in key and "\\" not in key and "." not in key and key
    assert file_image_key(hostile, 5, "png").startswith("images/")
    assert ".." not in file_image_key(hostile, 5, "png")


def test_safe_key_keeps_clean_ids_and_separates_lookalikes():
    assert safe_key("prompt_01-a") == "prompt_01-a"
    assert safe_key("a/b") != safe_key("a_b")
    assert safe_key("a.b") != safe_key("a_b")


def test_part_key_depends_on_content_not_order():
    assert part_key("f/000001", [("a", "1"), ("b", "2")]) == part_key("f/000001", [("b", "2"), ("a", "1")])
    assert part_key("f/000001", [("a", "1")]) != part_key("f/000001", [("a", "2")])
    assert part_key("f/000001", [("a", "1")]).startswith("manifest/open/f/000001/")


def test_manifest_table_rejects_unknown_columns_and_fills_nulls():
    table = manifest_table([{"prompt_id": "a", "seed": 3, "status": "ok"}])
    assert table.num_rows == 1 and table["score"][0].as_py() is None
    with pytest.raises(ValueError, match="unknown columns: colour"):
        manifest_table([{"prompt_id": "a", "colour": 1}])

"""Any single corpus row, however malformed, is one quarantined row with its reason, never a failed job.

seedsift 0.1 aborted a whole run on one jsonl line whose prompt was the escape "\\ud800" (valid JSON, a lone
surrogate: Arrow cannot encode it), and every rerun failed the same way. Here the reader itself (framing, parsing,
the Arrow block a Ray read task returns) is fed random bytes and random JSON values by Hypothesis, and a real run
gets the named cases end to end.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.corpus.listing import MAX_PROMPT_CHARS, list_corpus
from orchestrator.corpus.reader import ReadSettings, read_text_shards

NAMED_CASES = {  # what 0.1 and a careful adversary tried; each line must become exactly one row
    "lone surrogate prompt": '{"id": "s1", "prompt": "\\ud800"}',
    "lone surrogate id": '{"id": "\\udfff", "prompt": "a red cube"}',
    "NUL byte": '{"id": "n1", "prompt": "a red\\u0000cube"}',
    "control character": '{"id": "c1", "prompt": "a red \\u001b[31m cube"}',
    "ten megabyte line": json.dumps({"id": "big", "prompt": "x" * 10_000_000}),
    "deeply nested": "[" * 50_000 + "]" * 50_000,
    "number as prompt": '{"id": "num", "prompt": 12}',
    "list as prompt": '{"id": "lst", "prompt": ["a", "b"]}',
    "object as id": '{"id": {"k": 1}, "prompt": "a green cube"}',
    "bool as id": '{"id": true, "prompt": "a blue cube"}',
    "bare number": "3.5",
    "truncated": '{"id": "t", "prompt": "a yellow',
}
GOOD = ['{"id": "g1", "prompt": "a purple circle"}', '"a bare string prompt"', '{"id": 7, "prompt": "an id number"}']


def read_all(path, shard_size: int = 5) -> list[dict]:
    (corpus_file,) = list_corpus(str(path))
    rows = []
    for table in read_text_shards(corpus_file, {}, ReadSettings(shard_size=shard_size)):
        rows += table.to_pylist()  # the Arrow block itself was built: what failed in 0.1
    return rows


def test_each_named_malformed_line_is_one_quarantined_row_with_its_reason(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = list(NAMED_CASES.values()) + GOOD
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = read_all(path)
    assert [row["source"] for row in rows] == [f"c.jsonl:{i}" for i in range(1, len(lines) + 1)]
    by_case = dict(zip(list(NAMED_CASES) + ["good"] * len(GOOD), rows, strict=False))
    reasons = {case: row["error"] for case, row in by_case.items() if case != "good"}
    assert all(row["status"] == "quarantined" for case, row in by_case.items() if case != "good"), reasons
    assert [row["status"] for row in rows[-len(GOOD):]] == ["ok"] * len(GOOD)
    assert "lone surrogate (U+D800)" in reasons["lone surrogate prompt"]
    assert "id holds a lone surrogate" in reasons["lone surrogate id"]
    assert "control character (U+0000)" in reasons["NUL byte"]
    assert "control character (U+001B)" in reasons["control character"]
    assert f"at most {MAX_PROMPT_CHARS:,}" in reasons["ten megabyte line"]
    assert reasons["deeply nested"] == "malformed JSON: nested too deeply"
    assert reasons["number as prompt"] == "prompt is a int, not text"
    assert reasons["object as id"] == "id is a dict, not text or a number"
    assert reasons["truncated"].startswith("malformed JSON")
    # What a quarantined row keeps is short and storable (an escaped excerpt), never the 10 MB.
    assert len(by_case["ten megabyte line"]["prompt"]) <= 200
    assert by_case["lone surrogate prompt"]["prompt"] == "\\ud800"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
json_lines = st.one_of(
    json_values.map(json.dumps),
    st.fixed_dictionaries({"prompt": json_values}, optional={"id": json_values}).map(json.dumps),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3).map(
        lambda s: json.dumps({"prompt": s})),  # json.dumps escapes lone surrogates as \\udxxx: valid JSON
)
raw_lines = st.binary(max_size=60).map(lambda b: b.replace(b"\n", b" "))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(json_lines.map(lambda s: s.encode("utf-8")), raw_lines), min_size=1, max_size=12))
def test_random_bytes_and_json_values_are_all_accounted_for(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("fuzz") / "c.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    rows = read_all(path, shard_size=4)
    # Every line that is not blank is exactly one row, in order; blank lines are separators.
    expected = [f"c.jsonl:{i}" for i, line in enumerate(lines, start=1) if line.strip(b" \t\r\x0b\x0c")]
    got = [row["source"] for row in rows]
    assert got == expected or _only_unicode_blank_differs(lines, got, expected)
    for row in rows:
        assert row["status"] in ("ok", "quarantined")
        assert (row["status"] == "quarantined") == (row["error"] is not None)
        if row["status"] == "ok":
            assert row["prompt"] and row["prompt"] == row["prompt"].strip() and row["prompt_id"]


def _only_unicode_blank_differs(lines, got, expected) -> bool:
    """A line of Unicode whitespace (U+3000, U+00A0 ...) is not blank to the byte-level check above but is one
    whitespace-only row (quarantined) to the reader, or the other way round: accept exactly that difference."""
    numbers = {int(s.rsplit(":", 1)[1]) for s in set(got) ^ set(expected)}
    return all(not lines[n - 1].decode("utf-8", "replace").strip() for n in numbers)


@pytest.mark.parametrize("fmt", ["txt", "csv"])
def test_text_formats_quarantine_bad_bytes_and_long_lines(tmp_path, fmt):
    header = "prompt\n" if fmt == "csv" else ""
    path = tmp_path / f"c.{fmt}"
    body = [b"a red circle", b"\xff\xfe broken utf-8", b"a \x00 nul", b"y" * 3_000_000, b"two green squares"]
    path.write_bytes(header.encode() + b"\n".join(body) + b"\n")
    rows = read_all(path)
    assert [row["status"] for row in rows] == ["ok", "quarantined", "quarantined", "quarantined", "ok"]
    assert "invalid UTF-8" in rows[1]["error"] or "UTF-8" in rows[1]["error"]


# Later copies of an id or of a text (case and spaces aside) are quarantined as duplicates of the first.
DUPLICATES = [{"id": "a", "prompt": "a red cube"}, {"id": "b", "prompt": "a blue cube"},
              {"id": "a", "prompt": "a different text, same id"}, {"id": "c", "prompt": "A red  cube"},
              {"id": "d", "prompt": "a green cube"}, {"id": "a", "prompt": "a third copy of id a"}]


def test_a_run_over_the_named_cases_completes_with_every_line_accounted_for(ray_session, tmp_path):
    """The named cases, good lines and duplicates in one real run: every line is one row, duplicates name their
    first occurrence (a quarantined line never is one), and the rerun has nothing left to do. The corpus is a folder
    whose second file repeats an id of the first with another text: ids are scoped per file, so that row is no
    duplicate (0.2 quarantined it)."""
    from jobs.verify import verify_output
    from orchestrator.flow import pipeline
    from orchestrator.run.config import GenerateConfig

    folder = tmp_path / "corpus"
    folder.mkdir()
    lines = list(NAMED_CASES.values()) + GOOD + [json.dumps(line) for line in DUPLICATES]
    (folder / "c.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "d.jsonl").write_text(json.dumps({"id": "a", "prompt": "a yellow sphere"}) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    config = GenerateConfig(prompts=str(folder), out=str(out), candidates=2, keep=1, steps=2, guidance=3.0,
                            generator_cpus=1)
    summary = pipeline.run(config)
    rows = pq.read_table(out / "manifest" / "shards").to_pylist()
    assert sorted(row["source"] for row in rows) == sorted([f"c.jsonl:{i}" for i in range(1, len(lines) + 1)]
                                                           + ["d.jsonl:1"])
    assert summary["images"] == len(GOOD) + 4 and summary["prompts_quarantined"] == len(NAMED_CASES) + 3
    other = next(row for row in rows if row["source"] == "d.jsonl:1")
    assert other["status"] == "ok" and other["prompt_id"] == "d.jsonl#a", other
    quarantined = [row for row in rows if row["status"] == "quarantined"]
    assert all(row["seed"] is None and row["image_key"] is None and row["error"] for row in quarantined)
    first = len(NAMED_CASES) + len(GOOD)  # lines before the duplicates' block
    duplicates = {row["source"]: row["error"] for row in rows if row["error"] and "duplicate" in row["error"]}
    assert duplicates == {f"c.jsonl:{first + n}": f"duplicate of c.jsonl:{first + 1}" for n in (3, 4, 6)}
    assert sorted(row["prompt_id"] for row in rows if row["source"] in
                  {f"c.jsonl:{first + n}" for n in range(1, 7)} and row["status"] == "ok") == [
        "c.jsonl#a", "c.jsonl#b", "c.jsonl#d"]
    report = verify_output(str(out))
    assert report["strict_clean"] and report["committed_rows"] == len(lines) + 1, report
    again = pipeline.run(config)
    assert again["this_run"]["rows"] == 0  # the rerun does not fail the same way: it has nothing left to do

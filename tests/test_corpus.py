"""Corpus parsing: every format, stable ids, and bad lines quarantined with their reason."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.corpus.listing import (corpus_format, parse_lines, parse_table, prompt_id_for, read_corpus_local,
                                         rows_to_blocks)


def lines(text: bytes) -> list[bytes]:
    return text.splitlines(keepends=True)


def test_format_from_extension():
    assert corpus_format("s3://b/x/prompts.JSONL") == "jsonl"
    assert corpus_format("a.tsv") == "tsv"
    assert corpus_format("a.parquet") == "parquet"
    with pytest.raises(ValueError, match="unknown corpus format"):
        corpus_format("a.docx")


def test_txt_lines_ids_and_quarantine():
    rows = list(parse_lines(lines(b"a red cube\n\n   \nbad \xff byte\n  spaced prompt  \n"), "txt", "p.txt"))
    assert [r["status"] for r in rows] == ["ok", "quarantined", "quarantined", "ok"]
    assert rows[0]["prompt_id"] == prompt_id_for("a red cube") and rows[0]["source"] == "p.txt:1"
    assert "whitespace" in rows[1]["error"] and rows[1]["source"] == "p.txt:3"
    assert "invalid UTF-8" in rows[2]["error"]
    assert rows[3]["prompt"] == "spaced prompt" and rows[3]["prompt_id"] == prompt_id_for("spaced prompt")


def test_prompt_id_is_stable_hash_of_text():
    assert prompt_id_for("a cat") == prompt_id_for("  a cat \n")
    assert prompt_id_for("a cat") != prompt_id_for("a dog")
    assert len(prompt_id_for("a cat")) == 16


def test_jsonl_objects_strings_and_malformed_rows():
    text = b"\n".join([
        json.dumps({"id": 7, "prompt": "seven"}).encode(),
        json.dumps("plain string").encode(),
        b'{"prompt": "unterminated',
        json.dumps({"caption": "a caption column"}).encode(),
        json.dumps({"title": "no prompt"}).encode(),
        json.dumps({"prompt": None}).encode(),
        json.dumps([1, 2]).encode(),
    ])
    rows = list(parse_lines(lines(text), "jsonl", "c.jsonl"))
    assert rows[0]["prompt_id"] == "7" and rows[0]["prompt"] == "seven"
    assert rows[1]["prompt"] == "plain string" and rows[1]["status"] == "ok"
    assert rows[2]["status"] == "quarantined" and "malformed JSON" in rows[2]["error"]
    assert rows[3]["prompt"] == "a caption column"
    assert rows[4]["error"] == "no 'prompt' field (found: title)"
    assert "null" in rows[5]["error"]
    assert "list" in rows[6]["error"]
    assert len({r["prompt_id"] for r in rows}) == len(rows)


def test_csv_with_id_column_quotes_and_bad_rows():
    text = b'ID,Prompt,extra\n1,"a, quoted prompt",x\n2,"multi\nline",y\n3,too,many,fields\n4,\xfe,z\n5,last,w\n'
    rows = list(parse_lines(lines(text), "csv", "c.csv"))
    by_status = [(r["prompt_id"], r["status"]) for r in rows]
    assert ("1", "ok") in by_status and ("2", "ok") in by_status and ("5", "ok") in by_status
    assert rows[0]["prompt"] == "a, quoted prompt"
    assert rows[1]["prompt"] == "multi\nline"
    bad = [r for r in rows if r["status"] == "quarantined"]
    assert len(bad) == 2
    assert any("3 fields" in r["error"] or "4 fields" in r["error"] for r in bad)
    assert any("invalid UTF-8" in r["error"] for r in bad)


def test_csv_without_prompt_column_names_what_it_found():
    with pytest.raises(ValueError, match=r"p.csv line 1: no prompt column \(found: text_en, id\); looked for prompt, "
                                         r"prompts, caption, text in any case; pass --prompt-column NAME"):
        list(parse_lines(lines(b"text_en,id\na,1\n"), "csv", "p.csv"))


def test_partiprompts_tsv_reads_every_prompt(parti_path):
    with open(parti_path, "rb") as f:
        rows = list(parse_lines(f, "tsv", "PartiPrompts.tsv"))
    full = parti_path.endswith("shared/data/PartiPrompts.tsv")  # else the bundled 48-prompt sample
    assert len(rows) == (1632 if full else 48)
    assert all(r["status"] == "ok" for r in rows)
    assert len({r["prompt_id"] for r in rows}) > (1600 if full else 47)  # a few prompts repeat verbatim


def test_parquet_nulls_and_ids(tmp_path):
    table = pa.table({"prompt_id": ["a", None, "c"], "prompt": ["one", "two", None]})
    rows = list(parse_table(table, "t.parquet"))
    assert rows[0]["prompt_id"] == "a" and rows[0]["status"] == "ok"
    assert rows[1]["prompt_id"] == prompt_id_for("two")
    assert rows[2]["status"] == "quarantined" and "null" in rows[2]["error"]
    path = tmp_path / "t.parquet"
    pq.write_table(table, path)
    assert [r["prompt_id"] for r in read_corpus_local(str(path))][0] == "a"


def test_blocks_are_bounded():
    rows = ({"prompt_id": str(i), "prompt": "p", "source": "s", "status": "ok", "error": None} for i in range(10))
    blocks = list(rows_to_blocks(rows, rows_per_block=4))
    assert [b.num_rows for b in blocks] == [4, 4, 2]

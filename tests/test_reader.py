"""Corpus reading on Ray: every format streams through the Ray reader with the same rows as the plain parser."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.corpus import read_corpus_local
from orchestrator.reader import read_corpus


def ray_rows(path: str, **kwargs) -> list[dict]:
    return sorted(read_corpus(path, **kwargs).take_all(), key=lambda r: r["source"])


@pytest.fixture
def corpora(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"a red cube\n   \nbad \xff\n" + b"".join(b"prompt %d\n" % i for i in range(5000)))
    (tmp_path / "p.jsonl").write_text("\n".join([json.dumps({"id": "x1", "prompt": "one"}), "{bad", json.dumps("two")]))
    (tmp_path / "p.csv").write_text('id,prompt\n1,"a, b"\n2,\n3,"multi\nline"\n')
    (tmp_path / "p.tsv").write_text("Prompt\tCategory\na cat\tAnimals\n")
    pq.write_table(pa.table({"prompt_id": ["a", None, "c"], "prompt": ["one", "two", None]}), tmp_path / "p.parquet")
    return tmp_path


@pytest.mark.parametrize("name", ["p.txt", "p.jsonl", "p.csv", "p.tsv", "p.parquet"])
def test_ray_reader_matches_the_plain_parser(ray_session, corpora, name):
    path = str(corpora / name)
    expected = sorted(read_corpus_local(path), key=lambda r: r["source"])
    rows = ray_rows(path)
    assert [(r["prompt_id"], r["prompt"], r["status"], r["error"]) for r in rows] == \
        [(r["prompt_id"], r["prompt"], r["status"], r["error"]) for r in expected]
    assert any(r["status"] == "quarantined" for r in rows) or name == "p.tsv"


def test_limit_and_sample(ray_session, corpora):
    path = str(corpora / "p.txt")
    assert len(read_corpus(path, limit=10).take_all()) == 10
    sampled = read_corpus(path, sample=0.25).take_all()
    assert 1000 < len(sampled) < 1600  # about a quarter of 5,003 rows
    assert {r["prompt_id"] for r in sampled} == {r["prompt_id"] for r in read_corpus(path, sample=0.25).take_all()}

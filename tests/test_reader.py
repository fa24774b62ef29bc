"""Corpus reading on Ray: every format streams through the Ray reader with the same rows as the plain parser."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.corpus.listing import list_corpus, read_corpus_local
from orchestrator.corpus.reader import ReadSettings, read_corpus, split_limit


def ray_dataset(path: str, limit: int | None = None, sample: float | None = None, shard_size: int = 1000):
    files = list_corpus(path)
    return read_corpus(files, ReadSettings(shard_size=shard_size, sample=sample), limits=split_limit(files, limit))


def ray_rows(path: str, **kwargs) -> list[dict]:
    return sorted(ray_dataset(path, **kwargs).take_all(), key=lambda r: r["source"])


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
    assert len(ray_dataset(path, limit=10).take_all()) == 10
    sampled = ray_dataset(path, sample=0.25).take_all()
    assert 1000 < len(sampled) < 1600  # about a quarter of 5,003 rows
    assert {r["prompt_id"] for r in sampled} == {r["prompt_id"] for r in ray_dataset(path, sample=0.25).take_all()}


def test_rows_carry_their_shard_and_a_folder_is_one_corpus(ray_session, corpora):
    rows = ray_rows(str(corpora / "p.txt"), shard_size=1000)
    shards = {}
    for row in rows:
        shards.setdefault(row["shard"], []).append(row["shard_row"])
    assert len(shards) == 6  # 5,002 rows in shards of 1,000
    assert all(sorted(positions) == list(range(len(positions))) for positions in shards.values())
    everything = ray_rows(str(corpora))  # the folder: every corpus file in it, one run
    assert {r["source"].split(":")[0] for r in everything} == {"p.txt", "p.jsonl", "p.csv", "p.tsv", "p.parquet"}

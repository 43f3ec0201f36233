from __future__ import annotations

import json
import math
from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import write_beir

from readaptir.stages.score import parse_metric, read_run, score
from readaptir.stages.search import format_run, merge_topk, search


def _write_embeddings(out: Path, corpus: np.ndarray, queries: np.ndarray, shard_size: int) -> None:
    """An ``embed``-style folder holding the given float16 vectors."""
    out.mkdir(parents=True)
    shards = 0
    for start in range(0, len(corpus), shard_size):
        np.save(out / f"corpus-{shards:05d}.npy", corpus[start : start + shard_size])
        shards += 1
    (out / "corpus_ids.json").write_text(json.dumps([f"doc{i:03d}" for i in range(len(corpus))]))
    np.save(out / "queries.npy", queries)
    (out / "query_ids.json").write_text(json.dumps([f"q{i}" for i in range(len(queries))]))
    info = {"dim": corpus.shape[1], "passages": len(corpus), "shards": shards}
    (out / "info.json").write_text(json.dumps({**info, "queries": len(queries)}))


def _read_trec(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()]


def test_sharded_search_equals_one_flat_index(tmp_path):
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((53, 16)).astype(np.float16)
    queries = rng.standard_normal((7, 16)).astype(np.float16)
    _write_embeddings(tmp_path / "emb", corpus, queries, shard_size=10)
    search(tmp_path / "emb", tmp_path / "run", k=8, device="cpu")
    rows = _read_trec(tmp_path / "run" / "run.trec")

    flat = faiss.IndexFlatIP(16)
    flat.add(corpus.astype(np.float32))
    scores, idx = flat.search(queries.astype(np.float32), 8)
    expected = [
        [f"q{q}", "Q0", f"doc{idx[q, r]:03d}", str(r + 1), f"{scores[q, r]:.9g}", "readaptir"]
        for q in range(7)
        for r in range(8)
    ]
    assert [r[:4] for r in rows] == [e[:4] for e in expected]
    for got, want in zip(rows, expected, strict=True):
        assert math.isclose(float(got[4]), float(want[4]), rel_tol=1e-6, abs_tol=1e-6)
        assert got[5] == "readaptir"


def test_k_larger_than_the_corpus(tmp_path):
    rng = np.random.default_rng(1)
    corpus = rng.standard_normal((5, 4)).astype(np.float16)
    _write_embeddings(tmp_path / "emb", corpus, corpus[:2], shard_size=2)
    search(tmp_path / "emb", tmp_path / "run", k=100, device="cpu")
    rows = _read_trec(tmp_path / "run" / "run.trec")
    assert len(rows) == 10 and [r[3] for r in rows[:5]] == ["1", "2", "3", "4", "5"]
    assert rows[0][2] == "doc000" and rows[5][2] == "doc001"  # a vector is its own best match


def test_merge_topk_breaks_ties_by_doc_id():
    parts = [
        (np.array([[0.5, 0.2]]), np.array([["b", "x"]])),
        (np.array([[0.5, 0.5]]), np.array([["a", "c"]])),
    ]
    scores, ids = merge_topk(parts, k=3)
    assert ids.tolist() == [["c", "b", "a"]] and scores.tolist() == [[0.5, 0.5, 0.5]]
    # Shard order does not matter.
    assert merge_topk(parts[::-1], k=3)[1].tolist() == [["c", "b", "a"]]


def test_format_run():
    text = format_run(["q1"], np.array([[2.5, 0.125]], np.float32), np.array([["d9", "d1"]]))
    assert text == "q1 Q0 d9 1 2.5 readaptir\nq1 Q0 d1 2 0.125 readaptir\n"


@pytest.fixture
def toy(tmp_path) -> Path:
    corpus = [{"_id": f"d{i}", "text": f"doc {i}"} for i in range(1, 7)] + [
        {"_id": "qa", "text": ""}
    ]
    queries = [{"_id": q, "text": q} for q in ("qa", "qb", "qc", "qd")]
    # qc has no results in the run; qd has no judgments.
    qrels = [("qa", "d1", 1), ("qa", "d3", 2), ("qb", "d2", 1), ("qb", "d6", 0), ("qc", "d1", 1)]
    root = write_beir(tmp_path / "beir", corpus, queries, qrels)
    run = [
        ("qa", "qa", 0.99),  # the query itself: dropped when ignoring identical ids
        ("qa", "d2", 0.9),
        ("qa", "d1", 0.8),
        ("qa", "d4", 0.7),
        ("qa", "d3", 0.6),
        ("qb", "d5", 0.9),
        ("qb", "d6", 0.8),
        ("qb", "d2", 0.7),
        ("qd", "d1", 0.9),
    ]
    lines = [f"{q} Q0 {d} {r} {s} test" for r, (q, d, s) in enumerate(run, start=1)]
    (tmp_path / "run.trec").write_text("\n".join(lines) + "\n")
    return root


def _dcg(gains: list[float]) -> float:
    # trec_eval's nDCG uses the grade itself as the gain (not 2**grade - 1).
    return sum(g / math.log2(rank + 2) for rank, g in enumerate(gains))


def test_hand_computed_metrics(toy, tmp_path):
    result = score(tmp_path / "run.trec", toy, "test", ["ndcg@10", "MRR@10", "recall@3", "mrr@2"])
    assert result["queries"] == 3
    pq = result["per_query"]
    assert set(pq) == {"qa", "qb", "qc"}  # qd is unjudged: skipped

    # qa ranks d2, d1, d4, d3 (rels 0, 1, 0, 2); ideal 2, 1.
    ndcg_qa = _dcg([0, 1, 0, 2]) / _dcg([2, 1])
    # qb ranks d5, d6, d2 (rels 0, 0, 1); d6 is judged non-relevant.
    ndcg_qb = _dcg([0, 0, 1]) / _dcg([1])
    assert pq["qa"]["nDCG@10"] == pytest.approx(ndcg_qa)
    assert pq["qb"]["nDCG@10"] == pytest.approx(ndcg_qb)
    assert pq["qa"]["MRR@10"] == pytest.approx(1 / 2) and pq["qb"]["MRR@10"] == pytest.approx(1 / 3)
    assert pq["qb"]["MRR@2"] == 0.0  # the relevant document sits at rank 3
    assert pq["qa"]["Recall@3"] == pytest.approx(1 / 2) and pq["qb"]["Recall@3"] == 1.0
    assert pq["qc"] == {"nDCG@10": 0.0, "MRR@10": 0.0, "Recall@3": 0.0, "MRR@2": 0.0}

    # Means are over every judged query, the one missing from the run counting as 0.
    metrics = result["metrics"]
    assert list(metrics) == ["nDCG@10", "MRR@10", "Recall@3", "MRR@2"]
    assert metrics["nDCG@10"] == pytest.approx((ndcg_qa + ndcg_qb) / 3)
    assert metrics["MRR@10"] == pytest.approx((1 / 2 + 1 / 3) / 3)
    assert any("1 of 3 judged queries have no results" in w for w in result["warnings"])


def test_identical_ids_kept_when_asked(toy, tmp_path):
    kept = score(tmp_path / "run.trec", toy, "test", ["MRR@10"], ignore_identical_ids=False)
    assert kept["per_query"]["qa"]["MRR@10"] == pytest.approx(1 / 3)


def test_unknown_judged_ids_are_warnings(toy, tmp_path):
    (toy / "qrels" / "test.tsv").write_text("qa\td1\t1\nqa\tgone\t1\nghost\td1\t1\n")
    result = score(tmp_path / "run.trec", toy, "test", ["P@1", "MAP", "map@5"])
    assert result["queries"] == 1
    assert set(result["metrics"]) == {"P@1", "MAP", "MAP@5"}
    assert result["per_query"]["qa"]["P@1"] == 0.0 and result["metrics"]["MAP"] == pytest.approx(
        0.5
    )
    assert any("unknown documents" in w for w in result["warnings"])
    assert any("unknown queries" in w for w in result["warnings"])


def test_parse_metric():
    assert parse_metric("ndcg@10") == ("nDCG@10", "ndcg_cut", 10)
    assert parse_metric("RECALL@100") == ("Recall@100", "recall", 100)
    assert parse_metric("mrr@10") == ("MRR@10", "recip_rank", 10)
    assert parse_metric("map") == ("MAP", "map", None)
    assert parse_metric("Map@5") == ("MAP@5", "map_cut", 5)
    assert parse_metric("p@5") == ("P@5", "P", 5)
    for bad in ("bleu@4", "ndcg", "ndcg@0", "ndcg@ten"):
        with pytest.raises(ValueError, match="supported: nDCG@k"):
            parse_metric(bad)


def test_run_file_errors(tmp_path):
    (tmp_path / "bad.trec").write_text("q1 Q0 d1 1 0.5 tag\nq1 Q0 d2 2\n")
    with pytest.raises(ValueError, match="bad.trec line 2"):
        read_run(tmp_path / "bad.trec")

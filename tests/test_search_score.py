from __future__ import annotations

import json
import math
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from conftest import write_beir

from readaptir.stages import search as search_module
from readaptir.stages.score import parse_metric, read_run, score
from readaptir.stages.search import (
    choose_backend,
    faiss_topk,
    format_run,
    merge_topk,
    search,
    torch_topk,
)


def _write_embeddings(
    out: Path,
    corpus: np.ndarray,
    queries: np.ndarray,
    shard_size: int,
    doc_ids: list[str] | None = None,
    query_ids: list[str] | None = None,
) -> None:
    """An ``embed``-style folder holding the given float16 vectors."""
    out.mkdir(parents=True)
    shards = 0
    for start in range(0, len(corpus), shard_size):
        np.save(out / f"corpus-{shards:05d}.npy", corpus[start : start + shard_size])
        shards += 1
    doc_ids = doc_ids or [f"doc{i:03d}" for i in range(len(corpus))]
    query_ids = query_ids or [f"q{i}" for i in range(len(queries))]
    (out / "corpus_ids.json").write_text(json.dumps(doc_ids))
    np.save(out / "queries.npy", queries)
    (out / "query_ids.json").write_text(json.dumps(query_ids))
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


def test_torch_search_equals_faiss():
    rng = np.random.default_rng(2)
    corpus = rng.standard_normal((300, 32)).astype(np.float16)
    queries = rng.standard_normal((17, 32)).astype(np.float16)
    want_s, want_i = faiss_topk(queries, corpus, 10)
    # Small chunks, so the running top-k is merged across query and passage blocks.
    got_s, got_i = torch_topk(queries, corpus, 10, "cpu", query_chunk=4, passage_chunk=64)
    assert got_i.dtype == np.int64 and got_s.dtype == np.float32
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, rtol=0, atol=1e-5)
    # k beyond the corpus gives the whole corpus, ranked.
    s, i = torch_topk(queries[:2], corpus[:5], 100, "cpu", passage_chunk=2)
    assert i.shape == (2, 5) and sorted(i[0].tolist()) == [0, 1, 2, 3, 4]
    assert (np.diff(s, axis=1) <= 0).all()


def test_search_backends_write_the_same_run(tmp_path):
    rng = np.random.default_rng(3)
    corpus = rng.standard_normal((41, 8)).astype(np.float16)
    queries = rng.standard_normal((5, 8)).astype(np.float16)
    _write_embeddings(tmp_path / "emb", corpus, queries, shard_size=9)
    for backend in ("faiss", "torch"):
        search(tmp_path / "emb", tmp_path / backend, k=7, device="cpu", backend=backend)
    faiss_rows = _read_trec(tmp_path / "faiss" / "run.trec")
    torch_rows = _read_trec(tmp_path / "torch" / "run.trec")
    assert [r[:4] for r in torch_rows] == [r[:4] for r in faiss_rows]
    for a, b in zip(torch_rows, faiss_rows, strict=True):
        assert abs(float(a[4]) - float(b[4])) < 1e-5


def test_choose_backend(monkeypatch):
    def machine(cuda: bool, faiss_gpus: int) -> None:
        monkeypatch.setattr(search_module, "_cuda", lambda: cuda)
        monkeypatch.setattr(search_module, "_faiss_gpus", lambda: faiss_gpus)

    machine(cuda=False, faiss_gpus=0)
    assert choose_backend(None) == ("faiss-cpu", "cpu")
    assert choose_backend("auto", "torch") == ("torch", "cpu")
    machine(cuda=True, faiss_gpus=0)  # the lent GPUs: CUDA, but FAISS without GPU support
    assert choose_backend(None) == ("torch", "cuda")
    assert choose_backend("cuda:1") == ("torch", "cuda:1")
    assert choose_backend("cpu") == ("faiss-cpu", "cpu")
    assert choose_backend(None, "faiss") == ("faiss-cpu", "cpu")
    machine(cuda=False, faiss_gpus=1)  # a torch without CUDA could not hold the shard there
    assert choose_backend(None) == ("faiss-cpu", "cpu")
    machine(cuda=True, faiss_gpus=1)
    assert choose_backend(None) == ("faiss-gpu", "cuda")
    assert choose_backend("cuda:1") == ("faiss-gpu", "cuda:1")
    assert choose_backend(None, "torch") == ("torch", "cuda")
    with pytest.raises(ValueError, match="unknown search backend 'annoy'"):
        choose_backend(None, "annoy")


def test_faiss_on_a_gpu_uses_the_gpu_named_and_one_set_of_resources(monkeypatch):
    """Every shard's index goes to the one GPU the device names, not to every visible GPU, and
    shares FAISS's GPU resources (stand-ins here: this FAISS has no GPU support)."""
    made, copies = [], []

    class Resources:
        def __init__(self) -> None:
            made.append(self)

    def index_cpu_to_gpu(resources, gpu, index):
        copies.append((resources, gpu))
        return index

    monkeypatch.setattr(faiss, "StandardGpuResources", Resources, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", index_cpu_to_gpu, raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    search_module.faiss_resources.cache_clear()
    try:
        index = faiss.IndexFlatIP(4)
        for device in ("cuda:1", "cuda:1", "cuda"):
            assert search_module.faiss_gpu_index(index, device) is index
    finally:
        search_module.faiss_resources.cache_clear()
    assert len(made) == 1
    assert copies == [(made[0], 1), (made[0], 1), (made[0], 3)]


def test_run_file_is_what_trec_eval_reads(tmp_path):
    import pytrec_eval

    rng = np.random.default_rng(4)
    corpus = rng.standard_normal((30, 8))
    corpus = (corpus / np.linalg.norm(corpus, axis=1, keepdims=True)).astype(np.float16)
    # Ids that look numeric keep their leading zeros; "42" and "0042" are different documents.
    doc_ids = ["0042", "42"] + [f"{i}" for i in range(100, 128)]
    corpus[1] = corpus[0]  # a tie: trec_eval puts the larger id (by strcmp) first
    queries = np.stack([corpus[0], corpus[5]])
    _write_embeddings(tmp_path / "emb", corpus, queries, 7, doc_ids, ["007", "7"])
    search(tmp_path / "emb", tmp_path / "run", k=10, device="cpu")
    path = tmp_path / "run" / "run.trec"
    rows = _read_trec(path)
    assert all(len(r) == 6 and r[1] == "Q0" and r[5] == "readaptir" for r in rows)
    for qid in ("007", "7"):
        mine = [r for r in rows if r[0] == qid]
        assert [int(r[3]) for r in mine] == list(range(1, 11))
        assert all(float(a[4]) >= float(b[4]) for a, b in zip(mine, mine[1:], strict=False))
    assert [r[2] for r in rows[:2]] == ["42", "0042"]
    with path.open() as fh:
        assert pytrec_eval.parse_run(fh) == read_run(path)

    root = write_beir(
        tmp_path / "beir",
        [{"_id": d, "text": "x"} for d in doc_ids],
        [{"_id": "007", "text": "a"}, {"_id": "7", "text": "b"}],
        [("007", "0042", 1), ("7", "103", 1)],
    )
    result = score(path, root, "test", ["MRR@10", "MAP"])
    assert result["per_query"]["007"]["MRR@10"] == pytest.approx(1 / 2)
    assert result["per_query"]["7"]["MRR@10"] == 1.0


def test_run_ids_with_whitespace_are_refused():
    with pytest.raises(ValueError, match="document id 'd 1'"):
        format_run(["q1"], np.array([[1.0]], np.float32), np.array([["d 1"]]))
    with pytest.raises(ValueError, match="query id ''"):
        format_run([""], np.array([[1.0]], np.float32), np.array([["d1"]]))


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
    metrics = ["ndcg@10", "MRR@10", "recall@3", "mrr@2"]
    result = score(tmp_path / "run.trec", toy, "test", metrics, ignore_identical_ids=True)
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
    kept = score(tmp_path / "run.trec", toy, "test", ["MRR@10"])  # the default
    assert kept["per_query"]["qa"]["MRR@10"] == pytest.approx(1 / 3)
    assert not any("own id first" in w for w in kept["warnings"])  # 1 of 2: a coincidence


def test_most_queries_finding_their_own_id_first_is_a_warning(toy, tmp_path):
    """Queries taken from the corpus, in a collection auto does not know, find themselves."""
    run = tmp_path / "run.trec"
    run.write_text(run.read_text() + "qb Q0 qb 0 0.95 test\n")
    kept = score(run, toy, "test", ["MRR@10"])
    (warning,) = [w for w in kept["warnings"] if "own id first" in w]
    assert warning.startswith("2 of 2 queries") and "eval.ignore_identical_ids: true" in warning
    dropped = score(run, toy, "test", ["MRR@10"], ignore_identical_ids=True)
    assert not any("own id first" in w for w in dropped["warnings"])


def test_absent_judged_documents_count_as_in_beir(toy, tmp_path):
    qrels = "qa\td1\t1\nqa\tgone\t1\nqc\tgone\t1\nghost\td1\t1\n"
    (toy / "qrels" / "test.tsv").write_text(qrels)
    result = score(tmp_path / "run.trec", toy, "test", ["P@1", "MAP", "map@5"])
    assert result["queries"] == 2 and result["per_query"]["qc"]["MAP"] == 0.0
    assert set(result["metrics"]) == {"P@1", "MAP", "MAP@5"}
    # qa ranks qa, d2, d1, ...: d1 at rank 3, 'gone' never; two relevant documents
    assert result["per_query"]["qa"]["P@1"] == 0.0
    assert result["per_query"]["qa"]["MAP"] == pytest.approx((1 / 3) / 2)
    # qc judges only an absent passage: it is not embedded, and not reported as a broken run
    assert any("1 queries judge only absent documents" in w for w in result["warnings"])
    assert not any("no results in the run" in w for w in result["warnings"])
    assert any("absent from the corpus" in w for w in result["warnings"])
    assert any("unknown queries" in w for w in result["warnings"])


def test_parse_metric():
    assert parse_metric("ndcg@10") == ("nDCG@10", "ndcg_cut", 10)
    assert parse_metric("RECALL@100") == ("Recall@100", "recall", 100)
    assert parse_metric("mrr@10") == ("MRR@10", "recip_rank", 10)
    assert parse_metric("map") == ("MAP", "map", None)
    assert parse_metric("Map@5") == ("MAP@5", "map_cut", 5)
    assert parse_metric("p@5") == ("P@5", "P", 5)
    for bad in ("bleu@4", "ndcg", "ndcg@0", "ndcg@ten", "mrr", "recall", "p"):
        with pytest.raises(ValueError, match="supported: nDCG@k"):
            parse_metric(bad)


def test_run_file_errors(tmp_path):
    (tmp_path / "bad.trec").write_text("q1 Q0 d1 1 0.5 tag\nq1 Q0 d2 2\n")
    with pytest.raises(ValueError, match="bad.trec line 2"):
        read_run(tmp_path / "bad.trec")


def test_a_run_repeating_a_pair_keeps_its_best_score(tmp_path, caplog):
    run = tmp_path / "run.trec"
    run.write_text("q1 Q0 d1 1 0.5 t\nq1 Q0 d2 2 0.4 t\nq1 Q0 d1 3 0.9 t\nq1 Q0 d2 4 0.1 t\n")
    with caplog.at_level("WARNING"):
        assert read_run(run) == {"q1": {"d1": 0.9, "d2": 0.4}}
    assert "2 repeated (query, document) pairs; kept the best score" in caplog.text


def test_depth_cuts_after_the_query_itself_is_dropped(toy, tmp_path):
    # qa's run: qa (itself), d2, d1, d4, d3; judged d1 = 1, d3 = 2
    run = tmp_path / "run.trec"
    dropped = score(run, toy, "test", ["MAP"], ignore_identical_ids=True, depth=3)
    assert dropped["per_query"]["qa"]["MAP"] == pytest.approx((1 / 2) / 2)  # d2, d1, d4
    deeper = score(run, toy, "test", ["MAP"], ignore_identical_ids=True, depth=4)
    assert deeper["per_query"]["qa"]["MAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)  # ... d3
    kept = score(run, toy, "test", ["MAP"], depth=3)
    assert kept["per_query"]["qa"]["MAP"] == pytest.approx((1 / 3) / 2)  # qa, d2, d1


def test_an_embed_folder_whose_ids_and_vectors_disagree_is_refused(tmp_path):
    """Else every id after the gap would be paired with another passage's vector."""
    corpus = np.eye(4, dtype=np.float16)[:2]
    _write_embeddings(tmp_path / "emb", corpus, corpus[:1], shard_size=2, doc_ids=list("abc"))
    with pytest.raises(ValueError, match=r"shards hold 2 vectors but corpus_ids\.json has 3"):
        search(tmp_path / "emb", tmp_path / "run", k=1, device="cpu")
    assert not (tmp_path / "run" / "run.trec").exists()


def test_one_shard_keeps_k_and_orders_ties_by_doc_id(tmp_path):
    corpus = np.eye(4, dtype=np.float16)
    corpus = np.concatenate([corpus, corpus[:1]])  # rows 0 and 4: the same vector
    _write_embeddings(tmp_path / "emb", corpus, corpus[:1], shard_size=5, doc_ids=list("zbcda"))
    search(tmp_path / "emb", tmp_path / "run", k=3, device="cpu")
    rows = _read_trec(tmp_path / "run" / "run.trec")
    assert [r[3] for r in rows] == ["1", "2", "3"]
    assert [r[2] for r in rows[:2]] == ["z", "a"]  # the tie at score 1, as trec_eval orders it


def test_a_depth_cut_keeps_the_tie_trec_eval_ranks_first(tmp_path):
    root = write_beir(
        tmp_path / "beir",
        [{"_id": d, "text": d} for d in ("a", "b", "c")],
        [{"_id": "q", "text": "q"}],
        [("q", "a", 1)],
    )
    run = tmp_path / "run.trec"
    run.write_text("q Q0 a 1 0.5 t\nq Q0 b 2 0.5 t\nq Q0 c 3 0.1 t\n")
    # trec_eval ranks the tie b before a: P@1 is 0, and a cut to depth 1 keeps b, not a
    assert score(run, root, "test", ["P@1"])["per_query"]["q"]["P@1"] == 0.0
    assert score(run, root, "test", ["MAP"], depth=1)["per_query"]["q"]["MAP"] == 0.0


def test_torch_search_scores_16_bit_vectors_in_float32():
    """float16 vectors, as the embed stages store them, score as float32 sums: 4096 terms summed
    in float16 would be off by about 1e-2 (on a GPU too, where one is present)."""
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((50, 4096)).astype(np.float16)
    queries = rng.standard_normal((3, 4096)).astype(np.float16)
    exact = queries.astype(np.float64) @ corpus.astype(np.float64).T
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        scores, rows = search_module.torch_topk(queries, corpus, 5, device)
        assert scores.dtype == np.float32
        np.testing.assert_allclose(scores, np.take_along_axis(exact, rows, 1), rtol=0, atol=1e-3)
        assert (rows == np.argsort(-exact, 1)[:, :5]).all()


def test_ties_at_the_kth_place_do_not_depend_on_engine_or_shards(tmp_path):
    # Exact duplicates (common in Quora, MS MARCO) tie; integer vectors score exactly on any engine.
    rng = np.random.default_rng(5)
    corpus = rng.integers(-1, 2, (6, 4))[rng.integers(0, 6, 60)].astype(np.float16)
    queries = np.concatenate([rng.integers(-1, 2, (8, 4)), np.zeros((1, 4))]).astype(np.float16)
    doc_ids = [f"d{i}" for i in rng.permutation(60)]  # ids out of corpus order
    exact = queries.astype(np.float32) @ corpus.astype(np.float32).T
    for k in (1, 5, 13):
        # brute force in trec_eval's order: score, then doc id, both descending
        want = [sorted(zip(row.tolist(), doc_ids, strict=True), reverse=True)[:k] for row in exact]
        for shard_size in (60, 16, 7, 2):
            emb = tmp_path / f"emb-{k}-{shard_size}"
            _write_embeddings(emb, corpus, queries, shard_size, doc_ids)
            for backend in ("faiss", "torch"):
                search(emb, emb / backend, k=k, device="cpu", backend=backend)
                rows = _read_trec(emb / backend / "run.trec")
                got = [[(float(r[4]), r[2]) for r in rows if r[0] == f"q{q}"] for q in range(9)]
                assert got == want, (k, shard_size, backend)


def test_duplicates_in_two_shards_keep_trec_order_when_one_shard_searches_deeper(tmp_path):
    """Real-valued unit vectors: an engine scores a passage a step apart in a batch of queries
    and in the one tied query searched again, so the scores must come from one routine."""
    rng = np.random.default_rng(1)
    corpus = rng.standard_normal((400, 4096))
    queries = rng.standard_normal((32, 4096))  # FAISS takes BLAS for 20 queries or more
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    corpus, queries = corpus.astype(np.float16), queries.astype(np.float16)
    copies = [3, 10, 20, 30, 40, 50, 250, 260, 270]  # six in the first shard: it ties at k = 5
    corpus[copies] = queries[0]
    doc_ids = [f"d{400 - i:04d}" for i in range(400)]  # the second shard's ids sort higher
    _write_embeddings(tmp_path / "emb", corpus, queries, shard_size=200, doc_ids=doc_ids)
    want = sorted((doc_ids[i] for i in copies), reverse=True)[:5]
    for backend in ("faiss", "torch"):
        search(tmp_path / "emb", tmp_path / backend, k=5, device="cpu", backend=backend)
        rows = [r for r in _read_trec(tmp_path / backend / "run.trec") if r[0] == "q0"]
        assert [r[2] for r in rows] == want, backend
        assert len({r[4] for r in rows}) == 1, backend  # one score for the one vector


@pytest.mark.parametrize("margin", [0, search_module.CANDIDATE_MARGIN])
def test_a_passage_an_engine_scores_level_with_duplicates_does_not_hide_them(monkeypatch, margin):
    """Twelve copies of a passage and a near copy X that float32 engines score level with them
    (exactly lower): wherever the engine cuts, the copies all stay ahead of X."""
    monkeypatch.setattr(search_module, "CANDIDATE_MARGIN", margin)
    rng = np.random.default_rng(2)
    dim, n = 768, 2053
    corpus = (rng.standard_normal((n, dim)) / np.sqrt(dim)).astype(np.float16)
    query = (rng.standard_normal((1, dim)) / np.sqrt(dim)).astype(np.float16)
    copy = query[0].copy()
    copy[10] = 0
    copies = [0, 1, 7, 15, 16, 17, 500, 1023, 1024, 2047, 2048, 2052]
    corpus[copies] = copy
    corpus[5] = copy
    corpus[5, 10] = -np.sign(query[0, 10]) * 7 * 2.0**-24  # a float16 step below the copies
    ids = np.array([f"d{i:04d}" for i in range(n)], dtype=object)
    exact = query.astype(np.float64) @ corpus.astype(np.float64).T
    engine = search_module.ShardSearch(corpus, "faiss-cpu").topk(query, 13)[0][0]
    assert engine[-1] == engine[0] and exact[0, 5] < exact[0, 0]  # level for FAISS, not exactly
    for k in (5, 11, 12):
        want = sorted(ids[copies], reverse=True)[:k]
        for engine in ("faiss-cpu", "torch"):
            for bounds in ((0, n), (0, 5, 6, n)):  # one shard; X in a shard of its own
                parts = [
                    search_module.shard_topk(
                        query, ids[a:b], search_module.ShardSearch(corpus[a:b], engine), k
                    )
                    for a, b in zip(bounds, bounds[1:], strict=False)
                ]
                got = merge_topk(parts, k)[1][0].tolist()
                assert got == want, (k, engine, bounds)


def test_a_document_an_engine_scores_its_whole_error_low_still_ties_after_rounding(monkeypatch):
    """x's exact score is below the k-th (1.0) but rounds to it in float32, and an engine may
    score x up to its error lower, level with b: the search must go on to fetch x."""
    monkeypatch.setattr(search_module, "CANDIDATE_MARGIN", 0)
    longest = 1 + 0.75 * 2.0**-8  # max|p|: a slack of 2^-16 and 0.75 of a float32 step
    slack = search_module.ENGINE_ERROR["cpu"] * longest  # for |q| = 1
    floor = np.float32(1 - slack)
    while np.float64(floor) + slack >= 1.0:
        floor = np.nextafter(floor, np.float32(0))
    x = np.float64(floor) + slack
    assert x < 1.0 and np.float32(x) == 1.0
    corpus = np.array([[1.0, 0.0], [floor, 0.0], [x, 0.0], [0.0, longest]])
    ids = np.array(["a", "b", "x", "z"])

    class Engine(search_module.ShardSearch):
        def topk(self, queries, k):  # exact but for x, scored its whole error low
            scores = np.array([[1.0, floor, floor, 0.0]], np.float32)
            return scores[:, :k], np.array([[0, 1, 2, 3]])[:, :k]

    _, got = search_module.shard_topk(np.array([[1.0, 0.0]]), ids, Engine(corpus, "faiss-cpu"), 1)
    assert got[0, 0] == "x"  # tied with a at 1.0 in float32, and the larger id


def test_a_longer_id_found_by_a_deeper_search_is_kept_whole(monkeypatch):
    monkeypatch.setattr(search_module, "CANDIDATE_MARGIN", 0)
    corpus = np.ones((8, 4), dtype=np.float16)  # all tied: searched to the end
    ids = np.array(["a", "b", "c", "d", "e", "f", "g", "zzzzzz"], dtype=object)
    shard = search_module.ShardSearch(corpus, "faiss-cpu")
    _, got = search_module.shard_topk(np.ones((1, 4), dtype=np.float16), ids, shard, k=2)
    assert got[0].tolist() == ["zzzzzz", "g", "f"]


def test_only_a_query_tied_at_the_kth_place_is_searched_deeper(monkeypatch):
    eye = np.eye(4, dtype=np.float16)
    corpus = np.concatenate([eye[:1] * 3, eye[:1] * 2, eye[:1], np.repeat(eye[3:], 17, axis=0)])
    ids = np.array([f"d{i:02d}" for i in range(20)])
    shard = search_module.ShardSearch(corpus, "faiss-cpu")
    search_engine = shard.topk
    calls = []

    def counted(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        calls.append((len(queries), k))
        return search_engine(queries, k)

    shard.topk = counted
    monkeypatch.setattr(search_module, "CANDIDATE_MARGIN", 0)  # k + 1 fetched at first
    scores, got = search_module.shard_topk(eye[[0, 3]], ids, shard, k=2)
    # scores 3, 2, 1: one search of k + 1; 17 documents at 1: doubling until the shard ends
    assert calls == [(2, 3), (1, 6), (1, 12), (1, 20)]
    assert got[:, :2].tolist() == [["d00", "d01"], ["d19", "d18"]]
    assert scores[:, :2].tolist() == [[3, 2], [1, 1]]

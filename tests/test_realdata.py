"""all-MiniLM-L6-v2 on BEIR SciFact through embed → search → score: the published figure."""

import pytest
from conftest import SHARED_DATA

from readaptir.families import resolve_encoding
from readaptir.stages.embed import embed
from readaptir.stages.score import score
from readaptir.stages.search import search

pytestmark = pytest.mark.slow

SCIFACT = SHARED_DATA / "scifact"


@pytest.mark.skipif(not SCIFACT.is_dir(), reason=f"SciFact not found at {SCIFACT}")
def test_minilm_scifact_matches_mteb(tmp_path, minilm_dir):
    (tmp_path / "emb").mkdir()
    (tmp_path / "run").mkdir()
    encoding = resolve_encoding("sentence-transformers", dataset="scifact")
    info = embed(minilm_dir, SCIFACT, "test", encoding, tmp_path / "emb")
    assert info["passages"] == 5183 and info["queries"] == 300
    metrics = ["nDCG@10", "Recall@100"]
    search(tmp_path / "emb", tmp_path / "run", k=100)
    result = score(tmp_path / "run" / "run.trec", SCIFACT, "test", metrics)
    assert result["queries"] == 300
    # MTEB leaderboard: 64.51 for sentence-transformers/all-MiniLM-L6-v2 on SciFact
    assert result["metrics"]["nDCG@10"] == pytest.approx(0.6451, abs=5e-4)

    # The torch search engine (the one used on GPUs whose FAISS lacks GPU support) agrees.
    search(tmp_path / "emb", tmp_path / "torch", k=100, device="cpu", backend="torch")
    again = score(tmp_path / "torch" / "run.trec", SCIFACT, "test", metrics)
    for name in metrics:
        assert again["metrics"][name] == pytest.approx(result["metrics"][name], abs=1e-6)

"""Exact inner-product search over sharded embeddings, written as a TREC run file."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from readaptir.stages.embed import load_embeddings, load_queries_embeddings

LOG = logging.getLogger(__name__)

RUN_FILE = "run.trec"
RUN_TAG = "readaptir"


def merge_topk(
    parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Global top-``k`` from per-shard top lists.

    ``parts`` holds (scores [queries, n_i], doc_ids [queries, n_i]) per shard. Returns (scores,
    doc_ids), each [queries, min(k, sum n_i)], by score descending with ties broken by doc id
    descending: the order trec_eval gives tied scores, so written ranks agree with how they score.
    """
    scores = np.concatenate([np.asarray(s, dtype=np.float32) for s, _ in parts], axis=1)
    ids = np.concatenate([np.asarray(d, dtype=str) for _, d in parts], axis=1)
    # lexsort's last key is the primary one; reversing an ascending sort gives both descending.
    order = np.lexsort((ids, scores), axis=1)[:, ::-1][:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def _index(dim: int, use_gpu: bool):
    import faiss

    index = faiss.IndexFlatIP(dim)
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    return index


def _gpus_wanted(device: str | None) -> bool:
    if device == "cpu":
        return False
    import faiss

    return getattr(faiss, "get_num_gpus", lambda: 0)() > 0


def search_shards(
    embeddings_dir: Path, k: int, device: str | None = None
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(query ids, scores [queries, k'], doc ids [queries, k']) over every corpus shard."""
    if k < 1:
        raise ValueError("k must be positive")
    query_ids, queries = load_queries_embeddings(embeddings_dir)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    use_gpu = _gpus_wanted(device)
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    for shard_ids, vecs in load_embeddings(embeddings_dir):
        index = _index(vecs.shape[1], use_gpu)
        index.add(np.ascontiguousarray(vecs, dtype=np.float32))
        scores, rows = index.search(queries, min(k, len(shard_ids)))
        parts.append((scores, np.asarray(shard_ids, dtype=str)[rows]))
        # Keep only a running top-k, so memory stays at two shards' worth of results.
        parts = [merge_topk(parts, k)]
    if not parts:
        raise ValueError(f"{embeddings_dir}: no corpus shards")
    scores, doc_ids = parts[0]
    return query_ids, scores, doc_ids


def format_run(query_ids: Sequence[str], scores: np.ndarray, doc_ids: np.ndarray) -> str:
    """TREC run lines ``qid Q0 docid rank score tag``, ranks from 1."""
    lines = []
    for qid, row_scores, row_ids in zip(query_ids, scores, doc_ids, strict=True):
        for rank, (score, did) in enumerate(zip(row_scores, row_ids, strict=True), start=1):
            # %.9g round-trips float32, so scoring sees exactly the order written here.
            lines.append(f"{qid} Q0 {did} {rank} {score:.9g} {RUN_TAG}")
    return "".join(line + "\n" for line in lines)


def search(embeddings_dir: Path, out: Path, *, k: int = 100, device: str | None = None) -> None:
    """Exact top-``k`` passages for every query of an ``embed`` folder, into ``out/run.trec``."""
    query_ids, scores, doc_ids = search_shards(embeddings_dir, k, device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(format_run(query_ids, scores, doc_ids), encoding="utf-8")
    LOG.info("wrote top-%d for %d queries to %s", k, len(query_ids), out / RUN_FILE)

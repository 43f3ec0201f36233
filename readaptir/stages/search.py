"""Exact inner-product search over sharded embeddings, written as a TREC run file.

Three interchangeable engines fetch each shard's candidates, from which ``shard_topk`` keeps the
exact top-k in trec_eval's order (ties by doc id) and ``merge_topk`` the top-k of all shards, the
same whatever the engine or the shard size:

- ``faiss`` on CPU (``IndexFlatIP``), the reference;
- ``faiss`` on GPU, when the installed FAISS was built with GPU support, on the one GPU the device
  names;
- ``torch``: chunked matrix products and ``topk`` on the GPU, for machines whose FAISS has no GPU
  support. Float16/bfloat16 inputs, float32 scores (accumulated in float32 where the GPU supports
  a float32 output, else rounded from a 16-bit product). On CPU it runs in float32.

``backend="auto"`` takes FAISS-GPU, else torch on CUDA, else FAISS-CPU. The engine only fetches
each shard's candidates; the scores ranked and written are theirs taken again by one float64
routine (``ShardSearch.scores``), so a passage scores the same in every shard and search, on any
engine, and a query is searched deeper while a document not fetched could, within the engine's
error (``ENGINE_ERROR``), still reach the k-th score (``shard_topk``).
"""

from __future__ import annotations

import functools
import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from readaptir.vectors import load_embeddings, load_queries_embeddings

LOG = logging.getLogger(__name__)

RUN_FILE = "run.trec"
RUN_TAG = "readaptir"
BACKENDS = ("auto", "faiss", "torch")
# Chunk sizes for the torch engine: a [queries, passages] float32 score block is at most
# 1024 x 65536 x 4 bytes = 256 MiB.
QUERY_CHUNK = 1024
PASSAGE_CHUNK = 65536
# The largest k FAISS searches with on a GPU (its GPU_MAX_SELECTION_K).
FAISS_GPU_MAX_K = 2048
# Candidates scored again at once, [queries, candidates, dim] float64 elements: on a CPU few
# enough to stay in cache (4 MiB blocks scored 500 queries x 101 candidates x 4096 dimensions
# 3.7x faster than 256 MiB ones on a 2-core CPU), on a GPU enough to keep it busy (256 MiB)
SCORE_ELEMENTS = {"cpu": 1 << 19, "cuda": 1 << 25}
# How far an engine's float32 score may be from the exact inner product, as a share of
# |q|·max|p|: float32 sums on a CPU were within 2^-20.6 for random vectors and 2^-18.5 for
# same-sign ones (FAISS and torch, 256 to 4096 dimensions), float16 products summed in float32 on
# an H100 within 2^-15.8 (bench/search.py (d)); a float16 product rounds to 2^-11 of itself
ENGINE_ERROR = {"cpu": 2.0**-16, "cuda": 2.0**-12, "cuda-float16-output": 2.0**-10}
# Candidates fetched past the k + 1 a shard returns, so that documents within an engine's error
# of the k-th score are nearly always among them without a deeper search: at least 16, k / 8
CANDIDATE_MARGIN = 16
_WHITESPACE = re.compile(r"\s")


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


def faiss_topk(
    queries: np.ndarray, corpus: np.ndarray, k: int, use_gpu: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, row indices) [queries, k] of the exact inner-product top-``k`` with FAISS."""
    engine, device = ("faiss-gpu", "cuda") if use_gpu else ("faiss-cpu", "cpu")
    return ShardSearch(corpus, engine, device).topk(queries, k)


class ShardSearch:
    """Exact searches of one corpus shard with ``engine`` (see ``choose_backend``): FAISS builds
    its index once for them all, torch moves the shard to the device once."""

    def __init__(self, corpus: np.ndarray, engine: str, device: str = "cpu") -> None:
        self.engine = engine
        corpus = np.ascontiguousarray(corpus, dtype=corpus.dtype.newbyteorder("="))
        # the vectors the torch engine searches and every engine's candidates are scored from:
        # FAISS on CPU scores them from the stored array itself (16-bit ones gathered as they are)
        if engine == "faiss-cpu":
            with warnings.catch_warnings():  # a read-only array: it is only ever read
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                self.vectors = torch.from_numpy(corpus)
        else:
            self.vectors = device_passages(corpus, device)
        on_gpu = engine == "faiss-gpu" or self.vectors.device.type != "cpu"
        self.error = ENGINE_ERROR["cuda" if on_gpu else "cpu"]
        gpu16 = on_gpu and self.vectors.dtype == torch.float16
        if gpu16 and not float32_output(self.vectors.device.type):
            self.error = ENGINE_ERROR["cuda-float16-output"]  # torch's engine rounds to float16
        self.index = None
        if engine == "torch":
            self.max_norm = max_norm(self.vectors)
        else:
            import faiss

            flat = np.ascontiguousarray(corpus, dtype=np.float32)
            self.max_norm = max_norm(torch.from_numpy(flat))  # float32 norms are fast on a CPU
            index = faiss.IndexFlatIP(corpus.shape[1])
            if engine == "faiss-gpu":
                index = faiss_gpu_index(index, device)
            index.add(flat)
            self.index = index

    def topk(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(engine scores, row indices) [queries, k], best first."""
        if self.index is None or (self.engine == "faiss-gpu" and k > FAISS_GPU_MAX_K):
            return torch_topk(queries, self.vectors, k, str(self.vectors.device))
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def slack(self, queries: np.ndarray) -> np.ndarray:
        """float64 [queries]: how far below an engine score the exact one may lie, at most."""
        norms = np.linalg.norm(np.asarray(queries, dtype=np.float64), axis=1)
        return self.error * norms * self.max_norm

    def scores(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """float32 [queries, n]: each query's inner product with its ``rows``, summed in float64
        and rounded once.

        An engine's own scores depend on how it was called (FAISS takes BLAS for 20 queries or
        more, another loop below; a GPU matrix product picks its kernel by shape), so the same
        passage could score a step apart in two shards or two searches, enough to reorder exact
        duplicates. Products of 16-bit values are exact multiples of 2^-48, so their float64 sum
        is exact (while the sum of their magnitudes stays below 32, as for unit vectors) and
        identical 16-bit vectors, which the embed stage stores, score identically in every call.
        For float32 vectors the float64 sum is off by far less than a float32 step, which the
        rounding hides unless the value lies that close to a rounding boundary.
        """
        vectors = self.vectors
        q_all = torch.from_numpy(np.ascontiguousarray(queries)).to(vectors.device, torch.float64)
        rows_all = torch.from_numpy(np.ascontiguousarray(rows)).to(vectors.device)
        dim, width = vectors.shape[1], rows.shape[1]
        block = SCORE_ELEMENTS["cpu" if vectors.device.type == "cpu" else "cuda"]
        # blocks of whole queries' candidates, or of one query's when a deep search has many
        q_step = max(1, block // max(1, width * dim))
        c_step = max(1, block // dim)
        out = torch.empty(rows.shape, dtype=torch.float32, device=vectors.device)
        with torch.inference_mode():
            for qs in range(0, len(rows_all), q_step):
                q = q_all[qs : qs + q_step, :, None]
                for cs in range(0, width, c_step):
                    candidates = vectors[rows_all[qs : qs + q_step, cs : cs + c_step]].double()
                    out[qs : qs + q_step, cs : cs + c_step] = torch.bmm(candidates, q)[..., 0]
        return out.cpu().numpy()


def faiss_gpu_index(index, device: str):
    """``index`` copied to the one GPU ``device`` names ("cuda": the current one; FAISS numbers
    GPUs as CUDA does), with the GPU resources of ``faiss_resources``."""
    import faiss

    gpu = torch.device(device).index
    return faiss.index_cpu_to_gpu(
        faiss_resources(), torch.cuda.current_device() if gpu is None else gpu, index
    )


@functools.cache
def faiss_resources():
    """FAISS's GPU resources, made once per process: every shard's index shares them, rather than
    reserving FAISS's scratch memory and making its cuBLAS handles again shard after shard."""
    import faiss

    return faiss.StandardGpuResources()


def max_norm(vectors: torch.Tensor) -> float:
    """The largest row norm of ``vectors``, in float32 blocks of ``PASSAGE_CHUNK`` rows."""
    largest = 0.0
    with torch.inference_mode():
        for start in range(0, len(vectors), PASSAGE_CHUNK):
            block = vectors[start : start + PASSAGE_CHUNK].float()
            largest = max(largest, float(torch.linalg.vector_norm(block, dim=1).max()))
    return largest


def device_passages(corpus: np.ndarray, device: str) -> torch.Tensor:
    """``corpus`` on ``device`` in the dtype the torch engine multiplies in: float16 stays float16
    on a GPU; CPU matrix products in 16 bits are slow and gain nothing, so float32 there."""
    on_gpu = torch.device(device).type != "cpu"
    dtype = torch.float16 if on_gpu and corpus.dtype == np.float16 else torch.float32
    return torch.from_numpy(np.ascontiguousarray(corpus)).to(device, dtype)


def torch_topk(
    queries: np.ndarray,
    corpus: np.ndarray | torch.Tensor,
    k: int,
    device: str = "cuda",
    *,
    query_chunk: int = QUERY_CHUNK,
    passage_chunk: int = PASSAGE_CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, row indices) [queries, k] of the exact inner-product top-``k`` with torch.

    Works through [query_chunk, passage_chunk] score blocks, keeping a running top-k per query, so
    memory stays at one block whatever the shard size. ``corpus`` may already be on the device
    (``device_passages``).
    """
    k = min(k, len(corpus))
    passages = corpus if isinstance(corpus, torch.Tensor) else device_passages(corpus, device)
    q_all = torch.from_numpy(np.ascontiguousarray(queries)).to(device, passages.dtype)
    top_scores: list[torch.Tensor] = []
    top_rows: list[torch.Tensor] = []
    with torch.inference_mode():
        for qs in range(0, len(q_all), query_chunk):
            q = q_all[qs : qs + query_chunk]
            best_s = torch.full((len(q), 0), 0.0, device=device)
            best_i = torch.zeros((len(q), 0), dtype=torch.long, device=device)
            for ps in range(0, len(passages), passage_chunk):
                scores = _inner_products(q, passages[ps : ps + passage_chunk])
                s, i = scores.topk(min(k, scores.shape[1]), dim=1)
                cand_s, cand_i = torch.cat([best_s, s], 1), torch.cat([best_i, i + ps], 1)
                best_s, pick = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
                best_i = cand_i.gather(1, pick)
            top_scores.append(best_s)
            top_rows.append(best_i)
    if not top_scores:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return torch.cat(top_scores).cpu().numpy(), torch.cat(top_rows).cpu().numpy()


def _inner_products(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """q @ p.T as float32: 16-bit inputs with a float32 result where the backend offers one."""
    if q.dtype == torch.float32:
        return q @ p.T
    if float32_output(q.device.type):
        return torch.mm(q, p.T, out_dtype=torch.float32)
    return (q @ p.T).float()


@functools.cache
def float32_output(device_type: str) -> bool:
    """Whether this PyTorch multiplies float16 matrices into a float32 result (accumulated in
    float32) on ``device_type``: CUDA from PyTorch 2.8 on."""
    a = torch.ones(2, 2, dtype=torch.float16, device=device_type)
    try:
        torch.mm(a, a, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def shard_topk(
    queries: np.ndarray, doc_ids: np.ndarray | Sequence[str], shard: ShardSearch, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, doc ids) [queries, min(k + 1, n)] of one shard of ``n`` documents, among them its
    top ``k`` in trec_eval's order, for ``merge_topk`` to pick.

    The engine fetches candidates; their scores are taken again by ``ShardSearch.scores``, one
    routine for every shard and search, and ranked with ties by doc id. An engine's own order
    cannot decide which documents tied at the k-th score survive (duplicate passages are common):
    its scores are a rounding away from the exact ones, and it breaks ties its own way. So a
    query is searched again, twice as deep each time, until the engine scores every document not
    fetched at least ``slack`` below the k-th exact score, or the shard is exhausted. Fetching
    max(``CANDIDATE_MARGIN``, k / 8) more than needed spares nearly every query that second search.
    Whatever lies past the top k is outranked by k documents, so the merge never keeps it.
    """
    doc_ids = np.asarray(doc_ids, dtype=str)  # one width of string for every search's ids
    n = len(doc_ids)
    width = min(k + 1, n)

    def ranked(queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores, ids) ranked, and the lowest engine score fetched, per query."""
        engine_scores, rows = shard.topk(queries, depth)
        scores, ids = merge_topk([(shard.scores(queries, rows), doc_ids[rows])], depth)
        return scores, ids, engine_scores[:, -1]

    depth = min(width + max(CANDIDATE_MARGIN, k // 8), n)
    scores, ids, floor = ranked(queries, depth)
    if depth == n:  # the whole shard: exact
        return scores[:, :width], ids[:, :width]
    slack = shard.slack(queries)
    scores, ids = scores[:, :width].copy(), ids[:, :width].copy()
    # open: a document not fetched might still score the k-th score or more
    # (in float32, as the scores are: a document within half a step below rounds to a tie)
    open_ = np.flatnonzero(reach(floor, slack) >= scores[:, k - 1])
    while len(open_):
        depth = min(2 * depth, n)
        deep_scores, deep_ids, floor = ranked(queries[open_], depth)
        scores[open_], ids[open_] = deep_scores[:, :width], deep_ids[:, :width]
        open_ = open_[(reach(floor, slack[open_]) >= deep_scores[:, k - 1]) & (depth < n)]
    return scores, ids


def reach(floor: np.ndarray, slack: np.ndarray) -> np.ndarray:
    """The highest float32 score a document the engine scored at most ``floor`` may have."""
    return (floor.astype(np.float64) + slack).astype(np.float32)


def choose_backend(device: str | None, backend: str = "auto") -> tuple[str, str]:
    """(engine, device) for a search: engine is ``faiss-cpu``, ``faiss-gpu`` or ``torch``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown search backend {backend!r}; expected one of {BACKENDS}")
    wants_gpu = device not in ("cpu",)
    torch_device = "cuda" if device in (None, "auto") else device
    if backend == "torch":
        return "torch", torch_device if wants_gpu and _cuda() else "cpu"
    if wants_gpu and _cuda() and _faiss_gpus() > 0:  # torch holds the shard for the rescoring
        return "faiss-gpu", torch_device
    if backend == "auto" and wants_gpu and _cuda():
        return "torch", torch_device
    return "faiss-cpu", "cpu"


def _faiss_gpus() -> int:
    import faiss

    return getattr(faiss, "get_num_gpus", lambda: 0)()


def _cuda() -> bool:
    return torch.cuda.is_available()


def search_shards(
    embeddings_dir: Path,
    k: int,
    device: str | None = None,
    backend: str = "auto",
    queries_dir: Path | None = None,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(query ids, scores [queries, k'], doc ids [queries, k']) over every corpus shard; the
    queries from ``queries_dir`` (default: the corpus's folder)."""
    if k < 1:
        raise ValueError("k must be positive")
    query_ids, queries = load_queries_embeddings(queries_dir or embeddings_dir)
    engine, where = choose_backend(device, backend)
    LOG.info("exact top-%d search with %s on %s", k, engine, where)
    best: tuple[np.ndarray, np.ndarray] | None = None
    for shard_ids, vecs in load_embeddings(embeddings_dir):
        if vecs.shape[1] != queries.shape[1]:
            raise ValueError(
                f"{embeddings_dir}: passage vectors of size {vecs.shape[1]}, but the queries' "
                f"are of size {queries.shape[1]}: embedded by different models"
            )
        part = shard_topk(queries, shard_ids, ShardSearch(vecs, engine, where), k)
        # Keep only a running top-k, so memory stays at two shards' worth of results.
        best = merge_topk([part] if best is None else [best, part], k)
    if best is None:
        raise ValueError(f"{embeddings_dir}: no corpus shards")
    return query_ids, best[0], best[1]


def format_run(query_ids: Sequence[str], scores: np.ndarray, doc_ids: np.ndarray) -> str:
    """TREC run lines ``qid Q0 docid rank score tag``, ranks from 1, as trec_eval reads them."""
    lines = []
    for qid, row_scores, row_ids in zip(query_ids, scores, doc_ids, strict=True):
        _check_id(qid, "query")
        for rank, (score, did) in enumerate(zip(row_scores, row_ids, strict=True), start=1):
            _check_id(did, "document")
            # %.9g round-trips float32, so scoring sees exactly the order written here.
            lines.append(f"{qid} Q0 {did} {rank} {score:.9g} {RUN_TAG}")
    return "".join(line + "\n" for line in lines)


def _check_id(value: str, what: str) -> None:
    # trec_eval splits lines on whitespace: such an id would shift every later column.
    value = str(value)
    if not value or _WHITESPACE.search(value):
        raise ValueError(f"{what} id {value!r} is empty or holds whitespace; a TREC run cannot")


def search(
    embeddings_dir: Path,
    out: Path,
    *,
    k: int = 100,
    device: str | None = None,
    backend: str = "auto",
    queries_dir: Path | None = None,
) -> None:
    """Exact top-``k`` passages of an ``embed`` folder for every query of ``queries_dir`` (a
    ``queries`` stage's folder; default: the embed folder's own), into ``out/run.trec``."""
    query_ids, scores, doc_ids = search_shards(embeddings_dir, k, device, backend, queries_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(format_run(query_ids, scores, doc_ids), encoding="utf-8")
    LOG.info("wrote top-%d for %d queries to %s", k, len(query_ids), out / RUN_FILE)

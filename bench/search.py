"""Exact search on a GPU: readaptir's torch engine against a float64 reference and a memory floor.

Random unit vectors stored as float16 (as the embed stage stores them) play the corpus; each query
is a noisy copy of one passage, so every query has a clear nearest neighbour and a tail of close
scores. Printed, all from the same run:

  (a) the torch engine (``readaptir.stages.search.torch_topk``): seconds and passages scored/s;
  (b) the memory floor: one pass over the corpus on the device (a sum over its bytes);
  (c) the ratio a/b;
  (d) agreement with a float64 reference: the share of the reference's top-k found, whether each
      query's planted passage ranks first, and the largest score difference;
  (e) the corpus searched as one shard the way the search stage does (``shard_topk``: the engine's
      candidates on the resident shard, scored again in float64, deeper searches where a document
      not fetched could still reach the k-th score) against the engine's top k + 1 alone, and the
      float64 scoring of k + 1 candidates by itself. The engine is torch on a GPU (the stage's
      where FAISS has no GPU support) and FAISS on the CPU.

    python bench/search.py --tiny      # CPU smoke run, a few seconds
    python bench/search.py             # 1M x 4096 float16 (8 GB) on a GPU
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Sequence

import numpy as np
import torch
from shapes import best_of, use_tiny

from readaptir.stages.search import ShardSearch, shard_topk, torch_topk

TINY = dict(passages=20_000, dim=256, queries=200)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a small corpus for a smoke run (CPU)")
    ap.add_argument("--passages", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--queries", type=int, default=2_000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--noise", type=float, default=0.5, help="query = passage + noise (norm)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs, best kept")
    ap.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    use_tiny(ap, args, TINY)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def make_data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(corpus float16, queries float16, the passage each query was made from), drawn on the
    device (fast) and returned in host memory, where the embed stage leaves them."""
    dev = args.device
    gen = torch.Generator(dev).manual_seed(args.seed)
    corpus = torch.empty(args.passages, args.dim, dtype=torch.float16, device=dev)
    for start in range(0, args.passages, 65536):  # in blocks: float32 scratch stays small
        rows = min(65536, args.passages - start)
        block = torch.randn(rows, args.dim, generator=gen, device=dev)
        corpus[start : start + rows] = unit_rows(block).half()
    planted = torch.randint(args.passages, (args.queries,), generator=gen, device=dev)
    noise = torch.randn(args.queries, args.dim, generator=gen, device=dev)
    queries = unit_rows(corpus[planted].float() + unit_rows(noise) * args.noise).half()
    return corpus.cpu().numpy(), queries.cpu().numpy(), planted.cpu().numpy()


def reference_topk(
    corpus: np.ndarray, queries: np.ndarray, k: int, device: str
) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-k in float64, in passage blocks."""
    q = torch.from_numpy(queries).to(device, torch.float64)
    best_s = torch.empty(len(q), 0, dtype=torch.float64, device=device)
    best_i = torch.empty(len(q), 0, dtype=torch.long, device=device)
    for start in range(0, len(corpus), 65536):
        p = torch.from_numpy(corpus[start : start + 65536]).to(device).double()
        s, i = (q @ p.T).topk(min(k, len(p)), dim=1)
        cand_s, cand_i = torch.cat([best_s, s], 1), torch.cat([best_i, i + start], 1)
        best_s, pick = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
        best_i = cand_i.gather(1, pick)
    return best_s.cpu().numpy(), best_i.cpu().numpy()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    corpus, queries, planted = make_data(args)
    gb = corpus.nbytes / 1e9
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"corpus {args.passages:,} x {args.dim} float16 ({gb:.2f} GB), {args.queries:,} "
          f"queries, top-{args.k}; device: {name}")  # fmt: skip

    # the engine moves the corpus to the device itself: time it from host arrays, as a stage runs
    seconds, (scores, rows) = best_of(
        args.repeat, args.device, lambda: torch_topk(queries, corpus, args.k, args.device)
    )
    upload, resident = best_of(
        args.repeat, args.device, lambda: torch.from_numpy(corpus).to(args.device)
    )
    one_pass = functools.partial(resident.sum, dtype=torch.float32)
    floor, _ = best_of(args.repeat, args.device, one_pass)
    del resident
    scored = args.passages * args.queries
    print(f"(a) torch engine: {seconds:.3f} s, {scored / seconds:.3g} query-passage scores/s "
          f"(host-to-device copy of the corpus alone: {upload:.3f} s)")  # fmt: skip
    print(f"(b) memory floor, one pass over the corpus on the device: {floor:.4f} s "
          f"({gb / floor:.0f} GB/s)")  # fmt: skip
    print(f"(c) ratio a/b: {seconds / floor:.1f}; a minus the upload over b: "
          f"{max(seconds - upload, 0.0) / floor:.1f}")  # fmt: skip

    ref_scores, ref_rows = reference_topk(corpus, queries, args.k, args.device)
    found = np.mean([len(set(r) & set(g)) / len(g) for r, g in zip(rows, ref_rows, strict=True)])
    first = float(np.mean(rows[:, 0] == planted))
    error = float(np.abs(scores.astype(np.float64) - ref_scores).max())
    print(f"(d) agreement with float64: {found:.4%} of the reference top-{args.k} found; "
          f"planted passage first for {first:.2%} of queries; "
          f"largest score difference {error:.2e}")  # fmt: skip
    del scores, rows, ref_scores, ref_rows

    engine = "torch" if args.device.startswith("cuda") else "faiss-cpu"
    shard = ShardSearch(corpus, engine, args.device)
    ids = np.array([f"doc{i}" for i in range(args.passages)])
    found_alone, (_, rows) = best_of(
        args.repeat, args.device, lambda: shard.topk(queries, args.k + 1)
    )
    rescored, _ = best_of(args.repeat, args.device, lambda: shard.scores(queries, rows))
    staged, _ = best_of(args.repeat, args.device, lambda: shard_topk(queries, ids, shard, args.k))
    print(f"(e) {engine}, one resident shard: engine top-{args.k + 1} {found_alone:.3f} s; "
          f"as the stage searches (candidates scored again in float64, ties) {staged:.3f} s, "
          f"ratio {staged / found_alone:.3f}; float64 scoring alone {rescored:.3f} s")  # fmt: skip


if __name__ == "__main__":
    main()

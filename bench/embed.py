"""Corpus-embedding throughput: naive padded batches against readaptir's length-sorted batching.

A random-weight Llama (by default Llama-2-7B's shape) encodes the same synthetic passages twice in
one run, with last-token pooling and normalisation as RepLLaMA does:

  (a) naive: fixed batches of ``--batch-size`` passages in random order, each padded to its longest;
  (b) readaptir: ``readaptir.encoding``'s batches, longest first under a ``--batch-tokens`` budget.

Passage lengths imitate MS MARCO's (seeded log-normal, mean ~82 tokens, clipped). Printed per
method: passages/s, real (non-padding) tokens/s, the share of padding, and the fraction of the
arithmetic ceiling, 2 x (non-embedding parameters) FLOP per real token at the rate of large square
matmuls in the model's dtype measured in the same run, or at ``--peak-flops`` when given (an H100's
datasheet dense bf16 peak is 989e12); then the speed-up (b)/(a).

    python bench/embed.py --tiny        # CPU smoke run, a few seconds
    python bench/embed.py               # 7B shape in bf16, on a GPU with ~20 GB free
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from shapes import add_shape_options, apply_tiny, best_of, llama_config
from transformers import LlamaModel

from readaptir.encoding import encode_ids, plan_batches

TINY = dict(hidden=64, layers=2, heads=4, intermediate=172, vocab=1000, passages=512)


@dataclass(frozen=True)
class Result:
    name: str
    seconds: float
    passages: int
    real_tokens: int
    padded_tokens: int


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_shape_options(ap)
    ap.add_argument("--passages", type=int, default=4096)
    ap.add_argument("--mean-tokens", type=float, default=82.0)
    ap.add_argument("--sigma", type=float, default=0.5, help="log-normal shape")
    ap.add_argument("--min-tokens", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64, help="naive batches")
    ap.add_argument("--batch-tokens", type=int, default=16384, help="readaptir's token budget")
    ap.add_argument("--peak-flops", type=float, default=None, help="default: measured")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None)
    ap.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    apply_tiny(ap, args, TINY)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    return args


def passage_lengths(n: int, mean: float, sigma: float, lo: int, hi: int, seed: int) -> np.ndarray:
    """Seeded log-normal token counts with the given mean (before clipping to [lo, hi])."""
    rng = np.random.default_rng(seed)
    mu = math.log(mean) - sigma**2 / 2  # a log-normal's mean is exp(mu + sigma^2 / 2)
    return np.clip(np.rint(rng.lognormal(mu, sigma, n)), lo, hi).astype(int)


def random_model(args: argparse.Namespace) -> LlamaModel:
    config = llama_config(args, max_position_embeddings=max(4096, args.max_tokens))
    torch.manual_seed(args.seed)
    previous = torch.get_default_dtype()
    # Built directly on the device in the target dtype: no float32 copy of 7B weights on the host.
    torch.set_default_dtype(getattr(torch, args.dtype))
    try:
        with torch.device(args.device):
            model = LlamaModel(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def run(
    name: str,
    model: LlamaModel,
    seqs: list[list[int]],
    batches: list[list[int]],
    device: str,
) -> Result:
    encode = dict(pooling="last", normalize=True, pad_token=0, out_dtype=torch.float16)
    encode_ids(model, seqs, batches=batches[:2], **encode)  # warm-up: kernels, allocator
    seconds, _ = best_of(1, device, lambda: encode_ids(model, seqs, batches=batches, **encode))
    lengths = [len(s) for s in seqs]
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return Result(name, seconds, len(seqs), sum(lengths), padded)


def matmul_flops(device: str, dtype: torch.dtype, products: int = 20, repeat: int = 3) -> float:
    """FLOP/s of square matmuls in ``dtype`` (8192² on a GPU, 1024² on the CPU): ``products`` of
    them back to back after as many to warm up (clocks and kernels), best of ``repeat``."""
    cuda = torch.device(device).type == "cuda"
    n = 8192 if cuda else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds, _ = best_of(repeat, device, lambda: [a @ b for _ in range(products)], warmup=1)
    return 2 * n**3 / (seconds / products)


def report(args: argparse.Namespace, model: LlamaModel, lengths: np.ndarray, results: list) -> str:
    params = sum(p.numel() for p in model.parameters())
    matmul_params = params - model.embed_tokens.weight.numel()  # a lookup is no arithmetic
    ceiling = args.peak_flops / (2 * matmul_params)
    source = "given" if args.peak_flops_given else f"measured {args.dtype} matmul"

    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    lines = [
        f"model: random Llama, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
        f"intermediate {args.intermediate}, vocab {args.vocab}: {params / 1e9:.3g}B params "
        f"({matmul_params / 1e9:.3g}B outside the embedding), {args.dtype} on {where}",
        f"passages: {len(lengths)}, tokens mean {lengths.mean():.1f}, median "
        f"{np.median(lengths):.0f}, p99 {np.percentile(lengths, 99):.0f}, max {lengths.max()} "
        f"(log-normal sigma {args.sigma}, seed {args.seed})",
        f"ceiling: 2 x {matmul_params:.3g} FLOP/token at {args.peak_flops:.3g} FLOP/s "
        f"({source}) = {ceiling:,.0f} tokens/s",
        "",
        f"{'method':<40} {'passages/s':>11} {'tokens/s':>10} {'padding':>8} {'ceiling':>8}",
    ]
    for r in results:
        tokens_s = r.real_tokens / r.seconds
        lines.append(
            f"{r.name:<40} {r.passages / r.seconds:>11,.1f} {tokens_s:>10,.0f} "
            f"{1 - r.real_tokens / r.padded_tokens:>8.1%} {100 * tokens_s / ceiling:>7.3g}%"
        )
    naive, ours = results
    lines.append(f"speed-up (b)/(a): {naive.seconds / ours.seconds:.2f}x")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    lengths = passage_lengths(
        args.passages, args.mean_tokens, args.sigma, args.min_tokens, args.max_tokens, args.seed
    )
    rng = np.random.default_rng(args.seed + 1)
    seqs = [rng.integers(3, args.vocab, size=n).tolist() for n in lengths]
    model = random_model(args)

    order = rng.permutation(len(seqs)).tolist()
    naive = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    ours = plan_batches(lengths.tolist(), args.batch_tokens)
    results = [
        run(f"(a) naive: {args.batch_size}/batch, random order", model, seqs, naive, args.device),
        run(f"(b) sorted, {args.batch_tokens}-token budget", model, seqs, ours, args.device),
    ]
    args.peak_flops_given = args.peak_flops is not None
    if not args.peak_flops_given:  # measured after the runs, on a warm device
        args.peak_flops = matmul_flops(args.device, getattr(torch, args.dtype))
    print(report(args, model, lengths, results))


if __name__ == "__main__":
    main()

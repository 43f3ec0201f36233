"""Knowledge-adapter training speed: the paper-like setting against this project's default.

Each setting trains DoRA r32 (q/k/v/up/down) on one random-weight bf16 Llama, in the same run:

  (a) paper-like: 4 single passages per step, padded to the longest; no gradient checkpointing;
      PEFT's own DoRA forward (its row norm built from a full-size B·A every call);
  (a') the same batches with this project's DoRA forward (``readaptir.dora``: the row norm in
       low-rank form, the layer's output in fewer full-size passes);
  (b) default: 4 rows of 1024 tokens packed with passages; gradient checkpointing; our forward;
  (b') the same batches without gradient checkpointing (whether they fit, and what it would gain);
  (b'') the same batches with every other layer checkpointed (``gradient_checkpointing: 0.5``);
  (a) once more, last: ratios take the faster of the two (a) runs, so that no start-up cost the
      first setting pays (kernel loading, the allocator's first growth) counts against the baseline;
  (b') and (b) once more, last, and the faster of each's two runs taken likewise: which of (b')
      and (b) is faster decides whether checkpointing should be on by default where the memory
      allows, so neither side gets a second chance the other lacks.

Each setting's line gives the GPU allocator's retries in its timed steps (each one a
synchronisation), which tell a fragmented cache from a slower computation.

All keep float32 adapter weights and compute in bf16 under autocast, as the adapter stage does.

Passage lengths are synthetic and MS MARCO-like (seeded log-normal, mean ≈ 82 tokens, clipped to
[8, 256]). Reports real (non-padding) tokens per second and peak memory (CUDA allocator on GPU,
resident set on CPU) for each, and the ratios (b)/(a), (b)/(a'), (a')/(a), (b')/(b), (b'')/(b);
then where one more step of (b) spends its time, op by op (torch's profiler).

    python bench/adapter.py           # Llama-2-7B shape; needs a GPU with ~40 GB
    python bench/adapter.py --tiny    # a smoke run on CPU
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from shapes import add_shape_options, apply_tiny, llama_config, peak_rss_bytes, sync
from transformers import LlamaForCausalLM, get_scheduler

from readaptir.dora import LowRankDoraLinear
from readaptir.packing import Layout, causal_inputs, layout, pack_boundaries
from readaptir.training import (
    attach_adapter,
    autocast_dtype,
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
    train_step,
)

LOG = logging.getLogger(__name__)

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
BOS, EOS, PAD = 1, 2, 0


def passage_lengths(n: int, rng: np.random.Generator) -> np.ndarray:
    # log-normal of mean exp(mu + sigma²/2) = 83 before clipping, ≈ 82 after
    sigma = 0.6
    mu = np.log(83) - sigma**2 / 2
    return np.clip(np.round(rng.lognormal(mu, sigma, n)), 8, 256).astype(int)


def passages(n: int, vocab: int, rng: np.random.Generator) -> list[list[int]]:
    return [[BOS, *rng.integers(3, vocab, n - 2).tolist(), EOS] for n in passage_lengths(n, rng)]


def padded_batches(steps: int, rows: int, vocab: int, rng: np.random.Generator) -> list[Layout]:
    return [layout([[p] for p in passages(rows, vocab, rng)], PAD) for _ in range(steps)]


def packed_batches(
    steps: int, rows: int, max_length: int, vocab: int, rng: np.random.Generator
) -> list[Layout]:
    stream = passages(steps * rows * max_length // 60, vocab, rng)  # more than enough
    bounds = pack_boundaries([len(p) for p in stream], max_length)
    packed = [stream[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return [layout(packed[k * rows : (k + 1) * rows], PAD) for k in range(steps)]


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        clear = Path("/proc/self/clear_refs")  # "5" resets the resident-set high-water mark
        if clear.exists():
            clear.write_text("5")


def peak_gib(device: torch.device) -> float:
    """Peak memory: on a GPU what the caching allocator reserved, which is what must fit (the
    tensors' own peak, ``max_memory_allocated``, leaves out its blocks and fragmentation)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**30
    return peak_rss_bytes() / 2**30


# the card the target is set for: a larger one is capped to it, so "fits" means fits there
CARD_BYTES = 80 * 10**9


def cap_memory(device: torch.device) -> str:
    """On a GPU of more than ``CARD_BYTES``, this process may allocate no more than that."""
    total = torch.cuda.get_device_properties(device).total_memory
    if total <= CARD_BYTES:
        return f"the whole card, {total / 1e9:.0f} GB"
    torch.cuda.set_per_process_memory_fraction(CARD_BYTES / total, device)
    return f"capped at {CARD_BYTES / 1e9:.0f} GB of its {total / 1e9:.0f} GB"


@dataclass
class Result:
    name: str
    tokens_per_step: float
    padded_per_step: float
    tokens_per_s: float  # nan when the setting ran out of memory
    peak_gib: float
    alloc_retries: int | None = None  # on a GPU: the caching allocator's, in the timed steps

    def line(self, memory: str) -> str:
        if self.tokens_per_s != self.tokens_per_s:
            return f"{self.name}\n    out of memory"
        retries = "" if self.alloc_retries is None else f", allocator retries {self.alloc_retries}"
        return (
            f"{self.name}\n    {self.tokens_per_step:.0f} real tokens/step of "
            f"{self.padded_per_step:.0f}, {self.tokens_per_s:,.0f} real tokens/s, "
            f"peak {memory} {self.peak_gib:.2f} GiB{retries}"
        )


def alloc_retries(device: torch.device) -> int | None:
    """How often the GPU's caching allocator has freed its cache to retry an allocation (each
    a synchronisation: what a setting near the card's limit, or a fragmented cache, pays)."""
    if device.type != "cuda":
        return None
    return torch.cuda.memory_stats(device).get("num_alloc_retries", 0)


def train(layouts, model, optimizer, schedule, device, autocast, packed) -> None:
    for lay in layouts:
        inputs = causal_inputs(lay, packed)
        # clipped at the recipe's default, as the adapter stage does
        train_step(model, inputs, optimizer, schedule, device, autocast=autocast, max_grad_norm=1.0)
    sync(device)


def measure(
    name: str,
    base: torch.nn.Module,
    batches: list[Layout],
    *,
    packed: bool,
    fast_dora: bool,
    warmup: int,
    r: int,
    device: torch.device,
    profile: bool = False,
) -> tuple[Result, torch.nn.Module]:
    """Train ``batches`` (the first ``warmup`` untimed); a setting out of GPU memory reports so.
    With ``profile``, one more step (untimed) prints the ops it spent its time in."""
    model = attach_adapter(
        base,
        objective="causal",
        method="dora",
        r=r,
        lora_alpha=2 * r,
        dropout=0.05,
        target_modules=TARGETS,
        fast_dora=fast_dora,
    )
    dora_layers = sum(1 for m in model.modules() if getattr(m, "lora_magnitude_vector", None))
    ours = sum(1 for m in model.modules() if isinstance(m, LowRankDoraLinear))
    if ours != (dora_layers if fast_dora else 0):  # a label that says which forward ran is true
        raise SystemExit(f"{name}: {ours} of {dora_layers} DoRA layers take readaptir's forward")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    schedule = get_scheduler("constant", optimizer)
    autocast = autocast_dtype(model)

    training = (model, optimizer, schedule, device, autocast, packed)
    timed = batches[warmup:]
    seconds = float("nan")
    try:
        train(batches[:warmup], *training)
        reset_peak(device)
        retries = alloc_retries(device)
        started = time.perf_counter()
        train(timed, *training)
        seconds = time.perf_counter() - started
        retries = None if retries is None else alloc_retries(device) - retries
    except torch.cuda.OutOfMemoryError:
        retries = None  # reported; the memory is freed below, once the traceback is gone
    real = sum(lay.real_tokens for lay in timed)
    result = Result(
        name,
        tokens_per_step=real / len(timed),
        padded_per_step=sum(lay.ids.numel() for lay in timed) / len(timed),
        tokens_per_s=real / seconds,
        peak_gib=peak_gib(device),  # of the timed steps: before the profiled one
        alloc_retries=retries,
    )
    if profile and seconds == seconds:
        try:  # the profile only explains; a profiler failure leaves the figures standing
            print(profile_step(timed[-1], training, device), flush=True)
        except Exception as err:
            print(f"no profile: {type(err).__name__}: {err}", flush=True)
    optimizer.zero_grad(set_to_none=True)
    del training
    base = model.unload()  # the bare Llama again, for the next setting
    del model, optimizer, schedule
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result, base


def profile_step(batch: Layout, training: tuple, device: torch.device) -> str:
    """The ops one training step spends its time in, most first: device time on a GPU."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        train([batch], *training)
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=50)
    kind = "GPU" if gpu else "CPU"
    return f"one more step of this setting, profiled (ops by their own {kind} time):\n{table}"


def build_llama(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    config = llama_config(
        args, max_position_embeddings=4096, use_cache=False, attn_implementation="sdpa"
    )
    torch.manual_seed(args.seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # made in bf16 on the device, never in fp32
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_options(parser)
    parser.add_argument("--rows", type=int, default=4, help="sequences per step, both settings")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-profile", action="store_true", help="skip the profile of (b)")
    args = parser.parse_args()
    apply_tiny(parser, args, dict(hidden=64, layers=2, heads=4, intermediate=128, vocab=512))
    device = torch.device(args.device)
    shape = f"hidden {args.hidden}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}), torch {torch.__version__}")
    if device.type == "cuda":
        print(f"GPU memory: {cap_memory(device)} (a setting past it runs out of memory)")
    base = build_llama(args, device)
    params = sum(p.numel() for p in base.parameters())
    print(f"random-weight bf16 Llama, {shape}: {params / 1e6:,.1f}M parameters")

    rng = np.random.default_rng(args.seed)
    n = args.warmup + args.steps
    padded = padded_batches(n, args.rows, args.vocab, rng)
    common = dict(warmup=args.warmup, r=args.r, device=device)
    packed = packed_batches(n, args.rows, args.max_length, args.vocab, rng)
    default = f"DoRA, {args.rows}×{args.max_length} packed"
    settings = [  # key, label, batches, our DoRA forward, share of the layers checkpointed
        ("a", f"(a) paper-like: DoRA, {args.rows} padded passages, PEFT's DoRA forward",
         padded, False, 0.0),
        ("a'", "(a') the same batches, our DoRA forward", padded, True, 0.0),
        ("b'", f"(b') the default's batches without checkpointing: {default}, our forward",
         packed, True, 0.0),
        ("b", f"(b) default: {default}, checkpointing, our forward", packed, True, 1.0),
        ("b''", f"(b'') the default's batches, checkpointing every other layer: {default}, "
         "our forward", packed, True, 0.5),
        ("a last", "(a) again, last: whatever the first setting paid for starting up is not in "
         "this one", padded, False, 0.0),
        ("b' last", "(b') again, after the other settings, as (b) ran", packed, True, 0.0),
        ("b last", "(b) again, last: as (b') had a second run", packed, True, 1.0),
    ]  # fmt: skip
    results: dict[str, Result] = {}
    memory = "GPU reserved" if device.type == "cuda" else "RSS"
    for key, label, batches, fast_dora, share in settings:
        disable_gradient_checkpointing(base)  # every setting starts from the same model
        if share:
            enable_gradient_checkpointing(base, share=share)
        profile = key == "b" and not args.no_profile
        results[key], base = measure(
            label, base, batches, packed=batches is packed, fast_dora=fast_dora, profile=profile,
            **common,
        )  # fmt: skip
        print(results[key].line(memory), flush=True)  # as measured: a run cut short still says
    half, paper_low_rank = results["b''"], results["a'"]

    def faster(*runs: Result) -> Result:  # (a run out of memory reports nan)
        return max(runs, key=lambda res: np.nan_to_num(res.tokens_per_s, nan=-1))

    # each of (a), (b) and (b') is the faster of its two runs: a ratio of two of them never gains
    # from the order of settings
    paper = faster(results["a"], results["a last"])
    ours = faster(results["b"], results["b last"])
    no_checkpointing = faster(results["b'"], results["b' last"])
    print(
        f"ratio (b)/(a), the faster of each: {ours.tokens_per_s / paper.tokens_per_s:.2f}× real "
        f"tokens/s, {ours.peak_gib / paper.peak_gib:.2f}× peak memory"
    )
    print(f"ratio (b)/(a'): {ours.tokens_per_s / paper_low_rank.tokens_per_s:.2f}× real tokens/s")
    print(f"ratio (a')/(a): {paper_low_rank.tokens_per_s / paper.tokens_per_s:.2f}× real tokens/s")
    gain = no_checkpointing.tokens_per_s / ours.tokens_per_s
    print(f"ratio (b')/(b), the faster of each: {gain:.2f}× real tokens/s")
    print(f"ratio (b'')/(b): {half.tokens_per_s / ours.tokens_per_s:.2f}× real tokens/s")


if __name__ == "__main__":
    main()

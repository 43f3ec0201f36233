"""Merge time and peak memory against the I/O floor, on a synthetic sharded checkpoint.

Builds three inputs of a Llama shape (default about 1B parameters: hidden 2048, 16 layers,
intermediate 5632, vocab 32000, bf16), each written by safetensors itself:

  Θ  a causal LM (with lm_head), sharded;
  R  a full retriever, a bare model with every tensor of Θ's body perturbed, sharded (bf16, or
     with ``--retriever-dtype float16`` fp16 as e5-mistral's, which makes the output fp16);
  Ψ  a PEFT DoRA adapter (r 32 on q/k/v/up/down, non-zero B, magnitudes off Θ's row norms).

Then, after one untimed run, each in a child process of its own and interleaved ``--repeat``
times, each round starting with another kind (medians compared; the best shown too):

  (a) readaptir's merge of Θ + 0.5·Ψ + β·Δ (``--beta``, default 1.0, the paper's), Δ taken from
      R directly (with ``--delta-route`` also the stored-Δ route, after computing Δ once), on each
      device of ``--device`` (``cuda,cpu``: both, over the same inputs);
  (b) the I/O floor: safetensors reads every tensor the merge needs once into memory (R and the
      adapter; of Θ, the DoRA targets' weights at β = 1, where Θ + Δ is R, else its whole body)
      and writes the output (R's tensors) once, in shards of the same size;
  (c) the ratio a/b;
  (d) the merge's peak RSS (the child's ru_maxrss) against one input shard + 1 GiB;
  (e) how long each of the merge's overlapped steps (read, sum, write; on a GPU the copies to and
      from it) was at work; and on a GPU, first, its copy rates from pageable and pinned memory.

Every run finds the inputs in the page cache (they are read once before timing) and none fsyncs
its output, so the figures compare CPU and memory work over cached files, not a disk.

    python bench/merge.py --tiny     # a few seconds
    python bench/merge.py            # ~1B shape: ~4 GB of inputs under --dir, a minute or two
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shapes import (  # noqa: E402
    add_shape_options,
    apply_tiny,
    best_of,
    llama_config,
    peak_rss_bytes,
    peak_rss_source,
)

from readaptir.readapt import describe_busy  # noqa: E402
from readaptir.shards import INDEX, TensorSpec, plan_shards  # noqa: E402

GiB = 1024**3
TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
LLAMA_1B = {"hidden": 2048, "layers": 16, "heads": 16, "intermediate": 5632, "vocab": 32000}
TINY = dict(hidden=256, layers=2, intermediate=688, vocab=4000, heads=4, rank=8, shard_gb=0.002)
ALPHA = 0.5
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_shape_options(ap, LLAMA_1B)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--beta", type=float, default=1.0, help="β of the merge (α is 0.5)")
    ap.add_argument(
        "--retriever-dtype",
        choices=["bfloat16", "float16"],
        default="bfloat16",
        help="R's storage, so the output's: float16 as e5-mistral's (each block range-checked)",
    )
    ap.add_argument("--shard-gb", type=float, default=1.0, help="input and output shard size, GiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="the merge's devices: cpu, cuda or cuda,cpu")
    ap.add_argument("--delta-route", action="store_true", help="also time Δ and a merge with it")
    ap.add_argument("--dir", type=Path, default=None, help="where the inputs go (default: tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the inputs and outputs")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    apply_tiny(ap, args, TINY)
    return args


# -- the synthetic inputs ------------------------------------------------------------------------


def body_specs(args: argparse.Namespace) -> list[TensorSpec]:
    """Canonical (bare LlamaModel) names and shapes, in the order transformers saves them."""
    h, inter, head_dim = args.hidden, args.intermediate, args.hidden // args.heads
    kv, bf16 = args.kv_heads * head_dim, torch.bfloat16
    specs = [("embed_tokens.weight", (args.vocab, h), bf16)]
    for i in range(args.layers):
        lead = f"layers.{i}."
        specs += [
            (lead + "input_layernorm.weight", (h,), bf16),
            (lead + "self_attn.q_proj.weight", (h, h), bf16),
            (lead + "self_attn.k_proj.weight", (kv, h), bf16),
            (lead + "self_attn.v_proj.weight", (kv, h), bf16),
            (lead + "self_attn.o_proj.weight", (h, h), bf16),
            (lead + "post_attention_layernorm.weight", (h,), bf16),
            (lead + "mlp.gate_proj.weight", (inter, h), bf16),
            (lead + "mlp.up_proj.weight", (inter, h), bf16),
            (lead + "mlp.down_proj.weight", (h, inter), bf16),
        ]
    return specs + [("norm.weight", (h,), bf16)]


def nbytes(specs: Sequence[TensorSpec]) -> int:
    return sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in specs)


def write_sharded(folder: Path, specs: list[TensorSpec], tensors: Iterator, shard: int) -> None:
    """Save ``tensors`` (yielded in ``specs`` order) with safetensors, as transformers shards."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    groups = plan_shards(specs, shard)
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file(
            {spec[0]: next(tensors) for spec in group}, folder / name, metadata={"format": "pt"}
        )
        weight_map.update({spec[0]: name for spec in group})
    index = {"metadata": {"total_size": nbytes(specs)}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def build(args: argparse.Namespace, work: Path) -> dict:
    # random numbers made on the GPU where there is one: at 7B shapes the CPU takes minutes
    dev = next((d for d in args.device.split(",") if d.startswith("cuda")), "cpu")
    body = body_specs(args)
    head = ("lm_head.weight", (args.vocab, args.hidden), torch.bfloat16)
    theta_specs = [("model." + n, s, d) for n, s, d in body] + [head]
    shard = int(args.shard_gb * GiB)
    adapter: dict[str, torch.Tensor] = {}

    # Each tensor has a seed of its own, so that R's tensors are made from Θ's again rather than
    # held while Θ is written: memory holds a shard, whatever the shape.
    def theta_tensor(index: int) -> tuple[torch.Tensor, torch.Generator]:
        name, shape, _ = theta_specs[index]
        gen = torch.Generator(dev).manual_seed(index)
        scale, mean = (0.05, 1) if name.endswith("norm.weight") else (0.02, 0)
        return (mean + scale * torch.randn(shape, generator=gen, device=dev)).to(
            torch.bfloat16
        ), gen

    def theta_tensors() -> Iterator[torch.Tensor]:
        for index, (name, _, _) in enumerate(theta_specs):
            w, gen = theta_tensor(index)
            module = name.removeprefix("model.").removesuffix(".weight")
            if module.rsplit(".", 1)[-1] in TARGETS:
                add_dora(adapter, module, w.float(), args.rank, gen)
            yield w.cpu()

    def r_tensors() -> Iterator[torch.Tensor]:
        for index, (_, shape, _) in enumerate(body):  # Θ's body, in the same order
            w, gen = theta_tensor(index)
            noise = 0.002 * torch.randn(shape, generator=gen, device=dev)
            yield (w.float() + noise).to(r_dtype).cpu()

    r_dtype = getattr(torch, args.retriever_dtype)
    write_sharded(work / "theta", theta_specs, theta_tensors(), shard)
    write_sharded(work / "retriever", [(n, s, r_dtype) for n, s, _ in body], r_tensors(), shard)
    from safetensors.torch import save_file

    (work / "adapter").mkdir()
    save_file(adapter, work / "adapter" / "adapter_model.safetensors", metadata={"format": "pt"})
    dora = {"peft_type": "LORA", "r": args.rank, "lora_alpha": 2 * args.rank, "use_dora": True}
    dora.update(target_modules=list(TARGETS), fan_in_fan_out=False, use_rslora=False)
    (work / "adapter" / "adapter_config.json").write_text(json.dumps(dora, indent=2) + "\n")
    config = llama_config(args)
    for folder, arch in (("theta", "LlamaForCausalLM"), ("retriever", "LlamaModel")):
        config.architectures = [arch]
        config.save_pretrained(work / folder)
    return {
        "params": sum(math.prod(s) for _, s, _ in theta_specs),
        "theta": nbytes(theta_specs),
        "body": nbytes(body),
        "adapter": sum(t.nbytes for t in adapter.values()),
        "shard": max(p.stat().st_size for p in work.glob("*/model-*.safetensors")),
    }


def add_dora(out: dict, module: str, weight: torch.Tensor, rank: int, gen: torch.Generator):
    fan_out, fan_in = weight.shape
    key, dev = f"base_model.model.model.{module}.", weight.device
    a = torch.randn(rank, fan_in, generator=gen, device=dev) / math.sqrt(fan_in)
    b = 1e-3 * torch.randn(fan_out, rank, generator=gen, device=dev)
    scale = 1 + 0.01 * torch.randn(fan_out, generator=gen, device=dev)
    m = torch.linalg.vector_norm(weight, dim=1) * scale
    for role, tensor in (("lora_A.weight", a), ("lora_B.weight", b), ("lora_magnitude_vector", m)):
        out[key + role] = tensor.cpu()


# -- what the children time ----------------------------------------------------------------------


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return usage.ru_utime + usage.ru_stime


def _io() -> dict[str, int]:
    lines = Path("/proc/self/io").read_text().split() if Path("/proc/self/io").exists() else []
    return {k.rstrip(":"): int(v) for k, v in zip(lines[::2], lines[1::2], strict=True)}


def clear(work: Path, kind: str) -> None:
    """Remove the previous run's output just before timing, in every kind of run alike.

    On this kind of virtual machine, memory freed a few seconds earlier has gone back to the host
    and faults in slowly again: a run that started later after the delete (e.g. after longer
    imports) would pay for it and the other not.
    """
    shutil.rmtree(work / ("delta" if kind == "delta" else "out"), ignore_errors=True)
    os.sync()  # and no run pays for the write-back of another's output


def child(args: argparse.Namespace) -> dict:
    """One timed run in this (fresh) process; what it measured, for the parent."""
    work, shard = args.work, int(args.shard_gb * GiB)
    out = work / "out"
    if args.child == "floor":
        import safetensors.torch  # noqa: F401 (imported before the clock starts)

        clear(work, args.child)
        started, cpu = time.perf_counter(), _cpu_seconds()
        io_floor(work, out, shard, args.beta)
        return {"seconds": time.perf_counter() - started, "cpu": _cpu_seconds() - cpu}
    from readaptir.stages.delta import compute_delta
    from readaptir.stages.merge import merge
    from readaptir.weights import base_model_prefix

    busy: dict[str, float] = {}

    # Looking up the model class imports transformers' modeling code: once per process, timed
    # apart from the weight work.
    started = time.perf_counter()
    base_model_prefix(work / "theta")
    if args.device.startswith("cuda"):  # the CUDA context, made once per process: off the clock
        torch.zeros(1, device=args.device)
        torch.cuda.synchronize(args.device)
    imports = time.perf_counter() - started
    clear(work, args.child)
    before, rss_before, cpu = _io(), peak_rss_bytes(), _cpu_seconds()
    started = time.perf_counter()
    if args.child == "delta":
        compute_delta(work / "theta", work / "retriever", work / "delta", device=args.device)
    else:
        merge(
            work / "theta",
            out,
            alpha=ALPHA,
            beta=args.beta,
            adapter_dir=work / "adapter",
            delta_dir=work / "delta" if args.child == "merge-delta" else None,
            retriever_dir=work / "retriever",
            device=args.device,
            max_shard_bytes=shard,
            busy=busy,
        )
    seconds = time.perf_counter() - started
    after = _io()
    return {
        "seconds": seconds,
        "cpu": _cpu_seconds() - cpu,
        "imports": imports,
        "rss_before": rss_before,
        "rss_peak": peak_rss_bytes(),
        # None where /proc/self/io does not count characters (some sandboxed kernels)
        "read": after["rchar"] - before["rchar"] if "rchar" in after else None,
        "written": after["wchar"] - before["wchar"] if "wchar" in after else None,
        "busy": busy or None,
    }


def io_floor(work: Path, out: Path, shard: int, beta: float) -> None:
    """Read what the merge reads once into memory, write the output's bytes once: safetensors.

    At β = 1 the merge reads of Θ only the weights DoRA rescales (its Ψ depends on them). Like
    the merge, it copies into memory it reuses (one buffer for what is read and dropped, one for
    the output shard being written): memory newly faulted in costs this kind of machine more
    than the copies, and more the more it is loaded, which is no part of the reads and writes."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    buffers = {
        "read": torch.empty(0, dtype=torch.uint8),
        "shard": torch.empty(0, dtype=torch.uint8),
    }

    def copied(tensor: torch.Tensor, role: str, offset: int = 0) -> torch.Tensor:
        """``tensor`` (a memory map until copied) copied into the ``role`` buffer at ``offset``."""
        end = offset + tensor.numel() * tensor.element_size()
        if len(buffers[role]) < end:
            grown = torch.empty(max(end, 2 * len(buffers[role])), dtype=torch.uint8)
            grown[:offset] = buffers[role][:offset]
            buffers[role] = grown
        view = buffers[role][offset:end].view(tensor.dtype).view(tensor.shape)
        return view.copy_(tensor)

    def files(folder: Path) -> list[Path]:
        return sorted(folder.glob("*.safetensors"))

    def needed(key: str) -> bool:
        if key == "lm_head.weight":
            return False
        return beta != 1.0 or any(key.endswith(f".{t}.weight") for t in TARGETS)

    for folder, wanted in ((work / "theta", needed), (work / "adapter", None)):
        for path in files(folder):
            with safe_open(path, "pt") as fh:
                for key in filter(wanted, fh.keys()):
                    copied(fh.get_tensor(key), "read")
    out.mkdir()
    # R's tensors in name order, read a shard's worth at a time (the merge holds no more)
    handles = {}
    for path in files(work / "retriever"):
        fh = safe_open(path, "pt")
        handles.update(dict.fromkeys(fh.keys(), fh))
    specs = [
        (
            key,
            tuple(fh.get_slice(key).get_shape()),
            SAFETENSORS_DTYPES[fh.get_slice(key).get_dtype()],
        )
        for key, fh in handles.items()
    ]
    for i, group in enumerate(plan_shards(specs, shard), start=1):
        tensors, offset = {}, 0
        for key, _, _ in group:
            tensors[key] = copied(handles[key].get_tensor(key), "shard", offset)
            offset += -(-tensors[key].nbytes // 64) * 64  # each tensor 64-byte aligned
        save_file(tensors, out / f"model-{i:05d}.safetensors")


def run_child(args: argparse.Namespace, work: Path, kind: str, device: str = "cpu") -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--work", str(work), "--device", device]
    cmd += ["--shard-gb", str(args.shard_gb), "--beta", str(args.beta)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:  # what the child said, in the log of a run that cannot be repeated
        sys.stderr.write(done.stderr[-20000:])
        raise SystemExit(f"{kind} on {device}: exit {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def warm(work: Path) -> None:
    for path in sorted(work.glob("*/*.safetensors")):
        with open(path, "rb") as fh:
            while fh.read(64 << 20):
                pass


def _gb(count: int | None) -> str:
    return "? GB (not counted here)" if count is None else f"{count / 1e9:.2f} GB"


def verdict(ratio: float) -> str:
    """The target's verdict. A merge faster than the floor is within the target as measured, but
    says more of the floor's runs (slowed on a noisy machine; the floor writes only after it has
    read, where the merge overlaps the two) than of the merge's cost: say so."""
    if ratio < 1:
        return "met as measured, but the floor ran slower than the merge: more --repeat pins it"
    return "met" if ratio <= 1.3 else "missed"


def merge_lines(args, sizes, runs: list[dict], floor: dict[str, float], device: str) -> list[str]:
    """(a), (c), (d) and (e) for the merges on one device; ``floor``: the floor's median and best
    seconds."""
    merge = min(runs, key=lambda r: r["seconds"])
    peak = max(r["rss_peak"] for r in runs)
    target = sizes["shard"] + GiB
    merged = statistics.median(r["seconds"] for r in runs)
    ratio, best = merged / floor["median"], merge["seconds"] / floor["best"]
    times = ", ".join(f"{r['seconds']:.2f}" for r in runs)
    lines = [
        f"(a) on {device}: merge Θ + {ALPHA}·Ψ + {args.beta:g}·Δ, Δ read from R: "
        f"median {merged:.2f} s, best {merge['seconds']:.2f} s (runs: {times}); "
        f"read {_gb(merge['read'])}, wrote {_gb(merge['written'])}; "
        f"{min(r['cpu'] for r in runs):.2f} CPU-s; before it, {merge['imports']:.2f} s "
        "importing transformers' model code (and making a CUDA context: once per process)",
        f"(c) on {device}: ratio a/b of the medians {ratio:.2f} (target ≤ 1.3: "
        f"{verdict(ratio)}); of the best runs {best:.2f}; "
        f"{(merged + merge['imports']) / floor['median']:.2f} with the imports",
        f"(d) on {device}: merge peak RSS {peak / GiB:.2f} GiB ({merge['rss_before'] / GiB:.2f} "
        f"GiB before the merge: interpreter and imports); target one input shard + 1 GiB = "
        f"{target / GiB:.2f} GiB: {'met' if peak <= target else 'missed'} ({peak_rss_source()})",
    ]
    if merge.get("busy"):
        lines.append(
            f"(e) on {device}: busy {describe_busy(merge['busy'])} (overlapped; on a GPU the sums "
            "are queued, and the copies to and from the device, parts of read and write, wait "
            "for them)"
        )
    return lines


def page_cache(sizes: dict) -> str:
    """Whether the runs can find the inputs in memory, and what each run does alike."""
    alike = "no run fsyncs its output; each run deletes the last output and syncs before its clock"
    inputs = sizes["theta"] + sizes["body"] + sizes["adapter"]
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if inputs > memory / 2:
        return (
            f"page cache: the inputs ({inputs / GiB:.1f} GiB) are more than half of this "
            f"machine's memory ({memory / GiB:.1f} GiB): reads come largely from disk; {alike}"
        )
    return f"page cache: warm in every run (inputs read once before timing); {alike}"


def report(args: argparse.Namespace, sizes: dict, runs: dict[str, list[dict]], built: float):
    gb = 1e9
    best = {kind: min(r["seconds"] for r in rs) for kind, rs in runs.items()}
    floor_times = ", ".join(f"{r['seconds']:.2f}" for r in runs["floor"])
    floor = {
        "median": statistics.median(r["seconds"] for r in runs["floor"]),
        "best": best["floor"],
    }
    lines = [
        f"shape: hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}, "
        f"vocab {args.vocab}, heads {args.heads}/{args.kv_heads}, Θ bf16, R and output "
        f"{args.retriever_dtype}: "
        f"{sizes['params'] / 1e6:,.0f}M parameters",
        f"inputs: Θ {sizes['theta'] / gb:.2f} GB (with lm_head), R {sizes['body'] / gb:.2f} GB, "
        f"DoRA r{args.rank} adapter {sizes['adapter'] / gb:.3f} GB; shards of "
        f"{args.shard_gb:g} GiB (largest input shard {sizes['shard'] / gb:.2f} GB); "
        f"built in {built:.0f} s",
        page_cache(sizes),
        f"devices: {args.device}; torch threads: {torch.get_num_threads()}; runs: {args.repeat}",
        f"(b) I/O floor, safetensors (read once what the merge reads: R, the adapter and "
        f"{'the DoRA targets of Θ' if args.beta == 1 else 'Θ'}; write the output once): "
        f"median {floor['median']:.2f} s, best {floor['best']:.2f} s (runs: {floor_times}); "
        f"{min(r['cpu'] for r in runs['floor']):.2f} CPU-s",
    ]
    for device in args.device.split(","):
        lines += merge_lines(args, sizes, runs[f"merge {device}"], floor, device)
    if "merge-delta" in runs:
        d_peak = max(r["rss_peak"] for r in runs["delta"])
        lines.append(
            f"(a') Δ route: computing Δ {best['delta']:.2f} s (peak RSS {d_peak / GiB:.2f} GiB), "
            f"then merge with the stored Δ {best['merge-delta']:.2f} s (it reads all of Θ and a "
            "float32 Δ, about twice R: not the bytes of the floor above)"
        )
    return "\n".join(lines)


def copy_rates(device: str, nbytes: int = 512 << 20, repeat: int = 3) -> str:
    """Host↔GPU copy rates of the merge's kind (whole tensors, synchronous) from pageable host
    memory, as the merge copies, and from pinned memory, best of ``repeat``."""
    gpu = torch.empty(nbytes, dtype=torch.uint8, device=device)
    rates = []
    for pinned in (False, True):
        host = torch.ones(nbytes, dtype=torch.uint8, pin_memory=pinned)  # touched: no faults
        for to_device in (True, False):
            target, source = (gpu, host) if to_device else (host, gpu)
            best, _ = best_of(repeat, device, functools.partial(target.copy_, source))
            way = "to the GPU" if to_device else "to the host"
            rates.append(
                f"{way} {nbytes / best / 1e9:.1f} GB/s {'pinned' if pinned else 'pageable'}"
            )
    return f"copies of {nbytes >> 20} MiB on {device}, best of {repeat}: " + ", ".join(rates)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    work = Path(tempfile.mkdtemp(prefix="readaptir-bench-merge-", dir=args.dir))
    try:
        started = time.perf_counter()
        sizes = build(args, work)
        built = time.perf_counter() - started
        print(f"inputs built in {built:.0f} s", flush=True)  # progress: a run cut short still says
        warm(work)
        devices = args.device.split(",")
        for device in [d for d in devices if d.startswith("cuda")]:
            print(copy_rates(device), flush=True)  # whether pinned buffers would pay
        # (the name a child runs, its device) for each kind of run
        kinds = {"floor": ("floor", "cpu")} | {f"merge {d}": ("merge", d) for d in devices}
        runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
        if args.delta_route:
            runs["delta"] = [run_child(args, work, "delta", devices[0])]
            kinds["merge-delta"] = ("merge-delta", devices[0])
            runs["merge-delta"] = []
        # one untimed run first (the first child after the build ran slow, up to 7x on a 2-core
        # machine), then each round starts with another kind
        run_child(args, work, "floor", "cpu")
        order = list(kinds.items())
        for round_ in range(args.repeat):
            for kind, (name, device) in order[round_ % len(order) :] + order[: round_ % len(order)]:
                runs[kind].append(run_child(args, work, name, device))
                done = runs[kind][-1]
                busy = f" (busy {describe_busy(done['busy'])})" if done.get("busy") else ""
                rss = f", peak RSS {done['rss_peak'] / GiB:.2f} GiB" if "rss_peak" in done else ""
                print(f"  {kind}: {done['seconds']:.2f} s{rss}{busy}", flush=True)
        print(report(args, sizes, runs, built))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Δ = retriever − Θ over the shared canonical tensors, stored exactly.

Each Δ tensor is stored as float32 when Θ + Δ, evaluated as the merge evaluates it (float32 for a
16-bit retriever and Θ, float64 otherwise; ``weights.compute_dtype``) and cast to the retriever's
dtype, gives back the retriever bit for bit; otherwise as float64 (and merged in float64). The
check assumes the merge writes the retriever's dtype: a recipe ``dtype`` that changes it can
round a rare tensor differently.

Speed and memory: the next tensor is read, and the last written, on threads of their own while
this one's Δ is taken, in float32 first, in blocks of rows on the CPU's cores
(``readapt.block_pool``) or whole on a GPU; float64, the same way, only where float32 does not
give the retriever back. The writer holds at most one output shard.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from readaptir.artifacts import require_empty, resolve_device, write_json
from readaptir.lora import Adapter, Rows
from readaptir.models import is_peft_adapter
from readaptir.readapt import (
    Scratch,
    block_pool,
    describe_busy,
    over_blocks,
    read_ahead,
    timed,
    write_behind,
)
from readaptir.shards import BufferPool, ShardWriter, WeightError, dtype_name
from readaptir.weights import Body, check_same_body, compute_dtype, is_buffer

LOG = logging.getLogger(__name__)

DELTA_JSON = "delta.json"


def storage_dtype(
    base: torch.Tensor, delta: torch.Tensor, target: torch.Tensor, stored: torch.dtype
) -> torch.dtype:
    """The narrowest of float32/float64 for ``delta`` such that base + delta casts to ``target``.

    ``base`` and ``delta`` are float64 (``stored``: Θ's dtype on disk); the sum is taken in the
    precision the merge will take it in for a float32 Δ and an output of ``target``'s dtype.
    """
    compute = compute_dtype(target.dtype, [stored, torch.float32])
    narrow = base.to(compute) + delta.float().to(compute)
    return torch.float32 if torch.equal(narrow.to(target.dtype), target) else torch.float64


def compute_delta(
    base_dir: Path, retriever_dir: Path, out: Path, *, device: str | None = None
) -> dict:
    """Write Δ = retriever − Θ into ``out`` (safetensors + delta.json) and return the info."""
    base_dir, retriever_dir, out = Path(base_dir), Path(retriever_dir), Path(out)
    require_empty(out)
    dev = resolve_device(device)
    base = Body(base_dir)
    source, names, info = _open_source(base, retriever_dir)
    out.mkdir(parents=True, exist_ok=True)  # only once every check has passed
    info["storage"] = _write_deltas(base, source, names, out, dev, info)
    write_json(out / DELTA_JSON, info)
    LOG.info("Δ of %d tensors written to %s", len(info["storage"]), out)
    return info


def _open_source(base: Body, retriever_dir: Path) -> tuple[Body | Adapter, list[str], dict]:
    """The retriever (a full model, or a PEFT adapter over Θ) checked against Θ on headers
    alone, the names Δ is taken over, and what delta.json records of them so far."""
    info: dict = {"dropped": {"base": list(base.heads)}, "buffers": [], "zero": [], "inexact": []}
    if is_peft_adapter(retriever_dir):
        adapter = Adapter(retriever_dir, base.prefix)
        adapter.check(base)  # before any tensor is read
        names = adapter.targets()
        info["kind"] = "lora"
        info["dropped"]["retriever"] = adapter.heads
        info["retriever_dtype"] = dtype_name(base.ckpt.float_dtype())
        untouched = [n for n in base.names() if n not in names]
        info["buffers"] = sorted(n for n in untouched if is_buffer(n))
        info["zero"] = sorted(n for n in untouched if not is_buffer(n))
        return adapter, names, info
    retriever = Body(retriever_dir)
    one_side = check_same_body(base, retriever)
    info["buffers"] = one_side.buffers
    info["dropped"]["base"] += one_side.base_only
    # taken by the merge from the retriever as they are: Θ has nothing to take a Δ from
    info["retriever_only"] = one_side.other_only
    info["kind"] = "full"
    info["dropped"]["retriever"] = retriever.heads
    info["retriever_dtype"] = dtype_name(retriever.ckpt.float_dtype())
    return retriever, [n for n in base.names() if n in retriever], info


def _write_deltas(
    base: Body, source: Body | Adapter, names: list[str], out: Path, dev: str, info: dict
) -> dict[str, str]:
    """Write each tensor's Δ into ``out``, noting buffers, zeros and inexact tensors in ``info``;
    the dtype each Δ is stored in."""
    storage: dict[str, str] = {}
    buffers = BufferPool()
    busy = {"read": 0.0, "sum": 0.0, "write": 0.0}  # the overlapped steps' seconds at work
    total = sum(base.nbytes(n) for n in names)
    with (
        # a PEFT retriever's B @ A runs on torch's own threads, which the pool sets to one
        block_pool(dev) if isinstance(source, Body) else contextlib.nullcontext() as pool,
        ShardWriter(out) as writer,
        write_behind(writer, None, busy) as add,
        tqdm(total=total, unit="B", unit_scale=True, desc="delta") as bar,
    ):
        for name, theta, target in read_ahead(_reader(base, source, buffers, busy), names):
            bar.update(base.nbytes(name))
            if theta is None:  # a buffer: rebuilt by the model at load time; carries no Δ
                info["buffers"].append(name)
                continue
            delta, exact = None, True
            with timed(busy, "sum"):
                if not theta.is_floating_point():
                    _check_unchanged(name, theta, source)
                    info["zero"].append(name)
                elif isinstance(source, Adapter):
                    delta, exact = _lora_delta(name, theta.to(dev), source)
                else:
                    delta, exact = tensor_delta(theta.to(dev), target.to(dev), pool)
            buffers.give(theta)
            if target is not None:
                buffers.give(target)
            if delta is None:
                continue
            if not exact:
                info["inexact"].append(name)
                LOG.warning("%s: Θ + Δ does not give back the retriever exactly", name)
            add(name, delta)  # held by the writer until its shard is full: not a pooled buffer
            storage[name] = dtype_name(delta.dtype)
    LOG.info("busy (overlapped): %s", describe_busy(busy))
    return storage


def _reader(
    base: Body, source: Body | Adapter, buffers: BufferPool, busy: dict[str, float]
) -> Callable[[str], tuple[str, torch.Tensor | None, torch.Tensor | None]]:
    """A function that reads (name, Θ's tensor, the retriever's) into ``buffers``: Θ's is None
    for a buffer, the retriever's for a PEFT retriever and for non-float tensors."""

    def read(name: str) -> tuple[str, torch.Tensor | None, torch.Tensor | None]:
        if is_buffer(name):
            return name, None, None
        with timed(busy, "read"):
            theta = base.get(name, buffers.take(base.nbytes(name)))
            if not isinstance(source, Body) or not theta.is_floating_point():
                return name, theta, None
            return name, theta, source.get(name, buffers.take(source.nbytes(name)))

    return read


def tensor_delta(
    theta: torch.Tensor, target: torch.Tensor, pool: ThreadPoolExecutor | None = None
) -> tuple[torch.Tensor, bool]:
    """Δ = ``target`` − ``theta`` for one tensor, and whether Θ + Δ gives ``target`` back exactly.

    Float32 when Θ + Δ, summed as the merge sums it (``compute_dtype``) and cast to the
    retriever's dtype, is ``target`` everywhere; else float64 (rare). Each is taken in blocks of
    rows on ``pool``'s workers (a CPU), in buffers reused from block to block.
    """
    narrow, exact = _delta_as(torch.float32, theta, target, pool)
    if exact:
        return narrow, True
    del narrow
    return _delta_as(torch.float64, theta, target, pool)


def _delta_as(
    storage: torch.dtype,
    theta: torch.Tensor,
    target: torch.Tensor,
    pool: ThreadPoolExecutor | None,
) -> tuple[torch.Tensor, bool]:
    """Δ stored as ``storage``, and whether Θ + Δ, summed as the merge sums it, is ``target``."""
    compute = compute_dtype(target.dtype, [theta.dtype, storage])
    delta = torch.empty(theta.shape, dtype=storage, device=theta.device)

    def fill(rows: Rows) -> bool:
        scratch = Scratch() if pool is None else Scratch.of_thread()
        t = scratch.take("theta", theta[rows], compute).copy_(theta[rows])
        r = scratch.take("target", target[rows], compute).copy_(target[rows])
        torch.sub(r, t, out=delta[rows])
        back = scratch.take("back", target[rows], target.dtype).copy_(t.add_(delta[rows]))
        return torch.equal(back, target[rows])

    return delta, all(over_blocks(fill, tuple(theta.shape), pool))


def _lora_delta(name: str, theta: torch.Tensor, source: Adapter) -> tuple[torch.Tensor, bool]:
    """A PEFT retriever's Δ for one target (its update, taken in float64), stored as
    ``storage_dtype`` says, and whether Θ + Δ gives the retriever back exactly."""
    theta64 = theta.double()
    delta = source.update(name, theta64)
    if delta is None:
        raise WeightError(f"{name} is not a target of the adapter in {source.folder}")
    target = (theta64 + delta).to(theta.dtype)  # a PEFT retriever is Θ + Δ, held in Θ's dtype
    kind = storage_dtype(theta64, delta, target, theta.dtype)
    exact = kind == torch.float32 or torch.equal((theta64 + delta).to(target.dtype), target)
    return delta.to(kind), exact


def _check_unchanged(name: str, theta: torch.Tensor, source: Body | Adapter) -> None:
    # Non-float tensors carry no Δ, so the retriever must hold the same values.
    if isinstance(source, Body) and not torch.equal(source.get(name).to(theta.device), theta):
        raise WeightError(f"non-float tensor {name} differs between {source.folder} and the base")

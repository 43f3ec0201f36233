"""The per-tensor sum of a merge: theta_coef·Θ + Σ c·X + Σ c·Ψ, read, computed and written in step.

``Readapter`` knows what each output tensor is made of (Θ, a stored Δ or the retriever R, the
adapters' Ψ) and sums it; ``stages.merge`` drives it over a model and writes the folder.

Exactness: a tensor no term changes is copied as stored (cast only), so α=0, β=1 gives the
retriever and α=0, β=0 gives Θ bit for bit; every other sum is taken in one wider precision and
cast once to the output dtype: float32 for 16-bit outputs (bf16/fp16, the 7B models), float64 for
wider outputs or where a stored Δ tensor needed float64 to give the retriever back exactly.
A float16 output, narrower in range than bf16 and float32, is checked block by block as it is
cast: a value beyond its range (inf where no input is) fails the merge, naming the tensor.

Speed and memory: reading the next tensor, computing this one and writing the last overlap, each
on a thread of its own (a large tensor is itself read by several threads). On a CPU a tensor is
computed in blocks of rows small enough to stay in cache, by single-threaded workers, in buffers
reused from block to block. Host buffers for whole tensors come from a pool, also those a GPU's
outputs are copied back into. Memory holds a few tensors, whatever the model's size.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from readaptir.lora import Adapter, Rows, TargetUpdate, add_psi
from readaptir.shards import (
    BufferPool,
    Checkpoint,
    ShardWriter,
    WeightError,
)
from readaptir.weights import Body, compute_dtype

LOG = logging.getLogger(__name__)

# Elements per block of rows on a CPU: big enough that per-op overhead is small, small enough
# that the few 2-4 MiB temporaries stay in cache (measured best of 2^14…2^22).
BLOCK_ELEMENTS = 1 << 19

T = TypeVar("T")
R = TypeVar("R")
Dense = list[tuple[float, torch.Tensor]]  # coefficient, a stored tensor (R or Δ)
Updates = list[tuple[float, TargetUpdate]]  # coefficient, an adapter's tensors (Ψ or Ψ_R)


class Scratch:
    """Buffers reused from block to block (one set per thread).

    Fresh memory costs a page fault per 4 KiB, which on blocks of a few MiB is most of the work.
    """

    _threads = threading.local()

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    @classmethod
    def of_thread(cls) -> Scratch:
        """The calling thread's own; a pool's threads end with the merge, and so do these."""
        if not hasattr(cls._threads, "scratch"):
            cls._threads.scratch = cls()
        return cls._threads.scratch

    def take(self, key: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A ``dtype`` buffer of ``like``'s shape and device; its content is undefined."""
        buf, size = self._buffers.get((key, dtype)), like.numel()
        if buf is None or buf.numel() < size or buf.device != like.device:
            buf = torch.empty(size, dtype=dtype, device=like.device)
            self._buffers[key, dtype] = buf
        return buf[:size].view(like.shape)


def readapt_rows(
    theta: torch.Tensor | None,
    theta_coef: float,
    dense: Dense,
    updates: Updates,
    rows: Rows,
    scratch: Scratch | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Rows ``rows`` of theta_coef·Θ + Σ c·X + Σ c·Ψ in ``dtype`` (Θ may be None if unused);
    Ψ's tensors are expected in ``dtype`` already.

    The result lives in ``scratch`` when one is given (valid until its next use), else is new.
    """
    scratch = scratch or Scratch()
    t = None
    if theta is not None:  # read below, never written
        t = scratch.take("theta", theta[rows], dtype).copy_(theta[rows])
    terms = list(dense)
    if t is not None and len(terms) == 1 and 0 != theta_coef != 1 and theta_coef == 1 - terms[0][0]:
        # (1 − β)·Θ + β·R, the retriever route at β ≠ 0, 1: one pass instead of two
        coef, x = terms.pop()
        acc = scratch.take("acc", t, dtype).copy_(x[rows])
        torch.lerp(t, acc, coef, out=acc)
    elif t is not None and theta_coef != 0:
        acc = torch.mul(t, theta_coef, out=scratch.take("acc", t, dtype))
    elif terms:
        coef, x = terms.pop(0)
        acc = scratch.take("acc", x[rows], dtype).copy_(x[rows])
        if coef != 1:
            acc.mul_(coef)
    else:
        raise ValueError("nothing to start the sum from: no Θ term and no stored tensor")
    for coef, x in terms:
        acc.add_(x[rows], alpha=coef)
    for coef, update in updates:
        work = scratch.take("work", acc, dtype) if update.needs_base else None
        acc = add_psi(acc, coef, update, t, rows, work)
    return acc


def row_blocks(shape: tuple[int, ...], whole: bool) -> Iterator[Rows]:
    """Blocks of leading rows of about BLOCK_ELEMENTS elements, or the whole tensor."""
    if whole or not shape:
        yield ...
        return
    step = max(1, BLOCK_ELEMENTS // max(1, math.prod(shape[1:])))
    for start in range(0, shape[0], step):
        yield slice(start, start + step)


def over_blocks(
    fill: Callable[[Rows], R],
    shape: tuple[int, ...],
    pool: ThreadPoolExecutor | None,
    whole: bool = False,
) -> list[R]:
    """``fill`` of each block of rows of a tensor of ``shape`` (``row_blocks``), on ``pool``'s
    workers where there are several blocks; the whole tensor at once without a pool."""
    blocks = list(row_blocks(shape, whole or pool is None))
    return list(
        pool.map(fill, blocks) if pool is not None and len(blocks) > 1 else map(fill, blocks)
    )


@contextlib.contextmanager
def block_pool(dev: str) -> Iterator[ThreadPoolExecutor | None]:
    """On a CPU, workers that take blocks of rows, each single-threaded, as many as torch's threads.

    Torch's own threads meet at a barrier after every op; on small blocks, and on a busy machine
    where one of them waits for a core, that costs more than the op itself.
    """
    if dev != "cpu":
        yield None
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads) as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Float32 matrix products in IEEE float32 within the block, whatever the process set: CUDA's
    TF32 would round B @ A to 10-bit mantissas, far outside float32 rounding."""
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")  # recent PyTorch; the two must not be mixed
    before = matmul.fp32_precision if new_api else matmul.allow_tf32
    if new_api:
        matmul.fp32_precision = "ieee"
    else:
        matmul.allow_tf32 = False
    try:
        yield
    finally:
        if new_api:
            matmul.fp32_precision = before
        else:
            matmul.allow_tf32 = before


def describe_busy(busy: dict[str, float]) -> str:
    """``read 1.20 s, sum 0.80 s, …``: the busy times of a merge, for a log line."""
    return ", ".join(f"{step} {seconds:.2f} s" for step, seconds in busy.items())


@contextlib.contextmanager
def timed(busy: dict[str, float], step: str) -> Iterator[None]:
    """Add the seconds the block takes to ``busy[step]`` (0 if absent)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        busy[step] = busy.get(step, 0.0) + time.perf_counter() - started


@contextlib.contextmanager
def write_behind(
    writer: ShardWriter, buffers: BufferPool | None, busy: dict[str, float]
) -> Iterator[Callable[[str, torch.Tensor], None]]:
    """``writer.add`` on a thread of its own: a tensor is written while the next is computed.

    At most one tensor waits. With ``buffers``, a tensor on a GPU is copied into one of them
    first and each host tensor goes back to them once written, so ``writer`` must write as it is
    given (a layout); without, ``writer`` may hold what it is given. ``busy["write"]`` adds up the
    thread's time, ``busy["to host"]`` the part of it spent copying from the device.
    """
    if buffers is not None and not writer.writes_as_added:
        raise ValueError("pooled buffers need a ShardWriter given the layout: others hold tensors")
    pending: list[Future] = []

    def write(name: str, tensor: torch.Tensor) -> None:
        with timed(busy, "write"):
            host = tensor
            if buffers is not None and tensor.device.type != "cpu":
                with timed(busy, "to host"):  # waits for the sums queued before it
                    host = buffers.to_host(tensor)
            writer.add(name, host)
            if buffers is not None:
                buffers.give(host)

    with ThreadPoolExecutor(1) as thread:

        def add(name: str, tensor: torch.Tensor) -> None:
            if pending:
                pending.pop().result()
            pending.append(thread.submit(write, name, tensor))

        yield add
        if pending:
            pending.pop().result()


@dataclass
class Terms:
    """What one output tensor is made of: theta_coef·Θ + Σ c·X + Σ c·Ψ, or ``passed`` as is."""

    name: str
    dtype: torch.dtype
    compute: torch.dtype = torch.float64
    theta: torch.Tensor | None = None
    theta_coef: float = 0.0
    dense: Dense = field(default_factory=list)
    updates: Updates = field(default_factory=list)
    passed: torch.Tensor | None = None


def _all_finite(block: torch.Tensor) -> bool:
    """Whether ``block`` holds no inf or nan: its min and max are finite unless a value is not
    (one pass, no temporary of the block's size: cheaper than ``isfinite`` or a float32 sum)."""
    return block.numel() == 0 or all(math.isfinite(x) for x in torch.aminmax(block))


def _refuse_overflow(terms: Terms, rows: Rows, block: torch.Tensor) -> None:
    """Fail if ``block``, rows ``rows`` of the output, is non-finite where its inputs are not."""
    inputs = [x for x in [terms.passed, terms.theta] + [x for _, x in terms.dense] if x is not None]
    for _, update in terms.updates:
        inputs += [x for x in (update.replacement, update.added) if x is not None]
        factors = [x for x in (update.a, update.b, update.magnitude) if x is not None]
        if not all(x.isfinite().all() for x in factors):
            return  # a non-finite factor reaches every value of Ψ
    new = ~block.isfinite()
    for x in inputs:
        new &= x[rows].isfinite()
    if new.any():
        raise WeightError(
            f"{terms.name}: {int(new.sum())} readapted values are inf or nan in float16 where no "
            "input is: beyond its range (±65504); merge in bfloat16 or float32 (the recipe's "
            "retriever.dtype)"
        )


def read_ahead(read: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """``read(item)`` for each of ``items``, on a thread of its own one item ahead of its use."""
    with ThreadPoolExecutor(1) as thread:
        reads = (thread.submit(read, item) for item in items)
        ahead = next(reads, None)
        while ahead is not None:
            current, ahead = ahead, next(reads, None)
            yield current.result()


class Readapter:
    """Θ + α·Ψ + β·Δ one tensor at a time: what to read for a tensor, and how to sum it.

    ``source`` gives the β term: a stored Δ (Checkpoint), the full retriever (Body, with Θ's
    coefficient 1 − β), or a PEFT retriever (Adapter, Ψ_R); ``knowledge`` gives Ψ.
    """

    def __init__(
        self,
        base: Body,
        source: Body | Checkpoint | Adapter | None,
        theta_coef: float,
        beta: float,
        knowledge: Adapter | None,
        alpha: float,
        dev: str,
    ) -> None:
        self.base, self.source, self.theta_coef, self.beta = base, source, theta_coef, beta
        self.knowledge, self.alpha, self.dev = knowledge, alpha, dev
        self.buffers = BufferPool()
        # seconds each of the overlapped steps was at work: on a CPU the longest bounds the
        # merge; on a GPU the copies both ways ("to device", part of "read", and "to host", part
        # of "write") wait for the sums queued before them
        self.busy = {"read": 0.0, "sum": 0.0, "write": 0.0}

    def read(self, ckpt: Body | Checkpoint, name: str, on_device: bool = True) -> torch.Tensor:
        """A stored tensor read into a pooled host buffer, then moved to the device unless
        ``on_device`` is False."""
        host = ckpt.get(name, self.buffers.take(ckpt.nbytes(name)))
        if not on_device or self.dev == "cpu":
            return host
        with timed(self.busy, "to device"):
            moved = host.to(self.dev)  # a synchronous copy: the host buffer is free afterwards
        self.buffers.give(host)
        return moved

    def terms(self, name: str, dtype: torch.dtype) -> Terms:
        """Read what the output tensor ``name`` is made of (on the device)."""
        with timed(self.busy, "read"):
            return self._terms(name, dtype)

    def _terms(self, name: str, dtype: torch.dtype) -> Terms:
        if not dtype.is_floating_point:
            return Terms(name, dtype, passed=self._unchanged(name))
        updates: Updates = []
        # a stored Δ omits zeros
        source = self.source if isinstance(self.source, Body | Checkpoint) else None
        stored_term = source is not None and name in source
        # Θ's own dtype counts too (a float64 Θ under a bf16 output is summed in float64); a PEFT
        # retriever is round(Θ + Ψ_R) taken in float64, as the delta stage defines it
        stored = [self.base.dtype(name)] + ([source.dtype(name)] if stored_term else [])
        peft = isinstance(self.source, Adapter)
        compute = torch.float64 if peft else compute_dtype(dtype, stored)
        if peft:
            self._add_update(updates, self.beta, self.source, name, compute)
        if self.knowledge is not None:
            self._add_update(updates, self.alpha, self.knowledge, name, compute)
        # A tensor that no term changes is passed on as stored (cast only): exactly, and without
        # a trip to the device and back.
        if not updates and not stored_term and self.theta_coef == 1:
            return Terms(name, dtype, passed=self.read(self.base, name, on_device=False))
        if not updates and stored_term and self.theta_coef == 0 and self.beta == 1:
            return Terms(name, dtype, passed=self.read(source, name, on_device=False))
        dense: Dense = [(self.beta, self.read(source, name))] if stored_term else []
        need_theta = self.theta_coef != 0 or any(update.needs_base for _, update in updates)
        theta = self.read(self.base, name) if need_theta else None
        return Terms(name, dtype, compute, theta, self.theta_coef, dense, updates)

    def output(self, terms: Terms, pool: ThreadPoolExecutor | None) -> torch.Tensor:
        """The output tensor. Inputs it does not share memory with go back to the buffer pool
        now, it goes back once written. On a GPU the sums are queued, not waited for: their
        time shows in the copies to and from the device, which wait for them."""
        with timed(self.busy, "sum"):
            return self._output(terms, pool)

    def _output(self, terms: Terms, pool: ThreadPoolExecutor | None) -> torch.Tensor:
        dtype, theta, dense, updates = terms.dtype, terms.theta, terms.dense, terms.updates
        passed = terms.passed
        # float16, narrower in range than bf16 and float32: each block checked as cast, in cache
        checked = dtype == torch.float16
        if passed is not None and not (checked and passed.dtype != dtype):
            cast = passed.to(dtype)
            if cast.data_ptr() != passed.data_ptr():
                self.buffers.give(passed)
            return cast
        shape = passed.shape if passed is not None else self.base.shape(terms.name)
        if self.dev == "cpu" or passed is not None:  # a passed tensor is on the host
            out = self.buffers.take(math.prod(shape) * dtype.itemsize).view(dtype).view(shape)
        else:
            out = torch.empty(shape, dtype=dtype, device=self.dev)
        whole = pool is None or not all(update.row_local for _, update in updates)

        def fill(rows: Rows) -> None:
            if passed is not None:
                out[rows] = passed[rows]
            else:
                scratch = None if whole else Scratch.of_thread()  # whole tensors: no buffers kept
                out[rows] = readapt_rows(
                    theta, terms.theta_coef, dense, updates, rows, scratch, terms.compute
                )
            # on a GPU this waits for the tensor's sums, which its copy to the host waits for too
            if checked and not _all_finite(out[rows]):
                _refuse_overflow(terms, rows, out[rows])

        over_blocks(fill, shape, pool, whole)
        for x in [x for _, x in dense] + [x for x in (theta, passed) if x is not None]:
            self.buffers.give(x)
        return out

    def _add_update(
        self, updates: Updates, coef: float, adapter: Adapter, name: str, dtype: torch.dtype
    ) -> None:
        target = adapter.target(name, self.dev, dtype)
        if target is not None:
            updates.append((coef, target))

    def _unchanged(self, name: str) -> torch.Tensor:
        # Integer tensors carry no update: a full retriever must hold Θ's values.
        theta = self.base.get(name)
        if isinstance(self.source, Body) and not torch.equal(self.source.get(name), theta):
            raise WeightError(f"non-float tensor {name} differs in {self.source.folder} and Θ")
        return theta

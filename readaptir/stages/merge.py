"""Readapt a retriever: W = Θ + α·Ψ + β·Δ for every body tensor of Θ, one tensor at a time.

Ψ is the change the knowledge adapter makes to Θ and Δ = retriever − Θ. The β·Δ term comes either
from a stored Δ (``delta_dir``, the delta stage's output) or straight from the retriever R with
nothing stored in between: (1 − β)·Θ + β·R + α·Ψ for a full retriever (with β = 1, Θ is read only
where Ψ needs it), Θ + α·Ψ + β·Ψ_R for a PEFT one.

Exactness: a tensor no term changes is copied as stored (cast only), so α=0, β=1 gives the
retriever and α=0, β=0 gives Θ bit for bit; every other sum is taken in one wider precision and
cast once to the output dtype: float32 for 16-bit outputs (bf16/fp16, the 7B models), float64 for
wider outputs or where a stored Δ tensor needed float64 to give the retriever back exactly.

Speed and memory: reading the next tensor, computing this one and writing the last overlap, each
on a thread of its own. On a CPU a tensor is computed in blocks of rows small enough to stay in
cache, by single-threaded workers, in buffers reused from block to block; host buffers for whole
tensors come from a pool. Memory holds a few tensors, whatever the model's size. The result is a
bare Hugging Face model folder (plus the retriever's tokenizer and sentence-transformers files)
that ``AutoModel`` loads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from readaptir.artifacts import resolve_device, write_json
from readaptir.lora import Adapter, Rows, TargetUpdate, add_psi
from readaptir.models import is_peft_adapter, torch_dtype
from readaptir.stages.delta import DELTA_JSON
from readaptir.weights import (
    DEFAULT_SHARD_BYTES,
    Body,
    BufferPool,
    Checkpoint,
    ShardWriter,
    TensorSpec,
    WeightError,
    auto_model_class,
    check_same_body,
    compute_dtype,
    dtype_name,
    is_buffer,
)

LOG = logging.getLogger(__name__)

READAPT_JSON = "readapt.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
# Elements per block of rows on a CPU: big enough that per-op overhead is small, small enough
# that the few 2-4 MiB temporaries stay in cache (measured best of 2^14…2^22).
BLOCK_ELEMENTS = 1 << 19

Dense = list[tuple[float, torch.Tensor]]  # coefficient, a stored tensor (R or Δ)
Updates = list[tuple[float, TargetUpdate]]  # coefficient, an adapter's tensors (Ψ or Ψ_R)


class Scratch:
    """Buffers reused from block to block (one set per thread).

    Fresh memory costs a page fault per 4 KiB, which on blocks of a few MiB is most of the work.
    """

    _threads = threading.local()

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

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
    if t is not None and theta_coef != 0:
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
def write_behind(
    writer: ShardWriter, done: Callable[[torch.Tensor], None]
) -> Iterator[Callable[[str, torch.Tensor], None]]:
    """``writer.add`` on a thread of its own: a tensor is written while the next is computed.

    At most one tensor waits; ``done`` gets each tensor once it is written.
    """
    pending: list[Future] = []

    def write(name: str, tensor: torch.Tensor) -> None:
        writer.add(name, tensor)
        done(tensor)

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


def read_ahead(readapter: Readapter, layout: list[TensorSpec]) -> Iterator[Terms]:
    """Each tensor's terms, read on a thread of its own one tensor ahead of their use."""
    with ThreadPoolExecutor(1) as thread:
        reads = (thread.submit(readapter.terms, name, dtype) for name, _, dtype in layout)
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

    def read(self, ckpt: Body | Checkpoint, name: str) -> torch.Tensor:
        """A stored tensor on the device, read into a pooled host buffer."""
        host = ckpt.get(name, self.buffers.take(ckpt.nbytes(name)))
        moved = host.to(self.dev)  # a synchronous copy: the host buffer is free afterwards
        if moved.data_ptr() != host.data_ptr():
            self.buffers.give(host)
        return moved

    def terms(self, name: str, dtype: torch.dtype) -> Terms:
        """Read what the output tensor ``name`` is made of (on the device)."""
        if not dtype.is_floating_point:
            return Terms(name, dtype, passed=self._unchanged(name))
        dense: Dense = []
        updates: Updates = []
        if isinstance(self.source, Body | Checkpoint) and name in self.source:
            dense.append((self.beta, self.read(self.source, name)))  # a stored Δ omits zeros
        compute = compute_dtype(dtype, [x.dtype for _, x in dense])
        if isinstance(self.source, Adapter):
            self._add_update(updates, self.beta, self.source, name, compute)
        if self.knowledge is not None:
            self._add_update(updates, self.alpha, self.knowledge, name, compute)
        # A tensor that no term changes is passed on as stored (cast only): exactly.
        if not updates and not dense and self.theta_coef == 1:
            return Terms(name, dtype, passed=self.read(self.base, name))
        if not updates and self.theta_coef == 0 and [c for c, _ in dense] == [1]:
            return Terms(name, dtype, passed=dense[0][1])
        need_theta = self.theta_coef != 0 or any(update.needs_base for _, update in updates)
        theta = self.read(self.base, name) if need_theta else None
        return Terms(name, dtype, compute, theta, self.theta_coef, dense, updates)

    def output(self, terms: Terms, pool: ThreadPoolExecutor | None) -> torch.Tensor:
        """The output tensor. Inputs it does not share memory with go back to the buffer pool
        now, it goes back once written."""
        dtype, theta, dense, updates = terms.dtype, terms.theta, terms.dense, terms.updates
        if terms.passed is not None:
            cast = terms.passed.to(dtype)
            if cast.data_ptr() != terms.passed.data_ptr():
                self.buffers.give(terms.passed)
            return cast
        shape = self.base.shape(terms.name)
        if self.dev == "cpu":
            out = self.buffers.take(math.prod(shape) * dtype.itemsize).view(dtype).view(shape)
        else:
            out = torch.empty(shape, dtype=dtype, device=self.dev)
        whole = pool is None or not all(update.row_local for _, update in updates)

        def fill(rows: Rows) -> None:
            scratch = None if whole else Scratch.of_thread()  # whole tensors: no buffers kept
            out[rows] = readapt_rows(
                theta, terms.theta_coef, dense, updates, rows, scratch, terms.compute
            )

        blocks = list(row_blocks(shape, whole))
        for _ in pool.map(fill, blocks) if pool and len(blocks) > 1 else map(fill, blocks):
            pass
        for x in [x for _, x in dense] + ([theta] if theta is not None else []):
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


def merge(
    base_dir: Path,
    out: Path,
    *,
    alpha: float,
    beta: float,
    adapter_dir: Path | None,
    delta_dir: Path | None,
    retriever_dir: Path,
    dtype: str | None = None,
    device: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict:
    """Write the readapted retriever into ``out`` and return what ``readapt.json`` records.

    Without ``delta_dir`` the β·Δ term is taken from ``retriever_dir`` directly.
    """
    if alpha != 0 and adapter_dir is None:
        raise ValueError(f"alpha={alpha} needs a knowledge adapter (adapter_dir)")
    base_dir, out, retriever_dir = Path(base_dir), Path(out), Path(retriever_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"output folder {out} is not empty")

    # Everything is checked on headers alone before a single tensor is read or written.
    base = Body(base_dir)
    retriever: Body | Adapter
    peft_retriever = is_peft_adapter(retriever_dir)
    if peft_retriever:
        retriever = Adapter(retriever_dir, base.prefix)
        retriever.check(base)
        out_dtype = torch_dtype(dtype) or base.ckpt.float_dtype()
    else:
        retriever = Body(retriever_dir)
        check_same_body(base, retriever)
        out_dtype = torch_dtype(dtype) or retriever.ckpt.float_dtype()
    knowledge = Adapter(Path(adapter_dir), base.prefix) if alpha != 0 else None
    if knowledge is not None:
        knowledge.check(base)
    route = "none" if beta == 0 else "delta" if delta_dir is not None else "retriever"
    source = _open_delta(Path(delta_dir), base) if route == "delta" else retriever
    theta_coef = 1 - beta if route == "retriever" and not peft_retriever else 1.0

    names = [n for n in base.names() if not is_buffer(n)]
    dropped = base.heads + [n for n in base.names() if is_buffer(n)]
    if dropped:
        LOG.info("not written to the readapted model: %s", dropped)
    layout: list[TensorSpec] = [
        (n, base.shape(n), out_dtype if base.dtype(n).is_floating_point else base.dtype(n))
        for n in names
    ]
    dev = resolve_device(device)
    readapter = Readapter(
        base, source if beta != 0 else None, theta_coef, beta, knowledge, alpha, dev
    )
    total = sum(math.prod(shape) * dt.itemsize for _, shape, dt in layout)
    started = time.perf_counter()
    with (
        block_pool(dev) as pool,
        ShardWriter(out, max_shard_bytes, layout) as writer,
        write_behind(writer, readapter.buffers.give) as add,
        tqdm(total=total, unit="B", unit_scale=True, desc="merge") as bar,
    ):
        for terms in read_ahead(readapter, layout):
            add(terms.name, readapter.output(terms, pool))
            bar.update(math.prod(base.shape(terms.name)) * terms.dtype.itemsize)
    seconds = time.perf_counter() - started
    LOG.info("merged %.2f GB in %.1f s (%.2f GB/s)", total / 1e9, seconds, total / 1e9 / seconds)

    config_src = base_dir if peft_retriever else retriever_dir
    _write_config(config_src, out, out_dtype)
    _copy_support_files(retriever_dir, base_dir, out)
    info = {
        "alpha": alpha,
        "beta": beta,
        "route": route,
        "dtype": dtype_name(out_dtype),
        "tensors": len(names),
        "dropped": dropped,
    }
    write_json(out / READAPT_JSON, info)
    LOG.info("readapted model (α=%s, β=%s, %s) written to %s", alpha, beta, info["dtype"], out)
    return info


def _open_delta(delta_dir: Path, base: Body) -> Checkpoint:
    """The stored Δ, checked to cover every body tensor of Θ with matching shapes."""
    meta_path = delta_dir / DELTA_JSON
    if not meta_path.is_file():
        raise WeightError(f"{delta_dir} has no {DELTA_JSON}; is it a delta stage output?")
    meta = json.loads(meta_path.read_text())
    delta = Checkpoint(delta_dir)
    for name in delta.names():
        if name not in base:
            raise WeightError(f"Δ tensor {name} in {delta_dir} is not in {base.folder}")
        if delta.shape(name) != base.shape(name):
            raise WeightError(
                f"Δ tensor {name} has shape {delta.shape(name)} in {delta_dir} "
                f"but {base.shape(name)} in {base.folder}"
            )
    known = set(delta.names()) | set(meta.get("zero", [])) | set(meta.get("buffers", []))
    for name in base.names():
        if name not in known and not is_buffer(name):
            raise WeightError(f"{delta_dir} has no Δ for tensor {name} of {base.folder}")
    return delta


def _write_config(src: Path, out: Path, dtype: torch.dtype) -> None:
    # The output holds the bare model, whatever class the source was saved as.
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = [auto_model_class(src).__name__]
    config["dtype"] = dtype_name(dtype)
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name(dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _copy_support_files(retriever_dir: Path, base_dir: Path, out: Path) -> None:
    """Tokenizer files (the retriever's, else the base's) and sentence-transformers modules."""
    tok_src = retriever_dir
    if not any((retriever_dir / f).is_file() for f in TOKENIZER_FILES):
        LOG.info("%s has no tokenizer files; using the base's", retriever_dir)
        tok_src = base_dir
    for name in TOKENIZER_FILES:
        if (tok_src / name).is_file():
            shutil.copy2(tok_src / name, out / name)
    modules = retriever_dir / "modules.json"
    if not modules.is_file():
        return
    for name in ST_FILES:
        if (retriever_dir / name).is_file():
            shutil.copy2(retriever_dir / name, out / name)
    for module in json.loads(modules.read_text()):
        sub = module.get("path", "")
        if sub and (retriever_dir / sub).is_dir():  # modules without files have no folder
            shutil.copytree(retriever_dir / sub, out / sub)

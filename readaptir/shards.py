"""Safetensors files read one tensor at a time and written shard by shard.

Both directions go through plain file reads and writes of the safetensors layout (an 8-byte header
length, a JSON header, then the tensors' bytes): memory holds only the tensors in hand. A folder is
one ``model.safetensors``, shards listed by ``model.safetensors.index.json``, or a PEFT adapter.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import BinaryIO

import torch

from readaptir.artifacts import INDEX, SINGLE, read_json_mapping

LOG = logging.getLogger(__name__)

ADAPTER = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"  # older PEFT releases' format; small enough to load whole
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_CODES = {dtype: code for code, dtype in _ST_DTYPES.items()}
DEFAULT_SHARD_BYTES = 2 * 1024**3
# A large tensor is read in pieces of this size, several at once: one thread copying out of the
# page cache runs well below what memory gives on a machine of many cores.
READ_PIECE = 16 << 20
READ_THREADS = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)

TensorSpec = tuple[str, tuple[int, ...], torch.dtype]  # name, shape, dtype


class WeightError(ValueError):
    """Checkpoints that do not fit together; the message names the tensor and the files."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _read_header(path: Path) -> tuple[dict[str, dict], int]:
    """The tensor entries of a safetensors header and where the tensor bytes start."""
    total = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if size is None or size > total - 8:
            lfs = head.startswith(b"version ")  # "version https://git-lfs…": a pointer file
            raise WeightError(
                f"{path} is not a safetensors file"
                + (" (a git-lfs pointer: run `git lfs pull`)" if lfs else f" ({total} bytes)")
            )
        try:
            header = json.loads(fh.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise WeightError(f"{path}: unreadable safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise WeightError(f"{path}: unreadable safetensors header")
    header.pop("__metadata__", None)
    _check_entries(path, header, total - 8 - size)
    return header, 8 + size


def _check_entries(path: Path, header: dict, data_bytes: int) -> None:
    """Every entry well formed, sized as its shape and dtype say, and the entries tiling the
    tensor bytes exactly (no overlap, no gap, nothing cut off), as the safetensors library
    requires; a file that breaks this would otherwise be read as wrong numbers."""
    spans = []
    for name, info in header.items():
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
            code = str(info["dtype"])
        except (TypeError, KeyError, ValueError):
            raise WeightError(
                f"{path}: malformed header entry for tensor {name}: {info!r}"
            ) from None
        dtype = _ST_DTYPES.get(code)
        if dtype is not None and end - begin != math.prod(shape) * dtype.itemsize:
            raise WeightError(
                f"{path}: tensor {name} ({code}, shape {shape}) has {end - begin} bytes, "
                f"not {math.prod(shape) * dtype.itemsize}"
            )
        spans.append((begin, end, name))
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            raise WeightError(
                f"{path}: tensor {name} starts at byte {begin} of the tensor data, not {at} "
                "(overlapping or missing bytes)"
            )
        at = end
    if at != data_bytes:
        raise WeightError(
            f"{path}: its header describes {at} bytes of tensor data, the file holds {data_bytes}"
            + (" (cut short)" if at > data_bytes else "")
        )


class _Readers:
    """The threads that read pieces of large tensors, shared by every read of the process."""

    _lock = threading.Lock()
    _pool: ThreadPoolExecutor | None = None

    @classmethod
    def pool(cls) -> ThreadPoolExecutor:
        with cls._lock:
            if cls._pool is None:
                cls._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="readaptir-read")
            return cls._pool

    @classmethod
    def forget(cls) -> None:
        # a forked child has none of its parent's threads, and may hold the lock one of them took
        cls._pool, cls._lock = None, threading.Lock()


os.register_at_fork(after_in_child=_Readers.forget)


def _pread_all(fd: int, view: memoryview, offset: int, path: Path) -> None:
    # One read returns at most ~2 GiB on Linux: loop until the view is full.
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if not got:
            raise WeightError(f"{path} ends before its header says it should")
        done += got


def read_at(path: Path, offset: int, view: memoryview) -> None:
    """Fill ``view`` with the bytes of ``path`` from ``offset``; beyond READ_PIECE bytes, in
    pieces read by several threads at once."""
    fd = os.open(path, os.O_RDONLY)
    jobs: list[Future] = []
    try:
        starts = range(0, len(view), READ_PIECE)
        if len(starts) <= 1 or READ_THREADS == 1:
            _pread_all(fd, view, offset, path)
            return
        pool = _Readers.pool()
        for i in starts:
            jobs.append(pool.submit(_pread_all, fd, view[i : i + READ_PIECE], offset + i, path))
        for job in jobs:
            job.result()
    finally:  # failed or interrupted: no piece may still read when the file closes
        for job in jobs:
            job.cancel()
        wait(jobs)
        os.close(fd)


def _header_bytes(specs: Sequence[TensorSpec]) -> bytes:
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        size = math.prod(shape) * dtype.itemsize
        entry = {
            "dtype": _ST_CODES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        header[name], offset = entry, offset + size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # tensor bytes 8-byte aligned, as safetensors pads
    return struct.pack("<Q", len(text)) + text


class Checkpoint:
    """Lazy view of the safetensors files in a model or PEFT adapter folder; with ``adapter``,
    the adapter's files first (a repository may hold merged weights beside them)."""

    def __init__(self, folder: Path, adapter: bool = False) -> None:
        self.folder = Path(folder)
        self.adapter = adapter
        self._meta: dict[str, dict] = {}
        self._file_of: dict[str, Path] = {}
        self._data_start: dict[Path, int] = {}
        self._loaded: dict[str, torch.Tensor] = {}  # an adapter_model.bin, held in memory
        if self._adapter_bin():
            self._load_bin(self.folder / ADAPTER_BIN)
            return
        self._files, weight_map = self._locate()
        for path in self._files:
            header, self._data_start[path] = _read_header(path)
            for name, info in header.items():
                if name in self._file_of:
                    raise WeightError(
                        f"tensor {name} is in both {self._file_of[name]} and {path.name}"
                    )
                mapped = (weight_map or {}).get(name)
                if mapped is not None and self.folder / mapped != path:
                    raise WeightError(
                        f"{path} holds tensor {name}, which {INDEX} maps to {mapped!r}"
                    )
                self._meta[name] = info
                self._file_of[name] = path
        # an index naming a tensor no shard holds is stale (published checkpoints have such
        # entries, and transformers loads them): what the model needs is checked by name later
        unheld = sorted(set(weight_map or ()) - set(self._meta))
        if unheld:
            LOG.warning(
                "%s names %d tensors no shard holds (e.g. %s)",
                self.folder / INDEX, len(unheld), unheld[0],
            )  # fmt: skip

    def _adapter_bin(self) -> bool:
        """Whether the weights to read are a PEFT ``adapter_model.bin``: with ``adapter``, where
        no safetensors adapter is; else only where the folder has no model weights either (a
        stray one beside them is not what transformers reads)."""
        folder = self.folder
        if (folder / ADAPTER).is_file() or not (folder / ADAPTER_BIN).is_file():
            return False
        return self.adapter or not ((folder / SINGLE).is_file() or (folder / INDEX).is_file())

    def _load_bin(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors come in many types
            raise WeightError(f"{path}: not a readable PyTorch state dict ({err})") from None
        self._files = [path]
        for name, tensor in state.items():
            if tensor.dtype not in _ST_CODES:
                raise WeightError(f"tensor {name} in {path} has unsupported dtype {tensor.dtype}")
            size = tensor.numel() * tensor.element_size()
            self._meta[name] = {
                "dtype": _ST_CODES[tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [0, size],
            }
            self._file_of[name] = path
            self._loaded[name] = tensor.contiguous()

    def _locate(self) -> tuple[list[Path], dict[str, str] | None]:
        """The weight files, and the index's map of tensor names to them (if there is one)."""
        folder = self.folder
        if self.adapter and (folder / ADAPTER).is_file():
            return [folder / ADAPTER], None
        if (folder / SINGLE).is_file():  # what transformers reads where both are present
            return [folder / SINGLE], None
        if (folder / INDEX).is_file():
            index = read_json_mapping(folder / INDEX)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                isinstance(f, str) for f in weight_map.values()
            ):
                raise WeightError(f"{folder / INDEX}: no weight_map of tensor names to files")
            return [folder / f for f in sorted(set(weight_map.values()))], weight_map
        if (folder / ADAPTER).is_file():
            return [folder / ADAPTER], None
        found = sorted(p.name for p in folder.glob("*.bin")) if folder.is_dir() else []
        if found:
            raise WeightError(f"{folder} holds only {found}; safetensors weights are required")
        raise WeightError(f"no {SINGLE}, {INDEX} or {ADAPTER} in {folder}")

    def names(self) -> list[str]:
        return list(self._meta)

    def __contains__(self, name: str) -> bool:
        return name in self._meta

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self._info(name)["dtype"]
        if code not in _ST_DTYPES:
            raise WeightError(
                f"tensor {name} in {self._file_of[name]} has unsupported dtype {code}"
            )
        return _ST_DTYPES[code]

    def nbytes(self, name: str) -> int:
        start, end = self._info(name)["data_offsets"]
        return end - start

    def get(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, read into memory of its own: ``buffer`` (uint8, its size) if given.

        Not through a memory map: the pages of a map stay resident (and counted) for as long as
        the file is open, which over a whole model adds up to the model's size.
        """
        dtype, shape, size = self.dtype(name), self.shape(name), self.nbytes(name)
        if name in self._loaded:
            buf = torch.empty(size, dtype=torch.uint8) if buffer is None else buffer
            return buf.view(dtype).reshape(shape).copy_(self._loaded[name])
        path = self._file_of[name]
        if size != math.prod(shape) * dtype.itemsize:
            raise WeightError(f"tensor {name} in {path}: {size} bytes for shape {shape} {dtype}")
        buf = torch.empty(size, dtype=torch.uint8) if buffer is None else buffer
        start = self._data_start[path] + self._info(name)["data_offsets"][0]
        read_at(path, start, memoryview(buf.numpy()))
        return buf.view(dtype).reshape(shape)

    def _info(self, name: str) -> dict:
        if name not in self._meta:
            raise WeightError(f"tensor {name} is not in {self.folder}")
        return self._meta[name]

    def float_dtype(self) -> torch.dtype:
        """The floating dtype holding most of the parameters."""
        counts: Counter[torch.dtype] = Counter()
        for name in self._meta:
            dtype = self.dtype(name)
            if dtype.is_floating_point:
                counts[dtype] += self.nbytes(name) // dtype.itemsize
        if not counts:
            raise WeightError(f"no floating-point tensors in {self.folder}")
        return counts.most_common(1)[0][0]


class BufferPool:
    """Host byte buffers lent out and given back, so that big tensors reuse memory.

    glibc maps blocks over its threshold (32 MiB at most) afresh and unmaps them when freed, so
    each new one faults in zeroed pages again; at 7B shapes (90 MiB MLP weights) that costs more
    than reading the bytes, and more still on a virtual machine. A buffer given back must not be
    used again by the giver.
    """

    def __init__(self, keep: int = 4, min_bytes: int = 1 << 20) -> None:
        self.keep, self.min_bytes = keep, min_bytes  # smaller blocks: glibc reuses them anyway
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of ``nbytes``, its content undefined."""
        if nbytes < self.min_bytes:
            return torch.empty(nbytes, dtype=torch.uint8)
        with self._lock:
            fits = [i for i, buf in enumerate(self._free) if buf.numel() >= nbytes]
            if fits:
                best = min(fits, key=lambda i: self._free[i].numel())
                return self._free.pop(best)[:nbytes]
        return torch.empty(nbytes, dtype=torch.uint8)

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of ``tensor`` (a GPU's output, say) in a buffer of the pool, to give back when
        done: not in fresh memory, which faults in page by page."""
        host = self.take(tensor.nbytes).view(tensor.dtype).view(tensor.shape)
        return host.copy_(tensor)

    def give(self, tensor: torch.Tensor) -> None:
        """Take back the memory under ``tensor`` (a host tensor the caller is done with)."""
        storage = tensor.untyped_storage()
        if tensor.device.type != "cpu" or storage.nbytes() < self.min_bytes:
            return
        with self._lock:
            if all(buf.data_ptr() != storage.data_ptr() for buf in self._free):
                self._free.append(torch.empty(0, dtype=torch.uint8).set_(storage))
                self._free.sort(key=torch.Tensor.numel, reverse=True)
                del self._free[self.keep :]  # the smallest go back to the system


def plan_shards(specs: Sequence[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors grouped into shards of at most ``max_bytes`` (a bigger one alone)."""
    shards: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * spec[2].itemsize
        if not shards or (shards[-1] and size + nbytes > max_bytes):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


class ShardWriter:
    """Write tensors into safetensors shards of at most ``max_shard_bytes`` each.

    Given the ``layout`` (every tensor's name, shape and dtype, in writing order) up front, each
    tensor goes to disk as it is added: memory holds only the tensor in hand. Without it, a
    shard's tensors are held until the shard is full. Shards get provisional names while writing
    and their final ``-of-N`` names at ``close``; a single shard becomes ``model.safetensors``.
    """

    def __init__(
        self,
        out_dir: Path,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        layout: Sequence[TensorSpec] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._plan = None if layout is None else plan_shards(layout, max_shard_bytes)
        self._file: BinaryIO | None = None
        self._due: list[TensorSpec] = []  # still to come in the open shard, in header order
        self._pending: list[tuple[TensorSpec, torch.Tensor]] = []
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._seen: set[str] = set()
        self.total_bytes = 0

    @property
    def writes_as_added(self) -> bool:
        """Whether each tensor is on disk once ``add`` returns (given a layout), not held."""
        return self._plan is not None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._seen:
            raise WeightError(f"tensor {name} written twice to {self.out_dir}")
        self._seen.add(name)
        tensor = tensor.detach().to("cpu").contiguous()
        spec, size = (name, tuple(tensor.shape), tensor.dtype), tensor.nbytes
        self.total_bytes += size
        if self._plan is None:
            if self._pending and self._pending_bytes + size > self.max_shard_bytes:
                self._flush()
            self._pending.append((spec, tensor))
            self._pending_bytes += size
            return
        if not self._due:
            if not self._plan:
                raise WeightError(f"tensor {name} is not in the layout of {self.out_dir}")
            self._begin(self._plan.pop(0))
        self._write(spec, tensor)

    def _begin(self, specs: list[TensorSpec]) -> None:
        path = self.out_dir / f".shard-{len(self._shards) + 1:05d}.safetensors"
        self._shards.append((path, [spec[0] for spec in specs]))
        self._file = open(path, "wb")  # noqa: SIM115 (closed after its last tensor, or by abort)
        self._file.write(_header_bytes(specs))
        self._due = list(specs)
        if not specs:
            self._file.close()

    def _write(self, spec: TensorSpec, tensor: torch.Tensor) -> None:
        if spec != self._due[0]:
            raise WeightError(f"{self.out_dir}: got tensor {spec}, the layout has {self._due[0]}")
        assert self._file is not None
        self._file.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        self._due.pop(0)
        if not self._due:
            self._file.close()

    def _flush(self) -> None:
        self._begin([spec for spec, _ in self._pending])
        for spec, tensor in self._pending:
            self._write(spec, tensor)
        self._pending, self._pending_bytes = [], 0

    def close(self) -> list[Path]:
        """Finish the last shard, give every shard its final name, write the index if sharded."""
        if self._plan is None:
            if self._pending or not self._shards:
                self._flush()
        else:
            missing = [spec[0] for spec in self._due + sum(self._plan, [])]
            if missing:
                self.abort()
                raise WeightError(f"{self.out_dir}: tensors never written: {missing[:3]}")
            if not self._shards:
                self._begin([])
        count = len(self._shards)
        if count == 1:
            final = self.out_dir / SINGLE
            os.replace(self._shards[0][0], final)
            return [final]
        weight_map: dict[str, str] = {}
        finals = []
        for i, (path, names) in enumerate(self._shards, start=1):
            final = self.out_dir / f"model-{i:05d}-of-{count:05d}.safetensors"
            os.replace(path, final)
            finals.append(final)
            weight_map.update({n: final.name for n in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return finals

    def abort(self) -> None:
        """Close an unfinished shard file; the caller discards the folder."""
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

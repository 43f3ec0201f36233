"""Safetensors checkpoints read one tensor at a time, canonical tensor names, and sharded writing.

Canonical names are those of the bare transformer (``AutoModel``): a causal-LM checkpoint
(``model.layers.0…``) and a bare one (``layers.0…``) agree once the base-model prefix is stripped.
Tensors outside the prefix of a prefixed checkpoint (``lm_head``, ``cls.*``) are heads.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import torch

LOG = logging.getLogger(__name__)

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
ADAPTER = "adapter_model.safetensors"
# Buffers some checkpoints carry and others do not; models rebuild them at load time.
BUFFER_SUFFIXES = ("position_ids", "rotary_emb.inv_freq")

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


class WeightError(ValueError):
    """Checkpoints that do not fit together; the message names the tensor and the files."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _read_header(path: Path) -> dict[str, dict]:
    # The safetensors header is a little-endian u64 length followed by JSON: no tensor data read.
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    return header


class Checkpoint:
    """Lazy view of the safetensors files in a model or PEFT adapter folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._files = self._locate()
        self._meta: dict[str, dict] = {}
        self._file_of: dict[str, Path] = {}
        for path in self._files:
            for name, info in _read_header(path).items():
                self._meta[name] = info
                self._file_of[name] = path
        self._handles: dict[Path, Any] = {}  # open safe_open readers (memory-mapped)

    def _locate(self) -> list[Path]:
        folder = self.folder
        if (folder / INDEX).is_file():
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
            return [folder / f for f in sorted(set(weight_map.values()))]
        for name in (SINGLE, ADAPTER):
            if (folder / name).is_file():
                return [folder / name]
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

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        self._info(name)
        path = self._file_of[name]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return self._handles[path].get_tensor(name)

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


def auto_model_class(model_dir: Path) -> type:
    """The bare ``AutoModel`` class for the folder's config.json."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    if not (Path(model_dir) / "config.json").is_file():
        raise WeightError(f"no config.json in {model_dir}")
    config = AutoConfig.from_pretrained(model_dir)
    try:
        return MODEL_MAPPING[type(config)]
    except KeyError:
        raise WeightError(
            f"{model_dir}: no AutoModel class for model_type {config.model_type!r}"
        ) from None


def base_model_prefix(model_dir: Path) -> str:
    return auto_model_class(model_dir).base_model_prefix


def is_buffer(name: str) -> bool:
    return name.endswith(BUFFER_SUFFIXES)


def split_head(names: list[str], prefix: str) -> tuple[dict[str, str], list[str]]:
    """Canonical name → stored name for body tensors, and the stored names of head tensors.

    A checkpoint is prefixed when any tensor starts with ``prefix.``; then the others are heads.
    """
    lead = prefix + "."
    if not any(n.startswith(lead) for n in names):
        return {n: n for n in names}, []
    body = {n[len(lead) :]: n for n in names if n.startswith(lead)}
    return body, sorted(n for n in names if not n.startswith(lead))


class Body:
    """A checkpoint seen through canonical names, head tensors set aside (and reported)."""

    def __init__(self, model_dir: Path, prefix: str | None = None) -> None:
        self.folder = Path(model_dir)
        self.ckpt = Checkpoint(model_dir)
        self.prefix = base_model_prefix(model_dir) if prefix is None else prefix
        self._raw, self.heads = split_head(self.ckpt.names(), self.prefix)
        if self.heads:
            LOG.info("%s: dropping head tensors %s", self.folder, self.heads)

    def names(self) -> list[str]:
        return list(self._raw)

    def __contains__(self, name: str) -> bool:
        return name in self._raw

    def shape(self, name: str) -> tuple[int, ...]:
        return self.ckpt.shape(self._raw[name])

    def dtype(self, name: str) -> torch.dtype:
        return self.ckpt.dtype(self._raw[name])

    def nbytes(self, name: str) -> int:
        return self.ckpt.nbytes(self._raw[name])

    def get(self, name: str) -> torch.Tensor:
        return self.ckpt.get(self._raw[name])


def check_same_body(base: Body, other: Body) -> list[str]:
    """Raise unless ``other`` has ``base``'s tensors with the same shapes (buffers aside).

    Returns the buffers only one side holds, which are dropped.
    """
    for name in other.names():
        if name not in base:
            if not is_buffer(name):
                raise WeightError(
                    f"tensor {name} {other.shape(name)} of {other.folder} "
                    f"is missing from {base.folder}"
                )
        elif other.shape(name) != base.shape(name):
            raise WeightError(
                f"tensor {name} has shape {other.shape(name)} in {other.folder} "
                f"but {base.shape(name)} in {base.folder}"
            )
    for name in base.names():
        if name not in other and not is_buffer(name):
            raise WeightError(
                f"tensor {name} {base.shape(name)} of {base.folder} is missing from {other.folder}"
            )
    one_side = sorted(set(base.names()) ^ set(other.names()))
    if one_side:
        LOG.info("dropping buffers present on one side only: %s", one_side)
    return one_side


class ShardWriter:
    """Write tensors one by one into safetensors shards of at most ``max_shard_bytes`` each.

    Shards get provisional names while writing and their final ``-of-N`` names at ``close``;
    a single shard becomes ``model.safetensors`` without an index.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int = 2 * 1024**3) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._seen: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._seen:
            raise WeightError(f"tensor {name} written twice to {self.out_dir}")
        self._seen.add(name)
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out_dir / f".shard-{len(self._shards) + 1:05d}.safetensors"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Finish the last shard, give every shard its final name, write the index if sharded."""
        if self._pending or not self._shards:
            self._flush()
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

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()

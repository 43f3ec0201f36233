"""Δ = retriever − Θ over the shared canonical tensors, stored exactly.

Each Δ tensor is stored as float32 when Θ + Δ, evaluated as the merge evaluates it (float32 for a
16-bit retriever and Θ, float64 otherwise; ``weights.compute_dtype``) and cast to the retriever's
dtype, gives back the retriever bit for bit; otherwise as float64 (and merged in float64). The
check assumes the merge writes the retriever's dtype: a recipe ``dtype`` that changes it can
round a rare tensor differently.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from readaptir.artifacts import resolve_device, write_json
from readaptir.lora import Adapter
from readaptir.models import is_peft_adapter
from readaptir.shards import ShardWriter, WeightError, dtype_name
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


def _require_empty(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"output folder {out} is not empty")


def compute_delta(
    base_dir: Path, retriever_dir: Path, out: Path, *, device: str | None = None
) -> dict:
    """Write Δ = retriever − Θ into ``out`` (safetensors + delta.json) and return the info."""
    base_dir, retriever_dir, out = Path(base_dir), Path(retriever_dir), Path(out)
    _require_empty(out)
    dev = resolve_device(device)
    base = Body(base_dir)
    info: dict = {"dropped": {"base": base.heads}, "buffers": [], "zero": [], "inexact": []}
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
        source = adapter
    else:
        retriever = Body(retriever_dir)
        info["buffers"] = check_same_body(base, retriever)
        names = [n for n in base.names() if n in retriever]
        info["kind"] = "full"
        info["dropped"]["retriever"] = retriever.heads
        info["retriever_dtype"] = dtype_name(retriever.ckpt.float_dtype())
        source = retriever

    storage: dict[str, str] = {}
    total = sum(base.nbytes(n) for n in names)
    with (
        ShardWriter(out) as writer,
        tqdm(total=total, unit="B", unit_scale=True, desc="delta") as bar,
    ):
        for name in names:
            bar.update(base.nbytes(name))
            if is_buffer(name):  # rebuilt by the model at load time; carries no Δ
                info["buffers"].append(name)
                continue
            theta = base.get(name).to(dev)
            if not theta.is_floating_point():
                _check_unchanged(name, theta, source)
                info["zero"].append(name)
                continue
            theta64 = theta.double()
            delta, target = _delta(name, theta, theta64, source)
            kind = storage_dtype(theta64, delta, target, theta.dtype)
            if kind == torch.float64 and not torch.equal(
                (theta64 + delta).to(target.dtype), target
            ):
                info["inexact"].append(name)
                LOG.warning("%s: Θ + Δ does not give back the retriever exactly", name)
            writer.add(name, delta.to(kind))
            storage[name] = dtype_name(kind)
    info["storage"] = storage
    write_json(out / DELTA_JSON, info)
    LOG.info("Δ of %d tensors written to %s", len(storage), out)
    return info


def _delta(
    name: str, theta: torch.Tensor, base: torch.Tensor, source: Body | Adapter
) -> tuple[torch.Tensor, torch.Tensor]:
    """Δ in float64 and the retriever tensor it must reproduce, in the retriever's dtype.

    ``theta`` is Θ's tensor as stored, ``base`` the same in float64.
    """
    if isinstance(source, Adapter):
        delta = source.update(name, base)
        if delta is None:
            raise WeightError(f"{name} is not a target of the adapter in {source.folder}")
        # A PEFT retriever is Θ + Δ itself, held in Θ's dtype.
        return delta, (base + delta).to(theta.dtype)
    target = source.get(name).to(theta.device)
    return target.double() - base, target


def _check_unchanged(name: str, theta: torch.Tensor, source: Body | Adapter) -> None:
    # Non-float tensors carry no Δ, so the retriever must hold the same values.
    if isinstance(source, Body) and not torch.equal(source.get(name).to(theta.device), theta):
        raise WeightError(f"non-float tensor {name} differs between {source.folder} and the base")

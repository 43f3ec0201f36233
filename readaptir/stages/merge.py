"""Readapt a retriever: W = Θ + α·Ψ + β·Δ for every body tensor of Θ, one tensor at a time.

Ψ is the change the knowledge adapter makes to Θ and Δ = retriever − Θ. The β·Δ term comes either
from a stored Δ (``delta_dir``, the delta stage's output) or straight from the retriever R with
nothing stored in between: (1 − β)·Θ + β·R + α·Ψ for a full retriever (with β = 1, Θ is read only
where Ψ needs it), Θ + α·Ψ + β·Ψ_R for a PEFT one. Every name and shape is checked before a tensor
is read; the sums are ``readapt.Readapter``'s (exactness, speed and memory are described there).
The result is a bare Hugging Face model folder (plus the retriever's tokenizer and
sentence-transformers files) that ``AutoModel`` loads.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from readaptir.artifacts import (
    read_json,
    read_json_mapping,
    require_empty,
    resolve_device,
    write_json,
)
from readaptir.lora import Adapter
from readaptir.models import has_tokenizer, is_peft_adapter, torch_dtype
from readaptir.readapt import (
    Readapter,
    Terms,
    block_pool,
    describe_busy,
    exact_float32,
    read_ahead,
    write_behind,
)
from readaptir.shards import (
    DEFAULT_SHARD_BYTES,
    Checkpoint,
    ShardWriter,
    TensorSpec,
    WeightError,
    dtype_name,
)
from readaptir.stages.delta import DELTA_JSON
from readaptir.weights import Body, auto_model_class, check_same_body, is_buffer

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
    "bpe.codes",  # PhoBERT's BPE
    "spm.model",  # DeBERTa-v2/v3's SentencePiece
    "sentencepiece.model",
)
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


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
    busy: dict[str, float] | None = None,
) -> dict:
    """Write the readapted retriever into ``out`` and return what ``readapt.json`` records.

    Without ``delta_dir`` the β·Δ term is taken from ``retriever_dir`` directly. ``busy``, if
    given, gets the seconds each overlapped step (read, sum, write) was at work.
    """
    if alpha != 0 and adapter_dir is None:
        raise ValueError(f"alpha={alpha} needs a knowledge adapter (adapter_dir)")
    base_dir, out, retriever_dir = Path(base_dir), Path(out), Path(retriever_dir)
    require_empty(out)

    # Everything is checked on headers alone before a single tensor is read or written.
    base = Body(base_dir)
    retriever: Body | Adapter
    peft_retriever = is_peft_adapter(retriever_dir)
    # optional modules (a pooler) one side holds: the retriever's kept as they are, Θ's dropped
    optional: list[str] = []
    theta_only: list[str] = []
    if peft_retriever:
        retriever = Adapter(retriever_dir, base.prefix)
        retriever.check(base)
    else:
        retriever = Body(retriever_dir)
        one_side = check_same_body(base, retriever)
        optional, theta_only = one_side.other_only, one_side.base_only
    # the model's own storage, tensor by tensor unless the recipe names one dtype (a bf16 model
    # keeping its norms in float32 stays so): the retriever's, but Θ's under a LoRA retriever and
    # at β = 0, where the output is Θ + αΨ (a float16 retriever's dtype would round a bf16 Θ's
    # tiniest values and turn its largest into inf)
    stored = base if peft_retriever or beta == 0 else retriever
    forced = torch_dtype(dtype)
    out_dtype = forced or stored.ckpt.float_dtype()
    knowledge = Adapter(Path(adapter_dir), base.prefix) if alpha != 0 else None
    if knowledge is not None:
        knowledge.check(base)
    route = "none" if beta == 0 else "delta" if delta_dir is not None else "retriever"
    source = _open_delta(Path(delta_dir), base) if route == "delta" else retriever
    theta_coef = 1 - beta if route == "retriever" and not peft_retriever else 1.0

    names = [n for n in base.names() if not is_buffer(n) and n not in theta_only]
    dropped = base.heads + [n for n in base.names() if is_buffer(n)] + theta_only
    if dropped:
        LOG.info("not written to the readapted model: %s", dropped)

    def spec(name: str, body: Body) -> TensorSpec:
        """A float as the recipe forces or as ``body`` stores it; another dtype as stored."""
        dt = body.dtype(name)
        return name, body.shape(name), (forced or dt) if dt.is_floating_point else dt

    layout = [spec(n, stored if stored.dtype(n).is_floating_point else base) for n in names]
    layout += [spec(n, retriever) for n in optional]
    dev = resolve_device(device)
    readapter = Readapter(
        base, source if beta != 0 else None, theta_coef, beta, knowledge, alpha, dev
    )
    sizes = {name: math.prod(shape) * dt.itemsize for name, shape, dt in layout}
    total = sum(sizes.values())

    def read(spec: TensorSpec) -> Terms:
        name, _, dtype = spec
        if name in optional:
            return Terms(name, dtype, passed=readapter.read(retriever, name, on_device=False))
        return readapter.terms(name, dtype)

    out.mkdir(parents=True, exist_ok=True)  # only once every check has passed
    started = time.perf_counter()
    with (
        exact_float32(),
        block_pool(dev) as pool,
        ShardWriter(out, max_shard_bytes, layout) as writer,
        write_behind(writer, readapter.buffers, readapter.busy) as add,
        tqdm(total=total, unit="B", unit_scale=True, desc="merge") as bar,
    ):
        for terms in read_ahead(read, layout):
            add(terms.name, readapter.output(terms, pool))
            bar.update(sizes[terms.name])
    seconds = time.perf_counter() - started
    LOG.info("merged %.2f GB in %.1f s (%.2f GB/s)", total / 1e9, seconds, total / 1e9 / seconds)
    LOG.info(
        "busy (overlapped; on a GPU the copies wait for the sums): %s",
        describe_busy(readapter.busy),
    )
    if busy is not None:
        busy.update(readapter.busy)

    config_src = base_dir if peft_retriever else retriever_dir
    _write_config(config_src, out, out_dtype)
    _copy_support_files(retriever_dir, base_dir, out, peft_retriever)
    info = {
        "alpha": alpha,
        "beta": beta,
        "route": route,
        "dtype": dtype_name(out_dtype),
        "tensors": len(layout),
        "dropped": dropped,
        "retriever_only": optional,
    }
    write_json(out / READAPT_JSON, info)
    LOG.info("readapted model (α=%s, β=%s, %s) written to %s", alpha, beta, info["dtype"], out)
    return info


def _open_delta(delta_dir: Path, base: Body) -> Checkpoint:
    """The stored Δ, checked to cover every body tensor of Θ with matching shapes."""
    meta_path = delta_dir / DELTA_JSON
    if not meta_path.is_file():
        raise WeightError(f"{delta_dir} has no {DELTA_JSON}; is it a delta stage output?")
    meta = read_json_mapping(meta_path)
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
    known |= set(meta.get("dropped", {}).get("base", []))  # a pooler Θ alone holds, say
    for name in base.names():
        if name not in known and not is_buffer(name):
            raise WeightError(f"{delta_dir} has no Δ for tensor {name} of {base.folder}")
    return delta


def _write_config(src: Path, out: Path, dtype: torch.dtype) -> None:
    # The output holds the bare model, whatever class the source was saved as.
    config = read_json_mapping(src / "config.json")
    config["architectures"] = [auto_model_class(src).__name__]
    config["dtype"] = dtype_name(dtype)
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name(dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _copy_support_files(retriever_dir: Path, base_dir: Path, out: Path, peft: bool) -> None:
    """Tokenizer files (the retriever's, else the base's) and sentence-transformers modules: the
    retriever's, else for a PEFT retriever the base's, as the retriever alone is encoded with
    (``Encoder.load``), so that both runs pool and cut texts alike."""
    tok_src = retriever_dir
    if not has_tokenizer(retriever_dir):  # the rule the retriever alone is encoded by
        LOG.info("%s has no tokenizer files; using the base's", retriever_dir)
        tok_src = base_dir
    for name in TOKENIZER_FILES:
        if (tok_src / name).is_file():
            shutil.copy2(tok_src / name, out / name)
    st_src = retriever_dir if (retriever_dir / "modules.json").is_file() or not peft else base_dir
    if not (st_src / "modules.json").is_file():
        return
    for name in ST_FILES:
        if (st_src / name).is_file():
            shutil.copy2(st_src / name, out / name)
    for module in read_json(st_src / "modules.json"):
        sub = module.get("path", "")
        if sub and (st_src / sub).is_dir():  # modules without files have no folder
            shutil.copytree(st_src / sub, out / sub)

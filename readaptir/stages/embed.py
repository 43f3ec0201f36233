"""Embed a collection: every passage, and the queries judged in one split.

Output folder layout (float16 to halve disk and RAM; scoring happens in float32 later)::

    corpus-00000.npy ...   at most ``shard_size`` passage vectors each, in corpus order
    corpus_ids.json        passage ids in corpus order
    queries.npy            vectors of the judged queries
    query_ids.json         their ids, in queries-file order
    info.json              sizes, the encoding asked for and the settings actually used
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from readaptir.artifacts import resolve_device, write_json
from readaptir.corpus import load_collection, passage_text, query_text
from readaptir.families import Encoding, Pooling
from readaptir.models import load_encoder, torch_dtype

LOG = logging.getLogger(__name__)

FALLBACK_POOLING: Pooling = "mean"
FALLBACK_NORMALIZE = True
FALLBACK_MAX_LENGTH = 512
# Tokenizers without a real limit report a huge sentinel as their model_max_length.
_SANE_MAX_LENGTH = 100_000

_ST_POOLING: dict[str, Pooling] = {"cls": "cls", "mean": "mean", "lasttoken": "last"}
_ST_LEGACY_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass(frozen=True)
class STConfig:
    """What a sentence-transformers model folder says about pooling, normalisation and length.

    ``pooling`` is the sentence-transformers mode name (``mean``, ``cls``, ``lasttoken``, ...).
    """

    pooling: str | None
    normalize: bool
    max_seq_length: int | None


@dataclass(frozen=True)
class Resolved:
    """The encoding settings actually used, with every ``None`` of the family filled in."""

    pooling: Pooling
    normalize: bool
    max_query_length: int
    max_passage_length: int


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _st_pooling_mode(config: dict) -> str | None:
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        if isinstance(mode, list):
            mode = mode[0] if len(mode) == 1 else "+".join(mode)
        return mode
    active = [name for key, name in _ST_LEGACY_POOLING.items() if config.get(key)]
    return "+".join(active) if active else None


def read_st_config(model_dir: Path | None) -> STConfig | None:
    """The sentence-transformers settings stored in ``model_dir``; None when it has none."""
    if model_dir is None or not (Path(model_dir) / "modules.json").is_file():
        return None
    model_dir = Path(model_dir)
    modules = _read_json(model_dir / "modules.json")
    types = [m.get("type", "") for m in modules]
    pooling = None
    for m in modules:
        cfg = model_dir / m.get("path", "") / "config.json"
        if m.get("type", "").endswith(".Pooling") and cfg.is_file():
            pooling = _st_pooling_mode(_read_json(cfg))
    max_len = None
    bert_cfg = model_dir / "sentence_bert_config.json"
    if bert_cfg.is_file():
        max_len = _read_json(bert_cfg).get("max_seq_length")
    tok_cfg = model_dir / "tokenizer_config.json"
    if max_len is None and tok_cfg.is_file():
        # Newer sentence-transformers releases keep the limit in the tokenizer config instead.
        limit = _read_json(tok_cfg).get("model_max_length")
        if isinstance(limit, int) and limit < _SANE_MAX_LENGTH:
            max_len = limit
    normalize = any(t.endswith(".Normalize") for t in types)
    return STConfig(pooling=pooling, normalize=normalize, max_seq_length=max_len)


def resolve_fields(encoding: Encoding, st: STConfig | None) -> Resolved:
    """Fill the encoding's ``None`` fields from the model's sentence-transformers settings."""

    def fallback(name: str, value: Any) -> Any:
        LOG.warning(
            "%s unset and not in the model's sentence-transformers files; using %s", name, value
        )
        return value

    pooling = encoding.pooling
    if pooling is None:
        if st is None or st.pooling is None:
            pooling = fallback("pooling", FALLBACK_POOLING)
        elif st.pooling in _ST_POOLING:
            pooling = _ST_POOLING[st.pooling]
        else:
            raise ValueError(
                f"sentence-transformers pooling {st.pooling!r} is not supported; "
                f"supported: {', '.join(_ST_POOLING)}"
            )
    normalize = encoding.normalize
    if normalize is None:
        normalize = st.normalize if st is not None else fallback("normalize", FALLBACK_NORMALIZE)
    st_len = st.max_seq_length if st is not None else None
    lengths = {}
    for name in ("max_query_length", "max_passage_length"):
        value = getattr(encoding, name)
        if value is None:
            value = st_len if st_len is not None else fallback(name, FALLBACK_MAX_LENGTH)
        lengths[name] = value
    return Resolved(pooling=pooling, normalize=normalize, **lengths)


def default_dtype(dtype: str | None, device: str, pooling: Pooling) -> torch.dtype | None:
    """The recipe's dtype, else float32 on CPU and a 16-bit type on an accelerator.

    Last-token pooling marks a decoder, which is trained in bfloat16 and can overflow float16.
    """
    if dtype is not None:
        return torch_dtype(dtype)
    if device == "cpu":
        return torch.float32
    return torch.bfloat16 if pooling == "last" else torch.float16


def tokenize(tokenizer, texts: Sequence[str], max_length: int, append_eos: bool) -> list[list[int]]:
    """Token ids per text, truncated to ``max_length`` (EOS included when ``append_eos``)."""
    if not append_eos:
        enc = tokenizer(list(texts), truncation=True, max_length=max_length)
        return [list(ids) for ids in enc["input_ids"]]
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("append_eos is set but the tokenizer has no EOS token")
    # Truncate one short so EOS always fits; skip it where the tokenizer already appended one.
    enc = tokenizer(list(texts), truncation=True, max_length=max_length - 1)
    return [list(ids) if ids and ids[-1] == eos else [*ids, eos] for ids in enc["input_ids"]]


def plan_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Index batches, longest texts first, each padding to at most ``batch_tokens`` tokens.

    A text longer than ``batch_tokens`` still gets a batch of its own. Longest-first makes an
    out-of-memory batch fail at once rather than at the end.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # The first index of a batch is its longest text.
        if current and (len(current) + 1) * max(lengths[current[0]], 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) padded to the batch's longest sequence on ``side``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        span = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[row, span] = torch.tensor(s, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def first_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Position of each row's first real token (0 with right padding)."""
    return mask.argmax(dim=-1)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Position of each row's last real token, whichever side the padding is on."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (mask * positions).argmax(dim=-1)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """One float32 vector per row from token states ``hidden`` [batch, tokens, dim]."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if pooling == "last":
        return hidden[rows, last_token_index(mask)].float()
    if pooling == "cls":
        return hidden[rows, first_token_index(mask)].float()
    if pooling == "mean":
        keep = mask.unsqueeze(-1).bool()
        # where() rather than a product: padded positions may hold NaN with some attention kernels.
        total = torch.where(keep, hidden.float(), 0.0).sum(dim=1)
        return total / mask.sum(dim=1, keepdim=True).clamp(min=1).float()
    raise ValueError(f"unknown pooling {pooling!r}; expected last, mean or cls")


def encode_texts(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    pooling: Pooling,
    normalize: bool,
    max_length: int,
    append_eos: bool = False,
    batch_tokens: int = 16384,
    progress: tqdm | None = None,
) -> np.ndarray:
    """Float32 vectors [len(texts), dim] in the order of ``texts``."""
    if not texts:
        return np.zeros((0, model.config.hidden_size), dtype=np.float32)
    seqs = tokenize(tokenizer, texts, max_length, append_eos)
    pad_id = _pad_id(tokenizer)
    # A text that tokenizes to nothing would make an empty row; give it one harmless token.
    seqs = [s if s else [pad_id] for s in seqs]
    side = getattr(tokenizer, "padding_side", "right")
    device = next(model.parameters()).device
    extra = {"use_cache": False} if _accepts(model, "use_cache") else {}
    out: np.ndarray | None = None
    with torch.inference_mode():
        for batch in plan_batches([len(s) for s in seqs], batch_tokens):
            ids, mask = pad_batch([seqs[i] for i in batch], pad_id, side)
            ids, mask = ids.to(device), mask.to(device)
            hidden = model(input_ids=ids, attention_mask=mask, **extra).last_hidden_state
            vecs = pool(hidden, mask, pooling)
            if normalize:
                vecs = F.normalize(vecs, dim=-1)
            if out is None:
                out = np.empty((len(texts), vecs.shape[-1]), dtype=np.float32)
            out[batch] = vecs.cpu().numpy()
            if progress is not None:
                progress.update(len(batch))
    assert out is not None
    return out


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if candidate is not None:
            return candidate
    return 0  # the attention mask hides padding, so any id will do


def _accepts(model, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _to_float16(vecs: np.ndarray, what: str) -> np.ndarray:
    half = vecs.astype(np.float16)
    if not np.isfinite(half).all():
        raise ValueError(
            f"{what}: vectors overflow float16 or are not finite; consider normalize: true"
        )
    return half


def embed(
    model_dir: Path,
    dataset_dir: Path,
    split: str,
    encoding: Encoding,
    out: Path,
    *,
    base_dir: Path | None = None,
    dtype: str | None = None,
    device: str | None = None,
    batch_tokens: int = 16384,
    shard_size: int = 100_000,
) -> dict:
    """Encode the corpus and the split's judged queries into ``out``; returns ``info.json``."""
    if shard_size < 1:
        raise ValueError("shard_size must be positive")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; embeddings need a fresh folder")

    collection = load_collection(dataset_dir, split)
    st = read_st_config(model_dir) or read_st_config(base_dir)
    resolved = resolve_fields(encoding, st)
    device = resolve_device(device)
    model, tokenizer = load_encoder(
        model_dir, base_dir, default_dtype(dtype, device, resolved.pooling), device
    )
    LOG.info("encoding on %s in %s with %s", device, model.dtype, resolved)
    encode = functools.partial(
        encode_texts,
        model,
        tokenizer,
        pooling=resolved.pooling,
        normalize=resolved.normalize,
        append_eos=encoding.append_eos,
        batch_tokens=batch_tokens,
    )

    passages = collection.passages
    shards = 0
    dim = model.config.hidden_size
    with tqdm(total=len(passages), desc="passages", unit="passage", unit_scale=True) as bar:
        # Shard by shard, so the whole corpus matrix is never held in memory.
        for start in range(0, len(passages), shard_size):
            chunk = passages[start : start + shard_size]
            texts = [passage_text(p, encoding.passage_template) for p in chunk]
            vecs = encode(texts, max_length=resolved.max_passage_length, progress=bar)
            dim = vecs.shape[1]
            np.save(out / f"corpus-{shards:05d}.npy", _to_float16(vecs, f"shard {shards}"))
            shards += 1
    write_json(out / "corpus_ids.json", [p.id for p in passages])

    query_ids = [q for q in collection.queries if q in collection.qrels]
    texts = [
        query_text(collection.queries[q], encoding.query_template, encoding.query_instruction)
        for q in query_ids
    ]
    with tqdm(total=len(texts), desc="queries", unit="query", unit_scale=True) as bar:
        vecs = encode(texts, max_length=resolved.max_query_length, progress=bar)
    np.save(out / "queries.npy", _to_float16(vecs.reshape(len(texts), dim), "queries"))
    write_json(out / "query_ids.json", query_ids)

    info = {
        "dim": int(dim),
        "passages": len(passages),
        "queries": len(query_ids),
        "shards": shards,
        "encoding": encoding.model_dump(),
        "resolved": asdict(resolved),
    }
    write_json(out / "info.json", info)
    return info


def load_embeddings(out: Path) -> Iterator[tuple[list[str], np.ndarray]]:
    """(passage ids, float16 vectors) for each corpus shard of an ``embed`` folder, in order."""
    out = Path(out)
    info = _read_json(out / "info.json")
    ids = _read_json(out / "corpus_ids.json")
    offset = 0
    for shard in range(info["shards"]):
        vecs = np.load(out / f"corpus-{shard:05d}.npy")
        yield ids[offset : offset + len(vecs)], vecs
        offset += len(vecs)
    if offset != len(ids):
        raise ValueError(f"{out}: shards hold {offset} vectors but corpus_ids.json has {len(ids)}")


def load_queries_embeddings(out: Path) -> tuple[list[str], np.ndarray]:
    """(query ids, float16 vectors) of an ``embed`` folder."""
    out = Path(out)
    ids = _read_json(out / "query_ids.json")
    vecs = np.load(out / "queries.npy")
    if len(ids) != len(vecs):
        raise ValueError(f"{out}: {len(vecs)} query vectors but {len(ids)} query ids")
    return ids, vecs

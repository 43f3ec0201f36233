"""Embed a collection into the float16 files of ``vectors`` (the layout is described there):
every passage (``embed_corpus``, the embed stage: hours at MS MARCO's scale) and the queries
judged in one split (``embed_queries``, the queries stage: seconds), apart so that new judgments
or another split never encode the corpus again; ``embed`` does both into one folder.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from readaptir.artifacts import files_identity, require_empty, resolve_device, write_json
from readaptir.corpus import (
    CORPUS_FILE,
    iter_passages,
    judgments_from,
    load_qrels,
    load_queries,
    passage_ids,
    passage_text,
    query_text,
)
from readaptir.distributed import (
    barrier,
    join_group,
    launched_ranks,
    leave_distributed,
    rank_device,
)
from readaptir.encoding import (
    DEFAULT_BATCH_TOKENS,
    appends_eos,
    encode_tokens,
    log_filled,
    pad_id,
)
from readaptir.encoding import tokenize as tokenize_ids
from readaptir.families import QUERY_FIELDS, Encoding, Pooling
from readaptir.models import is_peft_adapter, load_encoder, torch_dtype
from readaptir.objective import is_causal
from readaptir.st_config import Resolved, read_st_config, resolve_fields
from readaptir.training import position_limit
from readaptir.vectors import (
    CORPUS_IDS,
    INFO_FILE,
    QUERY_IDS,
    QUERY_VECTORS,
    complete_shard,
    prepare_work,
    save_shard,
    shard_file,
)

LOG = logging.getLogger(__name__)

# the ranks wait at a barrier for the slowest one's shards: hours at MS MARCO scale
BARRIER_TIMEOUT = timedelta(days=7)
# passages tokenised in one call ahead of the encoding: a second or so, the most an error waits
TOKENIZE_PIECE = 8192


def model_dtype(dtype: str, pooling: Pooling, causal: bool) -> torch.dtype:
    """The precision the model runs in: ``dtype``, or for ``auto`` bfloat16 for a decoder
    (``causal``, or last-token pooling) and float32 for an encoder, whatever the device."""
    if dtype != "auto":
        return torch_dtype(dtype)
    return torch.bfloat16 if causal or pooling == "last" else torch.float32


T = TypeVar("T")


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last one shorter), read lazily."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


class Throughput:
    """A progress bar in texts/s that also tracks real (non-padding) tokens/s."""

    def __init__(self, total: int, what: str, unit: str, show: bool = True) -> None:
        self.bar = tqdm(total=total, desc=what, unit=unit, unit_scale=True, disable=not show)
        self.what, self.texts, self.tokens, self.start = what, 0, 0, time.perf_counter()

    def __call__(self, texts: int, tokens: int) -> None:
        self.texts += texts
        self.tokens += tokens
        self.bar.update(texts)
        self.bar.set_postfix_str(f"{self.tokens / self.elapsed():,.0f} tokens/s", refresh=False)

    def skip(self, texts: int) -> None:
        """Texts encoded elsewhere (another rank, an earlier run): no longer this bar's work."""
        if self.bar.total is not None:
            self.bar.total -= texts
            self.bar.refresh()

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)

    def summary(self) -> str:
        secs = self.elapsed()
        return (
            f"{self.texts} {self.what} ({self.tokens} tokens) in {secs:.1f} s: "
            f"{self.texts / secs:,.1f} {self.what}/s, {self.tokens / secs:,.0f} tokens/s"
        )

    def close(self) -> None:
        self.bar.close()
        LOG.info("encoded %s", self.summary())


def _finite(vecs: np.ndarray, what: str, model_dir: Path, normalized: bool | None) -> np.ndarray:
    """``vecs``, if every value is finite; else an error that says where to look. One pass over a
    sound shard (1.2 s for 100k x 4096 on a CPU core); NaN is told from inf only when one fails."""
    if np.isfinite(vecs).all():
        return vecs
    if np.isnan(vecs).any():
        raise ValueError(
            f"{what}: {model_dir} gives NaN vectors: NaN or inf in its weights or activations"
        )
    why = "its activations overflow" if normalized else "they overflow float16 (normalize: true)"
    raise ValueError(f"{what}: {model_dir} gives infinite vectors: {why}")


@dataclass(frozen=True)
class Encoder:
    """A model loaded to encode texts the way an ``Encoding`` says (``load``): one load serves
    the passages and the queries."""

    tokenize: Callable[..., list[list[int]]]  # (texts, max_length) -> token ids; no model
    encode_tokens: Callable[..., np.ndarray]  # (token ids, on_batch=) -> float16 vectors
    resolved: Resolved
    dtype: str
    model_dir: Path
    base_dir: Path | None

    def encode(
        self, texts: Sequence[str], *, max_length: int, on_batch=None, what: str = "texts"
    ) -> np.ndarray:
        seqs = self.tokenize(texts, max_length)
        return self.encode_tokenized(seqs, max_length=max_length, on_batch=on_batch, what=what)

    def encode_tokenized(
        self, seqs: list[list[int]], *, max_length: int, on_batch=None, what: str = "texts"
    ) -> np.ndarray:
        """Vectors of ``tokenize``'s ids, after saying how many filled ``max_length``."""
        log_filled([len(s) for s in seqs], max_length, what)
        return self.encode_tokens(seqs, on_batch=on_batch)

    @classmethod
    def load(
        cls,
        model_dir: Path,
        encoding: Encoding,
        *,
        base_dir: Path | None = None,
        dtype: str | None = None,
        device: str | None = None,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        sides: tuple[str, ...] = ("query", "passage"),
    ) -> Encoder:
        """``model_dir`` (a PEFT retriever over ``base_dir``) on ``device`` (this rank's under
        torchrun), in ``dtype`` (default: ``encoding``'s; see ``model_dtype``), batches of
        ``batch_tokens``, for the ``sides`` (query, passage) it will encode."""
        device = rank_device(launched_ranks(), resolve_device(device))
        st = read_st_config(model_dir) or read_st_config(base_dir)
        config_dir = base_dir if is_peft_adapter(model_dir) else model_dir  # whose config.json
        resolved = resolve_fields(encoding, st, sides)
        causal = config_dir is not None and _is_causal(config_dir)
        if resolved.pooling == "cls" and causal:
            raise ValueError(
                f"{model_dir}: pooling cls on a causal decoder: its first token sees only "
                "itself, so every text would get the same vector; use last (or mean)"
            )
        model, tokenizer = load_encoder(
            model_dir,
            base_dir,
            model_dtype(dtype or encoding.dtype, resolved.pooling, causal),
            device,
        )
        limit = position_limit(model)
        resolved = _within_positions(resolved, encoding, limit, model_dir, sides)
        if resolved.pooling == "last" and not encoding.append_eos and not appends_eos(tokenizer):
            LOG.warning(
                "%s: last-token pooling of texts that end without an EOS: each vector is its "
                "text's last word's; a model trained to end on one (RepLLaMA, e5-mistral) needs "
                "retriever.encoding.append_eos: true (their families set it)",
                model_dir,
            )
        LOG.info("encoding on %s in %s with %s", device, model.dtype, resolved)
        tokenize = functools.partial(
            tokenize_ids,
            tokenizer,
            append_eos=encoding.append_eos,
            lowercase=resolved.lowercase,
        )
        encode = functools.partial(
            encode_tokens,
            model,
            pooling=resolved.pooling,
            normalize=resolved.normalize,
            pad_token=pad_id(tokenizer),
            batch_tokens=batch_tokens,
            out_dtype=torch.float16,
        )
        dtype_name = str(model.dtype).removeprefix("torch.")
        return cls(tokenize, encode, resolved, dtype_name, Path(model_dir), base_dir)


def _within_positions(
    resolved: Resolved, encoding: Encoding, limit: int | None, model_dir: Path, sides: tuple
) -> Resolved:
    """``resolved`` with no length past ``limit``: one the recipe or family set is an error, one
    taken from the model's own files (sentence-transformers' rule can give a RoBERTa-style
    model its 514-row table, two of whose rows are not positions) is cut to it."""
    for side in sides:
        key = f"max_{side}_length"
        length = getattr(resolved, key)
        if limit is None or length is None or length <= limit:
            continue
        if getattr(encoding, key) is not None:
            raise ValueError(
                f"{model_dir}: {key} {length} is more than the model's {limit} positions (its "
                f"table of position embeddings): set it to {limit}"
            )
        LOG.warning("%s: %s %d from the model's files is past its %d positions; using %d",
                    model_dir, key, length, limit, limit)  # fmt: skip
        resolved = replace(resolved, **{key: limit})
    return resolved


def _is_causal(config_dir: Path) -> bool:
    """Whether the model whose config.json is in ``config_dir`` is a causal decoder."""
    from transformers import AutoConfig

    return is_causal(AutoConfig.from_pretrained(config_dir))


def judged_queries(dataset_dir: Path, split: str) -> tuple[dict[str, str], set[str]]:
    """The collection's queries and the ids of those worth encoding: judged in ``split``, on a
    document of the corpus (one judging only absent documents scores 0 whatever its ranking)."""
    queries = load_queries(dataset_dir)
    raw_qrels = load_qrels(dataset_dir, split)
    known = passage_ids(dataset_dir)  # millions of ids at MS MARCO's scale, dropped on return
    _, _, wanted = judgments_from(raw_qrels, queries, known, dataset_dir, split)
    return queries, wanted


# embed()'s options that are embed_corpus's; the others are Encoder.load's
CORPUS_OPTIONS = ("shard_size", "work_dir", "on_shard")


def embed(
    model_dir: Path, dataset_dir: Path, split: str, encoding: Encoding, out: Path, **options: Any
) -> dict:
    """``embed_corpus`` and ``embed_queries`` into one folder with one model; ``options`` are
    ``embed_corpus``'s (``CORPUS_OPTIONS``) and ``Encoder.load``'s. The queries and judgments
    are read first, so that bad ones fail before hours of encoding."""
    judged = judged_queries(dataset_dir, split)
    corpus = {k: options.pop(k) for k in CORPUS_OPTIONS if k in options}
    encoder = Encoder.load(model_dir, encoding, **options)
    info = embed_corpus(encoder, dataset_dir, encoding, out, **corpus)
    if not launched_ranks().main:
        return info
    info |= embed_queries(encoder, dataset_dir, split, encoding, out, judged=judged)
    write_json(Path(out) / INFO_FILE, info)
    return info


def embed_corpus(
    encoder: Encoder,
    dataset_dir: Path,
    encoding: Encoding,
    out: Path,
    *,
    shard_size: int = 100_000,
    work_dir: Path | None = None,
    on_shard: Callable[[int], None] | None = None,
) -> dict:
    """Encode every passage into ``out``'s corpus shards; returns ``info.json``.

    The corpus is read, tokenised, length-sorted and encoded one shard of ``shard_size`` passages
    at a time, so neither its text nor its vectors are ever held whole in memory: peak memory is
    two shards' text and token ids (the next one is read and tokenised on a thread while this one
    encodes, about 1.6 GB each for 100k passages) and one shard's float16 vectors (100k x 4096 x 2
    bytes = 0.8 GB for a 7B model). Within a shard, batches are formed longest first under
    ``batch_tokens``; vectors are written back in corpus order. Only the passage side of
    ``encoding`` is used (and recorded).

    With ``work_dir`` the shards are written there first and a complete shard already there (made
    with the same shard size, corpus and model files) is not encoded again, so a killed run
    resumes; then they move into ``out``. Under torchrun each rank encodes every world-th shard
    into ``work_dir``, and rank 0, after all ranks are done, writes the rest. ``on_shard(index)``
    is called after each shard this process encodes.
    """
    if shard_size < 1:
        raise ValueError("shard_size must be positive")
    ranks = launched_ranks()
    if ranks.world > 1 and work_dir is None:
        raise ValueError("several processes share the shards through a work_dir")
    out = Path(out)
    require_empty(out)
    total = len(passage_ids(dataset_dir))  # every passage id checked before hours of encoding
    out.mkdir(parents=True, exist_ok=True)  # only once every check has passed
    model_dir = encoder.model_dir

    work = Path(work_dir) if work_dir is not None else out
    join_group(ranks, "gloo", timeout=BARRIER_TIMEOUT)  # for barriers alone
    if ranks.main and work != out:
        identity = {"shard_size": shard_size, "passages": total}
        prepare_work(work, {**identity, "model": files_identity(model_dir, encoder.base_dir)})
    barrier(ranks)  # the work folder is ready
    order: list[str] = []  # passage ids in corpus order
    shards = empty = 0
    progress = Throughput(total, "passages", "passage", show=ranks.main)
    max_length = encoder.resolved.max_passage_length
    # The corpus is read, templated and tokenised up to the next shard this process encodes on a
    # thread while one shard encodes (the tokenizer's batch call leaves Python's lock, and so does
    # waiting for the device), so the device waits for none of it, nor for the other ranks'
    # shards read past: two shards' text and token ids are held at once. The thread checks
    # ``stop`` per shard read and per piece tokenised, so that an error or an interrupt here
    # stops it within one piece rather than after a whole shard.
    chunks = chunked(iter_passages(dataset_dir), shard_size)
    stop = threading.Event()

    def next_shard() -> tuple[int, Path, list[list[int]] | None, int]:
        """Read on to this process's next shard to encode: its index, file and token ids, and
        the passages read past it (ids None: the corpus has ended)."""
        nonlocal shards, empty
        past = 0
        for chunk in chunks:
            if stop.is_set():
                raise CancelledError
            shard, shards = shards, shards + 1
            order.extend(p.id for p in chunk)
            empty += sum(1 for p in chunk if not p.title.strip() and not p.text.strip())
            path = shard_file(work, shard)
            if shard % ranks.world != ranks.rank or complete_shard(path, len(chunk)):
                past += len(chunk)  # another rank's, or encoded before an interruption
                continue
            texts = [passage_text(p, encoding.passage_template) for p in chunk]
            seqs: list[list[int]] = []
            for begin in range(0, len(texts), TOKENIZE_PIECE):
                if stop.is_set():
                    raise CancelledError
                seqs += encoder.tokenize(texts[begin : begin + TOKENIZE_PIECE], max_length)
            return shard, path, seqs, past
        return shards, work, None, past

    def encode_shard(shard: int, path: Path, seqs: list[list[int]]) -> None:
        """Encode and write one shard; its vectors go with the call, before the next encodes."""
        what = f"passages of shard {shard}"
        vecs = encoder.encode_tokenized(seqs, max_length=max_length, on_batch=progress, what=what)
        save_shard(path, _finite(vecs, f"shard {shard}", model_dir, encoder.resolved.normalize))
        LOG.info("shard %d written; so far %s", shard, progress.summary())
        if on_shard is not None:
            on_shard(shard)

    ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead")
    try:
        upcoming = ahead.submit(next_shard)
        while True:
            shard, path, seqs, past = upcoming.result()
            progress.skip(past)
            if seqs is None:
                break
            upcoming = ahead.submit(next_shard)
            encode_shard(shard, path, seqs)
            del seqs  # its token ids, while the next shard's are awaited
    finally:
        stop.set()  # nothing is left to read unless this ends in an error
        ahead.shutdown(wait=False, cancel_futures=True)
        progress.close()
    if empty and ranks.main:
        LOG.warning(
            "%s: %d passages have neither title nor text; each is encoded as the passage template "
            "alone (%r)",
            Path(dataset_dir) / CORPUS_FILE,
            empty,
            encoding.passage_template,
        )
    barrier(ranks)  # every rank's shards are written; only rank 0 touches the files from here
    leave_distributed(ranks)
    if not ranks.main:
        return {"shards": shards, "passages": len(order)}
    if work != out:
        for s in range(shards):
            os.replace(shard_file(work, s), shard_file(out, s))
    dims = {np.load(shard_file(out, s), mmap_mode="r").shape[1] for s in range(shards)}
    if len(dims) != 1:
        raise ValueError(f"{out}: shards of different vector sizes {sorted(dims)}")
    (dim,) = dims
    write_json(out / CORPUS_IDS, order)
    info = {
        "dim": int(dim),
        "passages": len(order),
        "shards": shards,
        "encoding": encoding.model_dump(exclude=set(QUERY_FIELDS)),
        "dtype": encoder.dtype,
        "resolved": asdict(encoder.resolved),
    }
    write_json(out / INFO_FILE, info)
    return info


def embed_queries(
    encoder: Encoder,
    dataset_dir: Path,
    split: str,
    encoding: Encoding,
    out: Path,
    *,
    judged: tuple[dict[str, str], set[str]] | None = None,
) -> dict:
    """Encode the queries judged in ``split`` (``judged_queries``, unless already read as
    ``judged``) into ``out``, in the queries file's order; returns their count and size."""
    queries, wanted = judged or judged_queries(dataset_dir, split)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    query_ids = [q for q in queries if q in wanted]
    texts = [
        query_text(queries[q], encoding.query_template, encoding.query_instruction)
        for q in query_ids
    ]
    progress = Throughput(len(texts), "queries", "query")
    try:
        max_length = encoder.resolved.max_query_length
        vecs = encoder.encode(texts, max_length=max_length, on_batch=progress, what="queries")
    finally:
        progress.close()
    vecs = vecs.reshape(len(texts), -1)  # wanted is never empty
    finite = _finite(vecs, "queries", encoder.model_dir, encoder.resolved.normalize)
    np.save(out / QUERY_VECTORS, finite)
    write_json(out / QUERY_IDS, query_ids)
    return {
        "queries": len(query_ids),
        "query_dim": int(vecs.shape[1]),
        "encoding": encoding.model_dump(),
        "dtype": encoder.dtype,
        "resolved": asdict(encoder.resolved),
    }

"""Texts to vectors with a bare transformer: tokenisation, batching under a token budget, pooling.

Small pure functions over token ids and tensors, shared by the embed stage and ``bench/embed.py``.
Only torch and numpy are needed here (the tokenizer is passed in).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from readaptir.packing import budget_steps

if TYPE_CHECKING:
    from readaptir.families import Pooling

LOG = logging.getLogger(__name__)

DEFAULT_BATCH_TOKENS = 16384
# Called after each batch with (texts in it, real tokens in it).
OnBatch = Callable[[int, int], None]


def appends_eos(tokenizer: Any) -> bool:
    """Whether the tokenizer's own post-processing ends every sequence with EOS."""
    eos = tokenizer.eos_token_id
    ids = tokenizer("a")["input_ids"]
    return eos is not None and bool(ids) and ids[-1] == eos


def tokenize(
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    append_eos: bool,
    lowercase: bool = False,
) -> list[list[int]]:
    """Token ids per text, at most ``max_length`` of them (EOS included when ``append_eos``).

    With ``append_eos`` every sequence ends with exactly one EOS, placed after truncation so that
    last-token pooling always reads it, whether or not the tokenizer appends one itself (recent
    transformers ignore the ``add_eos_token`` of Llama/Mistral tokenizer configs; older ones honour
    it).
    """
    if lowercase:
        texts = [t.lower() for t in texts]
    if not append_eos:
        enc = tokenizer(list(texts), truncation=True, max_length=max_length)
        return [list(ids) for ids in enc["input_ids"]]
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("append_eos is set but the tokenizer has no EOS token")
    if max_length < 2:
        raise ValueError(f"max_length {max_length} leaves no room for EOS")
    # A tokenizer that appends EOS keeps it through truncation; otherwise leave room for ours.
    limit = max_length if appends_eos(tokenizer) else max_length - 1
    enc = tokenizer(list(texts), truncation=True, max_length=limit)
    return [_ends_with_eos(list(ids), eos, max_length) for ids in enc["input_ids"]]


def log_filled(lengths: Sequence[int] | np.ndarray, max_length: int, what: str) -> None:
    """Says how many sequences fill ``max_length`` tokens (those that were longer were cut there:
    a collection of long documents loses their tails)."""
    filled = int(np.count_nonzero(np.asarray(lengths) >= max_length))
    if filled:
        LOG.info(
            "%d of %d %s (%.1f%%) fill max_length=%d tokens; any longer were cut there",
            filled, len(lengths), what, 100 * filled / len(lengths), max_length,
        )  # fmt: skip


def _ends_with_eos(ids: list[int], eos: int, max_length: int) -> list[int]:
    # Trailing EOS may come from the tokenizer or from a literal "</s>" ending the text: keep one.
    end = len(ids)
    while end and ids[end - 1] == eos:
        end -= 1
    return [*ids[: min(end, max_length - 1)], eos]


def plan_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Index batches, longest texts first, each padding to at most ``batch_tokens`` tokens.

    A text longer than ``batch_tokens`` still gets a batch of its own. Longest-first makes an
    out-of-memory batch fail at once rather than at the end.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    cuts = budget_steps([max(lengths[i], 1) for i in order], batch_tokens).tolist()
    return [order[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


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


def pad_id(tokenizer: Any) -> int:
    """The id used for padding: pad, else EOS, else UNK (the attention mask hides it anyway)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if candidate is not None:
            return candidate
    return 0


def encode_ids(
    model: torch.nn.Module,
    seqs: Sequence[Sequence[int]],
    *,
    pooling: Pooling,
    normalize: bool,
    pad_token: int,
    padding_side: str = "right",
    batches: Sequence[Sequence[int]] | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    out_dtype: torch.dtype = torch.float32,
    on_batch: OnBatch | None = None,
) -> torch.Tensor:
    """Vectors [len(seqs), dim] in the order of ``seqs``, on the model's device.

    ``batches`` (lists of indices into ``seqs``) default to length-sorted batches under
    ``batch_tokens``. Results stay on the device until the caller copies them, so the host never
    waits for the accelerator between batches.
    """
    device = next(model.parameters()).device
    # A text that tokenizes to nothing would make an empty row; give it one harmless token.
    seqs = [s if len(s) else [pad_token] for s in seqs]
    if batches is None:
        batches = plan_batches([len(s) for s in seqs], batch_tokens)
    pin = device.type == "cuda"
    extra = {"use_cache": False} if _accepts(model, "use_cache") else {}
    out: torch.Tensor | None = None
    with torch.inference_mode():
        for batch in batches:
            ids, mask = pad_batch([seqs[i] for i in batch], pad_token, padding_side)
            # every copy to the GPU from pinned memory: one from pageable memory (even of the
            # rows' index) waits for all the work queued before it
            index = torch.as_tensor(batch)
            if pin:
                ids, mask, index = ids.pin_memory(), mask.pin_memory(), index.pin_memory()
            ids, mask, index = (x.to(device, non_blocking=pin) for x in (ids, mask, index))
            hidden = model(input_ids=ids, attention_mask=mask, **extra).last_hidden_state
            vecs = pool(hidden, mask, pooling)
            if normalize:
                vecs = F.normalize(vecs, dim=-1)
            if out is None:
                out = torch.empty((len(seqs), vecs.shape[-1]), dtype=out_dtype, device=device)
            out[index] = vecs.to(out_dtype)
            if on_batch is not None:
                on_batch(len(batch), sum(len(seqs[i]) for i in batch))
    if out is None:
        return torch.zeros((0, model.config.hidden_size), dtype=out_dtype, device=device)
    return out


def encode_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    pooling: Pooling,
    normalize: bool,
    max_length: int,
    append_eos: bool = False,
    lowercase: bool = False,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    out_dtype: torch.dtype = torch.float32,
    on_batch: OnBatch | None = None,
) -> np.ndarray:
    """Vectors [len(texts), dim] as a numpy array in the order of ``texts``."""
    seqs = tokenize(tokenizer, texts, max_length, append_eos, lowercase)
    log_filled([len(s) for s in seqs], max_length, "texts")
    return encode_tokens(
        model,
        seqs,
        pooling=pooling,
        normalize=normalize,
        pad_token=pad_id(tokenizer),
        batch_tokens=batch_tokens,
        out_dtype=out_dtype,
        on_batch=on_batch,
    )


def encode_tokens(
    model: torch.nn.Module,
    seqs: Sequence[Sequence[int]],
    *,
    pooling: Pooling,
    normalize: bool,
    pad_token: int,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    out_dtype: torch.dtype = torch.float32,
    on_batch: OnBatch | None = None,
) -> np.ndarray:
    """Vectors of token ids (``tokenize``'s), in their order: ``encode_texts`` after the
    tokenizer."""
    vecs = encode_ids(
        model,
        seqs,
        pooling=pooling,
        normalize=normalize,
        pad_token=pad_token,
        # Right padding whatever the tokenizer prefers: real tokens then keep the positions they
        # have unpadded (absolute position embeddings) and never see padding (causal decoders).
        padding_side="right",
        batch_tokens=batch_tokens,
        out_dtype=out_dtype,
        on_batch=on_batch,
    )
    return vecs.cpu().numpy()


def _accepts(model: torch.nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters

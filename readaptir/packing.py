"""Training sequences for the knowledge adapter: token storage, data order, packing and batches.

Passages are shuffled per epoch, then either padded one per row or packed greedily, in order, into
rows of at most ``max_length`` tokens. A packed row restarts the position ids at every passage and
keeps attention inside each passage; a step is ``rows_per_step`` consecutive rows.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from readaptir.artifacts import atomic_file

IGNORE = -100
MLM_RATE = 0.15


class TokenStore:
    """Token ids of every passage in one flat int32 array (lists of Python ints cost ~9× more)."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray) -> None:
        self.ids = ids
        self.offsets = offsets

    @classmethod
    def from_chunks(cls, chunks: Iterable[Sequence[Sequence[int]]]) -> TokenStore:
        parts: list[np.ndarray] = []
        lengths: list[int] = []
        for chunk in chunks:
            sizes = [len(seq) for seq in chunk]
            flat = itertools.chain.from_iterable(chunk)
            parts.append(np.fromiter(flat, dtype=np.int32, count=sum(sizes)))
            lengths.extend(sizes)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        return cls(ids, offsets)

    def save(self, ids_path: Path, offsets_path: Path) -> None:
        """Both arrays as .npy files, each written whole or not at all."""
        for array, path in ((self.ids, ids_path), (self.offsets, offsets_path)):
            with atomic_file(path, fsync=True) as tmp, tmp.open("wb") as handle:
                np.save(handle, array)

    @classmethod
    def load(cls, ids_path: Path, offsets_path: Path) -> TokenStore:
        """Read back what ``save`` wrote, the ids memory-mapped: processes on one machine share
        one copy in the page cache."""
        return cls(np.load(ids_path, mmap_mode="r"), np.load(offsets_path))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The passages' training order in ``epoch``: a seeded shuffle, fixed for (seed, epoch)."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return np.asarray(order, dtype=np.int64)


def pack_boundaries(lengths: Sequence[int], max_length: int) -> list[int]:
    """Greedy in-order packing: row k holds items ``bounds[k]:bounds[k + 1]``.

    Items are never reordered or split, so a row ends where the next item would not fit.
    """
    bounds, used = [0], 0
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(f"item {i} has {n} tokens, more than max_length={max_length}")
        if used and used + n > max_length:
            bounds.append(i)
            used = 0
        used += n
    if len(lengths):
        bounds.append(len(lengths))
    return bounds


@dataclass(frozen=True)
class EpochPlan:
    """One epoch's rows (passage indices) and how they group into steps."""

    order: np.ndarray
    bounds: np.ndarray  # row k holds order[bounds[k]:bounds[k + 1]]
    steps_at: np.ndarray  # step s takes rows steps_at[s] to steps_at[s + 1]

    @property
    def rows(self) -> int:
        return len(self.bounds) - 1

    @property
    def steps(self) -> int:
        return len(self.steps_at) - 1

    def step_rows(self, step: int) -> list[np.ndarray]:
        first, last = self.steps_at[step], self.steps_at[step + 1]
        return [self.order[self.bounds[k] : self.bounds[k + 1]] for k in range(first, last)]


def budget_steps(row_lengths: Sequence[int], batch_tokens: int) -> np.ndarray:
    """Step boundaries over padded rows in order: as many rows as fit ``batch_tokens`` once padded
    to the step's longest (at least one row a step)."""
    cuts = [0]
    width = 0
    for i, length in enumerate(row_lengths):
        width = max(width, length)
        if i > cuts[-1] and (i - cuts[-1] + 1) * width > batch_tokens:
            cuts.append(i)
            width = length
    if len(row_lengths):
        cuts.append(len(row_lengths))
    return np.asarray(cuts, dtype=np.int64)


def plan_epoch(
    lengths: np.ndarray,
    *,
    seed: int,
    epoch: int,
    max_length: int,
    rows_per_step: int,
    packing: bool,
    batch_tokens: int | None = None,
) -> EpochPlan:
    """The epoch's rows and steps: ``rows_per_step`` rows a step, or for padded rows with
    ``batch_tokens`` as many as fit that many tokens once padded."""
    order = epoch_order(len(lengths), seed, epoch)
    if packing:
        bounds = np.asarray(pack_boundaries(lengths[order].tolist(), max_length), dtype=np.int64)
    else:
        bounds = np.arange(len(order) + 1, dtype=np.int64)
    rows = len(bounds) - 1
    if batch_tokens is not None:
        if packing:
            raise ValueError("a token budget per step is for padded rows; packed rows are full")
        steps_at = budget_steps(lengths[order].tolist(), batch_tokens)
    else:
        steps_at = np.append(np.arange(0, rows, rows_per_step, dtype=np.int64), rows)
    return EpochPlan(order, bounds, steps_at)


def total_steps(plans: Sequence[EpochPlan], epochs: float, max_steps: int | None) -> int:
    """Steps of the whole run: full epochs, then the started fraction of the last one."""
    steps = 0
    for e, plan in enumerate(plans):
        fraction = min(1.0, epochs - e)
        # rounded first: 1.1 - 1 is 0.10000000000000009, whose ceil of 10 steps would be 2
        steps += math.ceil(round(plan.steps * fraction, 9)) if fraction < 1 else plan.steps
    return steps if max_steps is None else min(steps, max_steps)


def pack_row(
    passages: Sequence[Sequence[int] | np.ndarray],
) -> tuple[list[int], list[int], list[int]]:
    """Token ids end to end, positions restarting at 0 per passage, each token's passage index."""
    ids: list[int] = []
    positions: list[int] = []
    segments: list[int] = []
    for index, passage in enumerate(passages):
        ids.extend(int(t) for t in passage)
        positions.extend(range(len(passage)))
        segments.extend([index] * len(passage))
    return ids, positions, segments


@dataclass
class Layout:
    """A batch as tensors (batch, width); padding is a segment of its own with ``real`` False."""

    ids: torch.Tensor
    positions: torch.Tensor
    segments: torch.Tensor
    real: torch.Tensor

    @property
    def real_tokens(self) -> int:
        return int(self.real.sum())


def layout(rows: Sequence[Sequence[Sequence[int] | np.ndarray]], pad_id: int) -> Layout:
    """Rows of passages laid out right-padded to the longest row."""
    packed = [pack_row(row) for row in rows]
    width = max(len(ids) for ids, _, _ in packed)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    segments = torch.zeros(shape, dtype=torch.long)
    real = torch.zeros(shape, dtype=torch.bool)
    for r, (row_ids, row_pos, row_seg) in enumerate(packed):
        n = len(row_ids)
        ids[r, :n] = torch.tensor(row_ids)
        positions[r, :n] = torch.tensor(row_pos)
        segments[r, :n] = torch.tensor(row_seg)
        real[r, :n] = True
        # the padding tail restarts its positions too, so it reads as one more (unlabeled) passage
        positions[r, n:] = torch.arange(width - n)
        segments[r, n:] = len(rows[r])
    return Layout(ids, positions, segments, real)


def causal_inputs(lay: Layout, packed: bool) -> dict[str, torch.Tensor | bool]:
    """Next-token inputs; a passage's first token is no target (nothing of its passage precedes it).

    Packed rows pass no attention mask but position ids that restart per passage: sdpa and eager
    attention then derive the block-diagonal causal mask themselves, but only without a KV cache,
    hence ``use_cache=False``. Flash attention reads them (varlen kernels) only in a batch of one
    row (``check_packed_attention``).
    """
    labels = lay.ids.masked_fill(~lay.real | (lay.positions == 0), IGNORE)
    if packed:
        return {
            "input_ids": lay.ids,
            "position_ids": lay.positions,
            "labels": labels,
            "use_cache": False,
        }
    return {"input_ids": lay.ids, "attention_mask": lay.real.long(), "labels": labels}


def check_packed_attention(attn_implementation: str | None, rows_per_step: int) -> None:
    """Refuse packed steps of several rows under flash attention: transformers takes position ids
    as passage boundaries there only for a batch of one row (``_is_packed_sequence``), so in more
    rows the passages packed together would attend to each other."""
    if rows_per_step > 1 and "flash" in (attn_implementation or ""):
        raise ValueError(
            f"packed rows under {attn_implementation} attention need one row a step, not "
            f"{rows_per_step}: in a batch of several rows it would let passages attend to each "
            "other; use batch_size 1 (or batch_tokens up to max_length), packing false, or sdpa"
        )


def block_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive (batch, 1, L, L) mask letting each token see only tokens of its own segment."""
    same = segments[:, :, None] == segments[:, None, :]
    mask = torch.zeros(same.shape, dtype=dtype)
    return mask.masked_fill(~same, torch.finfo(dtype).min)[:, None]


def mask_tokens(
    ids: torch.Tensor,
    maskable: torch.Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator,
    rate: float = MLM_RATE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption: ``rate`` of the maskable tokens become targets; of those 80% are replaced
    by the mask token, 10% by a random token and 10% left as they are."""
    draw = torch.rand(ids.shape, generator=generator)
    chosen = (draw < rate) & maskable
    if not chosen.any() and maskable.any():
        # a loss over no targets is NaN: take the maskable token with the lowest draw
        chosen.view(-1)[draw.masked_fill(~maskable, 2.0).argmin()] = True
    labels = ids.masked_fill(~chosen, IGNORE)
    roll = torch.rand(ids.shape, generator=generator)
    noise = torch.randint(vocab_size, ids.shape, generator=generator)
    inputs = ids.masked_fill(chosen & (roll < 0.8), mask_id)
    inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), noise, inputs)
    return inputs, labels


def masked_inputs(
    lay: Layout,
    packed: bool,
    *,
    special_ids: Iterable[int],
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator,
    position_offset: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Masked-LM inputs; packed rows carry an explicit block-diagonal mask (encoders get none
    derived from position ids) and positions shifted as the model numbers them."""
    special = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
    maskable = lay.real & ~torch.isin(lay.ids, special)
    inputs, labels = mask_tokens(
        lay.ids, maskable, mask_id=mask_id, vocab_size=vocab_size, generator=generator
    )
    if packed:
        return {
            "input_ids": inputs,
            "position_ids": lay.positions + position_offset,
            "attention_mask": block_mask(lay.segments, dtype),
            "labels": labels,
        }
    return {"input_ids": inputs, "attention_mask": lay.real.long(), "labels": labels}

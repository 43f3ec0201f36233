"""Canonical tensor names across checkpoints, body checks and the merge's precision.

Canonical names are those of the bare transformer (``AutoModel``): a causal-LM checkpoint
(``model.layers.0…``) and a bare one (``layers.0…``) agree once the base-model prefix is stripped.
Tensors outside the prefix of a prefixed checkpoint (``lm_head``, ``cls.*``) are heads.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from readaptir.shards import Checkpoint, WeightError

LOG = logging.getLogger(__name__)

# Buffers some checkpoints carry and others do not; models rebuild them at load time.
BUFFER_SUFFIXES = ("position_ids", "rotary_emb.inv_freq")


# Modules one class of an architecture builds and another does not: BertModel's pooler, which
# BertForMaskedLM and RoBERTa's or XLM-R's masked-LM checkpoints lack while their retrievers,
# saved as bare models, hold one. No pooling readaptir does reads it; one side's alone is allowed.
OPTIONAL_PREFIXES = ("pooler.",)


def is_optional(name: str) -> bool:
    return name.startswith(OPTIONAL_PREFIXES)


# Tensors outside the body of a prefixed checkpoint that serve only the language-model objective,
# whatever the architecture says besides (``lm_head_names``): causal LM heads, BERT's MLM head.
HEADS = ("lm_head.", "cls.")


def compute_dtype(out: torch.dtype, stored: list[torch.dtype]) -> torch.dtype:
    """The precision a merge sum is taken in: float32 for a 16-bit output whose stored terms are
    at most float32 (bf16 weights and most of their differences are exact there), else float64."""
    if out.itemsize <= 2 and all(dt.itemsize <= 4 for dt in stored):
        return torch.float32
    return torch.float64


def _config_key(model_dir: Path | str) -> tuple[str, int]:
    """A folder's config.json by path and modification time: what the caches below are keyed on."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise WeightError(f"no config.json in {model_dir}")
    return str(model_dir), path.stat().st_mtime_ns


@functools.lru_cache(maxsize=16)
def _read_config(key: tuple[str, int]) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(key[0])


def _config(model_dir: Path | str) -> Any:
    """The folder's transformers config, read once while config.json is unchanged (the merge's
    checks ask for it several times); read-only."""
    return _read_config(_config_key(model_dir))


def auto_model_class(model_dir: Path) -> Any:
    """The bare ``AutoModel`` class for the folder's config.json."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    config = _config(model_dir)
    try:
        return one_class(MODEL_MAPPING[type(config)], config)
    except KeyError:
        raise WeightError(
            f"{model_dir}: no AutoModel class for model_type {config.model_type!r}"
        ) from None


def one_class(found: Any, config: Any) -> Any:
    """The class a transformers auto mapping gives for ``config``: where it lists several (Funnel's
    bare model and base model), the one config.json's ``architectures`` names, else the first,
    as the auto classes choose."""
    if not isinstance(found, (tuple, list)):
        return found
    named = {cls.__name__: cls for cls in found}
    chosen = (named[a] for a in getattr(config, "architectures", None) or () if a in named)
    return next(chosen, found[0])


def ties_embeddings(model_dir: Path) -> bool:
    """Whether the model's output head shares the input embedding matrix (the architecture's
    default when config.json does not say)."""
    config = _config(model_dir)
    text = getattr(config, "text_config", None)
    return bool(getattr(config, "tie_word_embeddings", getattr(text, "tie_word_embeddings", True)))


def base_model_prefix(model_dir: Path) -> str:
    return auto_model_class(model_dir).base_model_prefix


def is_buffer(name: str) -> bool:
    return name.endswith(BUFFER_SUFFIXES)


@dataclass(frozen=True)
class Architecture:
    """What the classes of an architecture hold besides its bare body, built once on the meta
    device from config.json: the tensors outside the body (``heads``: causal-LM, masked-LM and
    pretraining heads, under the names transformers saves them by, e.g. GPT-NeoX's
    ``embed_out`` for ``lm_head``), every tensor they hold (``known``, body ones unprefixed too),
    and the patterns of stored tensors transformers ignores on loading (``ignored``: GPT-NeoX's
    and GPT-J's ``attention.masked_bias``)."""

    heads: frozenset[str] = frozenset()
    known: frozenset[str] = frozenset()
    ignored: tuple[re.Pattern[str], ...] = ()

    def unused(self, name: str) -> bool:
        """A stored tensor that transformers ignores on loading: no class of the architecture
        holds it, and one of their ignore patterns names it."""
        return name not in self.known and any(p.search(name) for p in self.ignored)


def _stored_names(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> set[str]:
    """The names transformers saves ``tensors`` of ``model`` by (its renamings reverted)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion

        return set(revert_weight_conversion(model, tensors))
    except Exception:  # a release without conversions, or one that cannot take meta tensors
        return set(tensors)


@functools.lru_cache(maxsize=16)
def _architecture(key: tuple[str, int]) -> Architecture:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_MASKED_LM_MAPPING,
        MODEL_FOR_PRETRAINING_MAPPING,
        MODEL_MAPPING,
    )

    try:
        config = _read_config(key)
    except (OSError, ValueError):
        return Architecture()
    heads: set[str] = set()
    known: set[str] = set()
    patterns: set[str] = set()
    for mapping in (
        MODEL_MAPPING,
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_MASKED_LM_MAPPING,
        MODEL_FOR_PRETRAINING_MAPPING,
    ):
        try:
            cls = one_class(mapping[type(config)], config)
            with torch.device("meta"):
                model = cls(config)
        except Exception:  # no such class, or one that cannot be built bare: HEADS serve
            continue
        patterns |= set(getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or ())
        lead = cls.base_model_prefix + "."
        tensors = model.state_dict()
        known |= set(tensors) | {n[len(lead) :] for n in tensors if n.startswith(lead)}
        if mapping is not MODEL_MAPPING:
            outside = {n: t for n, t in tensors.items() if not n.startswith(lead)}
            heads |= set(outside) | _stored_names(model, outside)
    return Architecture(
        frozenset(heads), frozenset(known | heads), tuple(re.compile(p) for p in sorted(patterns))
    )


def architecture(model_dir: Path) -> Architecture:
    try:
        return _architecture(_config_key(model_dir))
    except WeightError:  # no config.json: only the fixed HEADS names serve
        return Architecture()


def lm_head_names(model_dir: Path) -> frozenset[str]:
    """The tensors outside the body of the architecture's causal-LM, masked-LM and pretraining
    classes (e.g. DistilBERT's ``vocab_projector``, ALBERT's ``predictions``, ELECTRA's
    ``discriminator_predictions``)."""
    return architecture(model_dir).heads


# Legacy (TensorFlow-era) names of a LayerNorm's parameters, which transformers renames on loading
# (``LayerNorm.gamma`` / ``LayerNorm.beta`` exactly: a ``gamma`` elsewhere may be a real parameter):
# old BERT checkpoints carry them, and transformers 5.0-5.5 wrote them back when saving.
LEGACY_NORM_NAMES = {"gamma": "weight", "beta": "bias"}


def _modern_name(name: str) -> str:
    module, _, leaf = name.rpartition(".")
    if leaf in LEGACY_NORM_NAMES and module.endswith("LayerNorm"):
        return f"{module}.{LEGACY_NORM_NAMES[leaf]}"
    return name


def _modern_names(body: dict[str, str], where: Path | str) -> dict[str, str]:
    """``body`` with legacy LayerNorm names (``LayerNorm.gamma``) made modern (``.weight``)."""
    modern: dict[str, str] = {}
    for name, stored in body.items():
        new = _modern_name(name)
        if new != name and new in body:
            raise WeightError(f"{where}: tensors {stored} and {body[new]} would both be {new}")
        modern[new] = stored
    return modern


def split_head(
    names: list[str],
    prefix: str,
    where: Path | str = "checkpoint",
    heads: AbstractSet[str] | None = None,
) -> tuple[dict[str, str], list[str]]:
    """Canonical name → stored name for body tensors, and the stored names of head tensors.

    A checkpoint is prefixed when any tensor starts with ``prefix.``; then the others are heads.
    With ``heads`` (the architecture's LM-head tensors) each must be one of them or start with
    ``HEADS``: any other tensor outside the body (a projection a retriever applies to its states,
    say) fails, naming it, since dropping it would change what the model computes. A LayerNorm's
    legacy ``gamma``/``beta`` are named ``weight``/``bias``, as transformers loads them.
    """
    lead = prefix + "."
    if not any(n.startswith(lead) for n in names):
        return _modern_names({n: n for n in names}, where), []
    body = _modern_names({n[len(lead) :]: n for n in names if n.startswith(lead)}, where)
    outside = sorted(n for n in names if not n.startswith(lead))
    unknown = [n for n in outside if n not in (heads or ()) and not n.startswith(HEADS)]
    if heads is not None and unknown:
        raise WeightError(
            f"{where}: tensor {unknown[0]} is neither in the model body ({lead}…) nor an LM head "
            "of its architecture; readapting would drop it"
        )
    return body, outside


class Body:
    """A checkpoint seen through canonical names, head tensors set aside (and reported)."""

    def __init__(self, model_dir: Path, prefix: str | None = None) -> None:
        self.folder = Path(model_dir)
        self.ckpt = Checkpoint(model_dir)
        self.prefix = base_model_prefix(model_dir) if prefix is None else prefix
        arch = architecture(self.folder)
        names = self.ckpt.names()
        unused = [n for n in names if arch.unused(n)]
        self._raw, self.heads = split_head(
            [n for n in names if n not in unused], self.prefix, self.folder, arch.heads
        )
        if self.heads:
            LOG.info("%s: dropping head tensors %s", self.folder, self.heads)
        if unused:
            LOG.info("%s: dropping tensors transformers ignores on loading %s", self.folder, unused)
        self.heads += unused

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

    def get(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        return self.ckpt.get(self._raw[name], buffer)


@dataclass(frozen=True)
class OneSided:
    """What only one of two checked bodies holds: buffers (dropped; models rebuild them), and
    optional modules (a pooler) that Θ alone holds (dropped) or the retriever alone (written as
    it is)."""

    buffers: list[str]
    base_only: list[str]
    other_only: list[str]


def check_same_body(base: Body, other: Body) -> OneSided:
    """Raise unless ``other`` has ``base``'s tensors with the same shapes (buffers and optional
    modules aside); what only one side holds."""
    for name in other.names():
        if name not in base:
            if not (is_buffer(name) or is_optional(name)):
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
        if name not in other and not (is_buffer(name) or is_optional(name)):
            raise WeightError(
                f"tensor {name} {base.shape(name)} of {base.folder} is missing from {other.folder}"
            )
    one_side = sorted(set(base.names()) ^ set(other.names()))
    if one_side:
        LOG.info("tensors present on one side only (buffers, a pooler): %s", one_side)
    optional = [n for n in one_side if not is_buffer(n)]
    return OneSided(
        buffers=[n for n in one_side if is_buffer(n)],
        base_only=[n for n in optional if n in base],
        other_only=[n for n in optional if n in other],
    )

"""The base model an adapter trains on, and its objective.

Decoder bases learn by next-token prediction, encoder bases (BERT-style) by masked-LM; the LM head
serves only the loss and is never adapted, since Ψ is applied to a retriever that has none.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from readaptir.models import check_weight_files

LOG = logging.getLogger(__name__)

CAUSAL, MASKED = "causal", "masked"


def objective_for(config: Any) -> str:
    """``causal`` for decoders, ``masked`` for encoders with a masked-LM architecture."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = config.model_type
    causal = kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    masked = kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    # BERT-like types register a causal head too; only their decoder configs want it
    if causal and (getattr(config, "is_decoder", False) or not masked):
        return CAUSAL
    if masked:
        return MASKED
    raise ValueError(f"model type {kind!r} has neither a causal-LM nor a masked-LM architecture")


def is_causal(config: Any) -> bool:
    """Whether ``config`` (a transformers config, or an object with its fields) is a causal
    decoder's; a model type with neither LM architecture counts as an encoder."""
    try:
        return objective_for(config) == CAUSAL
    except ValueError:
        return False


def lm_class(objective: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return AutoModelForCausalLM if objective == CAUSAL else AutoModelForMaskedLM


def load_model(base_dir: Path, objective: str, dtype: torch.dtype | None) -> torch.nn.Module:
    """Θ with the head its objective needs, in ``dtype`` (None: the checkpoint's own, with float16
    trained as bfloat16: float16 gradients underflow without loss scaling).

    A base without its LM head is refused for next-token training (the head is Θ's); an encoder
    base saved without an MLM head gets one freshly initialised, trained beside the adapter
    (``head_to_train`` names its parameters) and, like any head, left out of Ψ.
    """
    if dtype == torch.float16:
        raise ValueError(
            "adapter training in float16 needs loss scaling, which is not done here; train in "
            "bfloat16 (or float32, or auto: a float16 checkpoint trains in bfloat16)"
        )
    check_weight_files(base_dir)
    model, info = lm_class(objective).from_pretrained(
        base_dir, dtype=dtype, output_loading_info=True
    )
    missing = sorted(info.get("missing_keys") or ())
    prefix = getattr(model, "base_model_prefix", "") + "."
    body = [name for name in missing if name.startswith(prefix)]
    if body or (missing and objective == CAUSAL):
        raise ValueError(
            f"{base_dir}: the checkpoint lacks {len(missing)} tensors the {objective} model needs "
            f"(e.g. {', '.join((body or missing)[:3])}); Θ must be the pretrained model with its "
            "LM head"
        )
    if missing:
        LOG.warning(
            "%s has no masked-LM head (%s): a fresh one is trained with the adapter",
            base_dir,
            ", ".join(missing),
        )
    model.head_to_train = missing
    if any(p.dtype == torch.float16 for p in model.parameters()):
        LOG.info("float16 checkpoint: training in bfloat16")
        model = model.to(torch.bfloat16)
    if objective == CAUSAL:
        # a KV cache in training would also stop transformers from reading packed position ids
        model.config.use_cache = False
    return model

"""DoRA's training forward without the full-size weight temporaries.

PEFT's DoRA forward recomputes ``||W + s·BA||`` per output row at every call by building ``BA``
(a forward pass over an identity matrix as wide as the layer's input), casting it and the frozen
weight ``W`` to the adapter's dtype, adding them and taking the norm: several full-size passes per
layer per step, float32 ones when the adapter weights are float32. At 7B this fixed cost dominates
a step of a few short passages.

The norm has a low-rank form, with ``C = W·Aᵀ`` (out × r) and ``G = A·Aᵀ`` (r × r):

    ||W_i + s·(BA)_i||² = ||W_i||² + 2s·(B_i · C_i) + s²·(B_i G B_iᵀ)

so it costs one out × in × r product (like r extra tokens) and reads ``W`` twice, in float32.
Everything else — the magnitude's and LoRA's gradients, the norm held constant (detached) as DoRA
prescribes, dropout's draws, the saved state dict — is PEFT's own; ``use_low_rank_norm`` only
changes the class of PEFT's magnitude modules. In float32 the adapter trained is PEFT's up to
rounding. Under bf16 autocast PEFT rounds B·A to bf16 before taking the norm and this forward does
not, so the norms differ by that rounding (ours is the closer to exact) and, training being
sensitive to it, so do the adapters; with PEFT's B·A taken in float32 they agree again.

The expanded form loses relative precision only for a row that ``s·BA`` nearly cancels
(``||W + s·BA|| ≪ ||W||``), which a DoRA update, small against ``W``, does not come near.
"""

from __future__ import annotations

import inspect
import logging

import torch
import torch.nn.functional as F
from peft.tuners.lora.dora import DoraLinearLayer

LOG = logging.getLogger(__name__)


def low_rank_row_norm(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``||W + scaling·B·A||`` per output row, in float32, never forming an out × in matrix but
    one float32 copy of ``weight``'s rows for the product ``W·Aᵀ``."""
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        a = lora_a.float()
        b = lora_b.float()
        squared = torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square()
        cross = (weight.float() @ a.T).mul_(b).sum(dim=1)
        lora = ((b @ (a @ a.T)) * b).sum(dim=1)
        total = squared.add_(cross, alpha=2 * scaling).add_(lora, alpha=scaling * scaling)
        return total.clamp_(min=0).sqrt_()


class LowRankNormDora(DoraLinearLayer):
    """PEFT's DoRA magnitude for an ``nn.Linear``, its row norm computed in low-rank form."""

    def forward(  # PEFT's signature, argument names included
        self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default"
    ):
        weight = base_layer.weight
        norm = low_rank_row_norm(weight, lora_A.weight, lora_B.weight, scaling)
        scale = (self.weight / norm).view(1, -1)
        lora_result = lora_B(lora_A(x))
        if base_result is not None:
            if base_layer.bias is not None:
                base_result = base_result - base_layer.bias
        elif torch.is_autocast_enabled(x.device.type):
            base_result = F.linear(x, weight)  # autocast casts x and W alike
        else:
            base_result = F.linear(x, weight.to(x.dtype))
        return (scale - 1) * base_result + scale * lora_result * scaling


def _same_arguments() -> bool:
    """Whether PEFT's DoRA forward takes the arguments ours does (a PEFT that passes more, or
    others, may compute something this forward does not)."""
    ours = inspect.signature(LowRankNormDora.forward).parameters
    return set(inspect.signature(DoraLinearLayer.forward).parameters) <= set(ours)


def use_low_rank_norm(model: torch.nn.Module) -> int:
    """Switch every DoRA magnitude over a plain ``nn.Linear`` in ``model`` to ``LowRankNormDora``;
    returns how many. Layers PEFT stores transposed (``fan_in_fan_out``) keep PEFT's forward, and
    so does every layer when PEFT's DoRA forward takes arguments this one does not know."""
    if not _same_arguments():
        LOG.warning(
            "this PEFT's DoRA forward takes %s: training with it, not the low-rank norm",
            ", ".join(inspect.signature(DoraLinearLayer.forward).parameters),
        )
        return 0
    switched = 0
    for module in model.modules():
        magnitudes = getattr(module, "lora_magnitude_vector", None)
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else None
        if not magnitudes or type(base) is not torch.nn.Linear:  # not quantized, not Conv1D
            continue
        for magnitude in magnitudes.values():
            if type(magnitude) is DoraLinearLayer and not magnitude.fan_in_fan_out:
                magnitude.__class__ = LowRankNormDora
                switched += 1
    return switched

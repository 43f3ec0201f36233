"""DoRA's training forward without PEFT's full-size float32 passes.

With float32 adapter weights under bf16 autocast (how the adapter stage trains a 7B model), PEFT's
DoRA layer pays two costs the matrix products do not:

- the row norm ``||W + s·BA||``, recomputed at every call by building ``BA`` (a forward pass over an
  identity matrix as wide as the layer's input), casting it and ``W`` to float32, adding them and
  taking the norm: several passes over each weight per step, whatever the step's tokens;
- the output ``y = r + (σ − 1)·p + σ·s·l`` (``r`` the base layer's output, ``p`` the plain product
  ``W·x`` of the dropped-out input, ``l`` LoRA's, ``σ = m / ||W + s·BA||``), taken as six float32
  passes over the output and about twice as many backward, after copying the input to float32 for
  the adapter (autocast casts it straight back to bf16 for each product): passes over every
  token's activations.

The norm has a low-rank form, with ``C = W·Aᵀ`` (out × r) and ``G = A·Aᵀ`` (r × r):

    ||W_i + s·(BA)_i||² = ||W_i||² + 2s·(B_i · C_i) + s²·(B_i G B_iᵀ)

so it costs one out × in × r product (like r extra tokens) and reads ``W`` twice: for its norm,
and into the float32 copy that product reads (``LowRankNormDora``); under gradient checkpointing,
once more in the recompute. ``LowRankDoraLinear`` keeps the input in bf16 under autocast (its
dropout, ``InputDropout``, gives the bf16 values PEFT's float32 dropout gives the products) and
takes ``y`` in three passes and its backward in six (``DoraOutput``): the same sum in float32,
rounded once.

Everything else — the magnitude's and LoRA's gradients, the norm held constant (detached) as DoRA
prescribes, the saved state dict — is PEFT's own; ``use_fast_dora`` only changes the classes of
PEFT's modules. In float32 the adapter trained is PEFT's up to rounding. Under bf16 autocast PEFT
rounds B·A to bf16 before taking the norm and this forward does not, so the norms differ by that
rounding (ours is the closer to exact) and, training being sensitive to it, so do the adapters;
with PEFT's B·A taken in float32 they agree again to bf16 rounding.

The expanded form loses relative precision only for a row that ``s·BA`` nearly cancels
(``||W + s·BA|| ≪ ||W||``), which a DoRA update, small against ``W``, does not come near.
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch
import torch.nn.functional as F
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.layer import Linear as LoraLinear
from torch.autograd.function import once_differentiable

LOG = logging.getLogger(__name__)


def low_rank_row_norm(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``||W + scaling·B·A||`` per output row, in float32 (float64 for a float64 ``weight``),
    never forming an out × in matrix but one float32 copy of ``weight``'s rows for ``W·Aᵀ``."""
    wide = torch.promote_types(weight.dtype, torch.float32)
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        a = lora_a.to(wide)
        b = lora_b.to(wide)
        squared = torch.linalg.vector_norm(weight, dim=1, dtype=wide).square()
        cross = (weight.to(wide) @ a.T).mul_(b).sum(dim=1)
        lora = ((b @ (a @ a.T)) * b).sum(dim=1)
        total = squared.add_(cross, alpha=2 * scaling).add_(lora, alpha=scaling * scaling)
        return total.clamp_(min=0).sqrt_()


def plain_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``W·x`` without the bias, in x's dtype (autocast casts x and W alike)."""
    if torch.is_autocast_enabled(x.device.type):
        return F.linear(x, weight)
    return F.linear(x, weight.to(x.dtype))


class LowRankNormDora(DoraLinearLayer):
    """PEFT's DoRA magnitude for an ``nn.Linear``, its row norm computed in low-rank form."""

    def row_scale(self, weight, lora_A, lora_B, scaling) -> torch.Tensor:
        """σ = m / ||W + s·BA|| per output row, the norm detached, as DoRA prescribes."""
        return self.weight / low_rank_row_norm(weight, lora_A.weight, lora_B.weight, scaling)

    def forward(  # PEFT's signature, argument names included
        self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default"
    ):
        scale = self.row_scale(base_layer.weight, lora_A, lora_B, scaling).view(1, -1)
        lora_result = lora_B(lora_A(x))
        if base_result is None:
            base_result = plain_product(x, base_layer.weight)
        elif base_layer.bias is not None:
            base_result = base_result - base_layer.bias
        return (scale - 1) * base_result + scale * lora_result * scaling


def _same_arguments() -> bool:
    """Whether PEFT's DoRA forward takes the arguments ours does (a PEFT that passes more, or
    others, may compute something this forward does not)."""
    ours = inspect.signature(LowRankNormDora.forward).parameters
    return set(inspect.signature(DoraLinearLayer.forward).parameters) <= set(ours)


class DoraOutput(torch.autograd.Function):
    """``result + (σ − 1)·plain + σ·scaling·lora`` taken in σ's precision (float32) and rounded
    once to ``result``'s dtype; ``plain`` None stands for ``result`` itself (no dropout, no bias).

    Three passes over the output forward (PEFT's sum takes six, each with autograd's backward) and
    six backward: one for each input's gradient, four for σ's (a float32 copy of ``plain``, two
    updates in place, the row sum). (So on a GPU, whose kernels cast mixed dtypes as they read them;
    a CPU copies such operands to float32 first.)
    """

    @staticmethod
    def forward(ctx, result, plain, lora, sigma, scaling):  # torch's signature
        # CUDA's autocast would copy every operand of addcmul to float32 first
        with torch.autocast(result.device.type, enabled=False):
            if plain is None:
                total = torch.mul(result, sigma)
            else:
                total = torch.addcmul(result, plain, sigma - 1)
            total.addcmul_(lora, sigma * scaling)
        ctx.save_for_backward(result if plain is None else plain, lora, sigma)
        ctx.plain_given, ctx.scaling = plain is not None, scaling
        return total.to(result.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # torch's signature
        plain, lora, sigma = ctx.saved_tensors
        scaling, need = ctx.scaling, ctx.needs_input_grad
        grads: list[torch.Tensor | None] = [None] * 5
        if ctx.plain_given:
            grads[0] = grad if need[0] else None
            if need[1]:
                grads[1] = _scaled(grad, sigma - 1, plain.dtype)
        elif need[0]:
            grads[0] = _scaled(grad, sigma, plain.dtype)
        if need[2]:
            grads[2] = _scaled(grad, sigma * scaling, lora.dtype)
        if need[3]:  # σ's gradient: the rows' sum of grad · (plain + scaling·lora), in float32
            wide = plain.to(torch.promote_types(plain.dtype, sigma.dtype), copy=True)
            wide.add_(lora, alpha=scaling).mul_(grad)
            grads[3] = wide.reshape(-1, wide.shape[-1]).sum(0).to(sigma.dtype)
        return tuple(grads)


def _scaled(grad: torch.Tensor, row: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad · row`` computed in the wider dtype and written once in ``dtype``."""
    return torch.mul(grad, row, out=torch.empty_like(grad, dtype=dtype))


@functools.cache
def _dropout_scale(device: torch.device, p: float) -> torch.Tensor:
    """As PEFT's dropout of a float32 tensor scales: float32 one divided by 1 − p (made once per
    device and p, not at every layer's every call)."""
    return torch.ones(1, dtype=torch.float32, device=device).div_(1 - p)


class InputDropout(torch.autograd.Function):
    """Dropout of a bf16 input as PEFT's of the input copied to float32 gives it to the products
    under autocast: ``x · 1/(1 − p)`` taken in float32, rounded to x's dtype, zero where dropped
    (the same values; on a CPU the same draws), without the float32 copies. Torch's own dropout of
    a bf16 tensor scales by ``1/(1 − p)`` rounded to bf16 on a CPU (1.109 for p = 0.1)."""

    @staticmethod
    def forward(ctx, x, p):  # torch's signature
        keep = torch.empty_like(x, dtype=torch.uint8).bernoulli_(1 - p)  # a byte, as torch's
        ctx.scale = _dropout_scale(x.device, p)
        ctx.save_for_backward(keep)
        return torch.mul(x, ctx.scale, out=torch.empty_like(x)).mul_(keep)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # torch's signature
        (keep,) = ctx.saved_tensors
        return torch.mul(grad, ctx.scale, out=torch.empty_like(grad)).mul_(keep), None


class LowRankDoraLinear(LoraLinear):
    """PEFT's LoRA ``Linear`` whose one active DoRA adapter computes through the low-rank norm and
    ``DoraOutput``; any other case (adapters disabled or merged, several active, per-sample
    adapter names) is PEFT's own forward."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._single_dora_adapter()
        if name is None or args or kwargs:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        dropout, scaling = self.lora_dropout[name], self.scaling[name]
        result = self.base_layer(x)
        autocast = torch.is_autocast_enabled(x.device.type)
        if not autocast:  # PEFT's cast; under autocast each product casts its inputs itself
            x = self._cast_input_dtype(x, lora_A.weight.dtype)
        sigma = self.lora_magnitude_vector[name].row_scale(base.weight, lora_A, lora_B, scaling)
        if isinstance(dropout, torch.nn.Identity) or not self.training:
            plain = None if base.bias is None else result - base.bias
        else:
            if autocast and type(dropout) is torch.nn.Dropout and dropout.training:
                x = InputDropout.apply(x, dropout.p) if 0 < dropout.p < 1 else dropout(x)
            else:
                x = dropout(x)
            plain = plain_product(x, base.weight)
        return DoraOutput.apply(result, plain, lora_B(lora_A(x)), sigma, scaling)

    def _single_dora_adapter(self) -> str | None:
        if self.disable_adapters or self.merged:
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1 or active[0] not in self.lora_magnitude_vector:
            return None
        magnitude = self.lora_magnitude_vector[active[0]]
        return active[0] if type(magnitude) is LowRankNormDora else None


def use_fast_dora(model: torch.nn.Module) -> int:
    """Switch every DoRA magnitude over a plain ``nn.Linear`` in ``model`` to ``LowRankNormDora``
    and PEFT's ``Linear`` layers holding them to ``LowRankDoraLinear``; returns how many
    magnitudes. Layers PEFT stores transposed (``fan_in_fan_out``) keep PEFT's forward, and so
    does every layer when PEFT's DoRA forward takes arguments this one does not know."""
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
                if type(module) is LoraLinear:
                    module.__class__ = LowRankDoraLinear
    return switched

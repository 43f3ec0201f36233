"""The model side of knowledge-adapter training: the adapter, the step, and the packing probe.

Beside it: ``readaptir.objective`` (the base and its objective), ``readaptir.targets`` (the
modules the adapter wraps) and ``readaptir.checkpoints`` (what a killed run resumes from).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from readaptir.objective import CAUSAL
from readaptir.packing import Layout, layout
from readaptir.targets import linear_modules, matches, resolve_targets

LOG = logging.getLogger(__name__)


def attach_adapter(
    model: torch.nn.Module,
    *,
    objective: str,
    method: str,
    r: int,
    lora_alpha: float,
    dropout: float,
    target_modules: list[str],
    fast_dora: bool = True,
    default_targets: bool = False,
) -> torch.nn.Module:
    """Wrap ``model`` with a PEFT LoRA/DoRA adapter over the body's ``target_modules``, every one
    of which must name a module unless they are the architecture's ``default_targets``.

    Adapter weights are float32 whatever the base's dtype: a bf16 base computes in bf16 under
    autocast (``autocast_dtype``) while the optimizer updates float32 weights, since bf16 weights
    would round most AdamW updates of a DoRA magnitude (|m| ≈ 1, steps ≈ lr) away. Parameters
    the base was loaded without (``head_to_train``, an encoder's fresh MLM head) train too.
    DoRA layers take ``readaptir.dora``'s forward (low-rank row norm, fewer full-size passes)
    unless ``fast_dora`` is False (PEFT's own forward, the baseline of ``bench/adapter.py``).
    """
    from peft import LoraConfig, get_peft_model

    from readaptir.dora import use_fast_dora

    body, head = linear_modules(model)
    excluded = resolve_targets(body, head, list(target_modules), every=not default_targets)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        exclude_modules=excluded or None,
        use_dora=method == "dora",
        task_type="CAUSAL_LM" if objective == CAUSAL else None,
    )
    fresh = getattr(model, "head_to_train", [])
    with warnings.catch_warnings():  # PEFT asks by transformers' old name, which warns
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
        wrapped = get_peft_model(model, config, autocast_adapter_dtype=True)
    for name, param in wrapped.named_parameters():
        if any(matches(name, f) for f in fresh):
            param.data = param.data.float()
            param.requires_grad_(True)
    if method == "dora":
        exact_dora_magnitudes(wrapped)
        if fast_dora:
            use_fast_dora(wrapped)
    return wrapped


def exact_dora_magnitudes(model: torch.nn.Module) -> None:
    """Start every DoRA magnitude at the float32 row norm ``||W + s·BA||`` (``||W||``, B being 0).

    PEFT takes it in the base's dtype, so over a bf16 base each row's magnitude starts rounded to
    bf16 (off by up to 2⁻⁸ of the norm) while the forward divides by the float32 norm: σ ≠ 1 before
    any step, the untrained adapter already rescales Θ's rows at random (||Ψ||/||W|| ≈ 2e-3 for a
    4096² layer), noise that α carries into every merge. One float32 weight at a time."""
    from readaptir.dora import low_rank_row_norm

    for module in model.modules():
        magnitudes = getattr(module, "lora_magnitude_vector", None)
        if magnitudes is None or getattr(module, "fan_in_fan_out", False):
            continue  # a Conv1D's weight is stored transposed: PEFT's own start stays
        if type(module.get_base_layer()) is not torch.nn.Linear:
            continue  # an embedding, a quantised layer: other norms, PEFT's own start stays
        for name, magnitude in magnitudes.items():
            norm = low_rank_row_norm(
                module.get_base_layer().weight,
                module.lora_A[name].weight,
                module.lora_B[name].weight,
                module.scaling[name],
            )
            magnitude.weight.data = norm.to(magnitude.weight.dtype)


def autocast_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The 16-bit dtype a model's frozen weights compute in under autocast; None for float32."""
    dtypes = {p.dtype for p in model.parameters() if not p.requires_grad}
    low = dtypes & {torch.bfloat16, torch.float16}
    return low.pop() if len(low) == 1 else None


def checkpointed(layers: int, share: float) -> list[bool]:
    """Which of ``layers`` layers to checkpoint for a ``share`` of them (rounded, at least one),
    evenly spread and ending with the last."""
    if not 0 < share <= 1:
        raise ValueError(f"the share of the layers to checkpoint must be in (0, 1], not {share}")
    count = max(1, round(layers * share)) if layers else 0
    chosen = {(j + 1) * layers // count - 1 for j in range(count)}
    return [i in chosen for i in range(layers)]


def enable_gradient_checkpointing(model: torch.nn.Module, share: float = 1.0) -> None:
    """Recompute activations in the backward pass (non-reentrant checkpointing) in a ``share``
    of the transformer layers, evenly spread; the others keep theirs. The same gradients either
    way: checkpointing trades memory for a second forward pass of the layers it covers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    chosen = checkpointed(len(layers), share)  # a share out of range fails before any change
    if share < 1 and not layers:
        LOG.warning("%s has no layers to checkpoint one by one: all checkpointed", type(model))
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name in recent transformers
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
    for layer, on in zip(layers, chosen, strict=True):
        layer.gradient_checkpointing = on


def disable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Checkpointing off in every layer, and every hook that makes the embeddings' output need
    gradients gone too: enabling checkpointing adds one, PEFT wrapping a checkpointed model
    another (transformers keeps the handle of the last one only), and (on a model without PEFT)
    disabling removes none."""
    if hasattr(model, "activation_checkpointing_disable"):  # the name in recent transformers
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
    with contextlib.suppress(AttributeError):  # older releases fail when there is no hook
        model.disable_input_require_grads()
    hooks = model.get_input_embeddings()._forward_hooks
    for key, hook in list(hooks.items()):
        if "inputs_require_grad" in getattr(hook, "__name__", ""):  # transformers' and PEFT's
            del hooks[key]


def position_offset(model: torch.nn.Module) -> int:
    """Where the model's position ids start: RoBERTa-style embeddings count from padding_idx + 1."""
    embeddings = getattr(model.base_model, "embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    return padding_idx + 1 if isinstance(padding_idx, int) else 0


def position_limit(model: torch.nn.Module) -> int | None:
    """The positions of a model with a table of absolute position embeddings (BERT-style: a
    longer text fails deep in the model); None for one without (rotary decoders)."""
    embeddings = getattr(model.base_model, "embeddings", None)
    table = getattr(embeddings, "position_embeddings", None)
    if not isinstance(table, torch.nn.Embedding):
        return None
    return table.num_embeddings - position_offset(model)


def batch_loss(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The model's mean loss over the targets in ``labels``; without labels (a rank's share of a
    step that holds no target) a zero that still reaches every parameter, so that DDP's gradient
    reduction runs as on the other ranks."""
    output = model(**inputs)
    if output.loss is not None:
        return output.loss
    return output.logits.sum() * 0.0


@contextlib.contextmanager
def training_forward(
    inputs: dict[str, Any], device: torch.device | str, autocast: torch.dtype | None
) -> Iterator[dict[str, Any]]:
    """``inputs`` on ``device``, for a forward pass under ``autocast`` (a 16-bit base's
    ``autocast_dtype``; None: none) as training runs it."""
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.autocast(torch.device(device).type, dtype=autocast, enabled=autocast is not None):
        yield moved


def train_step(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    device: torch.device | str,
    loss_scale: float = 1.0,
    autocast: torch.dtype | None = None,
    max_grad_norm: float | None = None,
) -> float:
    """One optimizer step on one batch of model inputs; returns the loss (before ``loss_scale``).

    ``autocast`` (a 16-bit base's ``autocast_dtype``) runs the forward pass in that dtype over
    float32 adapter weights; gradients and the update stay float32. ``max_grad_norm`` clips the
    gradient of the optimizer's parameters to that total norm (None: no clipping).
    """
    with training_forward(inputs, device, autocast) as moved:
        loss = batch_loss(model, moved)
    (loss * loss_scale if loss_scale != 1.0 else loss).backward()
    if max_grad_norm is not None:
        # after backward, where DDP has averaged the ranks' gradients: every rank clips the
        # whole step's gradient alike
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


class Meter:
    """Real tokens per second and time left, over the steps of this process."""

    def __init__(self, total_steps: int, start_step: int, report_every_s: float = 60.0) -> None:
        self.total, self.start_step = total_steps, start_step
        self.started = self.reported = time.perf_counter()
        self.report_every_s = report_every_s
        self.tokens = 0

    def due(self) -> bool:
        """True at most once per ``report_every_s`` seconds."""
        now = time.perf_counter()
        if now - self.reported < self.report_every_s:
            return False
        self.reported = now
        return True

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def rate(self) -> float:
        return self.tokens / max(self.elapsed(), 1e-9)

    def eta(self, step: int) -> float:
        done = step - self.start_step
        return self.elapsed() / done * (self.total - step) if done else float("nan")


def _has_local_attention(config: Any) -> bool:
    """Whether some layers attend within a sliding window (ModernBERT's local layers): those
    build their window from a 2D mask, and take an explicit 4D one as it is."""
    return "sliding_attention" in (getattr(config, "layer_types", None) or ())


# the probe's passages: two packed in a row, and how far apart the second one's logits may be
# (relative to their largest) when the first one changes
PROBE_TOKENS = 8
PROBE_TOLERANCE = 1e-4


def check_passages_kept_apart(
    model: torch.nn.Module,
    make_inputs: Callable[[Layout], dict[str, torch.Tensor]],
    *,
    vocab_size: int,
    pad_id: int,
    device: torch.device | str,
    autocast: torch.dtype | None = None,
) -> None:
    """Refuse packing for a model that lets a packed passage attend to the passages before it.

    Each architecture builds its attention mask its own way: Llama-style decoders read the
    passages off the position ids, but OPT, BLOOM, MPT and XGLM, for instance, do not, and a
    packed row would train each passage on the ones packed before it. Two rows, ``[a, p]`` and
    ``[b, p]`` with ``a`` and ``b`` random passages of one length, go through the model one at a
    time (eval mode, no gradients, ``autocast`` as in training; inputs from ``make_inputs``, the
    token ids unmasked): where attention stays inside each passage, ``p``'s logits are computed
    by the same arithmetic on the same values in both, and agree to the last bit; where it
    crosses, they differ.
    """
    kind = model.config.model_type
    generator = torch.Generator().manual_seed(0)
    first, second, probe = torch.randint(vocab_size, (3, PROBE_TOKENS), generator=generator)
    was_training = model.training
    model.eval()
    logits = []
    try:
        for before in (first, second):
            lay = layout([[before.tolist(), probe.tolist()]], pad_id)
            inputs = {**make_inputs(lay), "input_ids": lay.ids}
            inputs.pop("labels", None)
            block = inputs.get("attention_mask")
            if block is not None and block.dim() == 4 and _has_local_attention(model.config):
                raise ValueError(
                    f"packing: true, but a {kind} model's sliding-window (local) attention "
                    "layers would take the packed rows' block mask as it is and attend across "
                    "each whole passage: set adapter.packing: false in the recipe"
                )
            with torch.no_grad(), training_forward(inputs, device, autocast) as moved:
                try:
                    logits.append(model(**moved).logits[0, PROBE_TOKENS:].float())
                except torch.OutOfMemoryError:
                    raise
                except (RuntimeError, ValueError, TypeError, IndexError) as err:
                    alone = {"input_ids": probe[None]}
                    with training_forward(alone, device, autocast) as unpacked:
                        model(**unpacked)  # a failure of its own is not packing's: raised as is
                    raise ValueError(
                        f"packing: true, but a {kind} model fails on packed rows ({err}): set "
                        "adapter.packing: false in the recipe"
                    ) from err
    finally:
        model.train(was_training)
    scale = float(logits[0].abs().max())
    change = float((logits[0] - logits[1]).abs().max())
    if not change <= PROBE_TOLERANCE * scale:
        raise ValueError(
            f"packing: true, but a {kind} model lets a packed passage attend "
            f"to the passages before it (another passage before one moved its logits by "
            f"{change:.3g}, against {scale:.3g} at most): set adapter.packing: false in the recipe"
        )

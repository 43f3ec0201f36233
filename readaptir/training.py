"""The model side of knowledge-adapter training: objective, adapter, step and checkpoints.

Decoder bases learn by next-token prediction, encoder bases (BERT-style) by masked-LM; the LM head
serves only the loss and is never adapted, since Ψ is applied to a retriever that has none.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import re
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from readaptir.artifacts import atomic_file
from readaptir.models import PEFT_LEAD, check_weight_files
from readaptir.packing import Layout, layout

LOG = logging.getLogger(__name__)

CAUSAL, MASKED = "causal", "masked"
DEFAULT_TARGETS = {
    CAUSAL: ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"),
    MASKED: ("query", "key", "value", "dense"),
}
# Model types whose modules the names above match none of: their attention and feed-forward
# projections. Only such types belong here: a stage id holds the recipe's target_modules, not
# the defaults, so a type the names above match would take other targets under the same id.
TYPE_TARGETS = {
    "distilbert": ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),
    "modernbert": ("Wqkv", "Wo", "Wi"),
}


def targets_for(config: Any) -> tuple[str, ...]:
    """The adapter's target modules when the recipe names none."""
    return TYPE_TARGETS.get(config.model_type) or DEFAULT_TARGETS[objective_for(config)]


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


def _lm_class(objective: str) -> type:
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
    model, info = _lm_class(objective).from_pretrained(
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


def linear_modules(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Names of the Linear modules in the body and in the head (outside the base-model prefix)."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    body, head = [], []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            (body if name.startswith(prefix) else head).append(name)
    return body, head


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # PEFT's rule for a list of names


def unmatched(targets: list[str], body: list[str]) -> str | None:
    """None when every target names one of the body's Linear modules; else which do not (PEFT
    itself only fails when none does, and would train an adapter without the others), listing
    the modules with layer numbers collapsed, so that the names a user may write are seen."""
    missing = [t for t in targets if not any(_matches(n, t) for n in body)]
    if not missing:
        return None
    shapes = sorted({re.sub(r"\.\d+\.", ".*.", n) for n in body})
    return (
        f"{missing} match none of the base model's Linear modules, which are: {', '.join(shapes)}"
    )


def resolve_targets(
    body: list[str], head: list[str], targets: list[str], every: bool = True
) -> list[str]:
    """The head modules that ``targets`` would also wrap (to exclude). Fails when a target names
    no body module (see ``unmatched``); with ``every`` False (an architecture's default names),
    only when none does, and warns of the others."""
    problem = unmatched(targets, body)
    matched = [t for t in targets if any(_matches(n, t) for n in body)]
    if problem and every:
        raise ValueError(f"adapter target_modules {problem}")
    if problem and not matched:
        raise ValueError(
            f"the default adapter target_modules {problem}; set adapter.target_modules in the "
            "recipe to the ones to adapt"
        )
    if problem:
        LOG.warning("default adapter target_modules %s: the adapter covers %s", problem, matched)
    return [n for n in head if any(_matches(n, t) for t in targets)]


def base_linear_modules(base_dir: Path) -> tuple[list[str], list[str]]:
    """``linear_modules`` of the model the adapter stage trains from ``base_dir``, built on the
    meta device from its config alone (no weight is read): the names PEFT will match, which may
    differ from the checkpoint's (a head class adds a prefix; some architectures rename on load)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        model = _lm_class(objective_for(config)).from_config(config)
    return linear_modules(model)


def check_stored_targets(model: torch.nn.Module, base_dir: Path) -> None:
    """Refuse an adapter whose wrapped modules are not tensors ``base_dir`` stores: some
    architectures (nomic-bert, gte) store fused or renamed weights (``attn.Wqkv``) that
    transformers converts on loading, and the merge, which reads Θ as stored, could not add Ψ."""
    from peft.tuners.lora import LoraLayer

    from readaptir.weights import Body

    body = Body(base_dir)
    lead = PEFT_LEAD + body.prefix + "."
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        stored = (name[len(lead) :] if name.startswith(lead) else name) + ".weight"
        if stored not in body:
            near = ", ".join(sorted(n for n in body.names() if ".0." in n)[:6])
            raise ValueError(
                f"{base_dir} stores no {stored}, which the adapter would train: transformers "
                f"renames or fuses a {model.config.model_type} model's stored weights on loading "
                f"(it stores e.g. {near}), and Ψ could not be merged into them; readapting this "
                "architecture needs alpha: 0"
            )


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
    wrapped = get_peft_model(model, config, autocast_adapter_dtype=True)
    for name, param in wrapped.named_parameters():
        if any(_matches(name, f) for f in fresh):
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


# --- checkpoints -------------------------------------------------------------------------------

CHECKPOINT_FILE = "checkpoint.pt"
# one per rank (dropout draws differ from rank to rank) and step: a kill after a rank's new state
# is written and before rank 0's checkpoint.pt is leaves the state of the step that file holds
RNG_FILE = "rng-rank{rank}-step{step}.pt"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict[str, torch.Tensor]:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()  # this rank's own GPU
    return rng


def save_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    progress: dict[str, Any],
    rank: int = 0,
    world: int = 1,
) -> Path:
    """Everything a resumed run needs, each file written to a temporary name, flushed to disk and
    renamed into place: every rank its random-number state, rank 0 the adapter, optimizer and
    progress. A rank keeps its states of this step and the one before: rank 0's checkpoint.pt
    is of one of them (the ranks step together, so none saves again before rank 0 has)."""
    folder = Path(folder)
    step = progress["step"]
    with atomic_file(folder / RNG_FILE.format(rank=rank, step=step), fsync=True) as tmp:
        made = {
            "step": progress["step"],
            "fingerprint": progress.get("fingerprint"),
            "world": world,
        }
        torch.save({**made, "rng": _rng_state()}, tmp)
    path = folder / CHECKPOINT_FILE
    if rank == 0:
        state = {
            "adapter": trainable_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": schedule.state_dict(),
            "progress": progress,
        }
        with atomic_file(path, fsync=True) as tmp:
            torch.save(state, tmp)
    # this step's and the one before it: a file of a higher step is of an abandoned run
    files = _rng_files(folder, rank)
    earlier = [p for p in files if _step_of(p) < step][-1:]
    for old in files:
        if _step_of(old) != step and old not in earlier:
            old.unlink(missing_ok=True)
    return path


def _rng_files(folder: Path, rank: int | str) -> list[Path]:
    """A rank's (``*``: every rank's) random-number states in ``folder``, by step."""
    return sorted(Path(folder).glob(RNG_FILE.format(rank=rank, step="*")), key=_step_of)


def _step_of(path: Path) -> int:
    return int(path.stem.rpartition("-step")[2])


def _load(path: Path) -> Any:
    """``path``'s state on the CPU, or None when the file is damaged (cut short by a crash on a
    file system that lost it: torch saves a zip archive, whose directory comes last); any other
    failure (a missing package) is raised as it is."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError):
        if zipfile.is_zipfile(path):
            raise
        return None


def load_checkpoint(
    folder: Path, fingerprint: str, rank: int = 0, world: int = 1
) -> dict[str, Any] | None:
    """The checkpoint in ``folder`` when one was made by a run with the same ``fingerprint``,
    with this rank's random-number state when it was saved at the same step by a run of as many
    ranks under the same fingerprint. Read onto the CPU: restoring moves each tensor where its
    parameter is, and leaves AdamW's step counts on the CPU, as a fresh run has them (on a GPU,
    each would cost a wait for the device per parameter and step)."""
    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    state = _load(path)
    if state is None:
        raise RuntimeError(
            f"{path}: a damaged checkpoint (cut short); delete the work folder {path.parent} to "
            "train this adapter from the start"
        )
    if state["progress"].get("fingerprint") != fingerprint:
        LOG.warning("%s belongs to a run with other settings; starting afresh", path)
        return None
    rng_path = Path(folder) / RNG_FILE.format(rank=rank, step=state["progress"]["step"])
    rng = _load(rng_path) if rng_path.is_file() else None
    made = {"step": state["progress"]["step"], "fingerprint": fingerprint, "world": world}
    if rng is None or any(rng.get(key) != value for key, value in made.items()):
        LOG.warning(
            "no random-number state of rank %d at step %d: resuming with fresh dropout draws "
            "(the adapter will differ slightly from an uninterrupted run's)",
            rank,
            state["progress"]["step"],
        )
        state["rng"] = None
    else:
        state["rng"] = rng["rng"]
    return state


def restore_checkpoint(
    state: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
) -> dict[str, Any]:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state["adapter"].items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["scheduler"])
    rng = state["rng"]
    if rng is not None:
        torch.set_rng_state(rng["torch"].cpu())
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"].cpu())
    return state["progress"]


def remove_checkpoint(folder: Path) -> None:
    for path in _rng_files(folder, "*"):
        path.unlink(missing_ok=True)
    (Path(folder) / CHECKPOINT_FILE).unlink(missing_ok=True)


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

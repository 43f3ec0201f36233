"""Which modules a knowledge adapter wraps: the recipe's ``target_modules`` or an
architecture's defaults, matched against the base's Linear modules as PEFT matches them, and
checked against the tensors Θ stores, which the merge adds Ψ to.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from readaptir.models import PEFT_LEAD
from readaptir.objective import CAUSAL, MASKED, lm_class, objective_for

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


def linear_modules(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Names of the Linear modules in the body and in the head (outside the base-model prefix)."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    body: list[str] = []
    head: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            (body if name.startswith(prefix) else head).append(name)
    return body, head


def matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # PEFT's rule for a list of names


def unmatched(targets: list[str], body: list[str]) -> str | None:
    """None when every target names one of the body's Linear modules; else which do not (PEFT
    itself only fails when none does, and would train an adapter without the others), listing
    the modules with layer numbers collapsed, so that the names a user may write are seen."""
    missing = [t for t in targets if not any(matches(n, t) for n in body)]
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
    no body module (see ``unmatched``); ``every`` False: the names are an architecture's
    defaults, which the error then asks the recipe to replace. Defaults some of which match
    (Phi-3's fused qkv_proj, MPNet's q/k/v) would adapt part of what the paper adapts: the
    attention without the MLP, or the reverse."""
    problem = unmatched(targets, body)
    if problem and every:
        raise ValueError(f"adapter target_modules {problem}")
    if problem:
        matched = [t for t in targets if any(matches(n, t) for n in body)]
        covered = f"; they would adapt {matched} alone" if matched else ""
        raise ValueError(
            f"the default adapter target_modules {problem}{covered}: set adapter.target_modules "
            "in the recipe to the ones to adapt (the paper's: the attention's query, key and "
            "value projections and the MLP's up and down ones)"
        )
    return [n for n in head if any(matches(n, t) for t in targets)]


def base_linear_modules(base_dir: Path) -> tuple[list[str], list[str]]:
    """``linear_modules`` of the model the adapter stage trains from ``base_dir``, built on the
    meta device from its config alone (no weight is read): the names PEFT will match, which may
    differ from the checkpoint's (a head class adds a prefix; some architectures rename on load)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        model = lm_class(objective_for(config)).from_config(config)
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

"""PEFT LoRA/DoRA adapters read per target tensor: the change Ψ each makes to a base weight.

The math follows PEFT's definitions (``lora_product``, ``dora_update``) and is checked against
PEFT's own ``merge_and_unload`` in the tests.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from types import EllipsisType

import torch

from readaptir.artifacts import read_json_mapping
from readaptir.models import PEFT_LEAD, check_mergeable_adapter
from readaptir.shards import Checkpoint, WeightError
from readaptir.weights import Body, split_head, ties_embeddings

LOG = logging.getLogger(__name__)

Rows = slice | EllipsisType  # a block of leading-dimension rows, or ``...`` for the whole tensor

_ADAPTER_KEY = re.compile(
    r"(?P<path>.+?)\.(?P<role>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A"
    r"|lora_embedding_B|lora_magnitude_vector(?:\.weight)?|base_layer\.\w+)"
)
_ROLES = {
    "lora_A.weight": "A",
    "lora_B.weight": "B",
    "lora_embedding_A": "A",
    "lora_embedding_B": "B",
    "lora_magnitude_vector": "m",
    "lora_magnitude_vector.weight": "m",
}


def lora_product(a: torch.Tensor, b: torch.Tensor, scaling: float, embedding: bool) -> torch.Tensor:
    """scaling · B @ A, laid out like the target weight (embedding adapters store it transposed)."""
    product = b @ a
    return scaling * (product.T if embedding else product)


def dora_update(
    weight: torch.Tensor, lora: torch.Tensor, magnitude: torch.Tensor, embedding: bool
) -> torch.Tensor:
    """W' − W with W' = m / ‖W + ΔW‖ ⊙ (W + ΔW), the norm taken as PEFT takes it.

    Linear weights (out, in) are normed per output row; embeddings (num, dim) per column.
    """
    merged = weight + lora
    norm = torch.linalg.norm(merged, dim=0 if embedding else 1, keepdim=True)
    return magnitude.reshape(norm.shape) / norm * merged - weight


@dataclass(frozen=True)
class TargetUpdate:
    """What an adapter holds for one target tensor, in the merge's precision on its device.

    Ψ is ``scaling · B @ A`` (LoRA), DoRA's rescaling of Θ + that product when ``magnitude`` is
    set, ``scaling · added`` for a LoRA bias, or ``replacement`` − Θ for a saved module.
    """

    scaling: float = 1.0
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    embedding: bool = False
    added: torch.Tensor | None = None
    replacement: torch.Tensor | None = None

    @property
    def needs_base(self) -> bool:
        """Whether Ψ depends on Θ (DoRA's norm, a replacement), not on the factors alone."""
        return self.magnitude is not None or self.replacement is not None

    @property
    def row_local(self) -> bool:
        """Whether a block of rows of Ψ needs only the same rows of Θ (not so for DoRA over an
        embedding, normed per column)."""
        return not (self.embedding and self.magnitude is not None)


def add_psi(
    acc: torch.Tensor,
    coef: float,
    update: TargetUpdate,
    theta: torch.Tensor | None,
    rows: Rows,
    work: torch.Tensor | None = None,
) -> torch.Tensor:
    """``acc`` + coef · rows ``rows`` of Ψ, accumulated into ``acc`` and returned.

    ``theta`` holds the same rows of Θ in ``acc``'s dtype (None unless ``update.needs_base``);
    ``work``, of ``acc``'s shape, may hold DoRA's Θ + scaling·B@A instead of fresh memory. The
    same sum as adding ``coef`` times ``lora_product`` or ``dora_update``, in fewer passes: the
    product is accumulated by ``addmm`` and DoRA's rescaling by ``addcmul``.
    """
    if update.replacement is not None or update.added is not None:
        if update.replacement is not None:  # a trained bias, or a saved module
            acc.add_(update.replacement[rows], alpha=coef).sub_(theta, alpha=coef)
        if update.added is not None:  # a LoRA bias, on top of a trained one or not
            acc.add_(update.added[rows], alpha=coef * update.scaling)
        return acc
    assert update.a is not None and update.b is not None
    if update.embedding:  # rows of the weight are columns of the factors; rare, kept plain
        lora = lora_product(update.a[:, rows], update.b, update.scaling, embedding=True)
        if update.magnitude is not None:
            lora = dora_update(theta, lora, update.magnitude, embedding=True)
        return acc.add_(lora, alpha=coef)
    a, b = update.a, update.b[rows]
    if update.magnitude is None:
        return acc.addmm_(b, a, alpha=coef * update.scaling)
    merged = torch.addmm(theta, b, a, alpha=update.scaling, out=work)  # Θ + scaling · B @ A
    norm = torch.linalg.vector_norm(merged, dim=1, keepdim=True)
    scale = update.magnitude[rows].reshape(norm.shape).div(norm).mul_(coef)
    return acc.addcmul_(merged, scale).sub_(theta, alpha=coef)


def _pattern_value(patterns: dict, path: str, default: float) -> float:
    # PEFT matches rank/alpha pattern keys against the end of the module path.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


class Adapter:
    """A PEFT LoRA/DoRA adapter read per target tensor, never merged into a whole model.

    Targets are canonical names; ``update`` gives the change made to one of them.
    """

    def __init__(self, adapter_dir: Path, prefix: str) -> None:
        self.folder = Path(adapter_dir)
        self.config = read_json_mapping(self.folder / "adapter_config.json")
        # PEFT's LoraConfig defaults, which its own loading applies to a config that omits them
        self.config = {"r": 8, "lora_alpha": 8, **self.config}
        try:
            check_mergeable_adapter(self.config, self.folder)
        except ValueError as err:
            raise WeightError(str(err)) from None
        self.ckpt = Checkpoint(adapter_dir, adapter=True)
        by_target: dict[str, dict[str, str]] = {}  # stored target name → role → adapter key
        embeddings: set[str] = set()  # targets whose factors are stored as (r, num), (dim, r)
        for key in self.ckpt.names():
            if not key.startswith(PEFT_LEAD):
                raise WeightError(f"unexpected key {key} in {self.folder}")
            rest = key[len(PEFT_LEAD) :]
            if ".original_module." in rest or ".modules_to_save." in rest:
                continue  # a saved module's wrapper copies; its plain name is saved beside them
            match = _ADAPTER_KEY.fullmatch(rest)
            if match is None:  # a whole replacement tensor (modules_to_save)
                by_target.setdefault(rest, {})["full"] = key
            elif match["role"] == "lora_B.bias":
                by_target.setdefault(match["path"] + ".bias", {})["bias"] = key
            elif match["role"] == "base_layer.bias" and self.config.get("bias", "none") != "none":
                # bias "all"/"lora_only": a target's trained bias, saved beside its factors
                by_target.setdefault(match["path"] + ".bias", {})["full"] = key
            elif not match["role"].startswith("base_layer"):  # base_layer: a copy of Θ's own
                roles = by_target.setdefault(match["path"] + ".weight", {})
                roles[_ROLES[match["role"]]] = key
                if "embedding" in match["role"]:
                    embeddings.add(match["path"] + ".weight")
        canon, self.heads = split_head(list(by_target), prefix, self.folder)
        if self.heads:
            LOG.info("%s: dropping updates to head tensors %s", self.folder, self.heads)
        self._targets = {name: by_target[stored] for name, stored in canon.items()}
        self._check_dora()
        self._paths = {name: stored.rsplit(".", 1)[0] for name, stored in canon.items()}
        self._embeddings = {name for name, stored in canon.items() if stored in embeddings}

    def _check_dora(self) -> None:
        # PEFT applies DoRA as the config says, whatever the file holds; the merge must agree
        dora = bool(self.config.get("use_dora"))
        for name, roles in self._targets.items():
            if dora and "A" in roles and "m" not in roles:
                raise WeightError(
                    f"{self.folder}: adapter_config.json has use_dora: true, but {name} has "
                    f"lora factors ({roles['A']}) and no lora_magnitude_vector"
                )
            if not dora and "m" in roles:
                raise WeightError(
                    f"{self.folder}: {roles['m']} is a DoRA magnitude, but adapter_config.json "
                    "has use_dora: false (PEFT would ignore it and merge plain LoRA)"
                )

    def targets(self) -> list[str]:
        return list(self._targets)

    def _rank(self, name: str) -> float:
        return _pattern_value(
            self.config.get("rank_pattern") or {}, self._paths[name], self.config["r"]
        )

    def scaling(self, name: str) -> float:
        """lora_alpha / r (or / √r with rsLoRA), per-module patterns applied."""
        r = self._rank(name)
        alpha = _pattern_value(
            self.config.get("alpha_pattern") or {}, self._paths[name], self.config["lora_alpha"]
        )
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def check(self, base: Body) -> None:
        """Every target exists in ``base`` with the shape the adapter's factors produce, and no
        head update would be lost with the head while reaching the body through tied weights."""
        if self.heads and ties_embeddings(base.folder):
            raise WeightError(
                f"{self.folder} updates the head tensor {self.heads[0]}, and {base.folder} ties "
                "its head to its input embeddings: no head update of such a base is merged (one "
                "of the tied matrix would change the body too); train the adapter without "
                "targeting the head"
            )
        foreign = [h for h in self.heads if h not in base.heads]
        if foreign:
            raise WeightError(
                f"adapter tensor {foreign[0]} in {self.folder} is outside the body of "
                f"{base.folder} and not one of its heads ({', '.join(base.heads) or 'none'})"
            )
        for name, roles in self._targets.items():
            key = next(iter(roles.values()))
            if name not in base:
                raise WeightError(
                    f"adapter tensor {key} in {self.folder} updates {name}, "
                    f"which is not in {base.folder}"
                )
            want, got = base.shape(name), self._shape(name, roles)
            if got != want:
                raise WeightError(
                    f"adapter tensor {key} in {self.folder} makes {name} of shape {got}, "
                    f"but it is {want} in {base.folder}"
                )

    def _shape(self, name: str, roles: dict[str, str]) -> tuple[int, ...]:
        shape = self.ckpt.shape
        if "full" in roles:
            if set(roles) - {"full", "bias"}:  # a trained bias plus a LoRA bias adds up
                raise WeightError(
                    f"{self.folder}: {name} is both replaced ({roles['full']}) and updated "
                    f"({', '.join(k for r, k in roles.items() if r != 'full')})"
                )
            return shape(roles["full"])
        if "bias" in roles:
            if "m" in self._targets.get(name.rsplit(".", 1)[0] + ".weight", {}):
                raise WeightError(f"{self.folder}: DoRA with lora_bias ({name}) is not supported")
            return shape(roles["bias"])
        if "A" not in roles or "B" not in roles:
            raise WeightError(f"{self.folder}: {name} lacks lora_A or lora_B")
        for key in (roles["A"], roles["B"]):
            if len(shape(key)) != 2:  # a Conv layer's adapter, or a damaged file
                raise WeightError(
                    f"{self.folder}: {key} has shape {shape(key)}; LoRA factors are matrices"
                )
        (rank, fan_in), (fan_out, rank_b) = shape(roles["A"]), shape(roles["B"])
        if not rank == rank_b == self._rank(name):
            raise WeightError(
                f"{self.folder}: {name} has rank {rank}/{rank_b}, config says {self._rank(name)}"
            )
        emb = name in self._embeddings
        if "m" in roles and shape(roles["m"]) != (fan_out,):
            raise WeightError(f"{self.folder}: {roles['m']} has shape {shape(roles['m'])}")
        return (fan_in, fan_out) if emb else (fan_out, fan_in)

    def target(
        self, name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64
    ) -> TargetUpdate | None:
        """The adapter's tensors for ``name`` in ``dtype`` on ``device``; None if untouched."""
        roles = self._targets.get(name)
        if roles is None:
            return None
        got = {role: self.ckpt.get(key).to(device, dtype) for role, key in roles.items()}
        return TargetUpdate(
            scaling=self.scaling(name),
            a=got.get("A"),
            b=got.get("B"),
            magnitude=got.get("m"),
            embedding=name in self._embeddings,
            added=got.get("bias"),
            replacement=got.get("full"),
        )

    def update(self, name: str, weight: torch.Tensor) -> torch.Tensor | None:
        """The change to ``name`` given its base ``weight``, in ``weight``'s dtype; None if
        untouched."""
        target = self.target(name, weight.device, weight.dtype)
        return None if target is None else add_psi(torch.zeros_like(weight), 1, target, weight, ...)

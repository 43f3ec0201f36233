"""Recipe schema: the pydantic models a recipe file is validated against (``recipe_files`` reads
the files, merges ``extends`` and locates errors at the file and key).

Defaults are the RE-AdaptIR paper's, but for adapters trained on packed rows (``adapter.packing``).
A minimal recipe is ``base``, ``retriever`` and ``corpus``.
Files whose name starts with ``_`` are partial recipes: used through ``extends``, never built alone.
Relative paths in a recipe are relative to the project root (the folder holding ``recipes/``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from readaptir.distributed import TORCH_SEEDS
from readaptir.families import COUNT_LIMIT, FAMILIES, Encoding, resolve_encoding

NAME_RE = re.compile(r"[A-Za-z0-9_-]+")  # fullmatch: a name is also a file and stage name
# what a fetched collection's folder may be called (its name, or the last part of its source)
CORPUS_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
URL_SCHEMES = ("https", "http", "ftp", "file")  # what urllib opens
Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class RecipeError(ValueError):
    """A recipe problem, located by file, key and (when known) line."""

    def __init__(self, file: Path | str, key: str | None, message: str, line: int | None = None):
        self.file, self.key, self.line = str(file), key, line
        where = shown(file) + (f":{line}" if line else "") + (f": {key}" if key else "")
        super().__init__(f"{where}: {message}")


class FieldError(ValueError):
    """A model validator's complaint about one of the model's keys (``key``, dotted), located
    there rather than at the model."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


def shown(file: Path | str) -> str:
    """A file as a message names it: relative to the working folder when inside it."""
    path = Path(file)
    try:
        return str(path.relative_to(Path.cwd().resolve())) if path.is_absolute() else str(path)
    except (ValueError, OSError):  # outside it, or no working folder any more
        return str(path)


class _Strict(BaseModel):
    # strict: `r: true`, `alpha: "0.5"` or `packing: "off"` are errors, not coerced; no .nan or .inf
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _shorthand(field: str):
    """Let ``key: value`` stand for ``key: {field: value}``."""

    def before(cls, value: Any) -> Any:
        return {field: value} if isinstance(value, str) else value

    return model_validator(mode="before")(classmethod(before))


class ModelSpec(_Strict):
    """A model: a hub id or a local folder, with an optional pinned revision."""

    source: str = Field(min_length=1)
    revision: str | None = None
    dtype: Dtype = "auto"
    _from_str = _shorthand("source")


class RetrieverSpec(ModelSpec):
    """The retriever: a full model or a PEFT LoRA adapter over ``base``, and how it encodes."""

    family: Literal[FAMILIES] = "custom"  # type: ignore[valid-type]
    encoding: dict[str, Any] = Field(default_factory=dict)
    _from_str = _shorthand("source")

    @field_validator("encoding")
    @classmethod
    def _known_encoding_fields(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        # every override a known field of the right type, and consistent with the family's preset
        family = info.data.get("family")  # absent when it failed its own check
        if family:
            resolve_encoding(family, value)
        else:
            Encoding(**value)
        return value


# what a fetch stage writes beside the collection's folder, named by the collection
FETCH_FILES = ("fetch.json", "stage.json")


class CorpusSpec(_Strict):
    """A BEIR-format collection (corpus.jsonl, queries.jsonl, qrels/<split>.tsv): a local
    ``path``, a public ``beir`` set by name, or a zip at ``url``; the last two are fetched by a
    stage of their own (``sha256`` pins the archive). ``beir:NAME`` stands for ``{beir: NAME}``.
    """

    path: str | None = None
    beir: str | None = None
    url: str | None = None
    sha256: str | None = None
    split: str = "test"
    name: str | None = None
    in_domain: bool = False  # excluded from the report's zero-shot average

    @model_validator(mode="before")
    @classmethod
    def _from_str(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"beir": value[5:]} if value.startswith("beir:") else {"path": value}
        return value

    @model_validator(mode="after")
    def _one_source(self) -> CorpusSpec:
        given = [k for k in ("path", "beir", "url") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of path, beir or url")
        if self.beir is not None and not CORPUS_NAME_RE.fullmatch(self.beir):
            raise FieldError("beir", f"a BEIR set's name (e.g. trec-covid), not {self.beir!r}")
        if self.url is not None and urlparse(self.url).scheme not in URL_SCHEMES:
            schemes = ", ".join(f"{s}://" for s in URL_SCHEMES)
            raise FieldError("url", f"{self.url!r} is not a URL the fetch stage reads ({schemes})")
        if not CORPUS_NAME_RE.fullmatch(self.split):
            raise FieldError(
                "split", f"the name of a qrels file (test, dev, train), not {self.split!r}"
            )
        if self.sha256 is not None and not SHA256_RE.fullmatch(self.sha256):
            raise FieldError("sha256", f"64 lower-case hex digits, not {self.sha256!r}")
        if self.sha256 is not None and self.path is not None:
            raise FieldError(
                "sha256", "pins a fetched archive (beir or url); a local path is hashed as it is"
            )
        # a fetched collection is a folder of that name; any name is in stage names and tables
        key = "name" if self.name is not None else given[0]
        if (self.name is not None or self.path is None) and not CORPUS_NAME_RE.fullmatch(
            self.label
        ):
            raise FieldError(
                key,
                f"the collection's name {self.label!r} must be letters, digits, '.', '-' or '_' "
                "(not starting with '.'); set `name:`",
            )
        if not self.label:
            raise FieldError(key, "this gives the collection no name; set `name:`")
        if self.path is None and self.label in FETCH_FILES:
            raise FieldError(key, f"{self.label!r} is the name of a file the fetch stage writes")
        return self

    @property
    def label(self) -> str:
        source = self.path or self.beir or (self.url or "").rsplit("/", 1)[-1].removesuffix(".zip")
        return self.name or Path(source.rstrip("/")).name


class AdapterSpec(_Strict):
    """The knowledge adapter Ψ: next-token (decoder bases) or masked-LM (encoder bases) training
    on unlabeled passages. ``target_modules`` None is the architecture's default: the paper's
    q/k/v/up/down projections for Llama/Mistral-style bases, query/key/value/dense for BERT."""

    method: Literal["dora", "lora"] = "dora"
    r: int = Field(32, gt=0)
    lora_alpha: float = Field(64, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, min_length=1)  # None: the architecture's
    lr: float = Field(2e-4, gt=0, le=1)  # AdamW's: past 1e38 its update overflowed float32
    # the HF Trainer's defaults, as the paper trained: no weight decay, gradients clipped to norm 1
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)  # None: no clipping
    batch_size: int = Field(4, gt=0, le=COUNT_LIMIT)
    epochs: float = Field(1, gt=0)
    max_length: int = Field(1024, gt=1, le=COUNT_LIMIT)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    seed: int = Field(0, ge=TORCH_SEEDS[0], le=TORCH_SEEDS[1])
    max_steps: int | None = Field(None, gt=0, le=COUNT_LIMIT)
    train_corpus: CorpusSpec | None = None
    # which passages of the training corpus: judged/unjudged in the evaluated split (Table 2)
    passages: Literal["all", "judged", "unjudged"] = "all"
    packing: bool = True  # false: one padded passage per sequence, as in the paper
    batch_tokens: int | None = Field(None, gt=0, le=COUNT_LIMIT)
    # auto: on when training on a GPU; a number: that share of the layers, evenly spread
    gradient_checkpointing: Literal["auto"] | bool | float = "auto"
    checkpoint_every: int = Field(500, gt=0, le=COUNT_LIMIT)  # steps between resumable checkpoints

    @field_validator("target_modules")
    @classmethod
    def _distinct_targets(cls, value: list[str] | None) -> list[str] | None:
        twice = sorted({name for name in value or [] if value.count(name) > 1})
        if twice:
            raise ValueError(f"a module name appears twice: {twice[0]}")
        return value

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _checkpointing(cls, value: Any) -> Any:
        if value == "auto" or isinstance(value, bool):
            return value
        if isinstance(value, int | float) and 0 <= value <= 1:
            return float(value) if value else False  # a share of none is off
        raise ValueError(
            f"auto, true, false, or the share of the layers to checkpoint (a number in [0, 1]), "
            f"not {value!r}"
        )


class ReadaptSpec(_Strict):
    """The scalars of Θ + αΨ + βΔ.

    A list sweeps (one variant recipe per value, sharing adapter and Δ). ``alpha: auto`` picks α
    from ``alpha_grid`` by ``tune_metric`` on a deterministic ``tune_fraction`` of the judged
    queries and reports on the other queries only.
    """

    alpha: float | list[float] | Literal["auto"] = 0.5
    beta: float | list[float] = 1.0
    # direct: the merge reads the retriever itself, W = (1-β)Θ + βR + αΨ (fastest, no extra
    # storage); stored: Δ = R - Θ is a stage of its own, cached (as large as a model)
    delta: Literal["direct", "stored"] = "direct"
    # where the delta and merge stages do their arithmetic; how, not what: outside the stage ids
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    alpha_grid: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0]  # distinct values
    tune_fraction: float = Field(0.5, gt=0, lt=1)
    tune_seed: int = 0
    tune_metric: str = "nDCG@10"

    @field_validator("tune_metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        _check_metric(value)
        return value

    @model_validator(mode="after")
    def _sweeps_are_sensible(self) -> ReadaptSpec:
        for key in ("alpha", "beta"):
            value = getattr(self, key)
            if isinstance(value, list) and not value:
                raise FieldError(key, "a sweep needs at least one value")
            if isinstance(value, list) and len(set(value)) != len(value):
                raise FieldError(key, "a sweep needs distinct values")
        if self.alpha == "auto":
            if isinstance(self.beta, list):
                raise FieldError("beta", "alpha: auto takes one beta, not a sweep")
            if len(set(self.alpha_grid)) < 2:
                raise FieldError("alpha_grid", "alpha: auto needs at least two values")
        if len(set(self.alpha_grid)) != len(self.alpha_grid):
            raise FieldError("alpha_grid", "a value appears twice")
        return self

    @property
    def auto(self) -> bool:
        return self.alpha == "auto"


def _check_metric(name: str) -> int | None:
    """The metric's cutoff; an unknown metric is an error now, not when the score stage runs."""
    from readaptir.stages.score import parse_metric

    return parse_metric(name)[2]


class EvalSpec(_Strict):
    k: int = Field(100, gt=0, le=COUNT_LIMIT)
    metrics: list[str] = Field(["nDCG@10", "Recall@100", "MRR@10"], min_length=1)
    ignore_identical_ids: Literal["auto"] | bool = "auto"

    @model_validator(mode="after")
    def _metrics_fit_the_run(self) -> EvalSpec:
        from readaptir.stages.score import parse_metric

        try:
            parsed = {m: parse_metric(m) for m in self.metrics}
        except ValueError as err:  # an unknown metric
            raise FieldError("metrics", str(err)) from None
        seen: dict[str, str] = {}
        for metric in self.metrics:  # nDCG@10, NDCG@10 and nDCG@010 are one metric
            canonical = parsed[metric][0]
            if canonical in seen:
                raise FieldError("metrics", f"a metric appears twice: {seen[canonical]}, {metric}")
            seen[canonical] = metric
        cutoffs = {m: cutoff or 0 for m, (_, _, cutoff) in parsed.items()}
        deep = [m for m in self.metrics if cutoffs[m] > self.k]
        if not deep:
            return self
        if "metrics" in self.model_fields_set:
            raise FieldError("metrics", _too_deep(deep[0], cutoffs[deep[0]], self.k))
        # the defaults too: Recall@100 of a top-5 run would be a silently wrong score
        raise FieldError(
            "k",
            f"the default metrics {', '.join(deep)} need the top {max(cutoffs.values())} of each "
            f"run, but eval.k is {self.k}: raise eval.k or set eval.metrics",
        )


def _check_cutoff(metric: str, k: int) -> None:
    cutoff = _check_metric(metric)
    if cutoff is not None and cutoff > k:
        raise ValueError(_too_deep(metric, cutoff, k))


def _too_deep(metric: str, cutoff: int, k: int) -> str:
    return f"{metric} needs the top {cutoff} of each run, but eval.k is {k}"


class Recipe(_Strict):
    name: str
    label: str | None = None  # the recipe's column in report tables (default: the retriever)
    base: ModelSpec
    retriever: RetrieverSpec
    corpus: CorpusSpec | list[CorpusSpec]
    adapter: AdapterSpec = AdapterSpec()
    readapt: ReadaptSpec = ReadaptSpec()
    eval: EvalSpec = EvalSpec()
    _file: str = PrivateAttr("<recipe>")
    _sweep: str | None = PrivateAttr(None)

    @property
    def file(self) -> str:
        """The YAML file this recipe came from (for error messages)."""
        return self._file

    @property
    def sweep(self) -> str | None:
        """The name of the recipe whose α/β sweep made this variant, if any."""
        return self._sweep

    @property
    def column(self) -> str:
        return self.label or Path(self.retriever.source.rstrip("/")).name

    @field_validator("base")
    @classmethod
    def _base_trains_without_loss_scaling(cls, value: ModelSpec) -> ModelSpec:
        if value.dtype == "float16":
            raise ValueError(
                "dtype float16: the adapter trains in this dtype, and float16 training needs loss "
                "scaling, which is not done; use bfloat16, float32 or auto (a float16 checkpoint "
                "then trains in bfloat16)"
            )
        return value

    @field_validator("name")
    @classmethod
    def _name_is_readable(cls, value: str) -> str:
        if not NAME_RE.fullmatch(value):
            raise ValueError("must use only letters, digits, '-' and '_'")
        return value

    @field_validator("corpus")
    @classmethod
    def _some_corpus(cls, value: CorpusSpec | list[CorpusSpec]) -> CorpusSpec | list[CorpusSpec]:
        if value == []:
            raise ValueError("an empty list: name at least one collection")
        return value

    @model_validator(mode="after")
    def _judgments_select_their_own_passages(self) -> Recipe:
        if self.adapter.passages != "all" and self.adapter.train_corpus is not None:
            raise FieldError(
                "adapter.passages",
                f"{self.adapter.passages} selects passages of the evaluated collection by its "
                "judgments; with adapter.train_corpus the adapter trains on another collection, "
                "whose ids those judgments do not name",
            )
        return self

    @model_validator(mode="after")
    def _tuned_within_the_run(self) -> Recipe:
        if self.readapt.auto:
            try:
                _check_cutoff(self.readapt.tune_metric, self.eval.k)
            except ValueError as err:
                raise FieldError("readapt.tune_metric", str(err)) from None
        return self

    def resolved(self) -> dict:
        """Every value this recipe builds with (α-selection settings only when α is auto); how a
        stage runs (``RUNTIME_FIELDS``) is no part of it."""
        auto_only = {"alpha_grid", "tune_fraction", "tune_seed", "tune_metric"}
        exclude = {
            "adapter": set(RUNTIME_FIELDS["adapter"]),
            "readapt": set(RUNTIME_FIELDS["readapt"]) | (set() if self.readapt.auto else auto_only),
        }
        return self.model_dump(mode="json", exclude=exclude)

    @property
    def train_corpus(self) -> CorpusSpec:
        assert isinstance(self.corpus, CorpusSpec), "expand_grid first"
        return self.adapter.train_corpus or self.corpus


# How a stage runs, not what it makes: kept out of stage ids and of the recipes DVC tracks.
RUNTIME_FIELDS = {
    "adapter": ("checkpoint_every", "gradient_checkpointing"),
    "readapt": ("device",),
}

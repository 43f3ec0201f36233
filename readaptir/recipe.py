"""Recipe schema: YAML validated by pydantic, with ``extends`` and errors that name file and key.

Defaults are the RE-AdaptIR paper's, but for adapters trained on packed rows (``adapter.packing``).
A minimal recipe is ``base``, ``retriever`` and ``corpus``.
Files whose name starts with ``_`` are partial recipes: used through ``extends``, never built alone.
Relative paths in a recipe are relative to the project root (the folder holding ``recipes/``).
"""

from __future__ import annotations

import re
import reprlib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from readaptir.artifacts import folder_files
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
        where = _shown(file) + (f":{line}" if line else "") + (f": {key}" if key else "")
        super().__init__(f"{where}: {message}")


class FieldError(ValueError):
    """A model validator's complaint about one of the model's keys (``key``, dotted), located
    there rather than at the model."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


def _shown(file: Path | str) -> str:
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
# keys a plain string may stand for a mapping under, and the field that string gives
SHORTHAND = {"base": "source", "retriever": "source", "corpus": "path"}


class ShorthandOverride(ValueError):
    """A string that would silently drop settings a parent recipe gave as a mapping."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


def deep_merge(parent: dict, child: dict) -> dict:
    """``child`` over ``parent``; nested mappings merge, everything else is replaced."""
    merged = dict(parent)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        elif key in SHORTHAND and (lost := _dropped(key, merged.get(key), value)):
            raise ShorthandOverride(key, _override_message(key, merged[key], value, lost))
        else:
            merged[key] = value
    return merged


def _dropped(key: str, inherited: Any, value: Any) -> list[str]:
    """The keys of a parent's mapping that ``value`` replacing it would lose: a string sets only
    the path (a corpus's) or source, a list (of corpora) what every one of its items sets."""
    items = value if isinstance(value, list) else [value]
    if not isinstance(inherited, dict) or not all(isinstance(i, (str, dict)) for i in items):
        return []  # nothing inherited, or not a recipe's shape at all (the schema says more)
    given = [set(item) if isinstance(item, dict) else {SHORTHAND[key]} for item in items]
    return sorted(k for k in inherited if not all(k in keys for keys in given))


def _override_message(key: str, inherited: dict, value: Any, lost: list[str]) -> str:
    field = SHORTHAND[key]
    if isinstance(value, str):
        return (
            f"a plain string here would drop what the parent recipe sets ({', '.join(lost)});"
            f" write a mapping, e.g. {key}: {{{field}: {value}}}, and repeat what should stay"
        )
    return (
        f"this list replaces the parent recipe's {key} ({', '.join(sorted(inherited))}) and "
        f"an item does not set {', '.join(lost)}: write each item as a mapping that does"
    )


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, but for numbers like ``2e-4``: a float (as in YAML 1.2 and
    JSON), not a string, so that ``lr: 2e-4`` means what it says under strict types."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _read_yaml(path: Path) -> tuple[dict, yaml.Node | None]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(path, None, "file not found") from None
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        raise RecipeError(path, None, "not UTF-8 text", line) from None
    try:
        data = yaml.load(text, Loader=_RecipeLoader)
        node = yaml.compose(text, Loader=_RecipeLoader)
    except yaml.reader.ReaderError as err:  # a character YAML refuses: at a position, no mark
        line = text[: err.position].count("\n") + 1
        char = f"#x{err.character:04x}" if isinstance(err.character, int) else err.character
        raise RecipeError(path, None, f"not valid YAML: {err.reason} {char}", line) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise RecipeError(
            path, None, f"not valid YAML: {getattr(err, 'problem', err)}", line
        ) from None
    _check_nodes(path, node)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(path, None, "a recipe must be a mapping of keys to values")
    return data, node


_KEY_TAGS = ("tag:yaml.org,2002:str", "tag:yaml.org,2002:merge")  # a name, or ``<<`` (a merge)


# numbers YAML 1.1 reads in another base than they seem to be written in: 010 is 8 (octal),
# 0b11 is 3, 1:30 is 90 (base 60); YAML 1.2 reads the first as 10 and the others as strings
_OTHER_BASES = {
    "tag:yaml.org,2002:int": re.compile(
        r"[-+]?(?:0[0_]*[1-7]_*[0-7][0-7_]*|0b[01_]+|[0-9][0-9_]*(?::[0-5]?[0-9])+)"
    ),
    "tag:yaml.org,2002:float": re.compile(r"[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*"),
}


def _check_nodes(
    path: Path, node: yaml.Node | None, prefix: str = "", done: set[int] | None = None
) -> None:
    """YAML keeps the last of two equal keys silently, and reads 010 as 8; a recipe must do
    neither. Each node is looked at once (``done``), however many aliases name it: aliases of
    aliases would otherwise be walked as many times as they repeat, exponentially."""
    done = set() if done is None else done
    if id(node) in done:
        return
    done.add(id(node))
    if isinstance(node, yaml.ScalarNode) and node.style is None:
        other = _OTHER_BASES.get(node.tag)
        if other is not None and other.fullmatch(node.value):
            raise RecipeError(
                path,
                prefix.rstrip(".") or None,
                f"YAML 1.1 reads {node.value} as a number in base 8, 2 or 60, not as it looks: "
                "write it in decimal, or quote it for a string",
                node.start_mark.line + 1,
            )
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            line = key_node.start_mark.line + 1
            # ~, 1 or true would reach the schema as None, 1, True
            if key_node.tag not in _KEY_TAGS:
                kind = key_node.tag.rsplit(":", 1)[-1]
                raise RecipeError(
                    path, key, f"a key must be a name; YAML reads this one as {kind}", line
                )
            if key_node.value in seen:
                raise RecipeError(path, key, "the same key appears twice", line)
            seen.add(key_node.value)
            _check_nodes(path, value_node, key + ".", done)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_nodes(path, item, prefix, done)


def _line_of(node: yaml.Node | None, loc: tuple, exact: bool = False) -> int | None:
    """The line of the deepest key of ``loc`` found in the YAML node tree (``exact``: of the
    whole of ``loc``, or None)."""
    line = None
    for depth, part in enumerate(loc):
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == str(part)]
            if not match:
                return None if exact and depth < len(loc) else line
            line, node = match[0][0].start_mark.line + 1, match[0][1]
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return None if exact else line
    return line


Chain = list[tuple[Path, "yaml.Node | None"]]  # a recipe file, then its parents, nearest first


def resolve_data(path: Path, _seen: tuple[Path, ...] = ()) -> tuple[dict, Chain]:
    """The recipe's data with its ``extends`` chain merged in, and the files that gave it."""
    path = path.resolve()
    if path in _seen:
        chain = " -> ".join(p.name for p in (*_seen, path))
        raise RecipeError(path, "extends", f"circular extends: {chain}")
    data, node = _read_yaml(path)
    refs = data.pop("extends", None)
    if refs is None:
        return data, [(path, node)]
    refs = [refs] if isinstance(refs, str) else refs
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise RecipeError(path, "extends", "expected a recipe file or a list of them")
    merged: dict = {}
    chain: Chain = []
    try:
        for ref in refs:  # later parents override earlier ones; this file overrides all
            parent_path = path.parent / ref
            if not parent_path.is_file():
                line = _line_of(node, ("extends",))
                raise RecipeError(path, "extends", f"no recipe file {ref!r} beside this one", line)
            parent, parent_chain = resolve_data(parent_path, (*_seen, path))
            merged = deep_merge(merged, parent)
            chain = parent_chain + chain
        return deep_merge(merged, data), [(path, node), *chain]
    except ShorthandOverride as err:
        raise RecipeError(path, err.key, str(err), _line_of(node, (err.key,))) from None


_TYPE_TAG = re.compile(r"^(function-|literal\[|list\[|dict\[)|^(float|int|str|bool)$")


# a bad value as an error shows it: long strings and lists cut short (an alias bomb is millions)
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 100
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = 8
_SHOWN.maxlevel = 3

# the input is not of this member of a union at all: the other members say more
_WRONG_KIND = {"model_type", "dict_type", "list_type", "float_type", "int_type", "bool_type"}
_WRONG_KIND |= {"string_type", "literal_error"}


def _most_specific(errors: list[dict]) -> list[dict]:
    """Of the errors a union gives for one value, those of the members that got inside it, else
    any but "not this kind" (``corpus: [a, {nmae: x}]`` is about ``corpus.1.nmae``, not "should
    be a mapping"; ``alpha: .nan`` is "not finite", not "should be a list")."""
    unions: dict[tuple, list[dict]] = {}
    for error in errors:
        loc = error["loc"]
        tagged = [i for i, p in enumerate(loc) if _TYPE_TAG.search(str(p))]
        unions.setdefault(loc[: tagged[0]] if tagged else loc, []).append(error)
    kept = []
    for at, members in unions.items():
        inside = [e for e in members if _depth(e) > len(at)]
        telling = [e for e in members if e["type"] not in _WRONG_KIND]
        kept += inside or telling or members
    return kept


def _depth(error: dict) -> int:
    return sum(1 for p in error["loc"] if not _TYPE_TAG.search(str(p)))


def _located(chain: Chain, err: ValidationError) -> RecipeError:
    """The first problem of a validation error, at its key and line, in a user's words.

    Errors of one key that come from the members of a union (``alpha: 0.5 | [..] | auto``) are
    one problem: their messages are joined.
    """
    problems: dict[tuple, list[dict]] = {}
    for error in _most_specific(err.errors()):
        loc = tuple(p for p in error["loc"] if not _TYPE_TAG.search(str(p)))
        field = error.get("ctx", {}).get("error")
        if isinstance(field, FieldError):
            loc += tuple(field.key.split("."))
        problems.setdefault(loc, []).append(error)
    loc, errors = next(iter(problems.items()))
    first = errors[0]
    if first["type"] == "extra_forbidden":
        message = "unknown key (check its spelling and indentation)"
    elif first["type"] == "missing":
        message = "required key is missing"
    else:
        message = "; or ".join(
            dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in errors)
        )
        if "input" in first and first["type"] != "value_error":
            message += f", got {_SHOWN.repr(first['input'])}"
            if first["type"] == "string_type" and isinstance(first["input"], int | float):
                message += " (YAML read a number: quote it)"  # a revision like 1e45678
    if len(problems) > 1:
        more = [".".join(str(p) for p in other) or "(top level)" for other in list(problems)[1:]]
        listed = ", ".join(more[:8]) + (", …" if len(more) > 8 else "")
        message += f" (and {len(more)} more: {listed})"
    key = ".".join(str(p) for p in loc) or None
    path, line = _setter(chain, loc)
    return RecipeError(path, key, message, line)


def _setter(chain: Chain, loc: tuple) -> tuple[Path, int | None]:
    """The file that sets the key ``loc`` (the recipe itself or a parent) and its line there;
    else the recipe and the line of the nearest key it has."""
    for path, node in chain:
        line = _line_of(node, loc, exact=True)
        if line is not None:
            return path, line
    path, node = chain[0]
    return path, _line_of(node, loc)


def located(file: Path | str, key: str | None, message: str) -> RecipeError:
    """An error about the dotted ``key`` of the recipe in ``file``, at the file and line that
    set it (for problems found after validation, e.g. while planning)."""
    try:
        _, chain = resolve_data(Path(file))
    except RecipeError:
        return RecipeError(file, key, message)
    loc = tuple(int(p) if p.isdigit() else p for p in key.split(".")) if key else ()
    path, line = _setter(chain, loc)
    return RecipeError(path, key, message, line)


def load_recipe(path: Path) -> Recipe:
    path = Path(path)
    if path.is_symlink() and not path.exists():
        try:
            path.resolve(strict=True)
        except FileNotFoundError:
            why = "which does not exist"
        except (OSError, RuntimeError):  # a loop: RuntimeError before Python 3.13
            why = "which leads back to itself (a loop of links)"
        raise RecipeError(path, None, f"a link to {path.readlink()}, {why}")
    if path.exists() and not path.is_file():  # a named pipe would block, a device never end
        raise RecipeError(path, None, "not a regular file")
    try:
        data, chain = resolve_data(path)
    except RecursionError:
        raise RecipeError(
            path,
            None,
            "nested too deeply: an alias that holds itself, nesting hundreds of levels deep, or "
            "a chain of hundreds of extends",
        ) from None
    if "name" not in data:
        data["name"] = path.stem
        if not NAME_RE.fullmatch(path.stem):
            raise RecipeError(
                path,
                "name",
                "the file name is not a valid recipe name (letters, "
                "digits, '-', '_'): rename the file or set `name:`",
            )
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise _located(chain, err) from None
    recipe._file = str(path)
    return recipe


def recipe_files(recipes_dir: Path) -> list[Path]:
    """The buildable recipes of a folder (recursively); partial ones, named ``_*`` or inside a
    ``_*`` folder, excluded, and hidden ones (``.*``: editor locks, notebook checkpoints) too."""
    root = Path(recipes_dir)
    files = [p for p in folder_files(root) if p.suffix.lower() in (".yaml", ".yml")]
    return [p for p in files if not any(part[:1] in "_." for part in p.relative_to(root).parts)]


def _value_tag(value: float) -> str:
    """0.25 -> '0p25', 1.0 -> '1': an exact number in a name DVC parameter paths accept."""
    text = repr(float(value)).removesuffix(".0")
    return text.replace(".", "p").replace("-", "m").replace("+", "")


def slug(text: str, limit: int = 32) -> str:
    """A readable name fragment from a path, hub id or label (letters, digits, '-', '_')."""
    tail = Path(text.rstrip("/")).name or text
    return re.sub(r"[^A-Za-z0-9_-]+", "-", tail).strip("-")[:limit] or "x"


def expand_grid(recipe: Recipe) -> list[Recipe]:
    """A list of corpora makes one recipe per corpus, named ``<name>-<corpus label>``."""
    if not isinstance(recipe.corpus, list):
        return [recipe]
    labels = [c.label for c in recipe.corpus]
    if len(set(labels)) != len(labels):
        raise RecipeError(recipe.file, "corpus", "two corpora of the list have the same name")
    variants = []
    for corpus in recipe.corpus:
        variant = recipe.model_copy(
            update={"name": f"{recipe.name}-{slug(corpus.label, 64)}", "corpus": corpus}
        )
        variant._file = recipe.file
        variants.append(variant)
    return variants


def expand_sweeps(recipe: Recipe) -> list[Recipe]:
    """One recipe per (α, β) of a sweep, named ``<name>-a<α>[-b<β>]``; others unchanged."""
    alphas, betas = recipe.readapt.alpha, recipe.readapt.beta
    if not isinstance(alphas, list) and not isinstance(betas, list):
        return [recipe]
    variants = []
    for alpha in alphas if isinstance(alphas, list) else [alphas]:
        for beta in betas if isinstance(betas, list) else [betas]:
            name = recipe.name
            if isinstance(alphas, list):
                name += f"-a{_value_tag(alpha)}"
            if isinstance(betas, list):
                name += f"-b{_value_tag(beta)}"
            readapt = recipe.readapt.model_copy(update={"alpha": alpha, "beta": beta})
            variant = recipe.model_copy(update={"name": name, "readapt": readapt})
            variant._file, variant._sweep = recipe.file, recipe.name
            variants.append(variant)
    return variants


def _name_clash(later: tuple[str, Path], earlier: tuple[str, Path]) -> RecipeError:
    """Two recipes of one name (or of names differing in case alone): blamed on the one whose
    own ``name:`` (not a parent's) makes the clash, at its line, where only the earlier one's
    does."""
    if later[1] == earlier[1]:
        return RecipeError(
            later[1], "name", f"{later[0]!r} is also the name of another variant of this recipe"
        )

    def blame(this: tuple[str, Path], other: tuple[str, Path], line: int | None) -> RecipeError:
        case = (
            f" (as {other[0]!r}: names must differ in more than case)"
            if other[0] != this[0]
            else ""
        )
        message = f"{this[0]!r} is also the name of {_shown(other[1])}{case}"
        return RecipeError(this[1], "name", message, line)

    later_line, earlier_line = _own_line(later[1], "name"), _own_line(earlier[1], "name")
    if later_line is None and earlier_line is not None:
        return blame(earlier, later, earlier_line)
    return blame(later, earlier, later_line)


def _own_line(path: Path, key: str) -> int | None:
    """The line at which the recipe file itself (not a parent) sets the top-level ``key``."""
    return _line_of(_read_yaml(Path(path).resolve())[1], (key,), exact=True)


def load_recipes(recipes_dir: Path) -> list[Recipe]:
    """Every buildable recipe, corpus grids and α/β sweeps expanded; names must be unique."""
    if Path(recipes_dir).exists() and not Path(recipes_dir).is_dir():
        raise RecipeError(recipes_dir, None, "not a folder: recipes are the *.yaml files in one")
    files = recipe_files(recipes_dir)
    if not files:
        raise RecipeError(recipes_dir, None, "no recipes (*.yaml or *.yml) found")
    # names key output folders: two differing in case alone would share them where the file
    # system ignores case (macOS, Windows)
    recipes, seen = [], {}
    for path in files:
        expanded = [v for r in expand_grid(load_recipe(path)) for v in expand_sweeps(r)]
        for recipe in expanded:
            key = recipe.name.casefold()
            if key in seen:
                raise _name_clash((recipe.name, path), seen[key])
            seen[key] = (recipe.name, path)
            recipes.append(recipe)
    return recipes

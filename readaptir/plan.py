"""Recipes → a graph of content-addressed stages.

A stage's id hashes everything that can change its output: its kind and that kind's version, its
own parameters (external inputs by identity: a local file's content hash, a hub id at a revision)
and the ids of the stages it reads. Identical stages of different recipes are therefore one stage:
an α/β sweep trains one adapter and computes one Δ, and the retriever's baseline is shared by all
recipes with the same retriever and corpus.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from readaptir.families import resolve_encoding
from readaptir.fingerprint import Fingerprints
from readaptir.recipe import CorpusSpec, ModelSpec, Recipe, RecipeError, RetrieverSpec

# Bump a kind's version when its code changes what it writes: every stage of that kind rebuilds.
KIND_VERSIONS = {"adapter": 1, "delta": 1, "merge": 1, "embed": 1, "search": 1, "score": 1}
DATASET_FILES = ("corpus.jsonl", "queries.jsonl")


@dataclass(frozen=True)
class Stage:
    kind: str
    id: str
    name: str
    desc: str
    params: dict
    inputs: dict[str, str]  # role -> input stage name
    deps: tuple[str, ...]  # external files and folders the stage reads

    @property
    def out(self) -> str:
        return stage_output(self.spec())

    @property
    def metrics_file(self) -> str | None:
        return f"metrics/{self.params['recipe']}.json" if self.kind == "score" else None

    def spec(self) -> dict:
        """What the stage's command reads from params.yaml."""
        return {"kind": self.kind, "id": self.id, "params": self.params, "inputs": self.inputs}


@dataclass
class Plan:
    stages: dict[str, Stage] = field(default_factory=dict)
    recipes: dict[str, dict] = field(default_factory=dict)

    def add(self, stage: Stage) -> Stage:
        existing = self.stages.get(stage.name)
        if existing is not None and existing.id != stage.id:
            raise ValueError(f"two different stages are both named {stage.name!r}")
        return self.stages.setdefault(stage.name, stage)


def stage_output(spec: dict) -> str:
    """A stage's output folder, relative to the project root: by id, or by recipe for scores."""
    key = spec["params"]["recipe"] if spec["kind"] == "score" else spec["id"]
    return f"artifacts/{spec['kind']}/{key}"


def slug(text: str, limit: int = 32) -> str:
    """A readable stage-name fragment from a path or hub id."""
    tail = Path(text.rstrip("/")).name or text
    return re.sub(r"[^A-Za-z0-9_-]+", "-", tail).strip("-")[:limit] or "x"


def stage_id(kind: str, params: dict, input_ids: dict[str, str]) -> str:
    payload = {"kind": kind, "version": KIND_VERSIONS[kind], "params": params, "inputs": input_ids}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class PlanError(ValueError):
    """A recipe that validates but cannot be planned; ``key`` locates it in the recipe."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


# Config fields that must agree for Θ, Ψ and Δ to be added tensor by tensor.
SHAPE_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


def check_same_shape(base_dir: Path, retriever_dir: Path) -> None:
    """Fail early when the retriever cannot be the base plus a delta (configs disagree)."""
    try:
        base = json.loads((base_dir / "config.json").read_text())
        retr = json.loads((retriever_dir / "config.json").read_text())
    except FileNotFoundError:
        return  # the delta stage checks every tensor anyway
    for key in SHAPE_FIELDS:
        if key in base and key in retr and base[key] != retr[key]:
            raise PlanError(
                "retriever",
                f"its {key} is {retr[key]!r} but the base's is {base[key]!r}: the retriever must "
                "have the base's architecture and shapes for weight arithmetic",
            )


class Planner:
    """Adds each recipe's stages to one plan, resolving external identities once."""

    def __init__(self, root: Path, fingerprints: Fingerprints | None = None):
        self.root = Path(root)
        self.fingerprints = fingerprints or Fingerprints(self.root)
        self.plan = Plan()

    # -- external inputs -------------------------------------------------------------------------

    def _local(self, source: str) -> Path | None:
        path = Path(source).expanduser()
        path = path if path.is_absolute() else self.root / path
        return path if path.exists() else None

    def model(self, spec: ModelSpec, key: str) -> tuple[dict, tuple[str, ...]]:
        """A model's identity and, for a local folder, the dependency path."""
        local = self._local(spec.source)
        if local is not None:
            ident = {"source": spec.source, "fingerprint": self.fingerprints.path(local)}
            return ident, (spec.source,)
        if spec.source.startswith((".", "/", "~")):
            raise PlanError(key, f"model folder {spec.source!r} does not exist")
        return {"source": spec.source, "revision": spec.revision or "main"}, ()

    def dataset(
        self, spec: CorpusSpec, key: str, with_qrels: bool = True
    ) -> tuple[dict, tuple[str, ...]]:
        folder = self._local(spec.path)
        if folder is None or not folder.is_dir():
            raise PlanError(key, f"corpus folder {spec.path!r} does not exist")
        names = (*DATASET_FILES, f"qrels/{spec.split}.tsv") if with_qrels else ("corpus.jsonl",)
        prints, deps = {}, []
        for name in names:
            if not (folder / name).is_file():
                raise PlanError(key, f"{spec.path}/{name} does not exist")
            prints[name] = self.fingerprints.path(folder / name)
            deps.append(f"{spec.path.rstrip('/')}/{name}")
        ident = {"path": spec.path, "name": spec.label, "fingerprints": prints}
        if with_qrels:
            ident["split"] = spec.split
        return ident, tuple(deps)

    def is_peft(self, spec: RetrieverSpec) -> bool:
        local = self._local(spec.source)
        return local is None or (local / "adapter_config.json").is_file()

    # -- stages ----------------------------------------------------------------------------------

    def add(
        self,
        kind: str,
        label: str,
        desc: str,
        params: dict,
        inputs: dict[str, Stage],
        deps: tuple[str, ...] = (),
        name: str | None = None,
    ) -> Stage:
        ident = stage_id(kind, params, {role: s.id for role, s in sorted(inputs.items())})
        stage = Stage(
            kind=kind,
            id=ident,
            name=name or f"{kind}-{label}-{ident[:8]}",
            desc=desc,
            params=params,
            inputs={role: s.name for role, s in sorted(inputs.items())},
            deps=tuple(sorted(set(deps))),
        )
        return self.plan.add(stage)

    def add_recipe(self, recipe: Recipe) -> None:
        base, base_deps = self.model(recipe.base, "base")
        retriever, retriever_deps = self.model(recipe.retriever, "retriever")
        dataset, dataset_deps = self.dataset(recipe.corpus, "corpus")
        encoding = resolve_encoding(recipe.retriever.family, recipe.retriever.encoding).model_dump()
        ret_name, data_name = slug(recipe.retriever.source), slug(recipe.corpus.label)
        peft_retriever = self.is_peft(recipe.retriever)

        def embed_and_search(model: dict, inputs: dict, deps: tuple, who: str) -> Stage:
            embed = self.add(
                "embed",
                f"{who}-{data_name}",
                f"Embed {data_name} ({recipe.corpus.split}) with {who}",
                {"model": model, "dataset": dataset, "encoding": encoding},
                inputs,
                deps + dataset_deps,
            )
            return self.add(
                "search",
                f"{who}-{data_name}",
                f"Exact top-{recipe.eval.k} search, {who} on {data_name}",
                {"k": recipe.eval.k},
                {"embeddings": embed},
            )

        retriever_model = {"retriever": retriever, "base": base if peft_retriever else None}
        retriever_model_deps = retriever_deps + (base_deps if peft_retriever else ())
        baseline = embed_and_search(retriever_model, {}, retriever_model_deps, ret_name)

        alpha, beta = recipe.readapt.alpha, recipe.readapt.beta
        if (alpha, beta) == (0.0, 1.0):
            readapted = baseline  # the retriever itself: nothing to merge
        else:
            base_dir, retriever_dir = (
                self._local(recipe.base.source),
                self._local(recipe.retriever.source),
            )
            if base_dir and retriever_dir and not peft_retriever:
                check_same_shape(base_dir, retriever_dir)
            merge_inputs: dict[str, Stage] = {}
            if alpha != 0:
                merge_inputs["adapter"] = self.add_adapter(recipe, base, base_deps)
            if beta != 0:
                merge_inputs["delta"] = self.add(
                    "delta",
                    ret_name,
                    f"Retriever delta: {recipe.retriever.source} - {recipe.base.source}",
                    {"base": base, "retriever": retriever},
                    {},
                    base_deps + retriever_deps,
                )
            merge = self.add(
                "merge",
                ret_name,
                f"Readapt {ret_name}: base + {alpha:g}*adapter + {beta:g}*delta",
                {
                    "base": base,
                    "retriever": retriever,
                    "alpha": alpha,
                    "beta": beta,
                    "dtype": recipe.retriever.dtype,
                },
                merge_inputs,
                base_deps + retriever_deps,
            )
            readapted = embed_and_search(
                {"retriever": None, "base": None}, {"model": merge}, (), "ra"
            )

        self.add(
            "score",
            recipe.name,
            f"Score {recipe.name}: retriever alone vs readapted",
            {
                "recipe": recipe.name,
                "dataset": dataset,
                "metrics": list(recipe.eval.metrics),
                "ignore_identical_ids": recipe.eval.ignore_identical_ids,
                "alpha": alpha,
                "beta": beta,
            },
            {"baseline": baseline, "readapted": readapted},
            dataset_deps,
            name=f"score-{recipe.name}",
        )
        self.plan.recipes[recipe.name] = recipe.model_dump(mode="json")

    def add_adapter(self, recipe: Recipe, base: dict, base_deps: tuple[str, ...]) -> Stage:
        train = recipe.train_corpus
        key = "adapter.train_corpus" if recipe.adapter.train_corpus else "corpus"
        corpus, corpus_deps = self.dataset(train, key, with_qrels=False)
        hyper = recipe.adapter.model_dump(mode="json", exclude={"train_corpus"})
        return self.add(
            "adapter",
            slug(train.label),
            f"Knowledge adapter ({recipe.adapter.method}, r={recipe.adapter.r}) on {train.label}",
            {"base": base, "dtype": recipe.base.dtype, "train_corpus": corpus, "hyper": hyper},
            {},
            base_deps + corpus_deps,
        )


def plan_recipes(recipes: list[Recipe], root: Path) -> Plan:
    planner = Planner(root)
    for recipe in sorted(recipes, key=lambda r: r.name):
        try:
            planner.add_recipe(recipe)
        except PlanError as err:
            raise RecipeError(recipe.file, err.key, str(err)) from None
    planner.fingerprints.save()
    return planner.plan

"""Recipes → a graph of content-addressed stages (``graph``: the stages and their ids).

Identical stages of different recipes are one stage: an α/β sweep trains one adapter and computes
one Δ, and the retriever's baseline is shared by all recipes with the same retriever and corpus.
External inputs are known by identity: a local file's content hash, a hub id at a revision.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

from readaptir.artifacts import INDEX, SINGLE, read_json_mapping
from readaptir.corpus import has_passages
from readaptir.families import QUERY_FIELDS, ignores_identical_ids, resolve_encoding
from readaptir.fingerprint import Fingerprints, project_path
from readaptir.graph import Plan, Stage, recipe_digest, stage_id
from readaptir.models import (
    check_mergeable_adapter,
    has_tokenizer,
    is_peft_adapter,
    peft_config,
    warn_if_other_base,
)
from readaptir.recipe import RUNTIME_FIELDS, CorpusSpec, ModelSpec, Recipe, RetrieverSpec
from readaptir.recipe_files import located, slug

LOG = logging.getLogger(__name__)

DATASET_FILES = ("corpus.jsonl", "queries.jsonl")
COMMIT = re.compile(r"[0-9a-f]{40}")  # a hub revision that cannot move


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
    "head_dim",
    "attention_bias",
    "mlp_bias",
    "vocab_size",
)
# compared only where both configs set them: what transformers takes in their absence differs
# between model types (GPT-NeoX's attention bias is on, Gemma's head_dim is 256)
BOTH_SET_FIELDS = ("head_dim", "attention_bias", "mlp_bias")


def check_same_shape(base: dict, retr: dict) -> None:
    """Fail early when the retriever cannot be the base plus a delta (their configs disagree)."""
    for key in SHAPE_FIELDS:
        ours, theirs = _shape_field(retr, key), _shape_field(base, key)
        if key in BOTH_SET_FIELDS and None in (retr.get(key), base.get(key)):
            continue  # their defaults differ by model type; the merge checks every tensor
        if ours != theirs:  # a field one config lacks counts too: the merge copies that config
            # blamed on the one that lacks it, else on the retriever (the base is the reference)
            blamed, other = ("base", "retriever") if theirs is None else ("retriever", "base")
            mine, its = (theirs, ours) if blamed == "base" else (ours, theirs)
            raise PlanError(
                blamed,
                f"its {key} is {mine!r} but the {other}'s is {its!r}: the retriever must "
                "have the base's architecture and shapes for weight arithmetic",
            )


def _shape_field(config: dict, key: str):
    if key == "num_key_value_heads":  # absent in older configs: one per attention head
        return config.get(key, config.get("num_attention_heads"))
    return config.get(key)


@dataclass(frozen=True)
class DatasetRef:
    """A collection as stages see it: its identity, files it depends on, stages that make it."""

    ident: dict
    deps: tuple[str, ...]
    inputs: dict[str, Stage]

    def judgments(self, split: str) -> DatasetRef:
        """The collection known by its ``split`` judgments alone (a local one; a fetched one is
        known by its stage): what selects an adapter's judged or unjudged passages, which the
        queries' text cannot change."""
        prints = self.ident.get("fingerprints")
        if prints is None:
            return self
        name = f"qrels/{split}.tsv"
        ident = {**self.ident, "fingerprints": {name: prints[name]}}
        return DatasetRef(ident, tuple(d for d in self.deps if d.endswith(f"/{name}")), self.inputs)


@dataclass(frozen=True)
class Sources:
    """A recipe's external inputs, resolved once: identities and dependency paths."""

    base: dict
    base_deps: tuple[str, ...]
    retriever: dict
    retriever_deps: tuple[str, ...]
    dataset: DatasetRef  # the collection with the split's queries and judgments
    corpus: DatasetRef  # its passages alone
    encoding: dict
    retriever_name: str
    dataset_name: str
    retriever_is_peft: bool
    ignore_identical_ids: bool


class Planner:
    """Adds each recipe's stages to one plan, resolving external identities once."""

    def __init__(self, root: Path, fingerprints: Fingerprints | None = None):
        self.root = Path(root)
        self.fingerprints = fingerprints or Fingerprints(self.root)
        self.plan = Plan()
        self._recipe_file = "<recipe>"  # the recipe being planned
        self._set_by: dict[tuple[str, str], str] = {}  # (stage, runtime field) → recipe file
        self._named: dict[tuple[str, str], str] = {}  # (kind, id) → the stage's name
        self._linear: dict[Path, list[str]] = {}  # a local base's body Linear modules
        self._configs: dict[Path, dict | None] = {}  # local models' config.json, read once
        self.unpinned: set[str] = set()  # hub models at a branch or tag, not at a commit

    # -- external inputs -------------------------------------------------------------------------

    def _local(self, source: str) -> Path | None:
        path = project_path(self.root, source)
        return path if path.exists() else None

    def _config(self, folder: Path, key: str) -> dict | None:
        """A local model's config.json (None without one: a PEFT adapter), read once a build;
        one that does not parse is an error of the recipe's ``key`` too."""
        if folder not in self._configs:
            path = folder / "config.json"
            try:
                self._configs[folder] = read_json_mapping(path) if path.is_file() else None
            except ValueError as err:
                raise PlanError(key, str(err)) from None
        return self._configs[folder]

    def _spelling(self, path: str) -> str:
        """One spelling of a local path, whatever the recipe wrote (``./data/sci/``, its absolute
        path): relative to the project root inside it, else absolute; links are not followed.
        The stages that read it keep it, so DVC sees the same deps from every recipe."""
        full = os.path.normpath(project_path(self.root, path).absolute())
        root = os.path.normpath(self.root.absolute())
        inside = os.path.commonpath([full, root]) == root
        return Path(os.path.relpath(full, root)).as_posix() if inside else Path(full).as_posix()

    def _where(self, spec: CorpusSpec) -> str:
        """A collection's part of stage names and its pipeline group: a local one's folder name,
        not its ``name`` (a label for reports), so that recipes sharing its stages name them
        alike and adding one renames nothing (DVC would run a renamed stage again)."""
        return slug(self._spelling(spec.path) if spec.path else spec.label)

    def model(self, spec: ModelSpec, key: str) -> tuple[dict, tuple[str, ...]]:
        """A model's identity and, for a local folder, the dependency path."""
        local = self._local(spec.source)
        if local is not None:
            configs = ("config.json", "adapter_config.json")
            if not local.is_dir() or not any((local / name).is_file() for name in configs):
                raise PlanError(
                    key,
                    f"{spec.source!r} is not a model folder (no config.json, nor a PEFT "
                    "adapter_config.json)",
                )
            if spec.revision is not None:
                raise PlanError(
                    key,
                    f"revision {spec.revision!r} pins a hub model, but {spec.source!r} is a local "
                    "folder, whose content is its identity: remove the revision (or set "
                    "`revision: null` where a parent recipe sets it)",
                )
            source = self._spelling(spec.source)
            return {"source": source, "fingerprint": self.fingerprints.path(local)}, (source,)
        first = spec.source.split("/")[0]
        # a link to a folder that is gone (an unmounted disk) counts as a folder: were it taken
        # for a hub id, every stage id would change
        if spec.source.startswith((".", "/", "~")) or os.path.lexists(self.root / first):
            raise PlanError(key, f"model folder {spec.source!r} does not exist")
        if spec.source.count("/") > 1:
            raise PlanError(key, f"{spec.source!r} is neither a folder nor a hub id (owner/name)")
        revision = spec.revision or "main"
        if not COMMIT.fullmatch(revision):
            self.unpinned.add(f"{spec.source}@{revision}")
        return {"source": spec.source, "revision": revision}, ()

    def dataset(self, spec: CorpusSpec, key: str, with_qrels: bool = True) -> DatasetRef:
        """A collection's identity: a local folder by content, a fetched one by its stage."""
        if spec.path is None:
            fetch = self.add_fetch(spec, key)
            ident = {"path": f"{fetch.out}/{spec.label}", "fetched": fetch.id}
            if with_qrels:
                ident["split"] = spec.split
            return DatasetRef(ident, (), {f"data-{spec.label}": fetch})
        folder = self._local(spec.path)
        if folder is not None and folder.is_file():
            raise PlanError(
                key, f"{spec.path!r} is a file; give the collection's folder, which holds it"
            )
        if folder is None or not folder.is_dir():
            raise PlanError(key, f"corpus folder {spec.path!r} does not exist")
        names = (*DATASET_FILES, f"qrels/{spec.split}.tsv") if with_qrels else ("corpus.jsonl",)
        prints, deps, path = {}, [], self._spelling(spec.path)
        for name in names:
            if not (folder / name).is_file():
                what = "is not a file" if (folder / name).exists() else "does not exist"
                raise PlanError(key, f"{spec.path}/{name} {what}")
            prints[name] = self.fingerprints.path(folder / name)
            deps.append(f"{path}/{name}")
        if not has_passages(folder / "corpus.jsonl"):
            raise PlanError(key, f"{spec.path}/corpus.jsonl is empty (no passages)")
        ident = {"path": path, "fingerprints": prints}
        if with_qrels:
            ident["split"] = spec.split
        return DatasetRef(ident, tuple(deps), {})

    def add_fetch(self, spec: CorpusSpec, key: str) -> Stage:
        from readaptir.stages.fetch import beir_url, file_url_path

        url, sha256, deps = spec.url or beir_url(spec.beir), spec.sha256, ()
        where = file_url_path(url)
        if where is not None:
            # a local archive is known by its content, as a corpus folder is, and DVC watches it
            archive = project_path(self.root, where)
            if not archive.is_file():
                raise PlanError(f"{key}.url", f"{url}: {archive} does not exist")
            digest = self.fingerprints.file(archive)
            if sha256 not in (None, digest):
                raise PlanError(f"{key}.sha256", f"{url} has sha256 {digest}, not {sha256}")
            sha256, deps = digest, (self._spelling(where),)
        return self.add(
            "fetch",
            slug(spec.label),
            f"Fetch {spec.label} ({url})",
            {"url": url, "name": spec.label, "sha256": sha256},
            {},
            deps,
            group=slug(spec.label),
        )

    def _decoder(self, recipe: Recipe) -> bool | None:
        """Whether the recipe embeds with a causal decoder, by a local retriever's config.json (a
        PEFT one's base's); None for a hub retriever, whose config the embed stage reads."""
        if self._local(recipe.retriever.source) is None:
            return None
        if self.is_peft(recipe.retriever):
            spec, key = recipe.base, "base"
        else:
            spec, key = recipe.retriever, "retriever"
        folder = self._local(spec.source)
        config = self._config(folder, key) if folder is not None else None
        if not config or not isinstance(config.get("model_type"), str):
            return None
        from readaptir.objective import is_causal  # transformers' model tables, only then

        return is_causal(SimpleNamespace(**config))

    def is_peft(self, spec: RetrieverSpec) -> bool:
        """Whether the retriever is a PEFT adapter over Θ, whose stages then depend on Θ too: a
        local folder says; a hub one counts as one, whatever it is, so that ids are the same
        whether or not the hub can be asked (a full retriever's baseline is then rebuilt when Θ
        changes, never stale)."""
        local = self._local(spec.source)
        return local is None or is_peft_adapter(local)

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
        group: str = "main",
        runtime: dict | None = None,
        explicit: dict[str, str] | None = None,
    ) -> Stage:
        """The stage, added to the plan unless an identical one is there already. ``runtime``
        (how it runs) may differ between the recipes sharing a stage only where no two of them
        set it explicitly (``explicit``: runtime field → recipe key); an explicit value wins
        over a default."""
        ident = stage_id(kind, params, {role: s.id for role, s in sorted(inputs.items())})
        stage = Stage(
            kind=kind,
            id=ident,
            name=name or f"{kind}-{label}-{ident[:8]}",
            desc=desc,
            params=params,
            inputs={role: s.name for role, s in sorted(inputs.items())},
            deps=tuple(sorted(set(deps))),
            group=group,
            runtime=runtime or {},
        )
        # the same stage under another name: the same input spelled or labelled otherwise
        existing = self.plan.stages.get(self._named.get((kind, ident), stage.name))
        if existing is not None and existing.id == stage.id:
            stage = replace(existing, runtime=self._shared_runtime(existing, stage, explicit or {}))
            self.plan.stages[stage.name] = stage
            return stage
        for name in explicit or {}:
            self._set_by[(stage.name, name)] = self._recipe_file
        self._named[kind, ident] = stage.name
        return self.plan.add(stage)

    def _shared_runtime(self, existing: Stage, new: Stage, explicit: dict[str, str]) -> dict:
        merged = dict(existing.runtime)
        for name, value in new.runtime.items():
            if name not in explicit:
                continue
            other = self._set_by.get((existing.name, name))
            if merged.get(name) == value:
                self._set_by.setdefault((existing.name, name), self._recipe_file)
                continue
            if other is not None:
                raise PlanError(
                    explicit[name],
                    f"{value!r} here, but {other} sets {merged.get(name)!r} for the same "
                    f"{existing.kind} stage ({existing.name}), which both recipes share: a stage "
                    "runs one way, so set both alike",
                )
            merged[name] = value
            self._set_by[(existing.name, name)] = self._recipe_file
        return merged

    def add_recipe(self, recipe: Recipe) -> None:
        self._recipe_file = str(recipe.file)
        src = self.sources(recipe)
        peft = src.retriever_is_peft
        self._check_retriever_tokenizer(recipe, peft)
        baseline = self.embed_and_search(
            recipe,
            src,
            {"retriever": src.retriever, "base": src.base if peft else None},
            {},
            src.retriever_deps + (src.base_deps if peft else ()),
            src.retriever_name,
        )
        readapt = recipe.readapt
        resolved = recipe.resolved()
        params = {
            "recipe": recipe.name,
            "recipe_digest": recipe_digest(resolved),
            "dataset": src.dataset.ident,
            "dataset_name": recipe.corpus.label,
            "metrics": list(recipe.eval.metrics),
            "ignore_identical_ids": src.ignore_identical_ids,
            "k": recipe.eval.k,
            "alpha": readapt.alpha,
            "beta": readapt.beta,
            "label": recipe.column,
            "in_domain": recipe.corpus.in_domain,
            "sweep": recipe.sweep,
        }
        inputs = {"baseline": baseline, **src.dataset.inputs}
        if readapt.auto:
            grid = {f"alpha-{i}": a for i, a in enumerate(readapt.alpha_grid)}
            for role, alpha in grid.items():
                inputs[role] = self.readapted(recipe, src, alpha, readapt.beta, baseline)
            params["select"] = {
                "grid": grid,
                "fraction": readapt.tune_fraction,
                "seed": readapt.tune_seed,
                "metric": readapt.tune_metric,
            }
        else:
            inputs["readapted"] = self.readapted(recipe, src, readapt.alpha, readapt.beta, baseline)
        alone = inputs.get("readapted") is baseline  # α=0, β=1: nothing readapted
        self.add(
            "score",
            recipe.name,
            f"Score {recipe.name}: retriever alone"
            + (" (α=0, β=1: nothing to readapt)" if alone else " vs readapted"),
            params,
            inputs,
            src.dataset.deps,
            name=f"score-{recipe.name}",
            group=src.dataset_name,
        )
        self.plan.recipes[recipe.name] = resolved

    def _check_retriever_tokenizer(self, recipe: Recipe, peft: bool) -> None:
        """A local retriever without the tokenizer its retriever-alone run loads (a PEFT one's
        may be its base's)."""
        base = self._local(recipe.base.source)
        retriever = self._local(recipe.retriever.source)
        if retriever is not None and not has_tokenizer(retriever):
            if not peft:
                raise PlanError("retriever", f"{retriever} has no tokenizer files to encode with")
            if base is not None and not has_tokenizer(base):
                raise PlanError(
                    "retriever", f"neither {retriever} nor the base {base} has tokenizer files"
                )

    def sources(self, recipe: Recipe) -> Sources:
        base, base_deps = self.model(recipe.base, "base")
        retriever, retriever_deps = self.model(recipe.retriever, "retriever")
        retriever_dir = self._local(recipe.retriever.source)
        if retriever_dir is not None:  # a hub retriever's adapter is checked when it runs
            warn_if_other_base(retriever_dir, base, f"{self._recipe_file}: retriever")
        dataset = self.dataset(recipe.corpus, "corpus")
        family, overrides = recipe.retriever.family, recipe.retriever.encoding
        encoding = resolve_encoding(family, overrides, dataset=recipe.corpus.label)
        if encoding.dtype == "auto":  # the pooling does not say: a local model's config may
            decoder = self._decoder(recipe)
            encoding = resolve_encoding(family, overrides, recipe.corpus.label, decoder)
        return Sources(
            base,
            base_deps,
            retriever,
            retriever_deps,
            dataset,
            self.dataset(recipe.corpus, "corpus", with_qrels=False),
            encoding=encoding.model_dump(),
            retriever_name=slug(retriever["source"]),
            dataset_name=self._where(recipe.corpus),
            retriever_is_peft=self.is_peft(recipe.retriever),
            ignore_identical_ids=ignores_identical_ids(
                recipe.eval.ignore_identical_ids, recipe.corpus.label
            ),
        )

    def _check_base_for_adapter(self, recipe: Recipe) -> None:
        """A local base the adapter stage would fail on: ``adapter.r`` above its hidden size, no
        tokenizer, explicit ``adapter.target_modules`` that match none of its Linear modules
        (torch is imported for that, only then)."""
        folder = self._local(recipe.base.source)
        config = self._config(folder, "base") if folder is not None else None
        if config is None:
            return
        hidden = config.get("hidden_size")
        if isinstance(hidden, int) and recipe.adapter.r > hidden:
            raise PlanError(
                "adapter.r", f"{recipe.adapter.r} is above the base's hidden size ({hidden})"
            )
        if not has_tokenizer(folder):
            raise PlanError(
                "base", f"{folder} has no tokenizer files, which the adapter trains with"
            )
        targets = recipe.adapter.target_modules
        if not targets:
            return
        from readaptir.targets import base_linear_modules, unmatched

        if folder not in self._linear:
            try:
                self._linear[folder] = base_linear_modules(folder)[0]
            except ValueError as err:  # a model type transformers lacks, or with no LM class
                raise PlanError("base", str(err)) from None
        problem = unmatched(targets, self._linear[folder])
        if problem:
            raise PlanError("adapter.target_modules", problem)

    def embed_and_search(
        self, recipe: Recipe, src: Sources, model: dict, inputs: dict, deps: tuple, who: str
    ) -> Stage:
        where, split = src.dataset_name, recipe.corpus.split
        # the corpus apart from the queries: new judgments or another split encode no passage
        passage_side = {k: v for k, v in src.encoding.items() if k not in QUERY_FIELDS}
        # the queries first: DVC runs independent stages in file order, and this stage reads the
        # queries and judgments, so a broken file fails in seconds, not after the corpus is embedded
        queries = self.add(
            "queries",
            f"{who}-{where}",
            f"Embed {where}'s queries judged in {split} with {who}",
            {"model": model, "dataset": src.dataset.ident, "encoding": src.encoding},
            {**inputs, **src.dataset.inputs},
            deps + src.dataset.deps,
            group=where,
        )
        embed = self.add(
            "embed",
            f"{who}-{where}",
            f"Embed {where}'s passages with {who}",
            {"model": model, "dataset": src.corpus.ident, "encoding": passage_side},
            {**inputs, **src.corpus.inputs},
            deps + src.corpus.deps,
            group=where,
        )
        # one more when the query's own passage will be dropped, so that k remain, as in BEIR
        depth = recipe.eval.k + 1 if src.ignore_identical_ids else recipe.eval.k
        return self.add(
            "search",
            f"{who}-{where}",
            f"Exact top-{depth} search, {who} on {where}",
            {"k": depth},
            {"embeddings": embed, "queries": queries},
            group=where,
        )

    def readapted(
        self, recipe: Recipe, src: Sources, alpha: float, beta: float, baseline: Stage
    ) -> Stage:
        """The search stage of Θ + αΨ + βΔ (the baseline's when α=0, β=1: nothing to merge)."""
        if (alpha, beta) == (0.0, 1.0):
            return baseline
        base_dir, retriever_dir = (
            self._local(recipe.base.source),
            self._local(recipe.retriever.source),
        )
        if base_dir and retriever_dir and not src.retriever_is_peft:
            configs = self._config(base_dir, "base"), self._config(retriever_dir, "retriever")
            if None not in configs:  # else the merge checks every tensor
                check_same_shape(*configs)
        if retriever_dir and src.retriever_is_peft:  # the retriever alone runs with any kind
            try:
                check_mergeable_adapter(peft_config(retriever_dir), retriever_dir)
            except ValueError as err:
                raise PlanError("retriever", str(err)) from None
        full_retriever = None if src.retriever_is_peft or beta == 0 else retriever_dir
        for key, folder in (("base", base_dir), ("retriever", full_retriever)):
            if folder is not None and not any((folder / f).is_file() for f in (SINGLE, INDEX)):
                raise PlanError(
                    key,
                    f"{folder} has no safetensors weights ({SINGLE} or {INDEX}), which the "
                    "merge reads tensor by tensor: save the model with safetensors",
                )
        merge_inputs: dict[str, Stage] = {}
        device = recipe.readapt.device
        chosen = "device" in recipe.readapt.model_fields_set  # `auto` written out counts too
        weights_runtime = {"device": device} if chosen or device != "auto" else None
        explicit = {"device": "readapt.device"} if chosen else None
        if alpha != 0:
            merge_inputs["adapter"] = self.add_adapter(recipe, src)
        if beta != 0 and recipe.readapt.delta == "stored":
            merge_inputs["delta"] = self.add(
                "delta",
                src.retriever_name,
                f"Retriever delta: {src.retriever['source']} - {src.base['source']}",
                {"base": src.base, "retriever": src.retriever},
                {},
                src.base_deps + src.retriever_deps,
                group="models",
                runtime=weights_runtime,
                explicit=explicit,
            )
        merge = self.add(
            "merge",
            src.retriever_name,
            f"Readapt {src.retriever_name}: base + {alpha:g}*adapter + {beta:g}*(retriever - base)",
            {
                "base": src.base,
                "retriever": src.retriever,
                "alpha": alpha,
                "beta": beta,
                "dtype": recipe.retriever.dtype,
            },
            merge_inputs,
            src.base_deps + src.retriever_deps,
            group=merge_inputs["adapter"].group if "adapter" in merge_inputs else "models",
            runtime=weights_runtime,
            explicit=explicit,
        )
        return self.embed_and_search(
            recipe, src, {"retriever": None, "base": None}, {"model": merge}, (), "ra"
        )

    def add_adapter(self, recipe: Recipe, src: Sources) -> Stage:
        train = recipe.train_corpus
        self._check_base_for_adapter(recipe)
        own = recipe.adapter.train_corpus is None  # the evaluated collection's passages
        corpus = src.corpus if own else self.dataset(train, "adapter.train_corpus", False)
        runtime_keys = set(RUNTIME_FIELDS["adapter"])  # the same adapter either way
        unused = {"batch_size"} if recipe.adapter.batch_tokens else set()  # batch_tokens rules
        hyper = recipe.adapter.model_dump(
            mode="json", exclude={"train_corpus", "passages", *runtime_keys, *unused}
        )
        runtime = recipe.adapter.model_dump(include=runtime_keys)
        explicit = {k: f"adapter.{k}" for k in runtime_keys & recipe.adapter.model_fields_set}
        params = {
            "base": src.base,
            "dtype": recipe.base.dtype,
            "train_corpus": corpus.ident,
            "hyper": hyper,
        }
        where, selection = self._where(train), recipe.adapter.passages
        label, deps, inputs = where, src.base_deps + corpus.deps, dict(corpus.inputs)
        if selection != "all":
            # judged/unjudged in the evaluated split: the judgments are part of the identity
            judged = src.dataset.judgments(recipe.corpus.split)
            params["selection"] = {"passages": selection, "judgments": judged.ident}
            deps, inputs = deps + judged.deps, {**inputs, **judged.inputs}
            label += f"-{selection}"
        return self.add(
            "adapter",
            label,
            f"Knowledge adapter ({recipe.adapter.method}, r={recipe.adapter.r}) on "
            f"{where} ({selection} passages)",
            params,
            inputs,
            deps,
            group=where,
            runtime=runtime,
            explicit=explicit,
        )


def plan_recipes(recipes: list[Recipe], root: Path) -> Plan:
    planner = Planner(root)
    for recipe in sorted(recipes, key=lambda r: r.name):
        try:
            planner.add_recipe(recipe)
        except PlanError as err:
            raise located(recipe.file, err.key, str(err)) from None
        except OSError as err:  # a path no key check caught (too long, an unknown ~user)
            raise located(recipe.file, None, str(err)) from None
    planner.fingerprints.save()
    if planner.unpinned:
        LOG.warning(
            "%d hub model(s) at a branch or tag, not a commit: %s. Their stages keep their ids "
            "when the hub's branch moves, so results made before would stand for the new weights "
            "(and a stage run later would mix them with earlier ones): pin `revision: <commit>`",
            len(planner.unpinned),
            ", ".join(sorted(planner.unpinned)),
        )
    return planner.plan

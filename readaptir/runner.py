"""``readaptir stage run NAME``: execute one planned stage from its spec in params.yaml.

Each stage verifies that its external inputs still have the content they had at build time, then
writes its output folder atomically (see ``artifacts.atomic_output``).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from readaptir.artifacts import (
    abandoned,
    atomic_output,
    held_alone,
    parse_mapping,
    read_json_mapping,
    read_text,
    remove,
    resolve_device,
    sync_tree,
    write_json,
)
from readaptir.distributed import launched_ranks, processes, relaunch
from readaptir.dvcfile import ROOT_PARAMS, find_stage_spec, read_stage_spec
from readaptir.fingerprint import Fingerprints, project_path
from readaptir.graph import recipe_digest, spec_is_intact, stage_output

if TYPE_CHECKING:
    from readaptir.families import Encoding
    from readaptir.stages.embed import Encoder

LOG = logging.getLogger(__name__)

# where a running stage holds its lock (under the project root; git ignores .readaptir/)
LOCK_DIR = Path(".readaptir") / "running"
# a stage's figures of its last run (times, rates, where it resumed), kept out of its output
RUNS_DIR = Path(".readaptir") / "runs"
RUN_FIGURES = ("seconds", "tokens_per_second", "resumed_from")

# the stages that compute on a device (fetch and score use none)
COMPUTING_KINDS = ("adapter", "delta", "merge", "embed", "queries", "search")


class StaleInputError(RuntimeError):
    pass


BEFORE_QUERIES_STAGE = (
    "this stage's spec is of an earlier readaptir, whose embed stage embedded the queries too: "
    "run `readaptir build`"
)


class Context:
    """What a stage needs besides its own parameters: paths, fingerprints, the device."""

    def __init__(self, root: Path, spec: dict, device: str | None):
        self.root = Path(root)
        self.spec = spec
        self.params = spec["params"]
        self._device = device
        if spec.get("kind") in COMPUTING_KINDS:  # checked before any model loads; others use none
            self.device  # noqa: B018
        self.fingerprints = Fingerprints(self.root)
        self.inputs = {role: self.root / path for role, path in spec["inputs"].items()}
        # "owner/name@revision" → the commit fetched, by this stage or one it reads: a hub branch
        # that moved between two stages of one plan would mix two models' results
        self.hub: dict[str, str] = {}
        self._hub_by: dict[str, str] = {}  # who recorded each commit first
        for role, path in self.inputs.items():
            recorded = path / "stage.json"
            if recorded.is_file():
                made = read_json_mapping(recorded)
                by = f"stage {made.get('name') or path.name} (input {role})"
                for model, commit in (made.get("hub") or {}).items():
                    self._fetched(model, commit, by)

    @functools.cached_property
    def device(self) -> str:
        """The command line's device, else $READAPTIR_DEVICE, else the recipe's (runtime), else
        auto; one this machine lacks is an error naming who asked for it."""
        return resolve_device(self._device, self.spec.get("runtime", {}).get("device"))

    @property
    def work_dir(self) -> Path:
        """Where a long stage keeps what outlives a killed run (adapter checkpoints, finished
        embedding shards) and its ranks meet; removed once the stage succeeds."""
        return self.root / "artifacts" / self.spec["kind"] / f".work-{self.spec['id']}"

    def local(self, path: str) -> Path:
        return project_path(self.root, path)

    def check(self, path: Path, expected: str, what: str) -> None:
        if self.fingerprints.path(path) != expected:
            raise StaleInputError(
                f"{what} {path} changed since `readaptir build`; run `readaptir build` again"
            )

    def model_dir(self, ident: dict | None) -> Path | None:
        """A model's folder, verified against its build-time fingerprint (hub: the snapshot)."""
        if ident is None:
            return None
        if "fingerprint" in ident:
            path = self.local(ident["source"])
            self.check(path, ident["fingerprint"], "model")
            return path
        from readaptir.models import local_dir

        model = f"{ident['source']}@{ident.get('revision') or 'main'}"

        def check(commit: str) -> None:  # before the download, where the hub answers
            self._fetched(model, commit, "this stage")

        path = local_dir(ident["source"], ident.get("revision"), check=check)
        if path.parent.name == "snapshots":  # the hub cache's snapshots/<commit>
            check(path.name)
        return path

    def _fetched(self, model: str, commit: str, by: str) -> None:
        """Record that ``by`` used hub ``model`` at ``commit``; another commit of it is an error."""
        known = self.hub.setdefault(model, commit)
        first = self._hub_by.setdefault(model, by)
        if known != commit:
            raise StaleInputError(
                f"{model} is commit {commit} for {by} but was {known} for {first} or a stage "
                "it reads (the branch moved on the hub between them, or a cache held another "
                "commit), so their results would mix two models. Pin `revision: <commit>` in the "
                "recipe, `readaptir build`, then `dvc repro` (new ids: what reads the model runs "
                "again); or, to go on at the commit the branch names now, run again the stages "
                "made at the other: `dvc repro -f -s STAGE`, from the first that fetched it (a "
                "plain `dvc repro` may restore them from DVC's run cache)"
            )

    def retriever_dir(self, ident: dict, base: dict | None) -> Path:
        """The retriever's folder (``model_dir``); one from the hub is checked against the base it
        was trained on (``readaptir build`` checked a local one)."""
        from readaptir.models import warn_if_other_base

        path = self.model_dir(ident)
        assert path is not None
        if base is not None and "fingerprint" not in ident:
            warn_if_other_base(path, base, f"stage {self.spec['kind']}", ident["source"])
        return path

    def dataset_dir(self, ident: dict) -> Path:
        folder = self.local(ident["path"])
        for name, expected in ident.get("fingerprints", {}).items():  # none when fetched
            self.check(folder / name, expected, "corpus file")
        return folder


def _adapter(ctx: Context, out: Path) -> dict:
    from readaptir.stages.adapter import train_adapter

    p = ctx.params
    selection = p.get("selection")
    return train_adapter(
        ctx.model_dir(p["base"]),
        ctx.dataset_dir(p["train_corpus"]),
        out,
        dtype=p["dtype"],
        device=ctx.device,
        passages=selection["passages"] if selection else "all",
        qrels_dir=ctx.dataset_dir(selection["judgments"]) if selection else None,
        qrels_split=selection["judgments"]["split"] if selection else "test",
        checkpoint_dir=ctx.work_dir,
        **p["hyper"],
        **ctx.spec.get("runtime", {}),
    )


def _delta(ctx: Context, out: Path) -> dict:
    from readaptir.stages.delta import compute_delta

    p = ctx.params
    return compute_delta(
        ctx.model_dir(p["base"]),
        ctx.retriever_dir(p["retriever"], p["base"]),
        out,
        device=ctx.device,
    )


def _merge(ctx: Context, out: Path) -> dict:
    from readaptir.stages.merge import merge

    p = ctx.params
    return merge(
        ctx.model_dir(p["base"]),
        out,
        alpha=p["alpha"],
        beta=p["beta"],
        adapter_dir=ctx.inputs.get("adapter"),
        delta_dir=ctx.inputs.get("delta"),
        retriever_dir=ctx.retriever_dir(p["retriever"], p["base"]),
        dtype=p["dtype"],
        device=ctx.device,
    )


def _encoder(ctx: Context, side: str) -> tuple[Encoder, Encoding]:
    """The model of an embed (``side`` passage) or queries stage, loaded, and the encoding it
    follows."""
    from readaptir.families import Encoding
    from readaptir.models import is_peft_adapter
    from readaptir.stages.embed import Encoder

    p = ctx.params
    model = ctx.inputs.get("model") or ctx.retriever_dir(
        p["model"]["retriever"], p["model"]["base"]
    )
    encoding = Encoding(**p["encoding"])
    # a full retriever (or a merged model) encodes without Θ: it is not fetched
    base = ctx.model_dir(p["model"]["base"]) if is_peft_adapter(model) else None
    encoder = Encoder.load(model, encoding, base_dir=base, device=ctx.device, sides=(side,))
    return encoder, encoding


def _embed(ctx: Context, out: Path) -> dict:
    from readaptir.stages.embed import embed_corpus

    if "split" in ctx.params["dataset"]:  # passages and queries in one spec
        raise StaleInputError(BEFORE_QUERIES_STAGE)
    dataset = ctx.dataset_dir(ctx.params["dataset"])
    encoder, encoding = _encoder(ctx, "passage")
    return embed_corpus(encoder, dataset, encoding, out, work_dir=ctx.work_dir)


def _queries(ctx: Context, out: Path) -> dict:
    from readaptir.stages.embed import embed_queries, judged_queries

    dataset, split = ctx.dataset_dir(ctx.params["dataset"]), ctx.params["dataset"]["split"]
    judged = judged_queries(dataset, split)  # bad judgments fail before the model loads
    encoder, encoding = _encoder(ctx, "query")
    return embed_queries(encoder, dataset, split, encoding, out, judged=judged)


def _search(ctx: Context, out: Path) -> None:
    from readaptir.stages.search import search

    if "queries" not in ctx.inputs:
        raise StaleInputError(BEFORE_QUERIES_STAGE)
    search(
        ctx.inputs["embeddings"],
        out,
        k=ctx.params["k"],
        device=ctx.device,
        queries_dir=ctx.inputs["queries"],
    )


def _fetch(ctx: Context, out: Path) -> dict:
    from readaptir.stages.fetch import fetch

    p = ctx.params
    return fetch(p["url"], p["name"], out, sha256=p["sha256"], root=ctx.root)


def _check_recipe(root: Path, p: dict, spec_file: str) -> None:
    """The recipe in params.yaml (and in the copy a split pipeline's score stage tracks, beside
    its specs) is the one this stage was planned from: one set there after the build
    (``dvc exp run -S recipes.…``) would change no stage, and its metrics would claim it."""
    if "recipe_digest" not in p:  # a spec of an earlier readaptir
        return
    copies = dict.fromkeys([Path(ROOT_PARAMS), Path(spec_file).parent / ROOT_PARAMS])
    for name in copies:
        path = Path(root) / name
        recipes = parse_mapping(read_text(path), str(path)).get("recipes") or {}
        if recipe_digest(recipes.get(p["recipe"])) != p["recipe_digest"]:
            raise StaleInputError(
                f"{path}: recipes.{p['recipe']} is not the recipe `readaptir build` planned "
                "this stage from (edited by hand, or by `dvc exp run -S`): edit recipes/ and "
                "run `readaptir build`"
            )


def _score(ctx: Context, out: Path) -> dict:
    from readaptir.evaluation import evaluate

    p = ctx.params
    summary, details = evaluate(
        {
            role: path / "run.trec"
            for role, path in ctx.inputs.items()
            if not role.startswith("data-")
        },
        ctx.dataset_dir(p["dataset"]),
        p["dataset"]["split"],
        p["metrics"],
        p["ignore_identical_ids"],
        p.get("select"),
        depth=p.get("k"),  # specs built before the search fetched k + 1 have none
    )
    write_json(out / "per_query.json", details)
    metrics = {
        "recipe": p["recipe"],
        "label": p["label"],
        "sweep": p["sweep"],
        "dataset": p.get("dataset_name") or p["dataset"]["name"],  # older specs: in "dataset"
        "in_domain": p["in_domain"],
        "split": p["dataset"]["split"],
        "alpha": p["alpha"],
        "beta": p["beta"],
        **summary,
    }
    return metrics


DISTRIBUTED_KINDS = ("adapter", "embed")  # the stages that use every GPU of the machine
RUNNERS: dict[str, Callable[[Context, Path], dict | None]] = {
    "fetch": _fetch,
    "adapter": _adapter,
    "delta": _delta,
    "merge": _merge,
    "embed": _embed,
    "queries": _queries,
    "search": _search,
    "score": _score,
}


def run_stage(
    root: Path,
    name: str,
    device: str | None = None,
    spec_file: str | None = None,
    procs: int | None = None,
) -> Path:
    """Run stage ``name`` of the built plan (its spec from ``spec_file``, default the file of
    either layout that holds it); returns its output folder.

    Adapter and embed stages run in ``procs`` processes under torchrun (default: one per visible
    GPU); other stages run in this process.
    """
    if spec_file is None:
        spec, spec_file = find_stage_spec(root, name)
    else:
        spec = read_stage_spec(root, name, spec_file)
    if spec["kind"] not in RUNNERS:
        known = ", ".join(sorted(RUNNERS))
        raise ValueError(f"{spec_file}: stage {name} has kind {spec['kind']!r}, not one of {known}")
    if not spec_is_intact(spec):
        raise StaleInputError(
            f"{spec_file}: stages.{name} does not hash to its id {spec['id']}: edited after "
            f"`readaptir build` (by hand, or by `dvc exp run -S`), or built by another "
            "readaptir; edit the recipes and run `readaptir build`"
        )
    if spec["kind"] == "score":
        _check_recipe(root, spec["params"], spec_file)
    if "WORLD_SIZE" in os.environ:  # a rank of a relaunch: the launching process holds the lock
        return _run(root, name, spec, spec_file, device, procs, rank=True)
    # one run of a stage at a time: DVC does not stop a stage when it is killed itself, and a
    # rerun beside that stage would train into its work folder and replace its output
    with held_alone(Path(root) / LOCK_DIR / f"{name}.lock", f"stage {name}"):
        return _run(root, name, spec, spec_file, device, procs, rank=False)


def _run(
    root: Path,
    name: str,
    spec: dict,
    spec_file: str,
    device: str | None,
    procs: int | None,
    rank: bool,
) -> Path:
    """The checked stage's work: relaunched in ``procs`` processes (not from a ``rank`` of a
    relaunch), or in this one."""
    ctx = Context(root, spec, device)
    if spec["kind"] in DISTRIBUTED_KINDS and not rank:
        n = processes(procs, ctx.device)
        if n > 1:
            args = ["stage", "run", name, "--root", str(root), "--spec", spec_file]
            out = Path(root) / stage_output(spec)
            try:
                relaunch(n, args + (["--device", device] if device else []))
            finally:  # a rank that failed has torchrun stop rank 0 before it cleans up its own
                remove(abandoned(out))
            return out
    for role, path in ctx.inputs.items():
        if not path.is_dir():
            raise FileNotFoundError(
                f"input {role!r} of {name} is missing: {path} (run `dvc repro`)"
            )
    out = Path(root) / stage_output(spec)
    if not launched_ranks().main:
        # the other ranks of a torchrun launch work beside rank 0, which alone writes the output
        with tempfile.TemporaryDirectory() as scratch:
            RUNNERS[spec["kind"]](ctx, Path(scratch))
        return out
    LOG.info("stage %s (%s) -> %s", name, spec["kind"], out)
    with atomic_output(out) as tmp:
        summary = RUNNERS[spec["kind"]](ctx, tmp)
        # how a run went is not what it made: the output DVC hashes holds the rest, so that a
        # rerun of the stage (dvc repro -f, another machine) can be the same bytes
        run = {key: summary.pop(key) for key in RUN_FIGURES if key in (summary or {})}
        hub = {"hub": dict(sorted(ctx.hub.items()))} if ctx.hub else {}
        made = {key: value for key, value in spec.items() if key != "runtime"}  # how, not what
        write_json(tmp / "stage.json", {"name": name, **made, **hub, "summary": summary})
    if run:
        write_json(Path(root) / RUNS_DIR / f"{name}.json", {"id": spec["id"], **run})
    if ctx.work_dir.exists():  # what a killed run would have resumed from, now the output's
        sync_tree(out)
        shutil.rmtree(ctx.work_dir, ignore_errors=True)
    if spec["kind"] == "score":  # published only once the stage's own output is complete
        # the stage's id tells a report whether the metrics are of the recipe as now built
        metrics = {
            **summary,
            "stage": spec["id"],
            "recipe_digest": spec["params"].get("recipe_digest"),
        }
        write_json(Path(root) / "metrics" / f"{spec['params']['recipe']}.json", metrics)
    ctx.fingerprints.save()
    return out

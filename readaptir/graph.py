"""The stage graph: stages, their content-addressed ids and the specs ``readaptir stage run``
reads, and what a built plan finds left under ``artifacts/`` (``plan`` builds it from recipes).

A stage's id hashes everything that can change its output: its kind and that kind's version, its
own parameters (external inputs by identity: a local file's content hash, a hub id at a revision)
and the ids of the stages it reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from readaptir.artifacts import alive, tmp_owner
from readaptir.fingerprint import project_path

# Bump a kind's version when its code changes what it writes: every stage of that kind rebuilds,
# and every stage that reads one. (search 2: candidates scored again in float64, searched deeper
# near the k-th score, so that a passage scores the same in every shard and engine.)
KIND_VERSIONS = {
    "fetch": 1,
    "adapter": 5,
    "delta": 2,
    "merge": 3,
    "embed": 3,
    "queries": 2,
    "search": 2,
    "score": 2,
}
# what a stage leaves under artifacts/<kind>/: its output and its work folder (and unfinished
# outputs, named as ``artifacts.tmp_owner`` reads them)
STAGE_ID = "[0-9a-f]{16}"
STAGE_FOLDER = re.compile(rf"(?:\.work-)?(?P<id>{STAGE_ID})")


@dataclass(frozen=True)
class Stage:
    kind: str
    id: str
    name: str
    desc: str
    params: dict
    inputs: dict[str, str]  # role -> input stage name
    deps: tuple[str, ...]  # external files and folders the stage reads
    group: str = "main"  # the pipeline file it is written to when dvc.yaml is split
    runtime: dict = field(default_factory=dict)  # how to run it; cannot change the output

    @property
    def out(self) -> str:
        return stage_output({"kind": self.kind, "id": self.id})

    @property
    def metrics_file(self) -> str | None:
        return f"metrics/{self.params['recipe']}.json" if self.kind == "score" else None

    def spec(self, plan: Plan) -> dict:
        """What ``readaptir stage run`` reads: kind, id, parameters and input folders."""
        inputs = {role: plan.stages[name].out for role, name in self.inputs.items()}
        spec = {"kind": self.kind, "id": self.id, "params": self.params, "inputs": inputs}
        return {**spec, "runtime": self.runtime} if self.runtime else spec


@dataclass
class Plan:
    stages: dict[str, Stage] = field(default_factory=dict)
    recipes: dict[str, dict] = field(default_factory=dict)

    def add(self, stage: Stage) -> Stage:
        existing = self.stages.get(stage.name)
        if existing is not None and existing.id != stage.id:
            raise ValueError(f"two different stages are both named {stage.name!r}")
        return self.stages.setdefault(stage.name, stage)

    def leftovers(self, root: Path) -> list[Path]:
        """Folders under ``root``/artifacts that no stage of this plan makes: outputs of stages
        no recipe has any more, and what interrupted runs left: a ``.tmp-<id>-<pid>`` output
        whose process is gone, a ``.work-`` folder (checkpoints, shards) of a stage no recipe
        has or whose output is complete (restored from DVC's cache, say). Anything else there is
        not readaptir's and is left out, and so is everything of a stage whose process runs, and
        a folder a recipe reads (a merged model taken as the next round's retriever, say)."""
        current = {(stage.kind, stage.id) for stage in self.stages.values()}
        read = [
            Path(os.path.normpath(project_path(root, dep).absolute()))
            for stage in self.stages.values()
            for dep in stage.deps
        ]
        found = []
        for kind in KIND_VERSIONS:
            folder = Path(root) / "artifacts" / kind
            made = [
                (path, *parsed)
                for path in (sorted(folder.iterdir()) if folder.is_dir() else [])
                if path.is_dir() and (parsed := _stage_folder(path.name))
            ]
            running = {ident for _, ident, pid in made if pid is not None and alive(pid)}
            for path, ident, pid in made:
                full = Path(os.path.normpath(path.absolute()))
                if ident in running or any(r.is_relative_to(full) for r in read):
                    continue
                if pid is not None:  # its process is gone: nothing will rename it into place
                    found.append(path)
                elif path.name.startswith(".work-"):
                    done = (folder / ident).is_dir()
                    if (kind, ident) not in current or done:
                        found.append(path)
                elif (kind, ident) not in current:
                    found.append(path)
        return found

    def stale_metrics(self, root: Path) -> list[Path]:
        """Files ``metrics/*.json`` no score stage of this plan writes: of recipes removed,
        renamed or made a sweep, which ``report`` leaves out."""
        written = {stage.metrics_file for stage in self.stages.values()}
        folder = Path(root) / "metrics"
        files = sorted(folder.glob("*.json")) if folder.is_dir() else []
        return [path for path in files if f"metrics/{path.name}" not in written]


def _stage_folder(name: str) -> tuple[str, int | None] | None:
    """The stage id of a folder a stage leaves, with the process of an unfinished output (None
    for the output or the work folder), or None for a folder no stage makes."""
    if m := STAGE_FOLDER.fullmatch(name):
        return m["id"], None
    owner = tmp_owner(name)
    if owner and re.fullmatch(STAGE_ID, owner[0]):
        return owner
    return None


def scores_a_sweep(kind: str, params: dict) -> bool:
    """Whether a stage is the score stage of a sweep's variant: α curves exist only then."""
    return kind == "score" and bool(params.get("sweep"))


def stage_output(spec: dict) -> str:
    """A stage's output folder, relative to the project root, named by the stage's id."""
    return f"artifacts/{spec['kind']}/{spec['id']}"


def stage_id(kind: str, params: dict, input_ids: dict[str, str]) -> str:
    # a score stage's recipe hash only guards params.yaml: a recipe spelling an input otherwise
    # is the same stage
    params = {k: v for k, v in params.items() if k != "recipe_digest"}
    payload = {
        "kind": kind,
        "version": KIND_VERSIONS[kind],
        "params": _identity(params),
        "inputs": input_ids,
    }
    return _digest(payload)


def recipe_digest(resolved: dict | None) -> str:
    """A resolved recipe's hash: its score stage holds it, so that a recipe in ``params.yaml``
    edited after the build (``dvc exp run -S``) is refused rather than credited with the scores
    of the recipe as built."""
    return _digest(resolved)


def _digest(value) -> str:
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def spec_is_intact(spec: dict) -> bool:
    """Whether a stage spec read back from its file still hashes to its id (its inputs are
    known by their output folders, named by their ids)."""
    try:
        inputs = {role: PurePosixPath(out).name for role, out in (spec.get("inputs") or {}).items()}
        return stage_id(spec["kind"], spec["params"], dict(sorted(inputs.items()))) == spec["id"]
    except (KeyError, TypeError, AttributeError):  # a part edited into another type
        return False


def _identity(value):
    """``value`` as a stage id sees it: a local input (one with content fingerprints) is what it
    holds, not where it is, so ``data/sci``, ``./data/sci/`` and its absolute path, or the same
    folder copied elsewhere, are one input and share every stage."""
    if isinstance(value, dict):
        local = "fingerprint" in value or "fingerprints" in value
        return {
            k: _identity(v) for k, v in value.items() if not (local and k in ("source", "path"))
        }
    if isinstance(value, list):
        return [_identity(v) for v in value]
    return value

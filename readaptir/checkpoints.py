"""Adapter training checkpoints: what a killed run resumes from.

Rank 0 saves the adapter, optimizer, schedule and progress; every rank its random-number state,
so that a resumed run draws the same dropout masks as an uninterrupted one. Each file is written
to a temporary name, flushed to disk and renamed into place.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from readaptir.artifacts import atomic_file

LOG = logging.getLogger(__name__)

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


def _rng_files(folder: Path, rank: int) -> list[Path]:
    """A rank's random-number states in ``folder``, by step."""
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

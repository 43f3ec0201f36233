"""Stage outputs: atomic directories and the compute device.

A stage writes into a hidden temporary sibling of its output folder and renames it into place only
when everything succeeded, so a stage killed midway leaves nothing a later run takes as finished.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOG = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_output(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder that becomes ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f"{TMP_PREFIX}{final.name}-*"):
        LOG.info("removing leftover of an interrupted run: %s", stale)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    os.replace(tmp, final)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; it becomes ``path`` only if the block
    succeeds, so readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


DEVICE_ENV = "READAPTIR_DEVICE"


def resolve_device(preference: str | None = None, fallback: str | None = None) -> str:
    """``auto`` (or None) is $READAPTIR_DEVICE if set, else ``fallback`` (a recipe's choice) if
    set, else CUDA when present, else CPU."""
    import torch

    if preference in (None, "auto"):
        preference = os.environ.get(DEVICE_ENV) or fallback or "auto"
    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return preference

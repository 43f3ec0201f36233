"""A readaptir project: a git repository with DVC, its cache settings and recipes/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# On ext4 DVC copies outputs into its cache by default: every multi-GB model would exist twice.
# Links keep one copy (DVC marks linked outputs read-only to protect the cache). Hardlink must
# come first: DVC moves a stage's fresh output into the cache by hardlink only when hardlink is
# the first type listed (with reflink first it copies, and ext4 cannot reflink).
CACHE_TYPES = "hardlink,symlink"
# local state, and what an interrupted stage leaves (resumable adapter checkpoints among it)
IGNORED = (".readaptir/", "artifacts/*/.tmp-*", "artifacts/*/.work-*")


def tool_env() -> dict[str, str]:
    """The environment for dvc and its stage commands: this interpreter's scripts come first."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def dvc(root: Path, *args: str, capture: bool = False) -> subprocess.CompletedProcess:
    """Run ``dvc ARGS`` in ``root``; a failure raises RuntimeError with dvc's own last words."""
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=root,
        env=tool_env(),
        text=True,
        capture_output=capture,
    )
    if result.returncode != 0:
        said = "\n".join(((result.stdout or "") + (result.stderr or "")).splitlines()[-20:])
        raise RuntimeError(
            f"`dvc {' '.join(args)}` failed in {root} (exit {result.returncode})"
            + (f":\n{said}" if said else "")
        )
    return result


def git_root(path: Path) -> Path:
    result = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"], cwd=path, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"{Path(path).resolve()} is not inside a git repository (git init)")
    return Path(result.stdout.strip())


def init(root: Path) -> list[str]:
    """Idempotent: DVC initialised, cache links set, recipes/ and ignore rules present."""
    root = Path(root)
    top = git_root(next(p for p in [root, *root.absolute().parents] if p.is_dir()))  # no mkdir yet
    root.mkdir(parents=True, exist_ok=True)
    done = []
    if not (root / ".dvc").is_dir():
        subdir = ["--subdir"] if top != root.resolve() else []
        dvc(root, "init", "--quiet", *subdir)
        done.append("initialised DVC")
    dvc(root, "config", "cache.type", CACHE_TYPES)
    done.append(f"DVC cache links: {CACHE_TYPES} (large outputs are stored once)")
    (root / "recipes").mkdir(exist_ok=True)
    (root / "metrics").mkdir(exist_ok=True)
    gitignore = root / ".gitignore"
    lines = gitignore.read_text().splitlines() if gitignore.exists() else []
    missing = [entry for entry in IGNORED if entry not in lines]
    if missing:
        gitignore.write_text("\n".join(lines + missing) + "\n")
    done.append("recipes/ ready: write recipes/NAME.yaml, then `readaptir validate` and `build`")
    return done

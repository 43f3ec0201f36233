"""A readaptir project: a git repository with DVC, its cache settings and recipes/."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from readaptir.artifacts import alive, atomic_file, user_file

# On ext4 DVC copies outputs into its cache by default: every multi-GB model would exist twice.
# Links keep one copy (DVC marks linked outputs read-only to protect the cache). Hardlink must
# come first: DVC moves a stage's fresh output into the cache by hardlink only when hardlink is
# the first type listed (with reflink first it copies, and ext4 cannot reflink).
CACHE_TYPES = "hardlink,symlink"
# local state, what an interrupted stage leaves (resumable adapter checkpoints among it), and the
# page `dvc plots show` writes
IGNORED = (".readaptir/", "artifacts/*/.tmp-*", "artifacts/*/.work-*", "dvc_plots/")


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
    try:
        top = git_root(next(p for p in [root, *root.absolute().parents] if p.is_dir()))  # no mkdir
    except RuntimeError:  # named by the folder asked for, not the nearest that exists
        raise RuntimeError(
            f"{root.absolute()} is not inside a git repository: `git init` there or above it, "
            "then `readaptir init`"
        ) from None
    # checked before anything is changed: what init makes must be free to be made
    for name in ("recipes", "metrics"):
        path = root / name
        if (path.exists() or path.is_symlink()) and not path.is_dir():
            raise FileExistsError(
                f"{path} exists and is not a folder: move it away, then init again"
            )
    gitignore = user_file(root / ".gitignore")
    root.mkdir(parents=True, exist_ok=True)
    done = []
    if not (root / ".dvc").is_dir():
        subdir = ["--subdir"] if top != root.resolve() else []
        dvc(root, "init", "--quiet", *subdir)
        done.append("initialised DVC")
    config = root / ".dvc" / "config"
    before = config.read_bytes() if config.is_file() else None
    dvc(root, "config", "cache.type", CACHE_TYPES)
    if config.read_bytes() != before:  # dvc init staged the file: stage what was added to it
        git_add = ["git", "add", "--", str(config)]
        subprocess.run(git_add, cwd=root, check=False, capture_output=True)
    done.append(f"DVC cache links: {CACHE_TYPES} (large outputs are stored once)")
    (root / "recipes").mkdir(exist_ok=True)
    (root / "metrics").mkdir(exist_ok=True)
    _ignore(gitignore, IGNORED)
    done.append("recipes/ ready: write recipes/NAME.yaml, then `readaptir validate` and `build`")
    return done


def _ignore(gitignore: Path, entries: tuple[str, ...]) -> None:
    """Add the ``entries`` missing from ``gitignore`` (``user_file``'s), its bytes kept as they
    are (git reads patterns as bytes, in any encoding) and its line ending used; written whole or
    not at all."""
    data = gitignore.read_bytes() if gitignore.exists() else b""
    lines = data.splitlines()
    missing = [entry.encode() for entry in entries if entry.encode() not in lines]
    if not missing:
        return
    newline = b"\r\n" if b"\r\n" in data else b"\n"
    if data and not data.endswith((b"\n", b"\r")):
        data += newline
    with atomic_file(gitignore) as tmp:
        tmp.write_bytes(data + newline.join(missing) + newline)
        if gitignore.exists():
            shutil.copymode(gitignore, tmp)


def dvc_running(root: Path) -> list[str]:
    """The commands DVC is running in the project at ``root`` now (from its stage locks).

    ``dvc repro`` releases the repository's lock while a stage's command runs; the stage's
    outputs and inputs stay in ``.dvc/tmp/rwlock``, with the pid that holds them.
    """
    try:
        locks = json.loads((Path(root) / ".dvc" / "tmp" / "rwlock").read_text())
    except (OSError, ValueError):
        return []
    holders = list(locks.get("write", {}).values())
    holders += [info for infos in locks.get("read", {}).values() for info in infos]
    running = {info["cmd"] for info in holders if alive(int(info["pid"]))}
    return sorted(running)


def freed_bytes(folders: list[Path]) -> int:
    """What removing ``folders`` frees: files no link outside them keeps (DVC's cache links
    outputs), each counted once; a folder that is a link frees nothing."""
    seen: dict[tuple[int, int], list] = {}
    for folder in folders:
        if folder.is_symlink():
            continue
        for path in folder.rglob("*"):
            info = path.lstat()
            if stat.S_ISREG(info.st_mode):
                seen.setdefault((info.st_dev, info.st_ino), [info, 0])[1] += 1
    return sum(info.st_size for info, links in seen.values() if links == info.st_nlink)

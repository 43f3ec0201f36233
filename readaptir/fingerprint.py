"""Identity of external inputs: content hashes of local files and folders, hub ids at revisions.

Hashing a multi-GB model folder takes seconds, so hashes are cached by (path, size, modification
time, inode, and change time for small files) in
``.readaptir/fingerprints.json`` under the project root; an unchanged file is never read twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from readaptir.artifacts import atomic_write_text, expand_home, visible_files

LOG = logging.getLogger(__name__)

CACHE_FILE = Path(".readaptir") / "fingerprints.json"
CHUNK = 1 << 22


def project_path(root: Path, path: str) -> Path:
    """A recipe's path on disk: ``~`` expanded, a relative one under the project root."""
    candidate = expand_home(path)
    return candidate if candidate.is_absolute() else Path(root) / candidate


# Files up to this size are hashed again when their change time moves: an edit that keeps the size
# and sets the modification time back (``cp -p``, an archive's stored times: a qrels fix) still
# moves it, and no program can set it. Larger ones (weights) are not: a hard link to them, made by
# DVC's cache, or a chmod moves it too, and rereading a 7B model for that takes tens of seconds.
CTIME_BELOW = 64 << 20


class Fingerprints:
    """Content hashes with a persistent cache, keyed by path, size, modification time and inode,
    and change time for files below ``CTIME_BELOW``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.cache_path = self.root / CACHE_FILE
        try:  # a cache that cannot be read, whatever it holds, is rebuilt
            self._cache: dict[str, list] = json.loads(self.cache_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):  # UnicodeDecodeError and JSONDecodeError too
            self._cache = {}
        if not isinstance(self._cache, dict):
            self._cache = {}
        self._dirty = False

    def file(self, path: Path) -> str:
        path = Path(path).resolve()
        stat = path.stat()
        key = str(path)
        hit = self._cache.get(key)
        ctime = stat.st_ctime_ns if stat.st_size < CTIME_BELOW else None
        state = [stat.st_size, stat.st_mtime_ns, ctime, stat.st_ino]
        if isinstance(hit, list) and len(hit) == len(state) + 1 and hit[:-1] == state:
            return hit[-1]
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while block := handle.read(CHUNK):
                digest.update(block)
        value = digest.hexdigest()
        self._cache[key] = [*state, value]
        self._dirty = True
        return value

    def path(self, path: Path) -> str:
        """sha256 of a file, or of a folder's file names and contents (hidden files skipped)."""
        path = Path(path)
        if path.is_file():
            return "sha256:" + self.file(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path} does not exist")
        digest = hashlib.sha256()
        for child in visible_files(path):
            rel = child.relative_to(path).as_posix()
            digest.update(f"{rel}\0{self.file(child)}\n".encode())
        return "sha256:" + digest.hexdigest()

    def save(self) -> None:
        """Keep the cache for the next run, where the project can be written: a cache that
        cannot be kept (a read-only checkout, a full disk) is a warning, never a failed run."""
        if not self._dirty:
            return
        try:
            atomic_write_text(self.cache_path, json.dumps(self._cache, sort_keys=True))
        except OSError as err:
            LOG.warning(
                "%s not kept (%s): the next run hashes the same files again",
                self.cache_path, err.strerror or err,
            )  # fmt: skip
            return
        self._dirty = False

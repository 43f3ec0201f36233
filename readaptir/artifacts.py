"""Stage outputs: atomic directories, the files build and stages write (and read back), and the
compute device.

A stage writes into a hidden temporary sibling of its output folder and renames it into place only
when everything succeeded, so a stage killed midway leaves nothing a later run takes as finished.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import stat
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

LOG = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
OLD_SUFFIX = "-old"
# a model folder's weights: one safetensors file, or shards listed by an index
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


@contextlib.contextmanager
def atomic_output(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder that becomes ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in abandoned(final):
        LOG.info("removing leftover of an interrupted run: %s", stale)
        remove([stale])
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as err:
        full = _named_write_error(err, final, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise full from err
        raise
    if not (final.exists() or final.is_symlink()):
        os.replace(tmp, final)
        return
    # the old output moves aside before the new one takes its name, and is removed after: a kill
    # during the removal leaves a leftover the next run clears, never a half-removed `final`
    old = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}{OLD_SUFFIX}"
    os.replace(final, old)
    os.replace(tmp, final)
    for failed in remove([old]):  # the new output stands: what is left is only disk used
        LOG.warning("the output it replaced is left (%s): `build --prune` removes it", failed)


def abandoned(final: Path) -> list[Path]:
    """The temporary outputs of ``final`` (``.tmp-<name>-<pid>``, and ``-old``: an output a rerun
    replaced) whose process is gone, or is this one: nothing will rename them into place. One of
    a live process is left alone, lock or no lock (a file system without locks, a rank torchrun
    did not stop)."""
    found = []
    for path in sorted(final.parent.glob(f"{TMP_PREFIX}{final.name}-*")):
        owner = tmp_owner(path.name)
        if owner and owner[0] == final.name and (owner[1] == os.getpid() or not alive(owner[1])):
            found.append(path)
    return found


def tmp_owner(name: str) -> tuple[str, int] | None:
    """The output and the process of a temporary output's name (``.tmp-<output>-<pid>``, or that
    with ``-old``), or None for any other name."""
    if not name.startswith(TMP_PREFIX):
        return None
    output, _, pid = name[len(TMP_PREFIX) :].removesuffix(OLD_SUFFIX).rpartition("-")
    if not (output and pid.isdigit() and pid.isascii()):
        return None
    return output, int(pid)


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True  # another user's
    except (ProcessLookupError, OverflowError):
        return False
    return True


def remove(paths: list[Path]) -> list[str]:
    """Remove each folder (a link or a file: itself only), read-only parts included, going on
    past one that fails; what could not be removed, and why."""
    failed = []
    for path in paths:
        try:
            if path.is_symlink() or not path.is_dir():
                path.unlink()
            else:
                shutil.rmtree(path, **_ON_ERROR)
        except OSError as err:
            failed.append(f"{path}: {err.strerror or err}")
    return failed


def _writable_and_again(func, path: str, _error) -> None:
    # a read-only folder cannot lose its entries, nor an unreadable one be listed: make the
    # folder (and a folder that failed to list) usable and try once more; a link is not followed
    parent = os.path.dirname(path)
    os.chmod(parent, os.stat(parent).st_mode | stat.S_IWUSR | stat.S_IXUSR)
    if os.path.isdir(path) and not os.path.islink(path):
        os.chmod(path, os.stat(path).st_mode | stat.S_IWUSR | stat.S_IXUSR | stat.S_IRUSR)
    func(path)


# Python 3.12 renamed rmtree's error hook and deprecated the old name
_ON_ERROR = {"onexc" if sys.version_info >= (3, 12) else "onerror": _writable_and_again}


@contextlib.contextmanager
def held_alone(path: Path, what: str) -> Iterator[None]:
    """Hold the exclusive lock of file ``path`` for the block, or fail at once naming the
    process that holds it. The system drops a lock with its holder, however that ends."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RuntimeError(
                f"{what} is already running ({holder}), perhaps left running by a `dvc "
                "repro` that was killed (DVC does not stop its stage): wait for it or stop it"
            ) from None
        except OSError as err:  # a file system without locks (NFS without lockd, Lustre)
            if err.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            LOG.warning("%s: no lock on this file system (%s); running unguarded", path, err)
            yield
            return
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_file(path: Path, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; it becomes ``path`` only if the block
    succeeds, so readers see either the old file or the whole new one. ``fsync`` also holds
    across a power loss (the file reaches the disk before the rename, the rename after it), at
    the cost of waiting for the disk: for files a later run depends on, such as checkpoints."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
    except BaseException as err:
        full = _named_write_error(err, path, tmp)
        tmp.unlink(missing_ok=True)
        if full:
            raise full from err
        raise
    os.replace(tmp, path)
    if fsync:
        _fsync(path.parent)


# free bytes under which a failed write is put down to a full disk: safetensors, torch.save and
# numpy each say so differently (torch: "unexpected pos", numpy: "requested and 0 written"), and
# none of them names the file
FULL_DISK_FREE = 16 * 2**20


class DiskFullError(OSError):
    """A write that failed for want of space, naming what was being written."""


class FileTooLargeError(OSError):
    """A write past the largest file allowed (``ulimit -f``), naming what was being written."""


def _named_write_error(err: BaseException, target: Path, written: Path) -> OSError | None:
    """The error to raise instead of ``err`` when it came of a full disk (or quota) or of a file
    grown past the largest allowed: one that names what was being written (``target``, by way of
    ``written``, its temporary file or folder) and keeps ``err``'s own words; None otherwise
    (checked before the partial output is removed, which frees space)."""
    if not isinstance(err, Exception) or isinstance(err, (DiskFullError, FileTooLargeError)):
        return None  # Ctrl-C and exits stay what they are, and so does an inner write's report
    too_large = isinstance(err, OSError) and err.errno == errno.EFBIG
    # safetensors reports the OS's error in its own words: "... (os error 27)"
    said = f"(os error {errno.EFBIG})" in str(err) and type(err).__name__ == "SafetensorError"
    if (
        (too_large and _same_disk(err.filename, target))
        or said
        or (_a_failed_write(err) and _reached_size_limit(written))
    ):
        return FileTooLargeError(
            errno.EFBIG,
            f"a file of {target} grew past the largest this process may write ({err}): see "
            "`ulimit -f`, and the file system's own limit (FAT32's is 4 GiB)",
        )
    if too_large:
        return None  # a file on another disk: its own error names it
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        if not _same_disk(err.filename, target):
            return None  # another disk (/tmp, /dev/shm) filled up: its own error names it
    elif not _a_failed_write(err):
        return None  # a bad config or an out-of-memory stays what it is, whatever the disk has left
    else:
        try:
            if shutil.disk_usage(target.parent).free >= FULL_DISK_FREE:
                return None
        except OSError:
            return None
    return DiskFullError(
        errno.ENOSPC,
        f"no space left on the disk of {target} ({err}); free some (`readaptir build --prune`"
        " removes outputs no stage makes any more, `dvc gc -w` then frees DVC's cache) and rerun",
    )


def _reached_size_limit(written: Path) -> bool:
    """Whether a file of ``written`` (a file or a folder) is as large as this process may write
    (``ulimit -f``): numpy, torch.save and safetensors report the refused write without EFBIG."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit == resource.RLIM_INFINITY:
            return False
        files = [written] if written.is_file() else [p for p in written.rglob("*") if p.is_file()]
        # a refused write stops its file at the limit exactly (a file moved in may be larger)
        return limit > 0 and any(p.stat().st_size == limit for p in files)
    except (ImportError, OSError):  # no such limits here, or the files went
        return False


def _a_failed_write(err: Exception) -> bool:
    """Whether ``err`` is of the kinds a writer raises when the disk is full without saying so: an
    OSError with no errno (numpy), torch's RuntimeError (not its out-of-memory one) or safetensors'
    own error. An OSError with another errno (a missing input, a permission) says what it is."""
    if isinstance(err, OSError):
        return err.errno is None
    if type(err).__name__ == "OutOfMemoryError":
        return False
    return isinstance(err, RuntimeError) or type(err).__name__ == "SafetensorError"


def _same_disk(filename: Any, target: Path) -> bool:
    """Whether the file an error names lies on the disk ``target`` is written to (True when the
    error names no file, or either is gone)."""
    if not isinstance(filename, (str, os.PathLike)):
        return True
    try:
        there = Path(filename)
        there = there if there.exists() else there.parent
        return os.stat(there).st_dev == os.stat(target.parent).st_dev
    except OSError:
        return True


def sync_tree(folder: Path) -> None:
    """Every file and folder under ``folder``, and the entry naming it, flushed to disk: before
    what a killed run would resume from is removed, so that a power cut cannot take both."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*"), reverse=True):  # the files before their folders
        if not path.is_symlink():
            _fsync(path)
    _fsync(folder)
    _fsync(folder.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a folder too: its entries are what a rename changes
    try:
        os.fsync(fd)
    except OSError as err:
        # some network and FUSE file systems cannot sync a folder; the file itself was synced
        if not path.is_dir() or err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def expand_home(path: str) -> Path:
    """``path`` with a leading ``~`` or ``~user`` made that home folder; one there is none of is
    an error naming it (``Path.expanduser`` says only that it could not tell)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        user = path.split("/", 1)[0]
        raise FileNotFoundError(f"{path}: {user} is not a home folder here") from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_texts({path: text})


def atomic_write_texts(texts: Mapping[Path, str]) -> None:
    """Write files that belong together (a pipeline and its params): each new text reaches a
    temporary sibling before any file is replaced, so a failed write (a full disk) leaves every
    one as it was. A file replaced keeps its permissions."""
    with contextlib.ExitStack() as stack:
        for path, text in texts.items():
            tmp = stack.enter_context(atomic_file(path))
            tmp.write_text(text, encoding="utf-8")
            if Path(path).is_file():
                shutil.copymode(path, tmp)


def user_file(path: Path) -> Path:
    """Where to write ``path``, a file of the user's that a command adds lines to (an ignore
    file): a link's target, so that a shared file gets them and the link stays. A link to nothing
    or something not a file is an error, raised before anything is written."""
    path = Path(path)
    if path.is_symlink():
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is a link to nothing: mend or remove it; nothing was written"
            )
        path = path.resolve()
    if path.exists() and not path.is_file():
        raise FileExistsError(f"{path} is not a file: move it away; nothing was written")
    return path


def require_empty(out: Path) -> None:
    """Refuse an output folder that holds anything; one that does not exist yet is made by the
    caller once its checks have passed, so a refused run leaves none behind."""
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"output folder {out} is not empty")


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def folder_files(folder: Path) -> list[Path]:
    """Everything under ``folder`` but folders, in sorted order (none if it is not a folder):
    files, and links to nothing, which callers skip or name; linked subfolders are followed (a
    model folder may link its parts from elsewhere; ``Path.rglob`` does not enter them). A link
    to a folder above it, a loop no walk ends, is an error naming the link."""
    files: list[Path] = []

    def visit(path: Path, above: frozenset[str]) -> None:
        real = os.path.realpath(path)
        if real in above:
            raise ValueError(f"{path} links to a folder that holds it: its files never end")
        for child in path.iterdir():
            if child.is_dir():
                visit(child, above | {real})
            else:
                files.append(child)

    if Path(folder).is_dir():
        visit(Path(folder), frozenset())
    return sorted(files)


def visible_files(folder: Path) -> list[Path]:
    """The files under ``folder`` (``folder_files``) outside hidden files and folders (``.*``):
    what readaptir counts of a model or collection folder."""
    return [
        path
        for path in filter(Path.is_file, folder_files(folder))
        if not any(part.startswith(".") for part in path.relative_to(folder).parts)
    ]


def files_identity(*folders: Path | None) -> list[list]:
    """Name, size and modification time of every file under ``folders``: cheap, and changed by a
    rebuilt model (whose content-addressed id stays the same)."""
    rows: list[list] = []
    for index, folder in enumerate(folders):
        if folder is None:
            continue
        for path in filter(Path.is_file, folder_files(folder)):
            stat = path.stat()
            name = path.relative_to(folder).as_posix()
            rows.append([index, name, stat.st_size, stat.st_mtime_ns])
    return rows


def read_text(path: Path) -> str:
    """A text file's content; one that is not UTF-8 is an error naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at {err.start})"
        ) from None


def read_json(path: Path) -> Any:
    """A JSON file's content; text that does not parse is an error naming the file and line."""
    return _parsed(read_text(path), str(path), "json")


def read_json_mapping(path: Path) -> dict:
    """The JSON object a file holds (a model's config.json, say); anything else is an error
    naming the file."""
    return parse_mapping(read_text(path), str(path), fmt="json")


def parse_mapping(text: str, where: str, fmt: str = "yaml") -> dict:
    """The mapping a YAML (or ``fmt="json"``) file holds; empty YAML is an empty mapping. Text
    that does not parse, or holds something else, is an error naming ``where`` (and the line)."""
    data = _parsed(text, where, fmt)
    if data is None and fmt != "json":
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, found {type(data).__name__}")
    return data


def _parsed(text: str, where: str, fmt: str) -> Any:
    try:
        return json.loads(text) if fmt == "json" else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}:{err.lineno}: not valid JSON: {err.msg}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or err
        raise ValueError(f"{where}{line}: not valid YAML: {problem}") from None


DEVICE_ENV = "READAPTIR_DEVICE"


def resolve_device(preference: str | None = None, fallback: str | None = None) -> str:
    """``auto`` (or None) is $READAPTIR_DEVICE if set, else ``fallback`` (a recipe's choice) if
    set, else CUDA when present, else CPU. A device this machine does not have is an error that
    says who asked for it."""
    import torch

    source = "--device"
    if preference in (None, "auto"):
        env = os.environ.get(DEVICE_ENV)
        source, preference = (DEVICE_ENV, env) if env else ("the recipe", fallback or "auto")
    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(preference)
    except RuntimeError:
        raise ValueError(
            f"device {preference!r} (from {source}): expected cpu, cuda, cuda:N or auto"
        ) from None
    if device.type == "cuda":
        present = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= present:
            raise ValueError(
                f"device {preference!r} (from {source}): this machine has "
                f"{present or 'no'} CUDA GPU{'s' if present > 1 else ''}"
            )
    elif device.type != "cpu":
        raise ValueError(f"device {preference!r} (from {source}): expected cpu or cuda[:N]")
    return preference

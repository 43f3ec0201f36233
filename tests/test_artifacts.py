"""Stage outputs appear whole or not at all, and a failed write says what failed."""

import errno
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError

from readaptir import artifacts
from readaptir.artifacts import DiskFullError, atomic_file, atomic_output


@pytest.fixture
def free_bytes(monkeypatch):
    """Set what the disk has free, as ``shutil.disk_usage`` reports it."""
    free = {"now": 10**12}
    monkeypatch.setattr(
        artifacts.shutil, "disk_usage", lambda path: SimpleNamespace(free=free["now"])
    )
    return free


def _fail_inside(final, err):
    with atomic_output(final) as tmp:
        (tmp / "part.bin").write_bytes(b"x" * 10)
        raise err


# what torch.save, numpy and safetensors raise on a full disk, in their own words
UNNAMED = [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
    OSError("1000000 requested and 0 written"),
    SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"),
]


def _write_output(final, text):
    with atomic_output(final) as tmp:
        for shard in ("a", "b"):
            (tmp / shard).write_text(text)


@pytest.mark.parametrize(
    ("name", "owner"),
    [
        (".tmp-0123456789abcdef-42", ("0123456789abcdef", 42)),
        (".tmp-0123456789abcdef-42-old", ("0123456789abcdef", 42)),
        (".tmp-checkpoint.pt-7", ("checkpoint.pt", 7)),
        (".tmp-run-1-99", ("run-1", 99)),  # an output whose name has a dash
        (".tmp-0123456789abcdef-x", None),
        (".tmp--42", None),
        (".tmp-out-\u0663", None),  # a digit, but not an ASCII one
        (".work-0123456789abcdef", None),
    ],
)
def test_a_temporary_output_names_its_output_and_process(name, owner):
    assert artifacts.tmp_owner(name) == owner


def test_only_gone_processes_temporary_outputs_are_abandoned(tmp_path):
    final = tmp_path / "out"
    gone, live = tmp_path / ".tmp-out-4242424242", tmp_path / f".tmp-out-{os.getppid()}-old"
    other = tmp_path / ".tmp-out-1-4242424242"  # of the output "out-1"
    for path in (gone, live, other):
        path.mkdir()
    assert artifacts.abandoned(final) == [gone]


def test_a_kill_while_the_old_output_is_removed_leaves_the_new_one_whole(tmp_path, monkeypatch):
    """A rerun (``dvc repro -f``) replaces its output: interrupted while the old folder is being
    deleted, the final name holds the new output, not an index beside half its shards."""
    final = tmp_path / "out"
    _write_output(final, "old")

    def killed_midway(path, **kwargs):
        next(Path(path).iterdir()).unlink()
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(artifacts.shutil, "rmtree", killed_midway)
        _write_output(final, "new")
    assert {p.name: p.read_text() for p in final.iterdir()} == {"a": "new", "b": "new"}
    _write_output(final, "last")  # the next run clears the half-removed old one
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert {p.read_text() for p in final.iterdir()} == {"last"}


def test_an_old_output_that_cannot_be_removed_leaves_the_new_one_standing(
    tmp_path, monkeypatch, caplog
):
    final = tmp_path / "out"
    _write_output(final, "old")

    def refused(path, **kwargs):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as patch, caplog.at_level("WARNING", logger="readaptir.artifacts"):
        patch.setattr(artifacts.shutil, "rmtree", refused)
        _write_output(final, "new")  # no error: the stage's output is in place
    assert {p.read_text() for p in final.iterdir()} == {"new"}
    assert "the output it replaced is left" in caplog.text and "Permission denied" in caplog.text
    _write_output(final, "last")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_only_temporary_outputs_of_gone_processes_are_cleared(tmp_path):
    """A run clears what interrupted runs left, never the unfinished output of a process that
    still runs (a rank torchrun did not stop, a file system without locks)."""
    final = tmp_path / "out"
    live = tmp_path / f".tmp-out-{os.getppid()}"  # a process that runs, not this one
    gone = [tmp_path / ".tmp-out-4242424242", tmp_path / ".tmp-out-4242424242-old"]
    mine = tmp_path / f".tmp-out-{os.getpid()}-old"
    other = tmp_path / ".tmp-outer-4242424242"  # another output's
    for folder in [live, *gone, mine, other]:
        folder.mkdir()
    assert artifacts.abandoned(final) == sorted([*gone, mine])
    _write_output(final, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, other.name])


def test_sync_tree_flushes_every_file_and_folder_and_the_name(tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "a").write_text("a")
    (out / "sub" / "b").write_text("b")
    flushed = []
    monkeypatch.setattr(
        artifacts.os, "fsync", lambda fd: flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
    )
    artifacts.sync_tree(out)
    assert flushed == [str(p) for p in (out / "sub" / "b", out / "sub", out / "a", out, tmp_path)]


@pytest.mark.parametrize("err", UNNAMED, ids=["torch", "numpy", "safetensors"])
def test_a_full_disk_names_the_output_keeps_the_cause_and_leaves_nothing(tmp_path, free_bytes, err):
    final = tmp_path / "artifacts" / "embed" / "0123abcd"
    free_bytes["now"] = 0
    with pytest.raises(DiskFullError) as raised:
        _fail_inside(final, err)
    message = str(raised.value)
    assert f"no space left on the disk of {final} ({err})" in message
    assert "readaptir build --prune" in message and raised.value.errno == errno.ENOSPC
    assert list(final.parent.iterdir()) == []


def test_a_failure_with_space_left_is_passed_on_as_it_is(tmp_path, free_bytes):
    with pytest.raises(RuntimeError, match="unexpected pos"):
        _fail_inside(tmp_path / "out", UNNAMED[0])
    # a quota says ENOSPC or EDQUOT while the disk itself has room
    with pytest.raises(DiskFullError, match="no space left on the disk of"):
        _fail_inside(tmp_path / "out", OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "err",
    [
        ValueError("retriever.pooling: unknown"),
        torch.OutOfMemoryError("CUDA out of memory"),
        FileNotFoundError(errno.ENOENT, "No such file or directory", "corpus.jsonl"),
    ],
    ids=["config", "cuda-oom", "missing-input"],
)
def test_an_error_that_is_not_a_write_stays_itself_on_a_nearly_full_disk(tmp_path, free_bytes, err):
    free_bytes["now"] = 0
    with pytest.raises(type(err), match=re.escape(str(err))):
        _fail_inside(tmp_path / "out", err)
    assert list(tmp_path.iterdir()) == []


def test_another_disk_filling_up_is_reported_as_that_disk_s_error(tmp_path, free_bytes):
    # /proc is never the disk a stage writes to: the error names its own file, not the output
    elsewhere = OSError(errno.ENOSPC, "No space left on device", "/proc/self/shm-segment")
    with pytest.raises(OSError) as raised:
        _fail_inside(tmp_path / "out", elsewhere)
    assert not isinstance(raised.value, DiskFullError) and raised.value is elsewhere
    here = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out.part"))
    with pytest.raises(DiskFullError, match=f"no space left on the disk of {tmp_path / 'out'}"):
        _fail_inside(tmp_path / "out", here)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_stays_an_interrupt_and_an_inner_report_is_not_wrapped_twice(
    tmp_path, free_bytes
):
    free_bytes["now"] = 0
    with pytest.raises(KeyboardInterrupt):
        _fail_inside(tmp_path / "out", KeyboardInterrupt())
    with pytest.raises(DiskFullError) as raised, atomic_output(tmp_path / "out") as tmp:
        with atomic_file(tmp / "vectors.npy") as part:
            part.write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(raised.value).count("no space left on the disk of") == 1
    assert list(tmp_path.iterdir()) == []


# each writer's way to fill a file, under a 10 kB size limit
WRITERS = {
    "python": "(tmp / 'run.trec').write_bytes(b'x' * 100_000)",  # EFBIG itself
    "numpy": "np.save(tmp / 'vectors.npy', np.zeros(100_000, np.float16))",  # "... requested"
    "safetensors": "save_file({'w': torch.zeros(100_000)}, tmp / 'adapter_model.safetensors')",
    "torch": "torch.save(torch.zeros(100_000), tmp / 'checkpoint.pt')",  # torch's RuntimeError
}


def test_a_file_past_the_size_limit_names_the_output_and_leaves_nothing(tmp_path):
    """`ulimit -f` (or FAT32's 4 GiB): the writers' own errors name no file, and only Python's
    own writes say EFBIG. One process tries each writer, in an output of its own."""
    import resource
    import subprocess
    import sys

    lines = [
        "import sys; from pathlib import Path; import numpy as np, torch",
        "from safetensors.torch import save_file",
        "from readaptir.artifacts import atomic_output",
    ]
    for name, save in WRITERS.items():
        lines += [
            "try:",
            f"    with atomic_output(Path(sys.argv[1]) / {name!r}) as tmp:",
            f"        {save}",
            "except Exception as err:",
            f"    print({name!r}, type(err).__name__, err)",
        ]

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, resource.RLIM_INFINITY))

    out = tmp_path / "artifacts" / "embed"
    done = subprocess.run(
        [sys.executable, "-c", "\n".join(lines), str(out)],
        preexec_fn=limit,
        capture_output=True,
        text=True,
    )
    said = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert sorted(said) == sorted(WRITERS), done.stderr
    for name, error in said.items():
        assert error.startswith(
            f"FileTooLargeError [Errno {errno.EFBIG}] a file of {out / name} grew past"
        ), error
        assert "ulimit -f" in error
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("limit", "size", "named"),
    [(10_000, 10_000, True), (10_000, 20_000, False), (0, 0, False)],
    ids=["stopped-at-the-limit", "moved-in-larger", "no-limit-of-zero"],
)
def test_only_a_file_stopped_at_the_size_limit_makes_an_error_a_size_limit_one(
    tmp_path, monkeypatch, limit, size, named
):
    """A write refused by `ulimit -f` leaves its file at the limit exactly (torch then says only
    "unexpected pos"); the same kind of error beside a larger file (a finished shard moved in),
    or under a limit of 0, is no size limit's."""
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda which: (limit, resource.RLIM_INFINITY))
    with pytest.raises(RuntimeError if not named else artifacts.FileTooLargeError):
        with atomic_output(tmp_path / "out") as tmp:
            (tmp / "shard.npy").write_bytes(b"x" * size)
            raise RuntimeError("unexpected pos 576 vs 534")

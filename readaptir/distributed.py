"""Several GPUs: adapter and embed stages relaunched under torchrun, one process per GPU.

Embedding needs no communication: each rank encodes every world-th shard (``stages.embed``).

For the adapter, a step's rows do not depend on the number of ranks: every rank lays out the
whole step (and draws its masked-LM corruption), takes rows ``rank, rank + world, …`` and scales
its mean loss by its share of the step's target tokens. DDP averages the ranks' gradients, so each
step's gradient is the one a single process computes over the whole step: the adapter does not
depend on how many GPUs trained it, as a content-addressed artifact must not (up to float
rounding and dropout draws).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where used: every stage's process reads its ranks here
    import torch

    from readaptir.packing import Layout

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_ranks() -> Ranks:
    """This process's place under torchrun (one process when not launched by it), read from the
    environment: no process group is joined."""
    env = os.environ
    return Ranks(
        int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))
    )


def rank_device(ranks: Ranks, device: str) -> str:
    """One GPU per rank: ``cuda:LOCAL_RANK``, made the current device before any process group
    forms (so NCCL and pinned host memory bind it); any other device as it is."""
    import torch

    device = str(device)
    if ranks.world > 1 and device.startswith("cuda"):
        device = f"cuda:{ranks.local}"
    if device.startswith("cuda"):  # also in one process on cuda:N: its RNG is the one saved
        index = torch.device(device).index  # None for "cuda", which set_device refuses
        torch.cuda.set_device(torch.cuda.current_device() if index is None else index)
    return device


def join_group(ranks: Ranks, backend: str, timeout: timedelta | None = None) -> None:
    """Join torchrun's process group (nothing to join in one process)."""
    if ranks.world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=timeout)


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        import torch.distributed as dist

        dist.barrier()


def leave_distributed(ranks: Ranks) -> None:
    """Destroy the process group; drop every DDP wrapper first (a reducer freed after its group
    is destroyed hangs in gloo's destructor)."""
    if ranks.world > 1:
        import gc

        import torch.distributed as dist

        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


def wrap_distributed(model: torch.nn.Module, ranks: Ranks) -> torch.nn.Module:
    if ranks.world <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    on_gpu = next(model.parameters()).is_cuda
    return DistributedDataParallel(model, device_ids=[ranks.local] if on_gpu else None)


def rank_share(lay: Layout, inputs: dict[str, Any], ranks: Ranks) -> tuple[dict[str, Any], float]:
    """This rank's rows of a whole step's model inputs, trimmed to their longest row, and the
    factor for its mean loss (its share of the step's target tokens × world).

    A rank left without a row (a step of fewer rows than ranks) computes row 0 with factor 0, so
    that it still joins DDP's gradient reduction; a share without a target carries no labels (a
    mean over no target is NaN; ``training.batch_loss`` makes it a zero), in one process too.
    Shares are contiguous: masked-LM heads flatten their labels with ``view``.
    """
    import torch

    from readaptir.packing import IGNORE

    labels = inputs["labels"]
    if ranks.world <= 1 and (labels != IGNORE).any():
        return inputs, 1.0
    rows = list(range(ranks.rank, labels.shape[0], ranks.world))
    weighted = bool(rows)
    rows = rows or [0]
    width = int(lay.real[rows].sum(dim=1).max())  # rows are right-padded
    share: dict[str, Any] = {}
    for key, value in inputs.items():
        if not isinstance(value, torch.Tensor):
            share[key] = value
        elif value.dim() == 4:  # an explicit (batch, 1, L, L) attention mask
            share[key] = value[rows][:, :, :width, :width].contiguous()
        else:
            share[key] = value[rows][:, :width].contiguous()
    total = int((labels != IGNORE).sum())
    mine = int((share["labels"] != IGNORE).sum()) if weighted else 0
    if not mine:
        del share["labels"]
        return share, 0.0
    return share, mine * ranks.world / total


# the seeds torch.manual_seed takes (a recipe's adapter.seed is one of them)
TORCH_SEEDS = (-(2**63), 2**64 - 1)


def torch_seed(value: int) -> int:
    """``value`` where ``torch.manual_seed`` takes it (``TORCH_SEEDS``), else reduced into that
    range mod 2^64: a seed derived from a recipe's seed may outgrow it."""
    low, high = TORCH_SEEDS
    return value if low <= value <= high else value % 2**64


def seed_rank(seed: int, ranks: Ranks) -> None:
    """Give each rank dropout draws of its own, once the initial weights (the same on every rank)
    are made: ranks other than 0 reseed torch from (``seed``, rank); rank 0 goes on with the
    stream of ``seed``, as one process does, so one-process adapters stay what they were."""
    if ranks.rank:
        import torch

        torch.manual_seed((seed * 1_000_003 + ranks.rank) * 7_919 % 2**63)


def mean_across_ranks(value: float, ranks: Ranks, device: torch.device | str) -> float:
    """The mean of ``value`` over the ranks (``value`` itself in one process)."""
    if ranks.world <= 1:
        return value
    import torch
    import torch.distributed as dist

    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total.item()) / ranks.world


def processes(requested: int | None, device: str) -> int:
    """How many processes an adapter stage runs in: ``requested``, else one per visible GPU when
    the (resolved) device is CUDA without an index, else one."""
    import torch

    if requested is not None:
        if requested < 1:
            raise ValueError(f"--procs must be at least 1, not {requested}")
        if requested > 1 and device.startswith("cuda"):
            if device != "cuda":
                raise ValueError(
                    f"--procs {requested} takes one GPU per process from the first visible one, "
                    f"not --device {device}; choose the GPUs with CUDA_VISIBLE_DEVICES"
                )
            if requested > torch.cuda.device_count():
                raise ValueError(
                    f"--procs {requested} needs as many GPUs; "
                    f"{torch.cuda.device_count()} are visible"
                )
        return requested
    if device != "cuda" or not torch.cuda.is_available():
        return 1
    return torch.cuda.device_count()


# the signals torchrun stops its ranks on (TORCHELASTIC_SIGNALS_TO_HANDLE's default)
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def relaunch(procs: int, args: Sequence[str]) -> None:
    """Run ``readaptir ARGS`` in ``procs`` processes under torchrun on this machine."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={procs}", "-m", "readaptir",
        *(["-v"] if LOG.isEnabledFor(logging.DEBUG) else []), *args,
    ]  # fmt: skip
    LOG.info("launching %d processes: %s", procs, " ".join(cmd))
    code = run_forwarding_signals(cmd)
    if code != 0:
        raise RuntimeError(
            f"the {procs}-process run failed (torchrun exit code {code}); "
            "see the ranks' messages above"
        )


# Run by a fresh Python on Linux: ask to be sent SIGTERM when the process that started it dies
# (prctl's PR_SET_PDEATHSIG, kept across exec), give up if that has already happened, then
# become the command. ARGV: the starter's pid, then the command.
_DIE_WITH_STARTER = """
import ctypes, os, signal, sys
if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM) != 0:
    sys.exit("cannot ask to be stopped with the stage: " + os.strerror(ctypes.get_errno()))
if os.getppid() != int(sys.argv[1]):
    sys.exit(128 + signal.SIGTERM)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def _dies_with_this_process(cmd: Sequence[str]) -> list[str]:
    """``cmd``, started so that it gets SIGTERM if this process dies first (Linux; elsewhere as
    it is): a launcher killed outright (SIGKILL, the OOM killer) cannot pass signals on."""
    if not sys.platform.startswith("linux"):
        return list(cmd)
    return [sys.executable, "-c", _DIE_WITH_STARTER, str(os.getpid()), *cmd]


def run_forwarding_signals(cmd: Sequence[str]) -> int:
    """Run ``cmd`` to its end and return its exit code, passing it the first of the signals
    torchrun stops its ranks on (SIGTERM, SIGINT, SIGHUP, SIGQUIT) that this process gets.

    torchrun starts its ranks in sessions of their own and stops them only when it is signalled
    itself: a stage killed alone (``kill``, a scheduler's stop, a closed terminal) would leave
    every rank training, and rank 0 would still publish its adapter after DVC had marked the
    stage failed. So the child runs in a session of its own and is told exactly once (a second
    signal would cut torchrun's shutdown of its ranks short, as a terminal's Ctrl-C to the whole
    group would); this process then waits for it to stop its ranks. The handlers are in place
    before the child starts; off the main thread, where Python takes no handlers, the child runs
    in this process's session and gets a terminal's signals itself. Killed outright, this process
    tells no one: there the system sends the child SIGTERM (``_dies_with_this_process``).
    """
    import threading

    child: list[subprocess.Popen] = []
    told: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if not told:
            told.append(signum)
            LOG.warning("%s: stopping the ranks", signal.Signals(signum).name)
            if child:
                child[0].send_signal(signum)

    handled = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED} if handled else {}
    try:
        child.append(subprocess.Popen(_dies_with_this_process(cmd), start_new_session=handled))
        if told:  # a signal came before the child was there to be told
            child[0].send_signal(told[0])
        code = child[0].wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if told:
        raise KeyboardInterrupt if told[0] == signal.SIGINT else SystemExit(128 + told[0])
    return code

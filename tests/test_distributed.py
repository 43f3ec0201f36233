"""Several ranks learn what one process learns: each takes a share of a step, weighted by tokens."""

import contextlib
import logging
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from readaptir import distributed, tiny
from readaptir.cli import log_level
from readaptir.distributed import Ranks, mean_across_ranks, processes, rank_share, relaunch
from readaptir.objective import CAUSAL, MASKED
from readaptir.packing import IGNORE, causal_inputs, layout, masked_inputs
from readaptir.training import attach_adapter, batch_loss


def _rows(n_rows: int, seed: int) -> list[list[list[int]]]:
    """Rows of one to three passages of uneven lengths (token ids 5..99)."""
    rng = random.Random(seed)

    def passage() -> list[int]:
        return [rng.randrange(5, 100) for _ in range(rng.randint(2, 9))]

    return [[passage() for _ in range(rng.randint(1, 3))] for _ in range(n_rows)]


def test_shares_partition_the_step_and_their_factors_sum_to_world():
    lay = layout(_rows(5, seed=0), pad_id=0)
    inputs = causal_inputs(lay, packed=True)
    targets = int((inputs["labels"] != IGNORE).sum())
    for world in (2, 3):
        shares = [rank_share(lay, inputs, Ranks(r, world)) for r in range(world)]
        got = [s["labels"].shape[0] for s, _ in shares]
        assert got == [len(range(r, 5, world)) for r in range(world)]
        assert sum(f for _, f in shares) == pytest.approx(world)
        for r, (share, factor) in enumerate(shares):
            mine = int((share["labels"] != IGNORE).sum())
            assert factor == pytest.approx(mine * world / targets)
            width = int(lay.real[r::world].sum(1).max())  # trimmed to the share's longest row
            assert share["input_ids"].shape[1] == share["position_ids"].shape[1] == width
            assert torch.equal(share["input_ids"], inputs["input_ids"][r::world, :width])
            assert all(v.is_contiguous() for v in share.values() if torch.is_tensor(v))
    # a step with fewer rows than ranks: the idle rank computes row 0 with no weight
    one = layout(_rows(1, seed=1), pad_id=0)
    share, factor = rank_share(one, causal_inputs(one, packed=False), Ranks(1, 2))
    assert factor == 0.0 and share["input_ids"].shape[0] == 1 and "labels" not in share
    assert rank_share(lay, inputs, Ranks())[1] == 1.0
    # rows of one-token passages hold no next-token target: that rank's share has no labels
    lay = layout([[[5, 6, 7]], [[8]], [[9, 10]], [[11], [12]]], pad_id=0)
    inputs = causal_inputs(lay, packed=True)
    (first, f0), (second, f1) = (rank_share(lay, inputs, Ranks(r, 2)) for r in (0, 2 - 1))
    assert (f0, f1) == (2.0, 0.0) and "labels" in first and "labels" not in second


def _grads(model, inputs, scale=1.0):
    model.zero_grad(set_to_none=True)
    (batch_loss(model, inputs) * scale).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("objective", [CAUSAL, MASKED])
def test_ranks_average_to_the_one_process_gradient(tmp_path, tokenizer, objective):
    """DDP averages the ranks' gradients: with the token factors that is the whole step's."""
    if objective == CAUSAL:
        folder, auto = tiny.make_llama(tmp_path / "m", tokenizer), AutoModelForCausalLM
        targets = ["q_proj", "v_proj", "up_proj"]
    else:
        folder, auto = tiny.make_bert(tmp_path / "m", tokenizer), AutoModelForMaskedLM
        targets = ["query", "value", "dense"]
    model = auto.from_pretrained(folder)
    model.config.use_cache = False
    model = attach_adapter(model, objective=objective, method="dora", r=4, lora_alpha=8,
                           dropout=0.0, target_modules=targets)  # fmt: skip
    with torch.no_grad():  # B is zero at init, which would leave A without a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    rows = _rows(5, seed=2)
    if objective == CAUSAL:  # one-token passages hold no target: rank 1 of 2 gets none at all
        rows[1], rows[3] = [[7], [8]], [[9]]
    else:  # the longest row on rank 1 of 2: rank 0's rows are cut narrower than the step
        rows[1] = [list(range(10, 40))]
    lay = layout(rows, pad_id=tokenizer.pad_token_id or 0)
    for packed in (True, False):
        if objective == CAUSAL:
            inputs = causal_inputs(lay, packed)
        else:
            gen = torch.Generator().manual_seed(0)
            inputs = masked_inputs(lay, packed, special_ids=[0, 1, 2], mask_id=3,
                                   vocab_size=len(tokenizer), generator=gen)  # fmt: skip
        whole = _grads(model, inputs)
        for world in (2, 3):
            ranks = [_grads(model, *rank_share(lay, inputs, Ranks(r, world))) for r in range(world)]
            for name, grad in whole.items():
                mean = sum(g[name] for g in ranks) / world
                assert torch.allclose(mean, grad, rtol=1e-4, atol=1e-6), (name, packed, world)
        # the factors matter: unweighted shares give another gradient
        plain = [_grads(model, rank_share(lay, inputs, Ranks(r, 2))[0]) for r in range(2)]
        assert any(
            not torch.allclose(sum(g[n] for g in plain) / 2, whole[n], rtol=1e-4, atol=1e-6)
            for n in whole
        )


def test_process_count():
    assert processes(3, "cpu") == 3
    assert processes(None, "cpu") == 1 and processes(None, "cuda:1") == 1
    assert processes(None, "cuda") == (torch.cuda.device_count() or 1)
    with pytest.raises(ValueError, match="--procs"):
        processes(0, "cuda")
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        processes(2, "cuda:1")
    with pytest.raises(ValueError, match="GPUs"):
        processes(torch.cuda.device_count() + 2, "cuda")


def test_relaunch_runs_the_requested_number_of_processes(monkeypatch):
    seen = []

    def fake_run(cmd):
        seen.append(cmd)
        return 1 if len(seen) == 2 else 0  # the second run fails

    monkeypatch.setattr(distributed, "run_forwarding_signals", fake_run)
    relaunch(3, ["stage", "run", "x"])
    assert "--nproc-per-node=3" in seen[0] and seen[0][-4:] == ["readaptir", "stage", "run", "x"]
    with pytest.raises(RuntimeError, match="3-process run failed"):
        relaunch(3, ["stage", "run", "x"])
    monkeypatch.setattr(distributed.LOG, "isEnabledFor", lambda level: True)  # readaptir -v
    relaunch(2, ["stage", "run", "x"])
    assert seen[-1][-5:] == ["readaptir", "-v", "stage", "run", "x"]  # the ranks log as verbosely


def test_ranks_past_the_first_log_warnings_only():
    assert log_level(False, Ranks(0, 4)) == logging.INFO
    assert log_level(False, Ranks(3, 4, 3)) == logging.WARNING
    assert log_level(True, Ranks(3, 4, 3)) == logging.DEBUG


# a stand-in for torchrun: reports its pid, then on SIGTERM takes a moment to stop its ranks
_CHILD = """
import os, signal, sys, time
def stop(signum, frame):
    time.sleep(0.5)
    open(sys.argv[1] + "/stopped", "w").write(signal.Signals(signum).name)
    sys.exit(1)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGHUP, stop)
open(sys.argv[1] + "/pid", "w").write(str(os.getpid()))
time.sleep(60)
"""


def _launch_stand_in(tmp_path) -> tuple[subprocess.Popen, int]:
    """A stage process launching the stand-in through ``run_forwarding_signals``, and the
    stand-in's pid once it runs."""
    (tmp_path / "child.py").write_text(_CHILD)
    stage = (
        "import sys; from readaptir.distributed import run_forwarding_signals; "
        f"run_forwarding_signals([sys.executable, {str(tmp_path / 'child.py')!r}, "
        f"{str(tmp_path)!r}])"
    )
    parent = subprocess.Popen([sys.executable, "-c", stage])
    deadline = time.monotonic() + 30
    while not (tmp_path / "pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return parent, int((tmp_path / "pid").read_text())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_terminated_stage_stops_torchrun_and_waits_for_it(tmp_path, sig):
    """``kill`` of the stage's process, or its terminal closing, reaches the launcher (which
    stops the ranks), once."""
    parent, child = _launch_stand_in(tmp_path)
    try:
        parent.send_signal(sig)
        parent.send_signal(sig)  # a second one does not cut the launcher's stop short
        assert parent.wait(timeout=30) == 128 + sig
        assert (tmp_path / "stopped").read_text() == sig.name  # the parent waited for its stop
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)
    finally:  # never leave the stand-in running
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_a_launcher_killed_outright_still_stops_torchrun(tmp_path):
    """SIGKILL (the OOM killer, a scheduler's hard stop) leaves the launcher no handler to pass a
    signal on: the system sends the child SIGTERM, so ranks do not train on and publish."""
    parent, child = _launch_stand_in(tmp_path)
    try:
        parent.kill()
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while not (tmp_path / "stopped").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "stopped").read_text() == "SIGTERM"
    finally:  # never leave the stand-in running
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_a_gpu_without_an_index_is_the_current_one(monkeypatch):
    """One process on "cuda" (a one-GPU machine): torch's set_device refuses a device without an
    index, so the current one is made current; under torchrun each rank takes its LOCAL_RANK."""
    made = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    # torch's own argument checks still run; the CPU build has no _cuda_setDevice
    monkeypatch.setattr(torch._C, "_cuda_setDevice", made.append, raising=False)
    assert distributed.rank_device(Ranks(), "cuda") == "cuda"
    assert distributed.rank_device(Ranks(), "cuda:1") == "cuda:1"
    assert distributed.rank_device(Ranks(3, 4, 3), "cuda") == "cuda:3"
    assert distributed.rank_device(Ranks(), "cpu") == "cpu"
    assert made == [0, 1, 3]


def test_a_launch_off_the_main_thread_runs_and_is_waited_for():
    """Python takes signal handlers on its main thread only: elsewhere the launch runs as is."""
    import threading

    codes = []
    launch = threading.Thread(
        target=lambda: codes.append(
            distributed.run_forwarding_signals([sys.executable, "-c", "raise SystemExit(3)"])
        )
    )
    launch.start()
    launch.join(timeout=60)
    assert codes == [3]


def test_mean_across_ranks_is_a_mean_not_a_sum(monkeypatch):
    import torch.distributed as dist

    def all_reduce(tensor):  # this rank holds 0.5, the other 1.5
        tensor.add_(1.5)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    assert mean_across_ranks(0.5, Ranks(0, 2), "cpu") == pytest.approx(1.0)
    assert mean_across_ranks(0.5, Ranks(), "cpu") == 0.5


def test_one_process_step_without_targets_is_a_zero_loss(tokenizer):
    """As on several ranks: a step whose targets are all ignored (one-token passages; an MLM
    step of [CLS][SEP] passages) adds a zero, not a NaN."""
    lay = layout([[[5], [6]], [[7]]], pad_id=0)
    share, factor = rank_share(lay, causal_inputs(lay, packed=True), Ranks())
    assert factor == 0.0 and "labels" not in share
    model = AutoModelForCausalLM.from_config(tiny.llama_config(tokenizer))
    loss = batch_loss(model, share) * factor
    loss.backward()
    assert loss.item() == 0.0
    assert all(not p.grad.any() for p in model.parameters())


def test_ranks_after_the_first_draw_their_own_dropout():
    def draws(rank: int) -> torch.Tensor:
        torch.manual_seed(5)  # the run's seed, as every rank sets it before building the model
        distributed.seed_rank(5, Ranks(rank, 3))
        return torch.rand(4)

    torch.manual_seed(5)
    alone = torch.rand(4)  # one process
    first, second, third = (draws(r) for r in range(3))
    assert torch.equal(first, alone)  # rank 0 keeps the one-process stream
    assert not torch.equal(second, first) and not torch.equal(third, second)
    assert torch.equal(draws(1), second)  # and each rank its own, the same every run


def test_a_derived_seed_torch_takes_is_kept_and_one_past_its_range_brought_into_it():
    for value in (0, -1, -(2**63), 2**64 - 1):  # as before: the same draws under the same stage id
        assert distributed.torch_seed(value) == value
    for value in (2**64, (2**64 - 1) * 1_000_003 * 1_009, -(2**63) - 1):
        torch.manual_seed(distributed.torch_seed(value))  # no overflow error
    assert distributed.torch_seed(2**64 + 5) == 5

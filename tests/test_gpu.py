"""The stages on a CUDA GPU where one is present (bench/device.sh runs these): the device
handling no CPU run reaches. Skipped on a machine without one."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from readaptir.families import resolve_encoding
from readaptir.stages.adapter import train_adapter
from readaptir.stages.embed import embed
from readaptir.stages.search import search
from readaptir.vectors import load_embeddings, load_queries_embeddings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_embedding_on_the_gpu_is_the_cpus(tiny_retriever, tiny_beir, tmp_path):
    """On "cuda" (no index: what a one-GPU machine resolves to), corpus and queries."""
    encoding = resolve_encoding("repllama", {"dtype": "float32"})
    vectors = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        embed(tiny_retriever, tiny_beir, "test", encoding, out, shard_size=5, device=device)
        corpus = np.concatenate([v for _, v in load_embeddings(out)])
        vectors[device] = (corpus, load_queries_embeddings(out)[1])
    for cpu, gpu in zip(vectors["cpu"], vectors["cuda"], strict=True):
        np.testing.assert_allclose(gpu.astype(np.float32), cpu.astype(np.float32), atol=2e-3)


def test_an_adapter_trains_on_the_gpu_as_on_the_cpu(tiny_base, tiny_beir, tmp_path):
    settings = dict(r=4, lora_alpha=8, batch_size=4, max_length=32, lr=1e-3, max_steps=3)
    adapters = {}
    for device in ("cpu", "cuda"):
        (tmp_path / device).mkdir()
        summary = train_adapter(tiny_base, tiny_beir, tmp_path / device, device=device, **settings)
        assert summary["steps"] == 3
        adapters[device] = load_file(tmp_path / device / "adapter_model.safetensors")
    assert adapters["cpu"].keys() == adapters["cuda"].keys()
    for name, tensor in adapters["cpu"].items():
        assert torch.allclose(adapters["cuda"][name], tensor, atol=1e-4), name


def test_a_run_killed_on_the_gpu_resumes_to_the_uninterrupted_adapter(
    tiny_base, tiny_beir, tmp_path
):
    """Optimizer state and the GPU's random-number state come back from a checkpoint."""
    settings = dict(r=4, lora_alpha=8, batch_size=3, max_length=32, lr=1e-3, epochs=3,
                    dropout=0.1, packing=False, device="cuda")  # fmt: skip
    for name in ("whole", "killed", "resumed"):
        (tmp_path / name).mkdir()
    train_adapter(tiny_base, tiny_beir, tmp_path / "whole", **settings)

    def kill_at_7(step: int) -> None:
        if step == 7:
            raise KeyboardInterrupt

    ckpt = dict(checkpoint_dir=tmp_path / "ckpt", checkpoint_every=3)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(tiny_base, tiny_beir, tmp_path / "killed", **settings, **ckpt,
                      on_step=kill_at_7)  # fmt: skip
    summary = train_adapter(tiny_base, tiny_beir, tmp_path / "resumed", **settings, **ckpt)
    assert summary["resumed_from"] == 6
    whole = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    for name, tensor in whole.items():
        assert torch.allclose(resumed[name], tensor, atol=1e-5), name


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_a_search_on_the_gpu_writes_the_cpus_run(backend, tiny_retriever, tiny_beir, tmp_path):
    """The torch engine on "cuda", and FAISS's GPU index where this FAISS has GPU support."""
    if backend == "faiss":
        faiss = pytest.importorskip("faiss")
        if getattr(faiss, "get_num_gpus", lambda: 0)() == 0:
            pytest.skip("this FAISS has no GPU support")
    encoding = resolve_encoding("repllama", {"dtype": "float32"})
    embed(tiny_retriever, tiny_beir, "test", encoding, tmp_path / "emb", shard_size=5, device="cpu")
    runs = {}
    for device in ("cpu", "cuda"):
        search(tmp_path / "emb", tmp_path / device, k=4, device=device, backend=backend)
        runs[device] = (tmp_path / device / "run.trec").read_text().splitlines()
    assert [line.split()[:4] for line in runs["cuda"]] == [line.split()[:4] for line in runs["cpu"]]
    for gpu, cpu in zip(runs["cuda"], runs["cpu"], strict=True):
        assert float(gpu.split()[4]) == pytest.approx(float(cpu.split()[4]), abs=1e-5)

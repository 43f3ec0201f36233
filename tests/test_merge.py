"""Δ and readapted merges on tiny models, checked against the checkpoints and PEFT's own merge."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from readaptir import readapt
from readaptir.artifacts import read_json, resolve_device
from readaptir.lora import Adapter
from readaptir.readapt import block_pool, readapt_rows, row_blocks
from readaptir.shards import BufferPool, Checkpoint, ShardWriter, WeightError
from readaptir.stages import delta as delta_stage
from readaptir.stages import merge as merge_stage
from readaptir.stages.delta import compute_delta, storage_dtype, tensor_delta
from readaptir.stages.merge import merge
from readaptir.weights import Body, auto_model_class, compute_dtype

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def make_adapter(model, out: Path, *, dora: bool, seed: int, **extra) -> Path:
    """Save a PEFT adapter over ``model`` with every trainable tensor moved off its init."""
    from peft import LoraConfig, get_peft_model

    extra.setdefault("target_modules", TARGETS)
    config = LoraConfig(use_dora=dora, r=4, lora_alpha=8, lora_dropout=0.0, **extra)
    peft_model = get_peft_model(model, config)
    train(peft_model, seed)
    peft_model.save_pretrained(out)
    return out


def train(peft_model, seed: int) -> None:
    """Move every trainable tensor of ``peft_model`` off its init, as training would."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
            elif p.requires_grad:  # lora_B starts at zero; modules_to_save at Θ
                p.add_(0.05 * torch.randn_like(p))


def state(model) -> dict[str, torch.Tensor]:
    """Canonical (bare-model) names → tensors of a loaded model, LM head left out."""
    sd = model.state_dict()
    prefix = model.base_model_prefix + "."
    if any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def peft_merged(base_dir: Path, adapter_dir: Path, causal: bool = True) -> dict:
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if causal else AutoModel
    model = PeftModel.from_pretrained(cls.from_pretrained(base_dir), adapter_dir)
    return state(model.merge_and_unload())


def load_state(model_dir: Path) -> dict:
    from transformers import AutoModel

    return state(AutoModel.from_pretrained(model_dir))


@pytest.fixture(scope="module")
def dora_adapter(tmp_path_factory, tiny_base) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    return make_adapter(model, tmp_path_factory.mktemp("dora"), dora=True, seed=3)


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory, tiny_base) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    return make_adapter(model, tmp_path_factory.mktemp("lora"), dora=False, seed=4)


@pytest.fixture(scope="module")
def lora_retriever(tmp_path_factory, tiny_base) -> Path:
    """A RepLLaMA-style retriever: a LoRA adapter over the bare LlamaModel."""
    from transformers import AutoModel

    out = tmp_path_factory.mktemp("lora_retriever")
    return make_adapter(AutoModel.from_pretrained(tiny_base), out, dora=False, seed=5)


@pytest.fixture(scope="module")
def full_delta(tmp_path_factory, tiny_base, tiny_retriever) -> Path:
    out = tmp_path_factory.mktemp("delta")
    compute_delta(tiny_base, tiny_retriever, out)
    return out


def run_merge(out: Path, base: Path, retriever: Path, **kw) -> dict:
    kw.setdefault("adapter_dir", None)
    kw.setdefault("delta_dir", None)
    return merge(base, out, retriever_dir=retriever, **kw)


def test_delta_output(full_delta, tiny_base, tiny_retriever):
    info = json.loads((full_delta / "delta.json").read_text())
    assert info["kind"] == "full" and info["retriever_dtype"] == "float32"
    assert info["dropped"]["base"] == ["lm_head.weight"]
    body = Body(tiny_base)
    assert sorted(info["storage"]) == sorted(body.names())
    assert sorted(Checkpoint(full_delta).names()) == sorted(body.names())
    name = "layers.0.self_attn.q_proj.weight"
    d = Checkpoint(full_delta).get(name).double()
    want = Body(tiny_retriever).get(name).double() - body.get(name).double()
    assert torch.allclose(d, want, atol=1e-9)


def test_tensor_delta_is_float32_where_it_gives_the_retriever_back(monkeypatch):
    theta = torch.ones(64, 8)  # float32 Θ and R: the merge sums them in float64
    target = theta + torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(readapt, "BLOCK_ELEMENTS", 16)  # two rows a block, on two workers
    with block_pool("cpu") as pool:
        delta, exact = tensor_delta(theta, target, pool)
        assert exact and delta.dtype == torch.float32
        assert torch.equal((theta.double() + delta.double()).float(), target)
        # one element of one block that a float32 Δ cannot carry: the whole tensor goes float64
        theta[40, 3], target[40, 3] = 2.0**20, 2.0**-10
        delta, exact = tensor_delta(theta, target, pool)
    assert exact and delta.dtype == torch.float64
    assert torch.equal((theta.double() + delta).float(), target)
    # float64 weights whose difference float64 cannot carry either: said, not hidden
    delta, exact = tensor_delta(torch.tensor([2.0**60, 1.0]).double(), torch.ones(2).double())
    assert not exact and delta.dtype == torch.float64


def test_storage_dtype_falls_back_to_float64():
    base = torch.tensor([1.0, 2.0**20]).double()
    target = torch.tensor([1.5, 2.0**-10], dtype=torch.float32)
    delta = target.double() - base
    assert storage_dtype(base[:1], delta[:1], target[:1], torch.float32) == torch.float32
    assert storage_dtype(base, delta, target, torch.float32) == torch.float64


def test_beta_one_gives_the_retriever_bit_for_bit(tmp_path, tiny_base, tiny_retriever, full_delta):
    info = run_merge(tmp_path, tiny_base, tiny_retriever, alpha=0.0, beta=1.0, delta_dir=full_delta)
    assert info["dtype"] == "float32" and "lm_head.weight" in info["dropped"]
    assert "lm_head.weight" not in Checkpoint(tmp_path).names()
    got, want = load_state(tmp_path), load_state(tiny_retriever)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaModel"]
    assert (tmp_path / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "readapt.json").read_text()) == info


def test_merge_reports_each_steps_busy_time(tmp_path, tiny_base, tiny_retriever):
    busy: dict[str, float] = {}
    run_merge(tmp_path, tiny_base, tiny_retriever, alpha=0.0, beta=0.5, busy=busy)
    steps = {"read", "sum", "write"}
    if resolve_device() != "cpu":  # the copies, parts of read and write
        steps |= {"to device", "to host"}
    assert set(busy) == steps and all(s > 0 for s in busy.values())


def test_zero_gives_the_base_body(tmp_path, tiny_base, tiny_retriever):
    run_merge(tmp_path, tiny_base, tiny_retriever, alpha=0.0, beta=0.0)
    got, base = Checkpoint(tmp_path), Body(tiny_base)
    assert sorted(got.names()) == sorted(base.names())
    assert all(torch.equal(got.get(n), base.get(n)) for n in base.names())


@pytest.mark.parametrize("kind", ["dora_adapter", "lora_adapter"])
def test_alpha_one_matches_peft_merge(request, tmp_path, tiny_base, tiny_retriever, kind):
    adapter = request.getfixturevalue(kind)
    run_merge(tmp_path, tiny_base, tiny_retriever, alpha=1.0, beta=0.0, adapter_dir=adapter)
    got, want = load_state(tmp_path), peft_merged(tiny_base, adapter)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)
    assert not torch.equal(
        got["layers.0.mlp.up_proj.weight"], load_state(tiny_base)["layers.0.mlp.up_proj.weight"]
    )


@pytest.mark.parametrize(
    "extra",
    [
        {
            "use_dora": True,
            "target_modules": ["q_proj", "embed_tokens"],
            "modules_to_save": ["norm"],
        },
        {
            "use_dora": False,
            "target_modules": ["q_proj", "down_proj", "embed_tokens"],
            "rank_pattern": {"q_proj": 2},
            "alpha_pattern": {r"layers\.1\.mlp\.down_proj": 3},
        },
        {"use_dora": True, "target_modules": ["v_proj", "lm_head"], "use_rslora": True},
    ],
    ids=["dora-embedding-saved-modules", "lora-patterns", "dora-rslora-head"],
)
def test_adapter_variants_match_peft_merge(tmp_path, tiny_base, tiny_retriever, extra):
    from transformers import AutoModelForCausalLM

    dora = extra.pop("use_dora")
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    adapter = make_adapter(model, tmp_path / "adapter", dora=dora, seed=6, **extra)
    out = tmp_path / "out"
    run_merge(out, tiny_base, tiny_retriever, alpha=1.0, beta=0.0, adapter_dir=adapter)
    got, want, theta = load_state(out), peft_merged(tiny_base, adapter), load_state(tiny_base)
    changed = [k for k in want if not torch.equal(want[k], theta[k])]
    assert "embed_tokens.weight" in changed or "v_proj" in extra["target_modules"]
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)


@pytest.mark.parametrize("route", ["delta", "retriever"])
def test_general_combination(tmp_path, tiny_base, tiny_retriever, dora_adapter, full_delta, route):
    alpha, beta = 0.5, 0.7
    info = run_merge(
        tmp_path,
        tiny_base,
        tiny_retriever,
        alpha=alpha,
        beta=beta,
        adapter_dir=dora_adapter,
        delta_dir=full_delta if route == "delta" else None,
    )
    assert info["route"] == route
    theta, ret = load_state(tiny_base), load_state(tiny_retriever)
    knowledge, got = peft_merged(tiny_base, dora_adapter), load_state(tmp_path)
    for k in theta:
        t = theta[k].double()
        want = t + alpha * (knowledge[k].double() - t) + beta * (ret[k].double() - t)
        torch.testing.assert_close(got[k].double(), want, atol=2e-6, rtol=0, msg=k)


@pytest.mark.parametrize(("alpha", "beta"), [(0.5, 1.0), (0.5, 0.3), (1.0, 2.0), (0.0, 0.5)])
def test_retriever_route_equals_delta_route(
    tmp_path, tiny_base, tiny_retriever, dora_adapter, full_delta, alpha, beta
):
    kw = dict(alpha=alpha, beta=beta, adapter_dir=dora_adapter if alpha else None)
    run_merge(tmp_path / "delta", tiny_base, tiny_retriever, delta_dir=full_delta, **kw)
    run_merge(tmp_path / "direct", tiny_base, tiny_retriever, **kw)
    via_delta, direct = Checkpoint(tmp_path / "delta"), Checkpoint(tmp_path / "direct")
    assert via_delta.names() == direct.names()
    for name in direct.names():  # float32 outputs: the two float64 sums round alike, or 1 ulp off
        torch.testing.assert_close(direct.get(name), via_delta.get(name), atol=1e-7, rtol=2e-7)


def test_retriever_route_is_exact(tmp_path, tiny_base, tiny_retriever, dora_adapter):
    info = run_merge(tmp_path / "r", tiny_base, tiny_retriever, alpha=0.0, beta=1.0)
    assert info["route"] == "retriever"
    got, want = load_state(tmp_path / "r"), load_state(tiny_retriever)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # β = 1 with an adapter: tensors the adapter leaves alone are the retriever's, untouched by Θ.
    out = tmp_path / "ra"
    run_merge(out, tiny_base, tiny_retriever, alpha=0.5, beta=1.0, adapter_dir=dora_adapter)
    got = load_state(out)
    targets = Adapter(dora_adapter, "model").targets()
    assert all(torch.equal(got[k], want[k]) for k in want if k not in targets)
    assert not any(torch.equal(got[k], want[k]) for k in targets)


def test_blocks_of_rows_equal_whole_tensors(monkeypatch, tmp_path, tiny_base, tiny_retriever):
    from transformers import AutoModelForCausalLM

    extra = {"target_modules": ["q_proj", "down_proj", "embed_tokens"]}
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    adapter = make_adapter(model, tmp_path / "adapter", dora=True, seed=7, **extra)
    kw = dict(alpha=0.5, beta=0.7, adapter_dir=adapter)
    run_merge(tmp_path / "rows", tiny_base, tiny_retriever, **kw)
    # A GPU takes whole tensors, without the CPU's worker pool: the same path on the CPU here.
    monkeypatch.setattr(merge_stage, "block_pool", lambda dev: contextlib.nullcontext())
    run_merge(tmp_path / "whole", tiny_base, tiny_retriever, **kw)
    monkeypatch.undo()
    monkeypatch.setattr(readapt, "BLOCK_ELEMENTS", 100)  # a row or two per block
    run_merge(tmp_path / "small", tiny_base, tiny_retriever, **kw)
    whole = Checkpoint(tmp_path / "whole")
    for other in (Checkpoint(tmp_path / "rows"), Checkpoint(tmp_path / "small")):
        for name in whole.names():
            torch.testing.assert_close(other.get(name), whole.get(name), atol=1e-7, rtol=0)


def test_exact_float32_sets_and_restores_the_matmul_precision():
    matmul = torch.backends.cuda.matmul
    key = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    before = getattr(matmul, key)
    setattr(matmul, key, "tf32" if key == "fp32_precision" else True)  # as a user might
    try:
        with readapt.exact_float32():
            assert getattr(matmul, key) == ("ieee" if key == "fp32_precision" else False)
        assert getattr(matmul, key) == ("tf32" if key == "fp32_precision" else True)
    finally:
        setattr(matmul, key, before)


def test_row_blocks():
    assert list(row_blocks((5, 4), whole=True)) == [...]
    assert list(row_blocks((), whole=False)) == [...]
    blocks = list(row_blocks((3, readapt.BLOCK_ELEMENTS // 2), whole=False))
    assert blocks == [slice(0, 2), slice(2, 4)]


def test_readapt_rows_sums_in_the_given_precision():
    theta = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    retriever = torch.tensor([[2.0, 2.0], [2.0, 2.0]], dtype=torch.bfloat16)
    got = readapt_rows(theta, 0.5, [(0.5, retriever)], [], slice(1, 2))
    assert got.dtype == torch.float64 and got.tolist() == [[2.5, 3.0]]
    narrow = readapt_rows(theta, 0.5, [(0.5, retriever)], [], slice(1, 2), dtype=torch.float32)
    assert narrow.dtype == torch.float32 and narrow.tolist() == [[2.5, 3.0]]
    assert compute_dtype(torch.bfloat16, [torch.bfloat16, torch.float32]) == torch.float32
    assert compute_dtype(torch.bfloat16, [torch.float64]) == torch.float64  # an inexact Δ
    assert compute_dtype(torch.float32, []) == torch.float64
    assert theta.tolist() == [[1.0, 2.0], [3.0, 4.0]]  # inputs are left as they were
    # β = 1 with a LoRA update: R + α·Ψ, Θ unread.
    from readaptir.lora import TargetUpdate

    update = TargetUpdate(scaling=2.0, a=torch.ones(1, 2).double(), b=torch.ones(2, 1).double())
    got = readapt_rows(None, 0.0, [(1.0, retriever)], [(0.25, update)], ...)
    assert got.tolist() == [[2.5, 2.5], [2.5, 2.5]]
    with pytest.raises(ValueError, match="nothing to start"):
        readapt_rows(None, 0.0, [], [(0.25, update)], ...)
    # β = 1 where Θ is read (DoRA needs it): the sum starts from R as stored, not from an
    # interpolation that is R only in exact arithmetic (a -0 would turn +0, a huge value NaN)
    theta, r = torch.tensor([1.0, -3e38]), torch.tensor([-0.0, 3e38])
    got = readapt_rows(theta, 0.0, [(1.0, r)], [], ..., dtype=torch.float32)
    assert torch.equal(got.view(torch.int32), r.view(torch.int32))


def test_lora_retriever(tmp_path, tiny_base, lora_retriever):
    delta_dir = tmp_path / "delta"
    info = compute_delta(tiny_base, lora_retriever, delta_dir)
    assert info["kind"] == "lora"
    assert "layers.0.self_attn.o_proj.weight" in info["zero"]
    merged = peft_merged(tiny_base, lora_retriever, causal=False)
    theta, delta = load_state(tiny_base), Checkpoint(delta_dir)
    assert sorted(delta.names()) == sorted(info["storage"])
    assert len(delta.names()) == 2 * len(TARGETS)
    for name in delta.names():
        want = merged[name].double() - theta[name].double()
        torch.testing.assert_close(delta.get(name).double(), want, atol=1e-6, rtol=0)
    base = load_state(tiny_base)
    for route, stored in [("delta", delta_dir), ("retriever", None)]:
        for beta in (1.0, 0.5):  # β scales the retriever's change on either route
            out = tmp_path / f"merged-{route}-{beta}"
            run_merge(out, tiny_base, lora_retriever, alpha=0.0, beta=beta, delta_dir=stored)
            got = load_state(out)
            assert got.keys() == merged.keys()
            for k in merged:
                want = base[k].double() + beta * (merged[k].double() - base[k].double())
                torch.testing.assert_close(got[k].double(), want, atol=1e-6, rtol=0, msg=k)
            assert (out / "tokenizer.json").is_file()  # the adapter has none: the base's


def test_adapter_over_bare_or_causal_model_agree(tiny_base, dora_adapter, lora_retriever):
    causal, bare = Adapter(dora_adapter, "model"), Adapter(lora_retriever, "model")
    assert sorted(causal.targets()) == sorted(bare.targets())
    assert "layers.1.mlp.down_proj.weight" in causal.targets()
    assert causal.scaling("layers.0.self_attn.q_proj.weight") == 2.0
    causal.check(Body(tiny_base))


def test_adapter_config_defaults_and_ranks(tmp_path, tiny_base, lora_retriever):
    """A config without r or lora_alpha takes PEFT's defaults (8 and 8: scaling 1); factors of
    another rank than the config's are refused, since lora_alpha / r would scale them wrongly."""
    bare = tmp_path / "bare"
    shutil.copytree(lora_retriever, bare)
    config = json.loads((bare / "adapter_config.json").read_text())
    del config["r"], config["lora_alpha"]
    (bare / "adapter_config.json").write_text(json.dumps(config))
    adapter = Adapter(bare, "model")
    assert adapter.scaling("layers.0.self_attn.q_proj.weight") == 1.0
    with pytest.raises(WeightError, match=r"bare: layers\.0\.\S+ has rank 4/4, config says 8"):
        adapter.check(Body(tiny_base))


# -- mismatches: each fails before anything is written ------------------------------------------


@pytest.fixture(scope="module")
def resized_vocab(tmp_path_factory, tiny_retriever) -> Path:
    from transformers import LlamaModel

    model = LlamaModel.from_pretrained(tiny_retriever)
    model.resize_token_embeddings(model.config.vocab_size + 8)
    out = tmp_path_factory.mktemp("resized")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bert(tmp_path_factory, tokenizer) -> Path:
    from readaptir import tiny

    return tiny.make_bert(tmp_path_factory.mktemp("bert"), tokenizer)


@pytest.fixture(scope="module")
def missing_tensor(tmp_path_factory, tiny_retriever) -> Path:
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("missing")
    tensors = load_file(tiny_retriever / "model.safetensors")
    del tensors["layers.1.mlp.up_proj.weight"]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(tiny_retriever / "config.json", out / "config.json")
    return out


@pytest.mark.parametrize(
    ("retriever", "tensor"),
    [
        ("resized_vocab", "embed_tokens.weight"),
        ("bert", "embeddings."),
        ("missing_tensor", "layers.1.mlp.up_proj.weight"),
    ],
)
def test_mismatches_fail_up_front(request, tmp_path, tiny_base, retriever, tensor):
    retriever_dir = request.getfixturevalue(retriever)
    out = tmp_path / "delta"
    with pytest.raises(WeightError, match=tensor.replace(".", r"\.")):
        compute_delta(tiny_base, retriever_dir, out)
    assert not out.exists()
    out = tmp_path / "merged"
    with pytest.raises(WeightError, match=tensor.replace(".", r"\.")):
        run_merge(out, tiny_base, retriever_dir, alpha=0.0, beta=0.0)
    assert not out.exists()


def test_adapter_for_another_base_fails(tmp_path, tokenizer, tiny_retriever, dora_adapter):
    from readaptir import tiny

    small = tiny.make_llama(tmp_path / "small", tokenizer, layers=1)
    out = tmp_path / "out"
    with pytest.raises(WeightError, match=r"layers\.1\."):
        run_merge(out, small, tiny_retriever, alpha=1.0, beta=0.0, adapter_dir=dora_adapter)
    assert not out.exists()


def test_missing_adapter(tmp_path, tiny_base, tiny_retriever):
    with pytest.raises(ValueError, match=r"alpha=1.0 needs a knowledge adapter"):
        run_merge(tmp_path, tiny_base, tiny_retriever, alpha=1.0, beta=0.0)


def test_output_dtype(tmp_path, tiny_base, tiny_retriever, full_delta):
    from transformers import AutoModel

    info = run_merge(
        tmp_path, tiny_base, tiny_retriever, alpha=0, beta=1, delta_dir=full_delta, dtype="bfloat16"
    )
    assert info["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModel.from_pretrained(tmp_path)
    assert model.dtype == torch.bfloat16
    want = Body(tiny_retriever).get("norm.weight").to(torch.bfloat16)
    assert torch.equal(model.state_dict()["norm.weight"], want)


def test_minilm_sentence_transformer(tmp_path, minilm_dir):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(minilm_dir), device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.001 * torch.randn_like(p))
    retriever = tmp_path / "retriever"
    model.save(str(retriever))
    delta_dir, out = tmp_path / "delta", tmp_path / "merged"
    compute_delta(minilm_dir, retriever, delta_dir)
    run_merge(out, minilm_dir, retriever, alpha=0.0, beta=1.0, delta_dir=delta_dir)
    readapted = st.SentenceTransformer(str(out), device="cpu")
    texts = ["a protein in the cell", "the river and the mountain"]
    torch.testing.assert_close(
        readapted.encode(texts, convert_to_tensor=True), model.encode(texts, convert_to_tensor=True)
    )


def test_a_peft_retriever_over_a_sentence_transformer_keeps_its_bases_encoding(
    tmp_path, minilm_dir
):
    from transformers import AutoModel

    from readaptir.st_config import read_st_config

    retriever = make_adapter(AutoModel.from_pretrained(minilm_dir), tmp_path / "lora", dora=False,
                             seed=0, target_modules=["query", "value"])  # fmt: skip
    assert not (retriever / "modules.json").exists()
    out = tmp_path / "merged"
    run_merge(out, minilm_dir, retriever, alpha=0.0, beta=1.0)
    # the retriever alone is encoded with the base's pooling and length (Encoder.load): the
    # readapted model must be too, or the comparison is of two encodings
    assert read_st_config(out) == read_st_config(minilm_dir) is not None
    assert (out / "modules.json").read_bytes() == (minilm_dir / "modules.json").read_bytes()


@pytest.fixture(scope="module")
def bf16_pair(tmp_path_factory, tiny_base, tiny_retriever) -> tuple[Path, Path]:
    """Θ and the retriever stored in bf16, as the 7B models are."""
    from transformers import AutoModel, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("bf16")
    for cls, src, name in (
        (AutoModelForCausalLM, tiny_base, "base"),
        (AutoModel, tiny_retriever, "r"),
    ):
        cls.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(out / name)
        shutil.copy(src / "tokenizer.json", out / name / "tokenizer.json")
    return out / "base", out / "r"


def test_bf16_merges_in_float32_exactly_where_it_must(
    tmp_path, bf16_pair, dora_adapter, monkeypatch
):
    base, retriever = bf16_pair
    delta = tmp_path / "delta"
    info = compute_delta(base, retriever, delta)
    assert set(info["storage"].values()) == {"float32"} and not info["inexact"]
    want = Checkpoint(retriever)
    for route in ("delta", "direct"):  # Θ + Δ summed in float32 is the retriever, bit for bit
        out = tmp_path / f"ret-{route}"
        kw = {"delta_dir": delta} if route == "delta" else {}
        run_merge(out, base, retriever, alpha=0.0, beta=1.0, **kw)
        got = Checkpoint(out)
        assert all(torch.equal(got.get(n), want.get(n)) for n in want.names()), route

    # a general sum: float32 then bf16 is the float64 sum cast to bf16, but for rare ties
    kw = dict(alpha=0.5, beta=0.7, adapter_dir=dora_adapter)
    run_merge(tmp_path / "f32", base, retriever, **kw)
    monkeypatch.setattr(readapt, "compute_dtype", lambda out, stored: torch.float64)
    run_merge(tmp_path / "f64", base, retriever, **kw)
    narrow, wide = Checkpoint(tmp_path / "f32"), Checkpoint(tmp_path / "f64")
    differ = total = 0
    for name in wide.names():
        a, b = narrow.get(name), wide.get(name)
        assert a.dtype == torch.bfloat16
        size = b.float().abs()
        # one bf16 step, or float32 rounding of terms of the tensor's size where they cancel
        bound = (
            torch.finfo(torch.bfloat16).eps * size + 4 * torch.finfo(torch.float32).eps * size.max()
        )
        assert bool(((a.float() - b.float()).abs() <= bound).all()), name
        differ, total = differ + int((a != b).sum()), total + b.numel()
    assert differ / total < 1e-3


def test_bf16_lora_retriever_routes_agree_bit_for_bit(tmp_path, bf16_pair, lora_retriever):
    """A PEFT retriever is round(Θ + Ψ_R): the direct and the stored-Δ merges both give it."""
    base = bf16_pair[0]
    delta = tmp_path / "delta"
    compute_delta(base, lora_retriever, delta)
    run_merge(tmp_path / "direct", base, lora_retriever, alpha=0.0, beta=1.0)
    run_merge(tmp_path / "stored", base, lora_retriever, alpha=0.0, beta=1.0, delta_dir=delta)
    direct, stored = Checkpoint(tmp_path / "direct"), Checkpoint(tmp_path / "stored")
    assert direct.names() == stored.names()
    assert {direct.get(n).dtype for n in direct.names()} == {torch.bfloat16}
    assert all(torch.equal(direct.get(n), stored.get(n)) for n in direct.names())


@pytest.mark.parametrize(
    "extra",
    [{"bias": "lora_only"}, {"bias": "all"}, {"bias": "all", "modules_to_save": ["norm"]},
     {"bias": "all", "lora_bias": True}],
    ids=["lora_only", "all", "all-saved-module", "all-lora-bias"],
)  # fmt: skip
def test_trained_biases_match_peft_merge(tmp_path, tokenizer, extra):
    from readaptir import tiny

    base = tiny.make_llama(tmp_path / "base", tokenizer, attention_bias=True)
    retriever = tiny.make_llama(tmp_path / "retr", tokenizer, seed=1, causal_lm=False,
                                attention_bias=True)  # fmt: skip
    adapter = make_adapter(
        AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter", dora=False, seed=7,
        target_modules=["q_proj", "v_proj"], **extra,
    )  # fmt: skip
    out = tmp_path / "out"
    run_merge(out, base, retriever, alpha=1.0, beta=0.0, adapter_dir=adapter)
    got, want, theta = load_state(out), peft_merged(base, adapter), load_state(base)
    assert not torch.equal(
        want["layers.0.self_attn.q_proj.bias"], theta["layers.0.self_attn.q_proj.bias"]
    )
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)


def test_head_update_through_tied_embeddings_is_refused(tmp_path, tokenizer):
    from readaptir import tiny

    base = tiny.make_llama(tmp_path / "base", tokenizer, tie_word_embeddings=True)
    retriever = tiny.make_llama(tmp_path / "retr", tokenizer, causal_lm=False)
    adapter = make_adapter(
        AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter", dora=False, seed=8,
        target_modules=["q_proj", "lm_head"],
    )  # fmt: skip
    with pytest.raises(WeightError, match=r"updates the head tensor lm_head\.weight, and .* ties"):
        run_merge(tmp_path / "out", base, retriever, alpha=1.0, beta=0.0, adapter_dir=adapter)


def stored_as(
    src: Path, out: Path, dtype: torch.dtype, values: dict[tuple[str, int], float] | None = None
) -> Path:
    """A copy of the checkpoint ``src`` in ``dtype``, with ``values`` (a canonical tensor name and
    a flat index → a value) written in."""
    shutil.copytree(src, out)
    tensors = {k: v.to(dtype) for k, v in load_file(out / "model.safetensors").items()}
    for (name, index), value in (values or {}).items():
        stored = next(k for k in tensors if k == name or k.endswith(f".{name}"))
        tensors[stored].view(-1)[index] = value
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_beta_zero_keeps_theta_s_dtypes_under_a_float16_retriever(tmp_path, bf16_pair):
    # Mistral-7B is bf16, e5-mistral-7b-instruct fp16: at β = 0 the output is Θ, in Θ's dtypes
    huge = {("layers.0.mlp.up_proj.weight", -1): 1e5}  # beyond float16's range
    base = stored_as(bf16_pair[0], tmp_path / "base", torch.bfloat16, huge)
    retriever = stored_as(bf16_pair[1], tmp_path / "r", torch.float16)
    info = run_merge(tmp_path / "out", base, retriever, alpha=0.0, beta=0.0)
    got, want = Checkpoint(tmp_path / "out"), Body(base)
    assert info["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    for name in want.names():
        assert got.dtype(name) == torch.bfloat16 and torch.equal(got.get(name), want.get(name))


def test_float16_overflow_is_an_error_naming_the_tensor(
    monkeypatch, tmp_path, tiny_base, tiny_retriever
):
    monkeypatch.setattr(readapt, "BLOCK_ELEMENTS", 256)  # several blocks of rows a tensor
    name = "layers.0.mlp.up_proj.weight"
    retriever = stored_as(tiny_retriever, tmp_path / "r", torch.float16, {(name, -1): 65504.0})
    # an inf of Θ's is carried over, not the merge's doing
    theta = {(name, -1): 65000.0, (name, 0): float("inf")}
    base = stored_as(tiny_base, tmp_path / "base", torch.float16, theta)
    run_merge(tmp_path / "fine", base, retriever, alpha=0.0, beta=0.5)
    assert not Checkpoint(tmp_path / "fine").get(name).view(-1)[0].isfinite()
    # −65000 + 2·65504 is beyond float16's range
    with pytest.raises(WeightError, match=rf"^{re.escape(name)}: 1 readapted values"):
        run_merge(tmp_path / "over", base, retriever, alpha=0.0, beta=2.0)
    # a tensor passed as stored, cast to a float16 recipe dtype
    wide = stored_as(tiny_base, tmp_path / "wide", torch.float32, {("norm.weight", -1): 1e5})
    with pytest.raises(WeightError, match=r"^norm[.]weight: 1 readapted values"):
        run_merge(tmp_path / "cast", wide, tiny_retriever, alpha=0.0, beta=0.0, dtype="float16")


def edited_adapter(src: Path, out: Path, tensors=None, **config) -> Path:
    """A copy of the PEFT adapter ``src`` with ``config`` set in its adapter_config.json and
    ``tensors`` (a function of its tensors) applied to its weights."""
    shutil.copytree(src, out)
    path = out / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if tensors is not None:
        weights = load_file(out / "adapter_model.safetensors")
        save_file(tensors(weights), out / "adapter_model.safetensors")
    return out


@pytest.mark.parametrize(
    ("kind", "config", "message"),
    [
        ("dora_adapter", {"use_dora": False}, r"lora_magnitude_vector.* use_dora: false"),
        ("lora_adapter", {"use_dora": True}, r"use_dora: true, but layers[.]0[.]\S+ has"),
        ("lora_adapter", {"alora_invocation_tokens": [5, 6]}, r"aLoRA"),
        *[
            ("lora_adapter", {"init_lora_weights": init}, rf"init_lora_weights '{init}'.* convert")
            for init in ("pissa_niter_4", "olora", "corda", "loftq", "lora_ga")
        ],
    ],
    ids=[
        "magnitudes-without-use_dora",
        "use_dora-without-magnitudes",
        "alora",
        *["pissa_niter_4", "olora", "corda", "loftq", "lora_ga"],
    ],
)
def test_adapter_config_must_agree_with_its_tensors(
    request, tmp_path, tiny_base, kind, config, message
):
    adapter = edited_adapter(request.getfixturevalue(kind), tmp_path / "adapter", **config)
    with pytest.raises(WeightError, match=rf"{re.escape(str(adapter))}: .*{message}"):
        Adapter(adapter, Body(tiny_base).prefix)


@pytest.mark.filterwarnings("ignore:PiSSA changes the base weights")  # PEFT's, converting
def test_a_pissa_retriever_is_refused_and_merges_once_converted_to_lora(
    tmp_path, tiny_base, lora_adapter
):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa")
    model = get_peft_model(AutoModel.from_pretrained(tiny_base), config)
    model.peft_config["default"].init_lora_weights = True  # PEFT's way to keep the start
    model.save_pretrained(tmp_path / "start")
    model.peft_config["default"].init_lora_weights = "pissa"
    train(model, seed=6)
    model.save_pretrained(tmp_path / "pissa")
    model.save_pretrained(
        tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "start")
    )
    retriever = state(model.merge_and_unload())  # over the residual PiSSA left in the base

    config_file = re.escape(str(tmp_path / "pissa"))
    with pytest.raises(WeightError, match=rf"^{config_file}: .*init_lora_weights 'pissa'"):
        run_merge(tmp_path / "refused", tiny_base, tmp_path / "pissa", alpha=0.0, beta=1.0)
    with pytest.raises(WeightError, match=rf"^{config_file}: .*init_lora_weights 'pissa'"):
        compute_delta(tiny_base, tmp_path / "pissa", tmp_path / "no-delta")
    assert not (tmp_path / "refused").exists() and not (tmp_path / "no-delta").exists()
    run_merge(tmp_path / "out", tiny_base, tmp_path / "lora", alpha=0.0, beta=1.0)
    got = load_state(tmp_path / "out")
    assert got.keys() == retriever.keys()
    for name, tensor in retriever.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)
    for init in ("gaussian", "eva", "orthogonal"):  # they start B·A over the base as it is
        edited = edited_adapter(lora_adapter, tmp_path / init, init_lora_weights=init)
        Adapter(edited, Body(tiny_base).prefix).check(Body(tiny_base))


@pytest.mark.parametrize(
    "reshape", [lambda a: a.reshape(-1), lambda a: a[..., None, None]], ids=["1-D", "4-D"]
)
def test_a_lora_factor_that_is_no_matrix_is_named(tmp_path, tiny_base, lora_adapter, reshape):
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"

    def edit(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weights[key] = reshape(weights[key]).contiguous()
        return weights

    adapter = edited_adapter(lora_adapter, tmp_path / "adapter", tensors=edit)
    shape = tuple(load_file(adapter / "adapter_model.safetensors")[key].shape)
    with pytest.raises(WeightError, match=re.escape(f"{key} has shape {shape}")):
        Adapter(adapter, Body(tiny_base).prefix).check(Body(tiny_base))


def test_mixed_precision_retriever_is_reproduced_tensor_by_tensor(
    tmp_path, tiny_base, tiny_retriever
):
    from safetensors.torch import load_file, save_file

    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_retriever, mixed)
    tensors = load_file(mixed / "model.safetensors")
    kept = {k: v if "norm" in k else v.to(torch.bfloat16) for k, v in tensors.items()}
    save_file(kept, mixed / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    info = run_merge(out, tiny_base, mixed, alpha=0.0, beta=1.0)
    assert info["dtype"] == "bfloat16"  # the model's dtype: most of its parameters
    got = Checkpoint(out)
    for name, tensor in kept.items():
        assert got.dtype(name) == tensor.dtype and torch.equal(got.get(name), tensor), name


def test_lora_retriever_saved_as_bin(tmp_path, tiny_base, lora_retriever):
    # adapters saved by PEFT before safetensors became its default (e.g. RepLLaMA's release)
    from safetensors.torch import load_file

    old = tmp_path / "old-format"
    shutil.copytree(lora_retriever, old)
    torch.save(load_file(old / "adapter_model.safetensors"), old / "adapter_model.bin")
    (old / "adapter_model.safetensors").unlink()
    run_merge(tmp_path / "new", tiny_base, lora_retriever, alpha=0.0, beta=1.0)
    run_merge(tmp_path / "old", tiny_base, old, alpha=0.0, beta=1.0)
    new, got = Checkpoint(tmp_path / "new"), Checkpoint(tmp_path / "old")
    assert sorted(new.names()) == sorted(got.names())
    assert all(torch.equal(new.get(n), got.get(n)) for n in new.names())
    (old / "adapter_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(WeightError, match=r"adapter_model\.bin: not a readable"):
        Checkpoint(old)
    # a stray adapter_model.bin beside a model's weights: the model is read, as transformers does
    shutil.copy(old / "adapter_model.bin", tmp_path / "new" / "adapter_model.bin")
    assert sorted(Checkpoint(tmp_path / "new").names()) == sorted(new.names())
    with pytest.raises(WeightError, match=r"adapter_model\.bin: not a readable"):
        Checkpoint(tmp_path / "new", adapter=True)


def test_a_lora_retriever_beside_merged_weights_is_read_as_the_adapter(
    tmp_path, tiny_base, tiny_retriever, lora_retriever
):
    """A repository holding an adapter and the model merged with it: PEFT reads the adapter."""
    both = tmp_path / "both"
    shutil.copytree(lora_retriever, both)
    shutil.copy(tiny_retriever / "model.safetensors", both / "model.safetensors")
    run_merge(tmp_path / "alone", tiny_base, lora_retriever, alpha=0.0, beta=1.0)
    run_merge(tmp_path / "beside", tiny_base, both, alpha=0.0, beta=1.0)
    want, got = _tensors(tmp_path / "alone"), _tensors(tmp_path / "beside")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_base_with_legacy_layernorm_names(tmp_path, tokenizer):
    """An old BERT checkpoint names LayerNorm parameters gamma/beta; transformers loads it, and so
    do the delta and the merge, writing modern names."""
    from safetensors.torch import load_file, save_file

    from readaptir import tiny

    base = tiny.make_bert(tmp_path / "base", tokenizer)
    retriever = tiny.make_bert(tmp_path / "retr", tokenizer, seed=1)
    tensors = load_file(base / "model.safetensors")
    old_names = {"LayerNorm.weight": "LayerNorm.gamma", "LayerNorm.bias": "LayerNorm.beta"}
    legacy = {}
    for name, tensor in tensors.items():
        for modern, old in old_names.items():
            name = name.replace(modern, old)
        legacy[name] = tensor
    assert "embeddings.LayerNorm.gamma" in legacy
    save_file(legacy, base / "model.safetensors", metadata={"format": "pt"})
    want = load_state(retriever)
    run_merge(tmp_path / "direct", base, retriever, alpha=0.0, beta=1.0)
    compute_delta(base, retriever, tmp_path / "delta")
    run_merge(tmp_path / "stored", base, retriever, alpha=0.0, beta=1.0,
              delta_dir=tmp_path / "delta")  # fmt: skip
    for route in ("direct", "stored"):
        assert "embeddings.LayerNorm.weight" in Checkpoint(tmp_path / route).names()
        got = load_state(tmp_path / route)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), route


def test_a_sharded_merges_index_names_each_tensors_file(tmp_path, tiny_base, tiny_retriever):
    # vLLM, accelerate and safe_open users look a tensor up in the index's weight map
    run_merge(tmp_path, tiny_base, tiny_retriever, alpha=0.0, beta=0.5, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = {p.name for p in tmp_path.glob("model-*-of-*.safetensors")}
    assert len(files) > 3 and set(index["weight_map"].values()) == files
    assert sorted(index["weight_map"]) == sorted(Body(tiny_base).names())
    for name, file in index["weight_map"].items():
        with safe_open(tmp_path / file, "pt") as f:
            assert name in f.keys(), (name, file)
    sizes = sum(Checkpoint(tmp_path).nbytes(n) for n in index["weight_map"])
    assert index["metadata"]["total_size"] == sizes


def test_a_forced_dtype_casts_the_tensors_passed_as_stored(tmp_path, tiny_base, tiny_retriever):
    for beta, source in ((1.0, tiny_retriever), (0.0, tiny_base)):  # R's tensors, then Θ's
        out = tmp_path / f"b{beta}"
        info = run_merge(out, tiny_base, tiny_retriever, alpha=0.0, beta=beta, dtype="bfloat16")
        assert info["dtype"] == "bfloat16"
        got, want = Checkpoint(out), Body(source)
        for name in want.names():
            assert torch.equal(got.get(name), want.get(name).to(torch.bfloat16)), name


def test_pooled_buffers_are_not_reused_while_written(
    monkeypatch, tmp_path, tiny_base, tiny_retriever, dora_adapter
):
    # the tiny tensors stay under the pool's floor: pool them all, and slow the writer down (a
    # slow disk) so that the next tensors are read and summed while one is written
    cases = {
        "passed": dict(alpha=0.0, beta=1.0),  # R's tensors handed on as read
        "summed": dict(alpha=0.5, beta=0.7, adapter_dir=dora_adapter),
    }
    for case, kwargs in cases.items():
        run_merge(tmp_path / f"ref-{case}", tiny_base, tiny_retriever, **kwargs)
    monkeypatch.setattr(readapt, "BufferPool", lambda: BufferPool(keep=16, min_bytes=0))
    add = ShardWriter.add

    def slow_add(self, name, tensor):
        time.sleep(0.01)
        add(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "add", slow_add)
    for case, kwargs in cases.items():
        run_merge(tmp_path / f"pooled-{case}", tiny_base, tiny_retriever, **kwargs)
        ref, got = Checkpoint(tmp_path / f"ref-{case}"), Checkpoint(tmp_path / f"pooled-{case}")
        assert ref.names() == got.names()
        for name in ref.names():
            assert torch.equal(got.get(name), ref.get(name)), (case, name)
    pool = BufferPool(min_bytes=1)
    pool.give(torch.empty(100, dtype=torch.uint8))
    first, second = pool.take(80), pool.take(80)  # both held: one buffer is lent once
    assert first.data_ptr() != second.data_ptr()


def test_delta_pooled_buffers_are_not_reused_while_in_use(
    monkeypatch, tmp_path, tiny_base, tiny_retriever, bf16_pair, lora_retriever
):
    # as above for the delta stage: Θ and R are read ahead into pooled buffers while the last Δ
    # is written; the bf16 pair takes its float32 Δ in blocks of rows on two workers
    pairs = {
        "float32": (tiny_base, tiny_retriever),
        "bf16": bf16_pair,
        "lora": (tiny_base, lora_retriever),
    }
    for case, (base, retriever) in pairs.items():
        compute_delta(base, retriever, tmp_path / f"ref-{case}")
    monkeypatch.setattr(delta_stage, "BufferPool", lambda: BufferPool(keep=16, min_bytes=0))
    monkeypatch.setattr(readapt, "BLOCK_ELEMENTS", 256)
    add = ShardWriter.add

    def slow_add(self, name, tensor):
        time.sleep(0.01)
        add(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "add", slow_add)
    for case, (base, retriever) in pairs.items():
        info = compute_delta(base, retriever, tmp_path / f"pooled-{case}")
        ref, got = Checkpoint(tmp_path / f"ref-{case}"), Checkpoint(tmp_path / f"pooled-{case}")
        assert info == read_json(tmp_path / f"ref-{case}" / "delta.json")
        assert ref.names() == got.names()
        for name in ref.names():
            assert torch.equal(got.get(name), ref.get(name)), (case, name)


def test_a_delta_missing_a_tensor_is_refused(tmp_path, tiny_base, tiny_retriever):
    delta = tmp_path / "delta"
    compute_delta(tiny_base, tiny_retriever, delta)
    tensors = load_file(delta / "model.safetensors")
    del tensors["layers.1.mlp.up_proj.weight"]
    save_file(tensors, delta / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(WeightError, match=r"no Δ for tensor layers\.1\.mlp\.up_proj\.weight"):
        run_merge(out, tiny_base, tiny_retriever, alpha=0.0, beta=1.0, delta_dir=delta)
    assert not out.exists()


def test_the_merged_tokenizer_is_the_one_the_retriever_alone_encodes_with(
    tmp_path, tiny_base, tiny_retriever
):
    from readaptir.models import has_tokenizer, load_tokenizer

    retriever = tmp_path / "retriever"
    shutil.copytree(tiny_retriever, retriever)
    for f in retriever.iterdir():
        if f.name.startswith("tokenizer"):
            f.unlink()
    (retriever / "special_tokens_map.json").write_text('{"eos_token": "</s>"}')
    assert not has_tokenizer(retriever)  # a special-tokens map alone loads no tokenizer
    out = tmp_path / "merged"
    run_merge(out, tiny_base, retriever, alpha=0.0, beta=0.5)
    assert (out / "tokenizer.json").read_bytes() == (tiny_base / "tokenizer.json").read_bytes()
    assert len(load_tokenizer(out)) == len(load_tokenizer(tiny_base))
    # the vocabulary files of slow tokenizers travel too: PhoBERT's bpe.codes, DeBERTa's spm.model
    own = tmp_path / "own-vocabulary"
    shutil.copytree(tiny_retriever, own)
    for name in ("bpe.codes", "spm.model"):
        (own / name).write_bytes(name.encode())
    run_merge(tmp_path / "merged-own", tiny_base, own, alpha=0.0, beta=1.0)
    assert all(
        (tmp_path / "merged-own" / n).read_bytes() == n.encode() for n in ("bpe.codes", "spm.model")
    )


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(folder)
    return {name: ckpt.get(name) for name in ckpt.names()}


def test_a_pooler_on_one_side_only_is_the_retrievers(tmp_path, tokenizer):
    """BERT's and RoBERTa's masked-LM checkpoints hold no pooler, their retrievers (bare models)
    one: the output keeps the retriever's as it is; a pooler Θ alone holds is dropped."""
    from transformers import AutoModelForMaskedLM, BertModel

    from readaptir import tiny

    base = tiny.make_bert(tmp_path / "base", tokenizer, masked_lm=True)
    retriever = tiny.make_bert(tmp_path / "retr", tokenizer, seed=1)
    pooler = sorted(n for n in load_file(retriever / "model.safetensors") if "pooler" in n)
    assert pooler and not any("pooler" in n for n in load_file(base / "model.safetensors"))
    knowledge = make_adapter(AutoModelForMaskedLM.from_pretrained(base), tmp_path / "psi",
                             dora=True, seed=2, target_modules=["query", "value"])  # fmt: skip
    assert compute_delta(base, retriever, tmp_path / "delta")["retriever_only"] == pooler
    want = load_file(retriever / "model.safetensors")
    for route, kw in {"direct": {}, "stored": {"delta_dir": tmp_path / "delta"}}.items():
        info = run_merge(tmp_path / route, base, retriever, alpha=0.0, beta=1.0, **kw)
        got = _tensors(tmp_path / route)
        assert info["retriever_only"] == pooler and got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), route
        run_merge(tmp_path / f"{route}-psi", base, retriever, alpha=0.5, beta=1.0,
                  adapter_dir=knowledge, **kw)  # fmt: skip
        readapted = _tensors(tmp_path / f"{route}-psi")
        assert all(torch.equal(readapted[k], want[k]) for k in pooler)
        assert not torch.equal(readapted["encoder.layer.0.attention.self.query.weight"],
                               want["encoder.layer.0.attention.self.query.weight"])  # fmt: skip
    # a float16 output checks each tensor's range as it casts: the pooler's too
    run_merge(tmp_path / "half", base, retriever, alpha=0.0, beta=1.0, dtype="float16")
    half = _tensors(tmp_path / "half")
    assert all(torch.equal(half[k], want[k].half()) for k in pooler)

    # the other way round: a pooler in Θ (BertModel), none in the retriever
    bare = tiny.make_bert(tmp_path / "bare", tokenizer)
    torch.manual_seed(3)
    BertModel(
        BertModel.config_class.from_pretrained(bare), add_pooling_layer=False
    ).save_pretrained(tmp_path / "no-pooler")
    info = run_merge(tmp_path / "dropped", bare, tmp_path / "no-pooler", alpha=0.0, beta=1.0)
    assert set(pooler) <= set(info["dropped"])
    got = _tensors(tmp_path / "dropped")
    want = load_file(tmp_path / "no-pooler" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    delta = compute_delta(bare, tmp_path / "no-pooler", tmp_path / "delta-dropped")
    assert set(pooler) <= set(delta["dropped"]["base"])
    stored = tmp_path / "dropped-stored"  # merged with that Δ: the same output
    run_merge(stored, bare, tmp_path / "no-pooler", alpha=0.0, beta=1.0,
              delta_dir=tmp_path / "delta-dropped")  # fmt: skip
    got = _tensors(stored)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _theta_and_retriever(tmp_path: Path, tokenizer, kind: str) -> tuple[Path, Path]:
    """Θ saved as its pretraining class, and a retriever: its bare model, every tensor moved."""
    import transformers

    sizes = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=64)  # fmt: skip
    config, cls = {
        "gpt_neox": (transformers.GPTNeoXConfig(**sizes), transformers.GPTNeoXForCausalLM),
        "electra": (transformers.ElectraConfig(embedding_size=16, **sizes),
                    transformers.ElectraForPreTraining),
        "funnel": (transformers.FunnelConfig(vocab_size=len(tokenizer), block_sizes=[1, 1],
                                             d_model=32, n_head=2, d_head=16, d_inner=64),
                   transformers.FunnelForMaskedLM),
    }[kind]  # fmt: skip
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path / "theta")
    model = transformers.AutoModel.from_pretrained(tmp_path / "theta")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "retriever")
    for folder in ("theta", "retriever"):
        tokenizer.save_pretrained(tmp_path / folder)
    return tmp_path / "theta", tmp_path / "retriever"


@pytest.mark.parametrize(
    "kind, set_aside",
    [
        # GPT-NeoX saves its head as embed_out; hub checkpoints carry masked_bias, which
        # transformers ignores on loading
        ("gpt_neox", ["embed_out.weight", "gpt_neox.layers.0.attention.masked_bias"]),
        # an ELECTRA retriever's Θ is the discriminator, with its pretraining head
        ("electra", ["discriminator_predictions.dense.weight"]),
        # transformers lists two bare classes for Funnel (FunnelModel, FunnelBaseModel)
        ("funnel", ["lm_head.bias"]),  # its weight is tied to the embeddings
    ],
)
def test_heads_and_tensors_transformers_ignores_are_set_aside(tmp_path, tokenizer, kind, set_aside):
    theta, retriever = _theta_and_retriever(tmp_path, tokenizer, kind)
    if kind == "gpt_neox":
        tensors = load_file(theta / "model.safetensors")
        tensors[set_aside[1]] = torch.tensor(-1e9)
        save_file(tensors, theta / "model.safetensors", metadata={"format": "pt"})
    info = run_merge(tmp_path / "merged", theta, retriever, alpha=0.0, beta=1.0)
    assert set(set_aside) <= set(info["dropped"])
    # the retriever's tensors under the names transformers loads (5.0 saves an ELECTRA body's
    # norms as LayerNorm.gamma/beta; the merge writes them as weight/bias, as later ones save)
    body = Body(retriever)
    want = {name: body.get(name) for name in body.names()}
    got = _tensors(tmp_path / "merged")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    delta = compute_delta(theta, retriever, tmp_path / "delta")
    assert set(set_aside) <= set(delta["dropped"]["base"])


def test_a_model_type_with_two_bare_classes_is_read_as_the_one_named(tmp_path, tokenizer):
    """transformers lists two bare classes for Funnel (FunnelModel, FunnelBaseModel): the one
    config.json names is taken, as AutoModel does (the merge itself: the set-aside test)."""
    from transformers import FunnelBaseModel, FunnelConfig

    theta, retriever = _theta_and_retriever(tmp_path, tokenizer, "funnel")
    assert set(Body(retriever).names()) == set(load_file(retriever / "model.safetensors"))
    run_merge(tmp_path / "out", theta, retriever, alpha=0.0, beta=1.0)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [
        "FunnelModel"
    ]
    FunnelBaseModel(FunnelConfig.from_pretrained(retriever)).save_pretrained(tmp_path / "pooled")
    assert auto_model_class(tmp_path / "pooled") is FunnelBaseModel  # the second class, named

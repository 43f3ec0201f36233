"""Checkpoint reading, canonical names, adapter maths and sharded writing."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from readaptir import tiny
from readaptir.lora import _pattern_value, dora_update, lora_product
from readaptir.shards import Checkpoint, ShardWriter, WeightError
from readaptir.weights import Body, base_model_prefix, lm_head_names, split_head, ties_embeddings


def test_split_head_causal_and_bare():
    causal = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"]
    body, heads = split_head(causal, "model")
    assert body == {
        "embed_tokens.weight": "model.embed_tokens.weight",
        "layers.0.mlp.up_proj.weight": "model.layers.0.mlp.up_proj.weight",
    }
    assert heads == ["lm_head.weight"]
    bare = ["embed_tokens.weight", "layers.0.mlp.up_proj.weight"]
    assert split_head(bare, "model") == ({n: n for n in bare}, [])


def test_split_head_bert():
    mlm = ["bert.encoder.layer.0.output.dense.weight", "cls.predictions.bias"]
    body, heads = split_head(mlm, "bert")
    assert list(body) == ["encoder.layer.0.output.dense.weight"]
    assert heads == ["cls.predictions.bias"]


def test_legacy_layernorm_names_are_modern():
    names = ["bert.embeddings.LayerNorm.gamma", "bert.embeddings.LayerNorm.beta",
             "bert.encoder.layer.0.output.LayerNorm.weight", "bert.pooler.gamma",
             "bert.encoder.final_layernorm.gamma",
             "cls.predictions.transform.LayerNorm.gamma"]  # fmt: skip
    body, heads = split_head(names, "bert")
    assert body == {
        "embeddings.LayerNorm.weight": "bert.embeddings.LayerNorm.gamma",
        "embeddings.LayerNorm.bias": "bert.embeddings.LayerNorm.beta",
        "encoder.layer.0.output.LayerNorm.weight": "bert.encoder.layer.0.output.LayerNorm.weight",
        # transformers renames LayerNorm.gamma only: elsewhere a gamma is the module's own name
        "pooler.gamma": "bert.pooler.gamma",
        "encoder.final_layernorm.gamma": "bert.encoder.final_layernorm.gamma",
    }
    assert heads == ["cls.predictions.transform.LayerNorm.gamma"]
    both = ["embeddings.LayerNorm.gamma", "embeddings.LayerNorm.weight"]
    with pytest.raises(WeightError, match=r"LayerNorm\.gamma and .*LayerNorm\.weight would both"):
        split_head(both, "bert", "old-bert")


def test_body_names_agree(tiny_base, tiny_retriever):
    base, retriever = Body(tiny_base), Body(tiny_retriever)
    assert base.prefix == "model" and base.heads == ["lm_head.weight"]
    assert retriever.heads == []
    assert sorted(base.names()) == sorted(retriever.names())
    name = "layers.0.self_attn.q_proj.weight"
    assert base.shape(name) == (64, 64) and base.dtype(name) == torch.float32
    assert base.get(name).shape == (64, 64)
    assert base.nbytes(name) == 64 * 64 * 4


def test_bert_mlm_and_bare_agree(tmp_path, tokenizer):
    mlm = Body(tiny.make_bert(tmp_path / "mlm", tokenizer, masked_lm=True))
    bare = Body(tiny.make_bert(tmp_path / "bare", tokenizer))
    assert base_model_prefix(tmp_path / "mlm") == "bert"
    assert mlm.heads and all(h.startswith("cls.") for h in mlm.heads)
    assert set(mlm.names()) <= set(bare.names())
    assert set(bare.names()) - set(mlm.names()) == {"pooler.dense.weight", "pooler.dense.bias"}


def test_pytorch_bin_is_refused(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightError, match="safetensors"):
        Checkpoint(tmp_path)
    with pytest.raises(WeightError, match="no model.safetensors"):
        Checkpoint(tmp_path / "missing")


def test_checkpoint_reports_unknown_tensor(tiny_retriever):
    with pytest.raises(WeightError, match="nope"):
        Checkpoint(tiny_retriever).shape("nope")


def _write(out: Path, tensors: dict[str, torch.Tensor], max_bytes: int) -> list[Path]:
    writer = ShardWriter(out, max_shard_bytes=max_bytes)
    for name, t in tensors.items():
        writer.add(name, t)
    return writer.close()


def test_shard_writer_single_file(tmp_path):
    files = _write(tmp_path, {"a": torch.ones(3), "b": torch.zeros(2, 2)}, 1 << 20)
    assert files == [tmp_path / "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert torch.equal(Checkpoint(tmp_path).get("b"), torch.zeros(2, 2))


def test_shard_writer_refuses_duplicates(tmp_path):
    writer = ShardWriter(tmp_path)
    writer.add("a", torch.ones(1))
    with pytest.raises(WeightError, match="tensor a written twice"):
        writer.add("a", torch.ones(1))


def test_shard_writer_shards_load_with_transformers(tmp_path, tiny_retriever):
    from transformers import AutoModel

    source = Checkpoint(tiny_retriever)
    out = tmp_path / "sharded"
    files = _write(out, {n: source.get(n) for n in source.names()}, 40_000)
    assert len(files) > 3
    assert files[0].name == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(source.names())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    assert index["metadata"]["total_size"] == sum(source.nbytes(n) for n in source.names())
    assert not list(out.glob(".shard-*"))
    (out / "config.json").write_text((tiny_retriever / "config.json").read_text())
    model = AutoModel.from_pretrained(out)
    sd = model.state_dict()
    assert all(torch.equal(sd[n], source.get(n)) for n in source.names())
    assert sorted(Checkpoint(out).names()) == sorted(source.names())


def test_lora_product_layouts():
    a, b = torch.randn(2, 5), torch.randn(3, 2)
    assert torch.allclose(lora_product(a, b, 0.5, embedding=False), 0.5 * b @ a)
    assert lora_product(a, b, 1.0, embedding=True).shape == (5, 3)


def test_dora_update_rescales_rows():
    weight = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=torch.float64)
    lora = torch.zeros_like(weight)
    magnitude = torch.tensor([10.0, 1.0], dtype=torch.float64)
    psi = dora_update(weight, lora, magnitude, embedding=False)
    assert torch.allclose(weight + psi, torch.tensor([[6.0, 8.0], [0.0, 1.0]], dtype=torch.float64))
    # Magnitudes equal to the row norms leave the weight as it is.
    same = dora_update(weight, lora, torch.tensor([5.0, 2.0], dtype=torch.float64), False)
    assert torch.allclose(same, torch.zeros_like(weight))
    # Embeddings (num, dim) are normed per column.
    cols = dora_update(weight, lora, torch.tensor([3.0, 1.0], dtype=torch.float64), True)
    want = torch.tensor([[3.0, 4 / (20**0.5)], [0.0, 2 / (20**0.5)]], dtype=torch.float64)
    assert torch.allclose(weight + cols, want)


def test_dora_update_matches_peft_layer():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 4, bias=False))
    config = LoraConfig(use_dora=True, r=2, lora_alpha=4, target_modules=["0"])
    peft_model = get_peft_model(net, config)
    layer = peft_model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        layer.lora_magnitude_vector["default"].weight.mul_(1.3)
    w = layer.base_layer.weight.detach().double()
    a = layer.lora_A["default"].weight.detach().double()
    b = layer.lora_B["default"].weight.detach().double()
    m = layer.lora_magnitude_vector["default"].weight.detach().double()
    psi = dora_update(w, lora_product(a, b, 2.0, False), m, False)
    merged = peft_model.merge_and_unload()[0].weight.detach().double()
    torch.testing.assert_close(w + psi, merged, atol=1e-6, rtol=0)


def test_rank_and_alpha_patterns():
    patterns = {"q_proj": 8, r"layers\.1\.mlp\.up_proj": 2}
    assert _pattern_value(patterns, "model.layers.0.self_attn.q_proj", 4) == 8
    assert _pattern_value(patterns, "model.layers.1.mlp.up_proj", 4) == 2
    assert _pattern_value(patterns, "model.layers.0.mlp.up_proj", 4) == 4
    assert _pattern_value(patterns, "model.layers.0.self_attn.xq_proj", 4) == 4


def _mixed() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "w": torch.randn(5, 3).to(torch.bfloat16),
        "d": torch.randn(7, dtype=torch.float64),
        "i": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "b": torch.tensor([True, False, True]),
        "s": torch.tensor(2.5),
        "e": torch.zeros(0, 4),
    }


@pytest.mark.parametrize("streamed", [False, True], ids=["buffered", "layout"])
def test_shard_writer_files_read_by_safetensors(tmp_path, streamed):
    from safetensors.torch import load_file

    tensors = _mixed()
    layout = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()] if streamed else None
    with ShardWriter(tmp_path, max_shard_bytes=60, layout=layout) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    files = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(files) == 3  # w (30 B) | d (56 B) | i, b, s, e (48 + 3 + 4 + 0 B)
    loaded = {k: v for f in files for k, v in load_file(f).items()}
    ours = Checkpoint(tmp_path)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)
        assert torch.equal(ours.get(name), tensor)


@pytest.mark.parametrize("streamed", [False, True], ids=["buffered", "layout"])
def test_a_shard_filled_exactly_is_not_split_and_tensor_bytes_are_aligned(tmp_path, streamed):
    """Both writers cut shards alike (a layout's plan as tensors come), at max_shard_bytes
    inclusive; every header is padded so that tensor bytes start 8-byte aligned, as safetensors
    and memory-mapping loaders expect."""
    import struct

    from safetensors.torch import load_file

    tensors = {name: torch.full((4,), float(i)) for i, name in enumerate("abc")}  # 16 B each
    layout = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()] if streamed else None
    with ShardWriter(tmp_path, max_shard_bytes=32, layout=layout) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    files = sorted(tmp_path.glob("model-*.safetensors"))
    assert [sorted(load_file(f)) for f in files] == [["a", "b"], ["c"]]
    for f in files:
        assert struct.unpack("<Q", f.read_bytes()[:8])[0] % 8 == 0


def test_shard_writer_holds_to_its_layout(tmp_path):
    layout = [("a", (2,), torch.float32), ("b", (3,), torch.float32)]
    with pytest.raises(WeightError, match="layout has"):
        with ShardWriter(tmp_path / "order", layout=layout) as writer:
            writer.add("b", torch.zeros(3))
    with pytest.raises(WeightError, match="layout has"):
        ShardWriter(tmp_path / "dtype", layout=layout).add("a", torch.zeros(2).double())
    writer = ShardWriter(tmp_path / "short", layout=layout)
    writer.add("a", torch.zeros(2))
    with pytest.raises(WeightError, match=r"never written: \['b'\]"):
        writer.close()
    writer = ShardWriter(tmp_path / "long", layout=layout[:1])
    writer.add("a", torch.zeros(2))
    with pytest.raises(WeightError, match="not in the layout"):
        writer.add("b", torch.zeros(3))


def test_checkpoint_keeps_no_file_open(tiny_retriever):
    # Reads go into the tensors' own memory: no map or handle of the file stays behind.
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        pytest.skip("needs /proc")
    before = len(list(fds.iterdir()))
    source = Checkpoint(tiny_retriever)
    tensors = {n: source.get(n) for n in source.names()}
    assert len(list(fds.iterdir())) == before
    tensors["norm.weight"].add_(1)  # writable, and the file is unchanged
    assert not torch.equal(source.get("norm.weight"), tensors["norm.weight"])


def test_truncated_file_is_an_error(tmp_path, tiny_retriever):
    data = (tiny_retriever / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(WeightError, match=r"model\.safetensors: its header .* \(cut short\)"):
        Checkpoint(tmp_path)  # found from the header, before any tensor is read
    (tmp_path / "model.safetensors").write_bytes(data)
    ckpt = Checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 100])  # cut after opening
    last = max(ckpt.names(), key=lambda n: ckpt._info(n)["data_offsets"][1])
    with pytest.raises(WeightError, match="ends before"):
        ckpt.get(last)


def _rewrite_header(path: Path, edit) -> None:
    """``path`` with its safetensors header changed by ``edit(header)``, tensor bytes kept."""
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size :])


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda h: h.__setitem__("norm.weight", 5),
            "malformed header entry for tensor norm.weight",
        ),
        (lambda h: h["norm.weight"].pop("data_offsets"), "malformed header entry"),
        (
            lambda h: h["norm.weight"].__setitem__("shape", [3]),
            r"norm\.weight .* has \d+ bytes, not 12",
        ),
        (
            lambda h: h["norm.weight"].__setitem__(
                "data_offsets",
                [0, h["norm.weight"]["data_offsets"][1] - h["norm.weight"]["data_offsets"][0]],
            ),
            "overlapping or missing bytes",
        ),
    ],
)
def test_a_malformed_header_is_refused_naming_file_and_tensor(
    tmp_path, tiny_retriever, edit, message
):
    shutil.copy(tiny_retriever / "model.safetensors", tmp_path / "model.safetensors")
    _rewrite_header(tmp_path / "model.safetensors", edit)
    with pytest.raises(WeightError, match=message):
        Checkpoint(tmp_path)


def test_a_shard_index_must_agree_with_its_shards(tmp_path, tiny_retriever):
    tensors = load_file(tiny_retriever / "model.safetensors")
    names = sorted(tensors)
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    save_file({n: tensors[n] for n in first}, tmp_path / "a.safetensors")
    save_file({n: tensors[n] for n in second}, tmp_path / "b.safetensors")
    weight_map = {**dict.fromkeys(first, "a.safetensors"), **dict.fromkeys(second, "b.safetensors")}
    index = tmp_path / "model.safetensors.index.json"

    def write_index(mapping) -> None:
        index.write_text(json.dumps({"metadata": {}, "weight_map": mapping}))

    write_index(weight_map)
    assert sorted(Checkpoint(tmp_path).names()) == names
    save_file({**{n: tensors[n] for n in second}, first[0]: torch.zeros_like(tensors[first[0]])},
              tmp_path / "b.safetensors")  # fmt: skip
    with pytest.raises(WeightError, match=f"tensor {re.escape(first[0])} is in both"):
        Checkpoint(tmp_path)  # a second copy (zeros) in another shard
    save_file({n: tensors[n] for n in second}, tmp_path / "b.safetensors")
    write_index({**weight_map, first[0]: "b.safetensors"})
    with pytest.raises(
        WeightError, match="which model.safetensors.index.json maps to 'b.safetensors'"
    ):
        Checkpoint(tmp_path)
    write_index({**weight_map, "extra.weight": "a.safetensors"})  # a stale entry: tolerated
    assert sorted(Checkpoint(tmp_path).names()) == names
    index.write_text('{"weight_map": ')
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json:1: not valid JSON"):
        Checkpoint(tmp_path)
    index.write_text('{"metadata": {}}')
    with pytest.raises(WeightError, match="no weight_map"):
        Checkpoint(tmp_path)


@pytest.fixture
def small_pieces(monkeypatch):
    """Reads of more than 1,000 bytes go in pieces, three threads at a time."""
    from readaptir import shards

    monkeypatch.setattr(shards, "READ_PIECE", 1000)
    monkeypatch.setattr(shards, "READ_THREADS", 3)


def test_tensors_read_in_pieces_are_the_stored_bytes(small_pieces, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    stored = {"a": torch.randn(1237, 7), "b": torch.arange(5), "c": torch.randn(3, 333).half()}
    save_file(stored, tmp_path / "model.safetensors")
    ckpt = Checkpoint(tmp_path)
    for name, tensor in stored.items():  # pieces of 1,000 bytes cut across elements and rows
        assert torch.equal(ckpt.get(name), tensor)


def test_truncated_file_read_in_pieces_is_an_error(small_pieces, tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.randn(100, 40)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    ckpt = Checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 100])  # cut after opening
    with pytest.raises(WeightError, match="model.safetensors ends before"):
        ckpt.get("w")  # 16 pieces; the last comes up short


def _stored_bytes(ckpt: Checkpoint, name: str) -> bytes:
    # plain bytes: pickling a tensor would copy it with OpenMP, which a forked child cannot use
    # once its parent has
    return ckpt.get(name).view(torch.uint8).numpy().tobytes()


def test_a_forked_child_reads_in_pieces(small_pieces, tiny_retriever):
    # The parent's reading threads do not exist in a forked child (a DataLoader worker, say):
    # the child must start its own rather than wait forever on theirs.
    import multiprocessing

    from readaptir.shards import _Readers

    ckpt = Checkpoint(tiny_retriever)
    name = max(ckpt.names(), key=ckpt.nbytes)
    want = _stored_bytes(ckpt, name)  # the parent's threads now exist
    with _Readers._lock:  # as if another thread were starting a read at the fork
        pool = multiprocessing.get_context("fork").Pool(1)
    with pool:
        got = pool.apply_async(_stored_bytes, (ckpt, name)).get(timeout=30)
    assert got == want


def test_buffer_pool_copies_to_host_and_reuses_memory():
    from readaptir.shards import BufferPool

    pool = BufferPool(min_bytes=64)
    for tensor in (torch.randn(40, 3), torch.tensor([True, False] * 50), torch.tensor(2.5)):
        host = pool.to_host(tensor)
        assert host.dtype == tensor.dtype and torch.equal(host, tensor)
        pool.give(host)
    big = pool.to_host(torch.ones(64))  # 256 bytes: the 480 given back above serve again
    assert big.untyped_storage().nbytes() == 40 * 3 * 4


@pytest.mark.parametrize("kind", ["lora", "dora", "lora-embedding", "dora-embedding"])
def test_add_psi_equals_the_reference_maths(kind):
    from readaptir.lora import TargetUpdate, add_psi

    torch.manual_seed(1)
    embedding = kind.endswith("embedding")
    weight = torch.randn(6, 5, dtype=torch.float64)
    a = torch.randn(2, 6 if embedding else 5, dtype=torch.float64)
    b = torch.randn(5 if embedding else 6, 2, dtype=torch.float64)
    m = torch.rand(5 if embedding else 6, dtype=torch.float64) + 1 if "dora" in kind else None
    lora = lora_product(a, b, 0.5, embedding)
    want = dora_update(weight, lora, m, embedding) if m is not None else lora
    update = TargetUpdate(scaling=0.5, a=a, b=b, magnitude=m, embedding=embedding)
    acc = torch.ones_like(weight)
    torch.testing.assert_close(add_psi(acc, 0.3, update, weight, ...), 1 + 0.3 * want)
    if update.row_local:  # a block of rows needs only those rows of Θ
        rows = slice(2, 5)
        got = add_psi(torch.zeros(3, 5, dtype=torch.float64), 1.0, update, weight[rows], rows)
        torch.testing.assert_close(got, want[rows])


def test_add_psi_of_a_saved_module_or_bias_is_its_change_from_theta():
    """A saved module or trained bias R gives Ψ = R − Θ, scaled by the coefficient as a whole; a
    LoRA bias on top adds scaling · b."""
    from readaptir.lora import TargetUpdate, add_psi

    torch.manual_seed(2)
    theta, r, b = (torch.randn(4, 3, dtype=torch.float64) for _ in range(3))
    saved = TargetUpdate(scaling=0.5, replacement=r)
    got = add_psi(torch.ones_like(theta), 0.3, saved, theta, ...)
    torch.testing.assert_close(got, 1 + 0.3 * (r - theta))
    both = TargetUpdate(scaling=0.5, replacement=r, added=b)
    got = add_psi(torch.ones_like(theta), 0.3, both, theta, ...)
    torch.testing.assert_close(got, 1 + 0.3 * (r - theta) + 0.3 * 0.5 * b)


def _safetensors(spans: list[tuple[int, int]], data: int) -> bytes:
    """A safetensors file of float32 tensors t0, t1, ... at ``spans`` of ``data`` bytes."""
    header = {
        f"t{i}": {"dtype": "F32", "shape": [(end - begin) // 4], "data_offsets": [begin, end]}
        for i, (begin, end) in enumerate(spans)
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + bytes(data)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (_safetensors([(0, 8), (12, 20)], 20), r"t1 starts at byte 12 of the tensor data, not 8"),
        (_safetensors([(0, 8)], 12), r"describes 8 bytes of tensor data, the file holds 12"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n", "git-lfs pointer"),
        (b"abc", "not a safetensors file"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json here!}", "unreadable safetensors header"),
    ],
    ids=["gap", "trailing-bytes", "lfs-pointer", "truncated", "bad-json"],
)
def test_broken_safetensors_name_the_file(tmp_path, content, message):
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(WeightError, match=rf"model\.safetensors.*{message}"):
        Checkpoint(tmp_path)


def test_head_outside_the_body_must_be_an_lm_head():
    names = ["model.layers.0.mlp.up_proj.weight", "lm_head.weight", "proj.weight"]
    with pytest.raises(WeightError, match=r"retr: tensor proj\.weight is neither in the model"):
        split_head(names, "model", "retr", heads={"lm_head.weight"})


def test_lm_heads_come_from_the_architecture(tmp_path):
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    config = DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    DistilBertForMaskedLM(config).save_pretrained(tmp_path / "distil")
    body = Body(tmp_path / "distil")  # its MLM head is vocab_transform/_layer_norm/_projector
    assert body.heads and all(h.startswith("vocab_") for h in body.heads)
    assert "vocab_projector.weight" in lm_head_names(tmp_path / "distil")


def test_tied_embeddings_default_is_the_architectures(tmp_path, tiny_base):
    config = json.loads((tiny_base / "config.json").read_text())
    del config["tie_word_embeddings"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert ties_embeddings(tmp_path) is False  # Llama's own default, not transformers' generic one

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
from tokenizers import processors

from readaptir.corpus import load_corpus, passage_text
from readaptir.families import Encoding, resolve_encoding
from readaptir.models import load_encoder
from readaptir.stages.embed import (
    STConfig,
    embed,
    encode_texts,
    last_token_index,
    load_embeddings,
    load_queries_embeddings,
    pad_batch,
    plan_batches,
    pool,
    read_st_config,
    resolve_fields,
    tokenize,
)

TEXTS = [
    "what is a gene?",
    "Rivers carry water from mountains to the ocean, shaping valleys and supporting forests.",
    "x",
    " ".join(["protein energy market signal"] * 120),  # longer than MiniLM's 256-token limit
    "Court rulings on music and film copyright law.",
]


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return load_encoder(minilm_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def st_model(minilm_dir):
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(minilm_dir), device="cpu")


def test_st_config_read_from_model_folder(minilm_dir):
    st = read_st_config(minilm_dir)
    assert st == STConfig(pooling="mean", normalize=True, max_seq_length=256)
    resolved = resolve_fields(resolve_encoding("sentence-transformers"), st)
    assert (resolved.pooling, resolved.normalize, resolved.max_passage_length) == (
        "mean",
        True,
        256,
    )


def test_st_config_newer_layout(tmp_path):
    (tmp_path / "1_Pooling").mkdir()
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.x.Pooling"},
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "lasttoken"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    assert read_st_config(tmp_path) == STConfig("lasttoken", normalize=False, max_seq_length=128)
    resolved = resolve_fields(resolve_encoding("sentence-transformers"), read_st_config(tmp_path))
    assert (resolved.pooling, resolved.normalize, resolved.max_query_length) == ("last", False, 128)
    with pytest.raises(ValueError, match="'max' is not supported"):
        resolve_fields(resolve_encoding("sentence-transformers"), STConfig("max", True, 10))


def test_missing_st_files_fall_back_with_a_warning(tiny_retriever, caplog):
    assert read_st_config(tiny_retriever) is None
    with caplog.at_level(logging.WARNING, logger="readaptir.stages.embed"):
        resolved = resolve_fields(resolve_encoding("sentence-transformers"), None)
    assert (resolved.pooling, resolved.normalize, resolved.max_passage_length) == (
        "mean",
        True,
        512,
    )
    assert "pooling" in caplog.text and "max_query_length" in caplog.text
    # Fields the recipe sets win over the model's files.
    explicit = resolve_fields(
        Encoding(pooling="cls", max_query_length=32), STConfig("mean", True, 9)
    )
    assert (explicit.pooling, explicit.max_query_length, explicit.max_passage_length) == (
        "cls",
        32,
        512,
    )


def test_minilm_matches_sentence_transformers(minilm, minilm_dir, st_model):
    model, tok = minilm
    resolved = resolve_fields(resolve_encoding("sentence-transformers"), read_st_config(minilm_dir))
    ours = encode_texts(
        model,
        tok,
        TEXTS,
        pooling=resolved.pooling,
        normalize=resolved.normalize,
        max_length=resolved.max_passage_length,
        batch_tokens=300,  # several batches of different widths
    )
    theirs = st_model.encode(TEXTS, convert_to_numpy=True, batch_size=2)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_plan_batches_respects_the_token_budget():
    lengths = [5, 40, 3, 40, 12, 7, 100, 1]
    batches = plan_batches(lengths, batch_tokens=80)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [6]  # too long for the budget: alone, and first
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 80


def test_pooling_is_the_same_on_either_padding_side():
    torch.manual_seed(0)
    seqs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    table = torch.randn(11, 4)
    for pooling in ("last", "mean", "cls"):
        out = {}
        for side in ("right", "left"):
            ids, mask = pad_batch(seqs, pad_id=0, side=side)
            out[side] = pool(table[ids], mask, pooling)
        torch.testing.assert_close(out["right"], out["left"])
        expect = {
            "last": table[[3, 5, 10]],
            "cls": table[[1, 4, 6]],
            "mean": torch.stack([table[s].mean(0) for s in seqs]),
        }[pooling]
        torch.testing.assert_close(out["right"], expect)


def test_last_token_pooling_takes_eos(tiny_retriever):
    model, tok = load_encoder(tiny_retriever)
    texts = ["cell", "river mountain market price engine", "gene data"]
    seqs = tokenize(tok, texts, max_length=64, append_eos=True)
    assert all(s[-1] == tok.eos_token_id and s.count(tok.eos_token_id) == 1 for s in seqs)
    assert tok.padding_side == "right"
    ids, mask = pad_batch(seqs, tok.pad_token_id, tok.padding_side)
    assert len({len(s) for s in seqs}) == 3  # really padded
    pooled_ids = ids[torch.arange(len(seqs)), last_token_index(mask)]
    assert pooled_ids.tolist() == [tok.eos_token_id] * len(seqs)

    # The batched vectors equal the EOS state of each text run alone, without padding.
    vecs = encode_texts(
        model, tok, texts, pooling="last", normalize=False, max_length=64, append_eos=True
    )
    with torch.inference_mode():
        for row, s in enumerate(seqs):
            alone = model(input_ids=torch.tensor([s])).last_hidden_state[0, -1]
            np.testing.assert_allclose(vecs[row], alone.numpy(), atol=1e-5)


def test_eos_survives_truncation_and_is_never_doubled(tokenizer):
    long = " ".join(["protein cell gene"] * 50)
    (seq,) = tokenize(tokenizer, [long], max_length=8, append_eos=True)
    assert len(seq) == 8 and seq[-1] == tokenizer.eos_token_id
    # A tokenizer whose own post-processor already appends EOS.
    appends = copy.deepcopy(tokenizer)
    eos = appends.eos_token_id
    appends.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", appends.bos_token_id), ("</s>", eos)]
    )
    assert appends("cell gene")["input_ids"][-1] == eos
    for max_length in (8, 64):
        (seq,) = tokenize(appends, [long if max_length == 8 else "cell gene"], max_length, True)
        assert seq[-1] == eos and seq.count(eos) == 1 and len(seq) <= max_length


def test_embed_writes_float16_shards(tiny_retriever, tiny_beir, tmp_path):
    encoding = resolve_encoding("repllama")
    out = tmp_path / "emb"
    info = embed(tiny_retriever, tiny_beir, "test", encoding, out, shard_size=5, batch_tokens=64)
    assert info["shards"] == 3 and info["passages"] == 12 and info["queries"] == 4
    assert sorted(p.name for p in out.glob("corpus-*.npy")) == [
        "corpus-00000.npy",
        "corpus-00001.npy",
        "corpus-00002.npy",
    ]
    assert json.loads((out / "info.json").read_text()) == info
    assert info["resolved"] == {
        "pooling": "last",
        "normalize": True,
        "max_query_length": 512,
        "max_passage_length": 512,
    }
    assert info["encoding"] == encoding.model_dump()
    shards = list(load_embeddings(out))
    assert [len(ids) for ids, _ in shards] == [5, 5, 2]
    assert [i for ids, _ in shards for i in ids] == [f"d{i}" for i in range(12)]
    assert all(v.dtype == np.float16 and v.shape[1] == info["dim"] for _, v in shards)
    qids, qvecs = load_queries_embeddings(out)
    assert (
        qids == ["q0", "q1", "q2", "q3"] and qvecs.shape
    )  # q4 has no judgments == (4, info["dim"])

    # The stored vectors are the float32 encodings rounded to float16.
    model, tok = load_encoder(tiny_retriever)
    texts = [passage_text(p, encoding.passage_template) for p in load_corpus(tiny_beir)]
    full = encode_texts(
        model, tok, texts, pooling="last", normalize=True, max_length=512, append_eos=True
    )
    stored = np.concatenate([v for _, v in shards]).astype(np.float32)
    np.testing.assert_allclose(stored, full, atol=1e-3, rtol=1e-3)

    with pytest.raises(FileExistsError):
        embed(tiny_retriever, tiny_beir, "test", encoding, out)


def test_embed_sentence_transformers_family(minilm_dir, st_model, tiny_beir, tmp_path):
    encoding = resolve_encoding("sentence-transformers")
    info = embed(minilm_dir, tiny_beir, "test", encoding, tmp_path / "emb")
    assert info["resolved"]["max_passage_length"] == 256 and info["dim"] == 384
    texts = [passage_text(p, "{title} {text}") for p in load_corpus(tiny_beir)]
    ((_, stored),) = load_embeddings(tmp_path / "emb")
    theirs = st_model.encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(stored.astype(np.float32), theirs, atol=1e-3)

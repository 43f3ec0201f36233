from __future__ import annotations

import copy
import functools
import json
import logging
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_ranks, write_beir
from safetensors.torch import load_file, save_file
from tokenizers import processors
from transformers import AutoModel

from readaptir.corpus import (
    CorpusError,
    iter_passages,
    load_corpus,
    load_judgments,
    load_queries,
    passage_text,
    query_text,
)
from readaptir.encoding import (
    appends_eos,
    encode_ids,
    encode_texts,
    last_token_index,
    pad_batch,
    plan_batches,
    pool,
    tokenize,
)
from readaptir.families import Encoding, resolve_encoding
from readaptir.models import load_encoder
from readaptir.st_config import STConfig, read_st_config, resolve_fields
from readaptir.stages import embed as embed_module
from readaptir.stages.embed import embed, embed_corpus, judged_queries
from readaptir.vectors import load_embeddings, load_queries_embeddings

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
    # no Normalize module and no similarity_fn_name: sentence-transformers' default, cosine
    assert read_st_config(tmp_path) == STConfig("lasttoken", normalize=False, max_seq_length=128)
    resolved = resolve_fields(resolve_encoding("sentence-transformers"), read_st_config(tmp_path))
    assert (resolved.pooling, resolved.normalize, resolved.max_query_length) == ("last", True, 128)
    with pytest.raises(ValueError, match="'max' is not supported"):
        resolve_fields(resolve_encoding("sentence-transformers"), STConfig("max", True, 10))


def st_modules(*extra: dict) -> list[dict]:
    """modules.json of a Transformer and its Pooling (in ``1_Pooling``), then ``extra``."""
    return [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
        *extra,
    ]


def test_st_max_length_defaults_as_sentence_transformers_does(tiny_retriever, tmp_path):
    """No max_seq_length in sentence_bert_config.json: the smaller of the position table and the
    tokenizer's limit, both where known, checked against sentence-transformers itself."""
    st_lib = pytest.importorskip("sentence_transformers")
    folder = shutil.copytree(tiny_retriever, tmp_path / "st")
    (folder / "1_Pooling").mkdir()
    (folder / "modules.json").write_text(json.dumps(st_modules()))
    pooling = {"pooling_mode": "lasttoken", "word_embedding_dimension": 64}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    tok_file = folder / "tokenizer_config.json"
    tok_config = json.loads(tok_file.read_text())
    positions = json.loads((folder / "config.json").read_text())["max_position_embeddings"]
    assert positions == 1024
    # no tokenizer limit (transformers' sentinel), one above the positions, one below
    for tokenizer_limit, expected in ((int(1e30), 1024), (2048, 1024), (64, 64)):
        tok_file.write_text(json.dumps({**tok_config, "model_max_length": tokenizer_limit}))
        assert read_st_config(folder).max_seq_length == expected
        model = st_lib.SentenceTransformer(str(folder), device="cpu")
        assert model.max_seq_length == expected


def test_st_modules_and_prompts_not_reproduced_are_refused(tmp_path):
    (tmp_path / "1_Pooling").mkdir()
    dense = {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    modules = st_modules(dense)
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "mean"}))
    with pytest.raises(ValueError, match=r"modules\.json: module 2_Dense .*not applied here"):
        read_st_config(tmp_path)

    (tmp_path / "modules.json").write_text(json.dumps(modules[:2]))
    prompts = {"prompts": {"query": "query: ", "passage": "passage: "}, "default_prompt_name": None}
    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps(prompts))
    st = read_st_config(tmp_path)
    assert (st.query_prompt, st.passage_prompt) == ("query: ", "passage: ")
    preset = resolve_encoding("sentence-transformers")
    with pytest.raises(ValueError, match=r"prompt 'query: '.*query_template.*'query: \{text\}'"):
        resolve_fields(preset, st)
    carried = resolve_encoding(
        "sentence-transformers",
        {"query_template": "query: {text}", "passage_template": "passage: {title} {text}"},
    )
    assert resolve_fields(carried, st).pooling == "mean"
    # an instruction of the recipe's own (per collection, as MTEB gives them) in place of the
    # model's default prompt is the user's choice: said, not refused
    e5_style = resolve_encoding(
        "sentence-transformers",
        {"query_template": "Instruct: {instruction}\nQuery: {text}",
         "query_instruction": "Given a claim, find documents",
         "passage_template": "passage: {title} {text}"},
    )  # fmt: skip
    assert resolve_fields(e5_style, st).pooling == "mean"
    default_only = {"prompts": {"retrieval": "Represent: "}, "default_prompt_name": "retrieval"}
    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps(default_only))
    st = read_st_config(tmp_path)
    assert (st.query_prompt, st.passage_prompt) == ("Represent: ", "Represent: ")


@pytest.mark.parametrize(
    "similarity, normalize_module, normalized",
    [(None, False, True), ("cosine", False, True), ("dot", False, False), ("dot", True, True),
     ("euclidean", True, True)],
)  # fmt: skip
def test_st_models_score_as_their_own_similarity(
    minilm, minilm_dir, tmp_path, caplog, similarity, normalize_module, normalized
):
    """The search's dot products of our vectors rank as sentence-transformers' model.similarity
    does: cosine unless config_sentence_transformers.json names another function."""
    st_lib = pytest.importorskip("sentence_transformers")
    folder = shutil.copytree(minilm_dir, tmp_path / "st")
    modules = json.loads((folder / "modules.json").read_text())
    kept = [m for m in modules if normalize_module or not m["type"].endswith(".Normalize")]
    (folder / "modules.json").write_text(json.dumps(kept))
    settings = {} if similarity is None else {"similarity_fn_name": similarity}
    (folder / "config_sentence_transformers.json").write_text(json.dumps(settings))
    with caplog.at_level(logging.WARNING, logger="readaptir.st_config"):
        resolved = resolve_fields(resolve_encoding("sentence-transformers"), read_st_config(folder))
    assert resolved.normalize is normalized
    unset = similarity is None and not normalize_module
    assert ("names no similarity_fn_name" in caplog.text) == unset
    model, tok = minilm
    queries, passages = TEXTS[:2], TEXTS[2:]
    kw = dict(pooling=resolved.pooling, normalize=resolved.normalize, max_length=256)
    ours = encode_texts(model, tok, queries, **kw) @ encode_texts(model, tok, passages, **kw).T
    st_model = st_lib.SentenceTransformer(str(folder), device="cpu")
    theirs = st_model.similarity(st_model.encode(queries), st_model.encode(passages)).numpy()
    if similarity == "euclidean":  # a negated distance: the same order as the cosine
        np.testing.assert_array_equal(np.argsort(ours, axis=1), np.argsort(theirs, axis=1))
    else:
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize(
    "similarity, normalize_module", [("manhattan", True), ("euclidean", False)]
)
def test_st_similarities_the_search_cannot_rank_by_are_refused(
    tmp_path, similarity, normalize_module
):
    (tmp_path / "modules.json").write_text(
        json.dumps(st_modules(*[{"path": "2", "type": "x.Normalize"}] * normalize_module))
    )
    settings = {"similarity_fn_name": similarity}
    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps(settings))
    with pytest.raises(
        ValueError, match=rf"config_sentence_transformers\.json: similarity_fn_name '{similarity}'"
    ):
        resolve_fields(resolve_encoding("sentence-transformers"), read_st_config(tmp_path))
    explicit = resolve_fields(Encoding(normalize=False), read_st_config(tmp_path))
    assert explicit.normalize is False  # the recipe's choice: searched by dot product


def test_missing_st_files_fall_back_with_a_warning(tiny_retriever, caplog):
    assert read_st_config(tiny_retriever) is None
    with caplog.at_level(logging.WARNING, logger="readaptir.st_config"):
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


def test_settings_unlike_the_models_own_files_are_warned_about(minilm_dir, caplog):
    """A family's fixed preset over a sentence-transformers model made to be used otherwise."""
    st = read_st_config(minilm_dir)  # mean pooling, unit vectors, 256 tokens
    cases = {
        "sentence-transformers": None,  # takes the model's own: nothing to say
        "custom": "max_query_length 512 (the model's: 256); max_passage_length 512",
    }
    for family, said in cases.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="readaptir.st_config"):
            resolve_fields(resolve_encoding(family), st)
        assert (said in caplog.text) if said else not caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="readaptir.st_config"):
        resolve_fields(
            Encoding(pooling="cls", normalize=False, max_passage_length=128), st, ("passage",)
        )
    assert (
        "sets pooling cls (the model's: mean); normalize False (the model's: True)" in caplog.text
    )
    assert "max_passage_length" not in caplog.text  # a shorter length is the recipe's to choose


def test_last_token_pooling_without_an_eos_is_warned_about(tiny_retriever, caplog):
    for family, overrides, warned in (
        ("repllama", FLOAT32, False),
        ("custom", {**FLOAT32, "pooling": "last"}, True),
    ):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="readaptir.stages.embed"):
            embed_module.Encoder.load(tiny_retriever, resolve_encoding(family, overrides))
        assert ("last-token pooling of texts that end without an EOS" in caplog.text) == warned


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
    left = copy.deepcopy(tok)  # a tokenizer saved to pad on the left: MiniLM's positions are
    left.padding_side = "left"  # absolute, so the batches must still be padded on the right
    ours = encode_texts(
        model, left, TEXTS, pooling="mean", normalize=True, max_length=256, batch_tokens=300
    )
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

    # The batched vectors equal the EOS state of each text run alone, without padding, whether
    # the tokenizer appends EOS itself or not, and whichever padding side it asks for.
    left = copy.deepcopy(tok)
    left.padding_side = "left"
    for variant in (tok, _appending_eos(tok), left):
        vecs = encode_texts(
            model, variant, texts, pooling="last", normalize=False, max_length=64, append_eos=True
        )
        with torch.inference_mode():
            for row, s in enumerate(seqs):
                alone = model(input_ids=torch.tensor([s])).last_hidden_state[0, -1]
                np.testing.assert_allclose(vecs[row], alone.numpy(), atol=1e-5)


def _appending_eos(tokenizer):
    """A copy of ``tokenizer`` whose own post-processor appends EOS (as older transformers did for
    Llama/Mistral tokenizers configured with ``add_eos_token``)."""
    appends = copy.deepcopy(tokenizer)
    bos, eos = appends.bos_token_id, appends.eos_token_id
    appends.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    return appends


def test_eos_survives_truncation_and_is_never_doubled(tokenizer):
    long = " ".join(["protein cell gene"] * 50)
    texts = ["cell gene", long, "", "river </s>"]
    appends = _appending_eos(tokenizer)
    assert not appends_eos(tokenizer) and appends_eos(appends)
    eos = tokenizer.eos_token_id
    for max_length in (8, 64):
        plain = tokenize(tokenizer, texts, max_length, append_eos=True)
        own = tokenize(appends, texts, max_length, append_eos=True)
        # Whoever appends it, each sequence ends with exactly one EOS and the ids agree.
        assert plain == own
        for seq in plain:
            assert seq[-1] == eos and seq.count(eos) == 1 and len(seq) <= max_length
        assert len(plain[1]) == max_length  # truncated texts use the whole budget
    with pytest.raises(ValueError, match="no room for EOS"):
        tokenize(tokenizer, texts, 1, append_eos=True)


def test_lowercase_before_tokenizing(tokenizer, tmp_path):
    assert tokenize(tokenizer, ["Cell GENE"], 16, False, lowercase=True) == tokenize(
        tokenizer, ["cell gene"], 16, False
    )
    (tmp_path / "modules.json").write_text(json.dumps([{"path": "", "type": "x.Transformer"}]))
    (tmp_path / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 64, "do_lower_case": True})
    )
    st = read_st_config(tmp_path)
    assert st == STConfig(None, False, 64, do_lower_case=True)
    assert resolve_fields(resolve_encoding("sentence-transformers"), st).lowercase is True
    # A recipe's explicit setting wins; other families never lower-case unless asked.
    assert not resolve_fields(Encoding(lowercase=False), st).lowercase
    assert not resolve_fields(resolve_encoding("repllama"), st).lowercase


def test_embed_writes_float16_shards(tiny_retriever, tiny_beir, tmp_path):
    encoding = resolve_encoding("repllama", {"dtype": "float32"})
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
        "lowercase": False,
    }
    assert info["encoding"] == encoding.model_dump()
    shards = list(load_embeddings(out))
    assert [len(ids) for ids, _ in shards] == [5, 5, 2]
    assert [i for ids, _ in shards for i in ids] == [f"d{i}" for i in range(12)]
    assert all(v.dtype == np.float16 and v.shape[1] == info["dim"] for _, v in shards)
    qids, qvecs = load_queries_embeddings(out)
    assert qids == ["q0", "q1", "q2", "q3"]  # q4 has no judgments
    assert qvecs.shape == (4, info["dim"]) and qvecs.dtype == np.float16

    # The stored vectors are the float32 encodings rounded to float16.
    model, tok = load_encoder(tiny_retriever)
    texts = [passage_text(p, encoding.passage_template) for p in load_corpus(tiny_beir)]
    full = encode_texts(
        model, tok, texts, pooling="last", normalize=True, max_length=512, append_eos=True
    )
    stored = np.concatenate([v for _, v in shards]).astype(np.float32)
    np.testing.assert_allclose(stored, full, atol=1e-3, rtol=1e-3)
    assert info["dtype"] == "float32"

    with pytest.raises(FileExistsError):
        embed(tiny_retriever, tiny_beir, "test", encoding, out)

    # the family's own precision (bf16 for a decoder), whatever the device: close, not equal
    info = embed(tiny_retriever, tiny_beir, "test", resolve_encoding("repllama"), tmp_path / "bf")
    assert info["dtype"] == "bfloat16"
    half = np.concatenate([v for _, v in load_embeddings(tmp_path / "bf")]).astype(np.float32)
    np.testing.assert_allclose(half, full, atol=3e-2)
    assert not np.allclose(half, full, atol=1e-3)


def test_embed_sentence_transformers_family(minilm_dir, st_model, tiny_beir, tmp_path):
    encoding = resolve_encoding("sentence-transformers")
    info = embed(minilm_dir, tiny_beir, "test", encoding, tmp_path / "emb")
    assert info["resolved"]["max_passage_length"] == 256 and info["dim"] == 384
    texts = [passage_text(p, "{title} {text}") for p in load_corpus(tiny_beir)]
    ((_, stored),) = load_embeddings(tmp_path / "emb")
    theirs = st_model.encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(stored.astype(np.float32), theirs, atol=1e-3)


def test_embed_streams_the_corpus_shard_by_shard(tiny_retriever, tiny_beir, tmp_path, monkeypatch):
    read = 0
    consumed_at_save: list[int] = []

    def counting(dataset_dir):
        nonlocal read
        for p in load_corpus(dataset_dir):
            read += 1
            yield p

    real_save = np.save

    def spy_save(path, arr):
        consumed_at_save.append(read)
        real_save(path, arr)

    monkeypatch.setattr(embed_module, "iter_passages", counting)
    monkeypatch.setattr(embed_module.np, "save", spy_save)
    info = embed(
        tiny_retriever,
        tiny_beir,
        "test",
        resolve_encoding("repllama"),
        tmp_path / "e",
        shard_size=5,
    )
    assert info["shards"] == 3
    # One shard is read ahead (on a thread, while the one before encodes), no more: when shard 0
    # is written at most passages 1-10 are read, then shards 1 and 2, then the queries.
    assert len(consumed_at_save) == 4 and 5 <= consumed_at_save[0] <= 10
    assert 10 <= consumed_at_save[1] <= 12 and consumed_at_save[2:] == [12, 12]


def test_one_shards_vectors_are_held_at_a_time(tiny_retriever, tiny_beir, tmp_path):
    """A shard's vectors (0.8 GB at 100k passages of a 7B model) are gone before the next shard
    encodes: the docstring's peak of one shard's vectors."""
    import gc
    import weakref

    encoding = resolve_encoding("repllama", FLOAT32)
    encoder = embed_module.Encoder.load(tiny_retriever, encoding, device="cpu")
    made, alive = [], []

    def encode(seqs, on_batch=None):
        gc.collect()
        alive.append(sum(ref() is not None for ref in made))
        vecs = np.zeros((len(seqs), 8), dtype=np.float16)
        made.append(weakref.ref(vecs))
        return vecs

    embed_corpus(
        replace(encoder, encode_tokens=encode), tiny_beir, encoding, tmp_path / "e", shard_size=5
    )
    assert alive == [0, 0, 0]


def test_a_last_shard_of_one_passage_is_encoded(tiny_retriever, tiny_beir, tmp_path):
    encoding = resolve_encoding("repllama", FLOAT32)
    info = embed(tiny_retriever, tiny_beir, "test", encoding, tmp_path / "e", shard_size=11)
    shards = list(load_embeddings(tmp_path / "e"))
    assert info["passages"] == 12 and [len(vecs) for _, vecs in shards] == [11, 1]
    embed(tiny_retriever, tiny_beir, "test", encoding, tmp_path / "whole")  # one shard
    ((ids, vecs),) = load_embeddings(tmp_path / "whole")
    assert [i for part, _ in shards for i in part] == ids
    got = np.concatenate([v for _, v in shards]).astype(np.float32)
    np.testing.assert_allclose(got, vecs.astype(np.float32), atol=2e-3)


def test_embed_handles_empty_documents_and_missing_titles(tiny_retriever, tmp_path, caplog):
    corpus = [
        {"_id": "0042", "title": "", "text": ""},
        {"_id": "42", "text": "no title at all"},
        {"_id": "d3", "title": "Only a title", "text": ""},
    ]
    queries = [
        {"_id": "007", "text": "title"},
        {"_id": "q2", "text": "unjudged"},
        {"_id": "q3", "text": "judges a passage the corpus lost"},
    ]
    qrels = [("007", "42", 2), ("007", "gone", 1), ("q3", "gone", 1)]
    root = write_beir(tmp_path / "beir", corpus, queries, qrels)
    with caplog.at_level(logging.WARNING, logger="readaptir.stages.embed"):
        info = embed(
            tiny_retriever,
            root,
            "test",
            resolve_encoding("repllama", {"dtype": "float32"}),
            tmp_path / "emb",
        )
    assert "corpus.jsonl: 1 passages have neither title nor text" in caplog.text
    ((ids, vecs),) = load_embeddings(tmp_path / "emb")
    assert ids == ["0042", "42", "d3"] and info["queries"] == 1
    # 007 judges one present and one absent passage: embedded; q3 only an absent one: it scores 0
    # whatever its ranking, so it is not encoded
    assert json.loads((tmp_path / "emb" / "query_ids.json").read_text()) == ["007"]
    norms = np.linalg.norm(vecs.astype(np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-3)
    # The empty document is read as "passage:" and its EOS: a real vector, not a padding artefact.
    model, tok = load_encoder(tiny_retriever)
    alone = encode_texts(
        model, tok, ["passage:"], pooling="last", normalize=True, max_length=512, append_eos=True
    )
    np.testing.assert_allclose(vecs[0].astype(np.float32), alone[0], atol=1e-3)


@pytest.mark.parametrize(
    "qrels, why",
    [
        ([("ghost", "42", 1)], "no judged query is in queries.jsonl"),
        ([("007", "gone", 1)], "every judged document is absent from corpus.jsonl"),
    ],
)
def test_nothing_to_score_fails_before_any_encoding(tmp_path, monkeypatch, qrels, why):
    corpus = [{"_id": "42", "text": "a passage"}]
    root = write_beir(tmp_path / "beir", corpus, [{"_id": "007", "text": "q"}], qrels)
    monkeypatch.setattr(embed_module, "load_encoder", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(CorpusError, match=r"qrels/test\.tsv: no query can be scored: " + why):
        embed(Path("no-model"), root, "test", resolve_encoding("repllama", {}), tmp_path / "emb")
    with pytest.raises(CorpusError, match="no query can be scored"):  # the queries stage alone
        judged_queries(root, "test")  # what the queries stage reads before its model
    assert not (tmp_path / "emb").exists()
    with pytest.raises(CorpusError, match="no query can be scored"):
        load_judgments(root, "test")  # the score stage's reading, the same check


def test_several_legacy_pooling_modes_are_refused(tmp_path):
    (tmp_path / "1_Pooling").mkdir()
    modules = [
        {"path": "", "type": "sentence_transformers.models.Transformer"},
        {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    legacy = {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(legacy))
    st = read_st_config(tmp_path)
    assert st.pooling == "cls+mean"  # sentence-transformers concatenates both: a 2x vector
    with pytest.raises(ValueError, match="not supported"):
        resolve_fields(resolve_encoding("sentence-transformers"), st)


def test_embed_uses_the_query_instruction_and_each_length(tiny_retriever, tiny_beir, tmp_path):
    encoding = resolve_encoding(
        "custom",
        {
            "query_template": "Instruct: {instruction}\nQuery: {text}",
            "query_instruction": "find the passage",
            "pooling": "last",
            "append_eos": True,
            "max_query_length": 48,
            "max_passage_length": 6,
            "dtype": "float32",
        },
    )
    embed(tiny_retriever, tiny_beir, "test", encoding, tmp_path / "emb")
    model, tok = load_encoder(tiny_retriever)

    def vectors(texts, max_length):
        return encode_texts(
            model,
            tok,
            texts,
            pooling="last",
            normalize=True,
            append_eos=True,
            max_length=max_length,
        )

    passages = [passage_text(p, encoding.passage_template) for p in load_corpus(tiny_beir)]
    stored = np.concatenate([v for _, v in load_embeddings(tmp_path / "emb")]).astype(np.float32)
    np.testing.assert_allclose(stored, vectors(passages, 6), atol=1e-3)
    assert not np.allclose(stored, vectors(passages, 48), atol=1e-3)
    qids, qvecs = load_queries_embeddings(tmp_path / "emb")
    queries = load_queries(tiny_beir)
    asked = [query_text(queries[q], encoding.query_template, "find the passage") for q in qids]
    bare = [query_text(queries[q], encoding.query_template, "") for q in qids]
    qvecs = qvecs.astype(np.float32)
    np.testing.assert_allclose(qvecs, vectors(asked, 48), atol=1e-3)
    assert not np.allclose(qvecs, vectors(asked, 6), atol=1e-3)
    assert not np.allclose(qvecs, vectors(bare, 48), atol=1e-3)


def test_embed_lowercases_when_the_model_says_so(tiny_retriever, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_retriever, model_dir)
    (model_dir / "modules.json").write_text(
        json.dumps([{"path": "", "type": "sentence_transformers.models.Transformer"}])
    )
    (model_dir / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 64, "do_lower_case": True})
    )
    corpus = [
        {"_id": "d0", "title": "", "text": "Protein CELL Gene"},
        {"_id": "d1", "text": "RIVER"},
    ]
    root = write_beir(tmp_path / "beir", corpus, [{"_id": "q0", "text": "Cell"}], [("q0", "d0", 1)])
    overrides = {"pooling": "mean", "normalize": True, "dtype": "float32"}  # a decoder: not auto
    encoding = resolve_encoding("sentence-transformers", overrides)
    info = embed(model_dir, root, "test", encoding, tmp_path / "emb")
    assert info["resolved"]["lowercase"] is True
    ((_, stored),) = load_embeddings(tmp_path / "emb")
    model, tok = load_encoder(model_dir)
    kw = dict(pooling="mean", normalize=True, max_length=64)
    lower = encode_texts(model, tok, ["protein cell gene", "river"], **kw)
    cased = encode_texts(model, tok, ["Protein CELL Gene", "RIVER"], **kw)
    np.testing.assert_allclose(stored.astype(np.float32), lower, atol=1e-3)
    assert not np.allclose(stored.astype(np.float32), cased, atol=1e-3)


@pytest.mark.parametrize(
    "value, normalize, message",
    [
        (np.inf, False, "gives infinite vectors: they overflow float16 \\(normalize: true\\)"),
        (np.inf, True, "gives infinite vectors: its activations overflow"),
        (np.nan, True, "gives NaN vectors: NaN or inf in its weights or activations"),
    ],
)
def test_embed_refuses_vectors_that_are_not_finite(
    tiny_retriever, tiny_beir, tmp_path, monkeypatch, value, normalize, message
):
    def broken(model, seqs, **kw):
        return np.full((len(seqs), 8), value, dtype=np.float16)

    monkeypatch.setattr(embed_module, "encode_tokens", broken)
    encoding = resolve_encoding("repllama", {"dtype": "float32", "normalize": normalize})
    with pytest.raises(ValueError, match=f"shard 0: {tiny_retriever} {message}"):
        embed(tiny_retriever, tiny_beir, "test", encoding, tmp_path / "emb", shard_size=5)
    assert not list((tmp_path / "emb").glob("corpus-*"))


KW = dict(shard_size=5, batch_tokens=64)
FLOAT32 = {"dtype": "float32"}


def _same_vectors(a, b) -> bool:
    pairs = list(zip(load_embeddings(a), load_embeddings(b), strict=True))
    queries_a, queries_b = load_queries_embeddings(a), load_queries_embeddings(b)
    return (
        all(ia == ib and np.array_equal(va, vb) for (ia, va), (ib, vb) in pairs)
        and queries_a[0] == queries_b[0]
        and np.array_equal(queries_a[1], queries_b[1])
    )


def test_a_refused_corpus_or_output_folder_leaves_nothing_written(tiny_retriever, tmp_path):
    encoding = resolve_encoding("repllama", FLOAT32)
    encoder = embed_module.Encoder.load(tiny_retriever, encoding, dtype="float32")
    bad = write_beir(
        tmp_path / "bad", [{"_id": "1", "text": "a"}, {"_id": "1", "text": "b"}], [], []
    )
    out = tmp_path / "emb"
    with pytest.raises(CorpusError, match=r"corpus\.jsonl line 2: duplicate id '1'"):
        embed_module.embed_corpus(encoder, bad, encoding, out)
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    good = write_beir(tmp_path / "good", [{"_id": "1", "text": "a"}], [], [])
    with pytest.raises(FileExistsError, match=r"output folder .*emb is not empty"):
        embed_module.embed_corpus(encoder, good, encoding, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_killed_embedding_resumes_from_its_finished_shards(tiny_retriever, tiny_beir, tmp_path):
    encoding = resolve_encoding("repllama", FLOAT32)
    whole = embed(tiny_retriever, tiny_beir, "test", encoding, tmp_path / "whole", **KW)
    work = tmp_path / "work"

    def kill_after_1(shard: int) -> None:
        if shard == 1:
            raise KeyboardInterrupt

    def run(name: str, model=tiny_retriever, **kw) -> tuple[dict, list[int]]:
        encoded: list[int] = []
        kw = {**KW, "on_shard": encoded.append, **kw}
        out = tmp_path / name
        return embed(model, tiny_beir, "test", encoding, out, work_dir=work, **kw), encoded

    with pytest.raises(KeyboardInterrupt):
        run("killed", on_shard=kill_after_1)
    assert sorted(p.name for p in work.glob("corpus-*")) == ["corpus-00000.npy", "corpus-00001.npy"]
    info, encoded = run("resumed")
    assert encoded == [2] and info == whole  # only the missing shard is encoded
    assert _same_vectors(tmp_path / "whole", tmp_path / "resumed")
    assert not list(work.glob("corpus-*"))  # the shards moved into the output

    # a shard cut short is not trusted; shards of another shard size are not reused
    with pytest.raises(KeyboardInterrupt):
        run("killed2", on_shard=kill_after_1)
    np.save(work / "corpus-00001.npy", np.zeros((3, whole["dim"]), np.float16))
    assert run("resumed2")[1] == [1, 2]
    with pytest.raises(KeyboardInterrupt):
        run("killed3", on_shard=kill_after_1)
    assert run("resized", shard_size=4)[1] == [0, 1, 2]
    # nor one of another dtype, nor the shards of a model rebuilt since (same file names)
    with pytest.raises(KeyboardInterrupt):
        run("killed4", on_shard=kill_after_1)
    np.save(work / "corpus-00001.npy", np.zeros((5, whole["dim"]), np.float32))
    assert run("retyped")[1] == [1, 2]
    model = tmp_path / "model"
    shutil.copytree(tiny_retriever, model)
    with pytest.raises(KeyboardInterrupt):
        run("killed5", model, on_shard=kill_after_1)
    rebuilt = AutoModel.from_pretrained(model)
    with torch.no_grad():
        for param in rebuilt.parameters():
            param.mul_(1.5)
    rebuilt.save_pretrained(model)
    assert run("rebuilt", model)[1] == [0, 1, 2]


def test_ranks_share_the_shards_and_rank_zero_assembles(tiny_retriever, tiny_beir, tmp_path):
    """Two processes as torchrun starts them (RANK, WORLD_SIZE): every other shard each."""
    encoding = resolve_encoding("repllama", FLOAT32)
    embed(tiny_retriever, tiny_beir, "test", encoding, tmp_path / "one", **KW)
    script = (
        "import sys, json; from pathlib import Path\n"
        "from readaptir.families import Encoding\n"
        "from readaptir.stages.embed import embed\n"
        "a = sys.argv\n"
        "done = []\n"
        "info = embed(Path(a[1]), Path(a[2]), 'test', Encoding(**json.loads(a[3])), Path(a[4]),\n"
        "             work_dir=Path(a[5]), on_shard=done.append, shard_size=5, batch_tokens=64,\n"
        "             device='cpu')\n"
        "print(json.dumps(done))\n"
    )
    results = run_ranks(
        script,
        lambda rank: [tiny_retriever, tiny_beir, encoding.model_dump_json(),
                      tmp_path / f"out{rank}", tmp_path / "work"],
    )  # fmt: skip
    done = [json.loads(out.strip().splitlines()[-1]) for _, out in results]
    assert done == [[0, 2], [1]]
    assert _same_vectors(tmp_path / "one", tmp_path / "out0")
    assert not (tmp_path / "out1" / "corpus_ids.json").exists()  # rank 1 writes shards only


def test_a_model_missing_a_tensor_or_with_a_foreign_one_is_refused(tiny_retriever, tmp_path):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_retriever, model)
    tensors = load_file(tiny_retriever / "model.safetensors")
    weights = model / "model.safetensors"
    kept = {n: t for n, t in tensors.items() if n != "layers.1.mlp.up_proj.weight"}
    save_file(kept, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 tensors of a LlamaModel .*up_proj"):
        load_encoder(model)  # transformers would fill it at random and carry on
    save_file(
        {**tensors, "projection.weight": torch.ones(2, 2)}, weights, metadata={"format": "pt"}
    )
    with pytest.raises(ValueError, match=r"holds tensors the model does not use: .*projection"):
        load_encoder(model)
    weights.write_bytes((tiny_retriever / "model.safetensors").read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"model\.safetensors: its header .* \(cut short\)"):
        load_encoder(model)


def test_a_tokenizer_larger_than_the_embeddings_is_refused(tiny_retriever, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_retriever, model)
    _, tok = load_encoder(tiny_retriever)
    tok.add_tokens([f"extra{i}" for i in range(10)])
    tok.save_pretrained(model)
    with pytest.raises(ValueError, match="do not belong together"):
        load_encoder(model)


def test_auto_precision_is_bfloat16_for_a_decoder_and_float32_for_an_encoder(
    tiny_retriever, minilm_dir, tmp_path
):
    """Whatever says what the pooling is: a decoder whose sentence-transformers files choose
    last-token pooling, or one pooled by its mean, runs in bfloat16 (a 7B model in float32 would
    run many times slower); an encoder in float32; on any device."""
    decoder = shutil.copytree(tiny_retriever, tmp_path / "st")
    (decoder / "1_Pooling").mkdir()
    (decoder / "modules.json").write_text(json.dumps(st_modules()))
    pooling = {"pooling_mode": "lasttoken", "word_embedding_dimension": 64}
    (decoder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    for model, encoding, expected in (
        (decoder, resolve_encoding("sentence-transformers"), "bfloat16"),
        (tiny_retriever, resolve_encoding("custom", {"pooling": "mean"}), "bfloat16"),
        (minilm_dir, resolve_encoding("sentence-transformers"), "float32"),
        (tiny_retriever, resolve_encoding("custom", {"dtype": "float32"}), "float32"),
    ):
        assert embed_module.Encoder.load(model, encoding, device="cpu").dtype == expected, model
    # a PEFT retriever over that decoder takes its base's sentence-transformers settings
    from test_merge import make_adapter
    from transformers import AutoModel

    lora = make_adapter(AutoModel.from_pretrained(decoder), tmp_path / "lora", dora=False, seed=5)
    st = resolve_encoding("sentence-transformers")
    encoder = embed_module.Encoder.load(lora, st, base_dir=decoder, device="cpu")
    assert (encoder.resolved.pooling, encoder.dtype) == ("last", "bfloat16")


@pytest.mark.parametrize(
    "dtype, pooling, causal, expected",
    [
        ("auto", "mean", True, torch.bfloat16),
        ("auto", "last", False, torch.bfloat16),  # last-token pooling: a decoder's habit
        ("auto", "mean", False, torch.float32),
        ("auto", "cls", False, torch.float32),
        ("float16", "last", True, torch.float16),
        ("float32", "mean", True, torch.float32),
    ],
)
def test_auto_precision_follows_the_architecture_or_the_pooling(dtype, pooling, causal, expected):
    assert embed_module.model_dtype(dtype, pooling, causal) == expected


def test_texts_that_tokenize_to_nothing_get_a_vector(tiny_retriever):
    """A tokenizer adding no special tokens turns an empty text into no tokens at all: such a
    text still gets a finite vector, also in a batch of nothing else."""
    model = AutoModel.from_pretrained(tiny_retriever)
    width = model.config.hidden_size
    for pooling in ("last", "mean"):
        encode = functools.partial(encode_ids, model, pooling=pooling, normalize=True, pad_token=0)
        for seqs in ([[], []], [[], [5, 6, 7]]):
            vecs = encode(seqs)
            assert vecs.shape == (len(seqs), width) and torch.isfinite(vecs).all()
            assert torch.allclose(vecs.norm(dim=-1), torch.ones(len(seqs)))
        torch.testing.assert_close(vecs[1:], encode([[5, 6, 7]]))  # its neighbour unchanged


def test_cls_pooling_on_a_causal_decoder_is_refused(tiny_retriever, tmp_path):
    encoding = resolve_encoding("custom", {"pooling": "cls"})
    with pytest.raises(ValueError, match="pooling cls on a causal decoder: its first token"):
        embed_module.Encoder.load(tiny_retriever, encoding, device="cpu")
    # the same model with last-token pooling loads
    embed_module.Encoder.load(tiny_retriever, resolve_encoding("repllama"), device="cpu")


def test_lengths_past_an_encoders_position_table_are_refused(tokenizer, tmp_path):
    from readaptir import tiny

    bert = tiny.make_bert(tmp_path / "bert", tokenizer)
    table = json.loads((bert / "config.json").read_text())["max_position_embeddings"]
    too_long = resolve_encoding("custom", {"pooling": "cls", "max_passage_length": table + 1})
    with pytest.raises(ValueError, match=rf"max_passage_length {table + 1} is more than the "
                       rf"model's {table} positions"):  # fmt: skip
        embed_module.Encoder.load(bert, too_long, device="cpu", sides=("passage",))
    # the queries stage does not encode passages; the table's own length is allowed
    embed_module.Encoder.load(bert, too_long, device="cpu", sides=("query",))
    fits = resolve_encoding("custom", {"pooling": "cls", "max_passage_length": table})
    embed_module.Encoder.load(bert, fits, device="cpu", sides=("passage",))


def test_a_length_from_the_models_own_files_is_cut_to_its_positions(caplog, tmp_path):
    # sentence-transformers' rule gives a RoBERTa-style model without max_seq_length its table's
    # 514 rows, two of which are no positions: cut to 512, where a recipe's 514 is an error
    from readaptir.st_config import Resolved

    inferred = Resolved(pooling="mean", normalize=True, max_query_length=None,
                        max_passage_length=514)  # fmt: skip
    preset = resolve_encoding("sentence-transformers")
    with caplog.at_level("WARNING", logger="readaptir.stages.embed"):
        cut = embed_module._within_positions(inferred, preset, 512, tmp_path, ("passage",))
    assert cut.max_passage_length == 512 and "past its 512 positions; using 512" in caplog.text
    asked = resolve_encoding("sentence-transformers", {"max_passage_length": 514})
    with pytest.raises(ValueError, match="max_passage_length 514 is more than the model's 512"):
        embed_module._within_positions(inferred, asked, 512, tmp_path, ("passage",))


def test_a_peft_retriever_is_applied_whole_or_refused(tiny_base, tmp_path):
    from peft import PeftModel
    from test_merge import make_adapter
    from transformers import AutoModel, AutoModelForCausalLM

    lora = make_adapter(AutoModel.from_pretrained(tiny_base), tmp_path / "lora", dora=False, seed=5)
    dora = make_adapter(AutoModel.from_pretrained(tiny_base), tmp_path / "dora", dora=True, seed=5)

    def adapter(source: Path, name: str, **config) -> Path:
        out = tmp_path / name
        shutil.copytree(source, out)
        path = out / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
        return out

    # CAUSAL_LM is what a causal-LM training run writes: the bare model still takes it
    model, _ = load_encoder(adapter(lora, "causal", task_type="CAUSAL_LM"), tiny_base)
    expected = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_base), lora)
    want = expected.merge_and_unload().state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    with pytest.raises(
        ValueError, match=r"16 adapter tensors are not applied by PEFT onto LlamaModel .*down_proj"
    ):
        load_encoder(adapter(lora, "fewer", target_modules=["q_proj"]), tiny_base)
    with pytest.raises(ValueError, match=r"adapter tensors are not applied .*lora_magnitude"):
        load_encoder(adapter(dora, "not-dora", use_dora=False), tiny_base)
    with pytest.raises(ValueError, match=r"other-r: PEFT cannot load the adapter onto its base \("):
        load_encoder(adapter(lora, "other-r", r=8), tiny_base)  # its tensors are r=4
    # trained over the causal-LM wrapper (keys under base_model.model.model.): taken as the merge
    # stage takes it, the body of PEFT's merge over that wrapper
    causal = make_adapter(
        AutoModelForCausalLM.from_pretrained(tiny_base), tmp_path / "causal-lm", dora=True, seed=6
    )
    model, _ = load_encoder(causal, tiny_base)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), causal)
    want = merged.merge_and_unload().model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    # a retriever that trained its embeddings: saved whole (modules_to_save), or LoRA on them
    for name, extra in (
        ("saved-embeddings", dict(modules_to_save=["embed_tokens"])),
        ("lora-embeddings", dict(target_modules=["q_proj", "embed_tokens"])),
    ):
        trained = make_adapter(
            AutoModel.from_pretrained(tiny_base), tmp_path / name, dora=False, seed=7, **extra
        )
        model, _ = load_encoder(trained, tiny_base)
        expected = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_base), trained)
        want = expected.merge_and_unload().state_dict()
        assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items()), name
    # LoRA on the embeddings saves a copy of the base's: one that is not the base's is refused
    # (the baseline would encode with it, the merge with the base's)
    stale = adapter(trained, "stale-copy")
    tensors = load_file(stale / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("embed_tokens.base_layer.weight"))
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, stale / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"its copy of embed_tokens\.weight .* is not its base's"):
        load_encoder(stale, tiny_base)
    no_type = adapter(lora, "no-type", peft_type=None)
    with pytest.raises(ValueError, match=r"no-type/adapter_config\.json: no peft_type"):
        load_encoder(no_type, tiny_base)
    broken = adapter(lora, "broken")
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no model\.safetensors, .* in .*broken"):
        load_encoder(broken, tiny_base)
    (broken / "adapter_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"adapter_model\.bin: not a readable PyTorch state dict"):
        load_encoder(broken, tiny_base)


def test_texts_cut_at_max_length_are_counted_in_the_log(tiny_retriever, caplog):
    model, tok = load_encoder(tiny_retriever)
    texts = ["word " * 100, "a", "b"]
    with caplog.at_level("INFO", logger="readaptir.encoding"):
        encode_texts(model, tok, texts, pooling="last", normalize=True, max_length=16)
    assert "1 of 3 texts (33.3%) fill max_length=16 tokens; any longer were cut" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="readaptir.encoding"):
        encode_texts(model, tok, texts[1:], pooling="last", normalize=True, max_length=16)
    assert "fill max_length" not in caplog.text


def test_the_shard_read_ahead_logs_in_order_and_stops_with_an_error(
    tiny_retriever, tiny_beir, tmp_path, monkeypatch, caplog
):
    """The corpus is read and tokenised on a thread, the next shard while one encodes (the
    device waits for neither): each shard's count of passages cut at max_length is said with it,
    in order; an error while encoding stops the thread within one piece, not after the whole
    next shard."""
    import threading

    readers = set()

    def read(dataset_dir):
        for passage in iter_passages(dataset_dir):
            readers.add(threading.current_thread().name)
            yield passage

    monkeypatch.setattr(embed_module, "iter_passages", read)
    encoding = resolve_encoding("repllama", {**FLOAT32, "max_passage_length": 4})
    encoder = embed_module.Encoder.load(tiny_retriever, encoding, device="cpu")
    with caplog.at_level("INFO"):
        embed_corpus(encoder, tiny_beir, encoding, tmp_path / "a", shard_size=5)
    assert readers and all(name.startswith("read-ahead") for name in readers)
    said = [r.getMessage() for r in caplog.records]
    events = [
        m.split(" (")[0].split(";")[0]
        for m in said
        if "passages of shard" in m or re.match(r"shard \d+ written", m)
    ]
    assert events == [
        "5 of 5 passages of shard 0", "shard 0 written",
        "5 of 5 passages of shard 1", "shard 1 written",
        "2 of 2 passages of shard 2", "shard 2 written",
    ]  # fmt: skip

    calls = []

    def slow(texts, max_length):
        calls.append(len(texts))
        threading.Event().wait(0.05)
        return tokenize(texts, max_length)

    def broken(seqs, on_batch=None):
        raise RuntimeError("out of memory, say")

    tokenize = encoder.tokenize
    monkeypatch.setattr(embed_module, "TOKENIZE_PIECE", 1)
    failing = replace(encoder, tokenize=slow, encode_tokens=broken)
    with pytest.raises(RuntimeError, match="out of memory, say"):
        embed_corpus(failing, tiny_beir, encoding, tmp_path / "b", shard_size=5)
    for thread in threading.enumerate():
        if thread.name.startswith("read-ahead"):
            thread.join()
    assert 5 <= len(calls) < 10  # shard 0's five pieces, and shard 1's cut short

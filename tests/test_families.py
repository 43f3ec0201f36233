from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from readaptir.corpus import query_text
from readaptir.families import (
    E5_DEFAULT_INSTRUCTION,
    E5_INSTRUCTIONS,
    PRESETS,
    Encoding,
    dataset_key,
    ignores_identical_ids,
    resolve_encoding,
)

SCIFACT = "Given a scientific claim, retrieve documents that support or refute the claim"
CQADUPSTACK = (  # microsoft/unilm e5/utils.py, CQADupstackRetrieval
    "Given a question, retrieve detailed question descriptions from Stackexchange that are "
    "duplicates to the given question"
)


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("scifact", "scifact"),
        ("SciFact", "scifact"),
        ("sci-fact", "scifact"),
        ("trec-covid", "treccovid"),
        ("TRECCOVID", "treccovid"),
        ("webis-touche2020", "webistouche2020"),
        ("Touche2020", "webistouche2020"),
        ("dbpedia-entity", "dbpediaentity"),
        ("DBPedia", "dbpediaentity"),
        ("FiQA2018", "fiqa"),
        ("fiqa", "fiqa"),
        ("QuoraRetrieval", "quora"),
        ("climate-fever", "climatefever"),
        ("MS MARCO", "msmarco"),
        ("cranfield", "cranfield"),
        ("", None),
        (None, None),
    ],
)
def test_dataset_key(name, key):
    assert dataset_key(name) == key


def test_e5_has_an_instruction_for_msmarco_and_14_beir_sets():
    names = (
        "MSMARCO ArguAna ClimateFEVER CQADupstackRetrieval DBPedia FEVER FiQA2018 HotpotQA "
        "NFCorpus NQ QuoraRetrieval SCIDOCS SciFact TRECCOVID Touche2020"
    ).split()
    assert {dataset_key(n) for n in names} == set(E5_INSTRUCTIONS)
    assert all(v and not v.endswith(".") for v in E5_INSTRUCTIONS.values())


def test_e5_instruction_follows_the_collection(caplog):
    enc = resolve_encoding("e5-mistral", dataset="SciFact")
    assert enc.query_instruction == SCIFACT
    assert enc.passage_template == "{title} {text}"  # documents carry no instruction
    assert (enc.pooling, enc.normalize, enc.append_eos) == ("last", True, True)
    assert query_text("q?", enc.query_template, enc.query_instruction) == (
        f"Instruct: {SCIFACT}\nQuery: q?"
    )
    with caplog.at_level(logging.WARNING, logger="readaptir.families"):
        unknown = resolve_encoding("e5-mistral", dataset="cranfield")
    assert unknown.query_instruction == E5_DEFAULT_INSTRUCTION
    assert "no published instruction for collection 'cranfield'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="readaptir.families"):
        mine = resolve_encoding("e5-mistral", {"query_instruction": "find"}, dataset="cranfield")
        also_mine = resolve_encoding("e5-mistral", {"query_instruction": "find"}, dataset="scifact")
    assert mine.query_instruction == also_mine.query_instruction == "find"
    assert caplog.text == ""
    # Without a collection name the generic instruction is used, silently.
    assert resolve_encoding("e5-mistral").query_instruction == E5_DEFAULT_INSTRUCTION


def test_repllama_lengths_per_collection():
    beir = resolve_encoding("repllama", dataset="scifact")
    assert (beir.max_query_length, beir.max_passage_length) == (512, 512)
    marco = resolve_encoding("repllama", dataset="msmarco")
    assert (marco.max_query_length, marco.max_passage_length) == (32, 196)
    assert (marco.query_template, marco.passage_template) == (
        "query: {text}",
        "passage: {title} {text}",
    )
    assert (marco.pooling, marco.normalize, marco.append_eos) == ("last", True, True)
    mine = resolve_encoding("repllama", {"max_passage_length": 300}, dataset="msmarco")
    assert (mine.max_query_length, mine.max_passage_length) == (32, 300)


def test_sentence_transformers_defers_to_the_model():
    enc = resolve_encoding("sentence-transformers", dataset="scifact")
    unset = (enc.pooling, enc.normalize, enc.max_query_length, enc.max_passage_length)
    assert unset == (None, None, None, None) and enc.lowercase is None
    assert not enc.append_eos


def test_custom_takes_every_field_from_the_recipe():
    fields = dict(
        query_template="Q: {instruction} {text}",
        passage_template="D: {text}",
        query_instruction="look",
        pooling="cls",
        normalize=False,
        append_eos=True,
        max_query_length=16,
        max_passage_length=64,
        lowercase=True,
        dtype="float16",
    )
    assert set(fields) == set(Encoding.model_fields)
    assert resolve_encoding("custom", fields, dataset="scifact").model_dump() == fields
    assert PRESETS["custom"] == {}


def test_precision_is_fixed_at_build_time_where_the_pooling_or_the_model_says():
    """Last-token pooling marks a decoder (bfloat16), cls an encoder (float32), and so does a
    local model's config; otherwise ``auto`` is the stage's to read off the model (see
    test_embed), as precisely fixed by the id, which holds the model's identity."""
    assert resolve_encoding("repllama").dtype == "bfloat16"
    assert resolve_encoding("e5-mistral", dataset="scifact").dtype == "bfloat16"
    assert resolve_encoding("sentence-transformers").dtype == "auto"  # pooling from the model
    assert resolve_encoding("sentence-transformers", decoder=True).dtype == "bfloat16"
    assert resolve_encoding("sentence-transformers", decoder=False).dtype == "float32"
    assert resolve_encoding("custom").dtype == "auto"  # mean pooling: an encoder or a decoder
    assert resolve_encoding("custom", {"pooling": "last"}).dtype == "bfloat16"
    assert resolve_encoding("custom", {"pooling": "cls"}).dtype == "float32"
    assert resolve_encoding("repllama", {"dtype": "float16"}).dtype == "float16"
    with pytest.raises(ValueError, match="unknown family 'bert'"):
        resolve_encoding("bert")
    with pytest.raises(ValidationError):
        resolve_encoding("custom", {"pooling": "max"})


@pytest.mark.parametrize(
    ("setting", "dataset", "expected"),
    [("auto", "arguana", True), ("auto", "QuoraRetrieval", True), ("auto", "scifact", False),
     ("auto", "cranfield", False), ("auto", None, False), (True, "scifact", True),
     (False, "quora", False)],
)  # fmt: skip
def test_identical_ids_rule_per_collection(setting, dataset, expected):
    assert ignores_identical_ids(setting, dataset) is expected


# MTEB's and BEIR's spellings of a collection, each with a phrase of its own instruction (as
# the e5 authors' evaluation code has it), written here rather than looked up through the
# same name normalisation the code uses
SPELLINGS = {
    "MSMARCO": "web search query", "msmarco-passage": "web search query",
    "ArguAna": "find documents that refute", "arguana": "find documents that refute",
    "ClimateFEVER": "about climate change", "climate-fever": "about climate change",
    "DBPedia": "entity descriptions from DBPedia", "dbpedia-entity": "entity descriptions",
    "FEVER": "Given a claim, retrieve documents", "fever": "Given a claim, retrieve",
    "FiQA2018": "financial question", "fiqa": "financial question",
    "HotpotQA": "multi-hop question", "hotpotqa": "multi-hop question",
    "NFCorpus": "retrieve relevant documents that best", "nfcorpus": "relevant documents",
    "NQ": "Wikipedia passages", "nq": "Wikipedia passages",
    "QuoraRetrieval": "semantically equivalent", "quora": "semantically equivalent",
    "SCIDOCS": "scientific paper title", "scidocs": "scientific paper title",
    "SciFact": "scientific claim", "scifact": "scientific claim",
    "TRECCOVID": "COVID-19", "trec-covid": "COVID-19",
    "Touche2020": "detailed and persuasive", "webis-touche2020": "detailed and persuasive",
}  # fmt: skip


@pytest.mark.parametrize("name", SPELLINGS)
def test_every_spelling_of_a_collection_gets_its_instruction(name):
    instruction = resolve_encoding("e5-mistral", dataset=name).query_instruction
    assert SPELLINGS[name] in instruction
    # no other collection's instruction holds the phrase: the right one was picked
    assert [i for i in E5_INSTRUCTIONS.values() if SPELLINGS[name] in i] == [instruction]


@pytest.mark.parametrize(
    "name", ["SciFact-PL", "NQ-PL", "CQADupstackAndroidRetrieval-Fa", "cqadupstack-klingon", "fev"]
)
def test_a_name_merely_near_a_collections_gets_the_generic_instruction(name):
    assert resolve_encoding("e5-mistral", dataset=name).query_instruction == E5_DEFAULT_INSTRUCTION


@pytest.mark.parametrize(
    "name",
    ["cqadupstack", "cqadupstack/android", "cqadupstack/wordpress", "cqadupstack-english",
     "CQADupstackRetrieval", "CQADupstackAndroidRetrieval", "CQADupstackGisRetrieval"],
)  # fmt: skip
def test_every_cqadupstack_forum_gets_its_instruction(name, caplog):
    with caplog.at_level(logging.WARNING, logger="readaptir.families"):
        enc = resolve_encoding("e5-mistral", dataset=name)
    assert enc.query_instruction == CQADUPSTACK and caplog.text == ""


def test_repllama_msmarco_lengths_under_an_alias():
    enc = resolve_encoding("repllama", dataset="msmarco-passage")
    assert (enc.max_query_length, enc.max_passage_length) == (32, 196)

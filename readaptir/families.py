"""Retriever families: how each one turns queries and passages into vectors.

A family is a preset of encoding fields; a recipe may override any of them. ``None`` for pooling,
normalisation, lower-casing or a max length in the ``sentence-transformers`` preset means "as the
model's own sentence-transformers configuration says" (read at encoding time from the model folder).

Some settings depend on the collection, as their authors published them. They are looked up by the
collection's name (``corpus.name``, else its folder name), matched without regard to case or
punctuation, so ``scifact``, ``SciFact`` and ``sci-fact`` agree, and BEIR's folder names
(``trec-covid``, ``webis-touche2020``, ``dbpedia-entity``) agree with MTEB's task names
(``TRECCOVID``, ``Touche2020``, ``DBPedia``). Precedence, lowest first: the family preset, the
per-collection table below, the recipe's ``retriever.encoding``.

- e5-mistral: the query instruction of each of the 15 collections its authors evaluated on
  (MS MARCO and 14 BEIR sets, CQADupStack's forums sharing one); an unknown collection gets a
  generic instruction and a warning.
- RepLLaMA: 512 tokens for queries and passages (its authors' BEIR setting); on MS MARCO, the
  lengths it was trained with (32 / 196).
"""

from __future__ import annotations

import logging
import re
import string
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

LOG = logging.getLogger(__name__)

Pooling = Literal["last", "mean", "cls"]
FAMILIES = ("repllama", "e5-mistral", "sentence-transformers", "custom")

# Used by e5-mistral on a collection without a published instruction.
E5_DEFAULT_INSTRUCTION = "Given a query, retrieve relevant passages that answer the query"

# e5-mistral's query instructions, per collection. Source: microsoft/unilm, e5/utils.py,
# get_task_def_by_task_name_and_type (task type "Retrieval"); mteb ships the same strings as the
# model's prompts. Documents get no instruction.
E5_INSTRUCTIONS: dict[str, str] = {
    "msmarco": "Given a web search query, retrieve relevant passages that answer the query",
    "arguana": "Given a claim, find documents that refute the claim",
    "climatefever": (
        "Given a claim about climate change, retrieve documents that support or refute the claim"
    ),
    "cqadupstack": (
        "Given a question, retrieve detailed question descriptions from Stackexchange that are "
        "duplicates to the given question"
    ),
    "dbpediaentity": "Given a query, retrieve relevant entity descriptions from DBPedia",
    "fever": "Given a claim, retrieve documents that support or refute the claim",
    "fiqa": "Given a financial question, retrieve user replies that best answer the question",
    "hotpotqa": "Given a multi-hop question, retrieve documents that can help answer the question",
    "nfcorpus": "Given a question, retrieve relevant documents that best answer the question",
    "nq": "Given a question, retrieve Wikipedia passages that answer the question",
    "quora": (
        "Given a question, retrieve questions that are semantically equivalent to "
        "the given question"
    ),
    "scidocs": (
        "Given a scientific paper title, retrieve paper abstracts that are cited by the given paper"
    ),
    "scifact": "Given a scientific claim, retrieve documents that support or refute the claim",
    "treccovid": "Given a query on COVID-19, retrieve documents that answer the query",
    "webistouche2020": (
        "Given a question, retrieve detailed and persuasive arguments that answer the question"
    ),
}

# RepLLaMA (castorini/repllama-v1-7b-lora-passage) max lengths (query, passage) in tokens, BOS and
# EOS included. Sources: texttron/tevatron examples/repllama/README.md (MS MARCO training:
# q_max_len 32, p_max_len 196) and examples/example_repllama.md (BEIR: query_max_len and
# passage_max_len 512). Tevatron's later generic MS MARCO recipe uses 156 for passages; 196 is the
# one this checkpoint was trained with.
REPLLAMA_DEFAULT_LENGTHS = (512, 512)
REPLLAMA_LENGTHS: dict[str, tuple[int, int]] = {"msmarco": (32, 196)}

# Collections whose queries are passages of the corpus (counter-arguments, duplicate questions):
# each query's own passage is removed from its ranking before scoring, as MTEB does for these two
# (``ignore_identical_ids``). Elsewhere a query id equal to a passage id is a coincidence of
# numbering (Cranfield and Medline number both from 1) and the passage is kept.
QUERIES_FROM_CORPUS = frozenset({"arguana", "quora"})

# CQADupStack's forums: BEIR's subfolders (``cqadupstack/android``), MTEB's tasks
# (``CQADupstackAndroidRetrieval``); all are one collection for the settings here.
CQADUPSTACK_FORUMS = (
    "android english gaming gis mathematica physics programmers stats tex unix webmasters wordpress"
).split()

# Other spellings of the collections above: MTEB task names, BEIR folder names, common variants.
_ALIASES = {
    **{
        f"cqadupstack{forum}{task}": "cqadupstack"
        for forum in ("", *CQADUPSTACK_FORUMS)
        for task in ("", "retrieval")
    },
    "dbpedia": "dbpediaentity",
    "fiqa2018": "fiqa",
    "quoraretrieval": "quora",
    "touche2020": "webistouche2020",
    "touche": "webistouche2020",
    "msmarcopassage": "msmarco",
    "naturalquestions": "nq",
}


# the fields only queries use: the corpus's embeddings do not depend on them
QUERY_FIELDS = ("query_template", "query_instruction", "max_query_length")


# the most tokens, rows, steps or hits a recipe may ask for: a signed 32-bit count, which the
# tokenizers, torch's index tensors and pytrec_eval take (2^64 and more did not even convert)
COUNT_LIMIT = 2**31 - 1


class Encoding(BaseModel):
    """Everything that decides the text fed to the model and how its states become a vector.

    Templates use ``{text}`` (query or passage body), ``{title}`` (passages) and ``{instruction}``
    (queries). A passage whose title is empty has the result stripped of surrounding whitespace.
    ``lowercase`` lower-cases the text before tokenisation (uncased sentence-transformers models).
    ``dtype`` is the precision the model runs in. ``auto`` is bfloat16 for a causal decoder (LLM
    retrievers are trained in bf16, and float16 can overflow) and float32 for an encoder: fixed by
    ``resolve_encoding`` where the pooling says (last-token marks a decoder, cls an encoder) or a
    local model's config does, and otherwise by the embed stage from the model's config (a hub
    model pooled by its mean, or whose sentence-transformers files choose its pooling). Either way
    the recipe and the model alone decide it, the same on every machine, so that an embedding
    stage's id fixes the precision of its vectors.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    query_template: str = "{text}"
    passage_template: str = "{title} {text}"
    query_instruction: str = ""
    pooling: Pooling | None = "mean"
    normalize: bool | None = True
    append_eos: bool = False
    # None: the model's own limit; at least 2 tokens, room for one beside an appended EOS
    max_query_length: int | None = Field(512, gt=1, le=COUNT_LIMIT)
    max_passage_length: int | None = Field(512, gt=1, le=COUNT_LIMIT)
    lowercase: bool | None = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @field_validator("query_template", "passage_template")
    @classmethod
    def _known_placeholders(cls, value: str, info: ValidationInfo) -> str:
        allowed = {"query_template": {"text", "instruction"}, "passage_template": {"text", "title"}}
        names = {field for _, field, _, _ in string.Formatter().parse(value) if field is not None}
        unknown = names - allowed[info.field_name]
        if unknown:
            known = ", ".join(f"{{{name}}}" for name in sorted(allowed[info.field_name]))
            raise ValueError(f"unknown placeholder {{{sorted(unknown)[0]}}}; use {known}")
        if "text" not in names:
            raise ValueError("needs {text}: without it every text would encode the same")
        try:  # a conversion or format spec str.format refuses, found now rather than at embed
            value.format_map(dict.fromkeys(allowed[info.field_name], "x"))
        except (ValueError, IndexError, KeyError) as err:
            raise ValueError(f"{value!r} is not a template str.format fills: {err}") from None
        return value

    @model_validator(mode="after")
    def _instruction_has_a_place(self) -> Encoding:
        if self.query_instruction and "{instruction}" not in self.query_template:
            raise ValueError(
                f"query_instruction is set ({self.query_instruction[:40]!r}) but query_template "
                f"{self.query_template!r} has no {{instruction}}: it would be dropped (set "
                "query_instruction to '' to encode without one)"
            )
        return self


PRESETS: dict[str, dict[str, Any]] = {
    "repllama": dict(
        query_template="query: {text}",
        passage_template="passage: {title} {text}",
        pooling="last",
        normalize=True,
        append_eos=True,
        max_query_length=REPLLAMA_DEFAULT_LENGTHS[0],
        max_passage_length=REPLLAMA_DEFAULT_LENGTHS[1],
    ),
    "e5-mistral": dict(
        query_template="Instruct: {instruction}\nQuery: {text}",
        passage_template="{title} {text}",
        query_instruction=E5_DEFAULT_INSTRUCTION,
        pooling="last",
        normalize=True,
        append_eos=True,
        # microsoft/unilm e5/utils.py create_batch_dict: max_length=512 in its MTEB/BEIR runs.
        max_query_length=512,
        max_passage_length=512,
    ),
    "sentence-transformers": dict(
        query_template="{text}",
        passage_template="{title} {text}",
        pooling=None,
        normalize=None,
        append_eos=False,
        max_query_length=None,
        max_passage_length=None,
        lowercase=None,
    ),
    "custom": {},
}


def dataset_key(name: str | None) -> str | None:
    """The canonical key of a collection name (``"TREC-COVID"`` → ``"treccovid"``), or None."""
    if not name:
        return None
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    return _ALIASES.get(key, key) or None


def ignores_identical_ids(setting: bool | str, dataset: str | None) -> bool:
    """``eval.ignore_identical_ids`` resolved: ``auto`` is on for ``QUERIES_FROM_CORPUS`` only."""
    if setting == "auto":
        return dataset_key(dataset) in QUERIES_FROM_CORPUS
    return bool(setting)


def collection_defaults(
    family: str, dataset: str | None, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The fields a family's authors set for this collection (empty when nothing is known)."""
    key = dataset_key(dataset)
    if family == "e5-mistral":
        if key in E5_INSTRUCTIONS:
            return {"query_instruction": E5_INSTRUCTIONS[key]}
        if dataset is not None and "query_instruction" not in (overrides or {}):
            LOG.warning(
                "e5-mistral has no published instruction for collection %r; using %r "
                "(set retriever.encoding.query_instruction to choose one)",
                dataset,
                E5_DEFAULT_INSTRUCTION,
            )
    if family == "repllama":
        query_len, passage_len = REPLLAMA_LENGTHS.get(key or "", REPLLAMA_DEFAULT_LENGTHS)
        return {"max_query_length": query_len, "max_passage_length": passage_len}
    return {}


def resolve_encoding(
    family: str,
    overrides: dict[str, Any] | None = None,
    dataset: str | None = None,
    decoder: bool | None = None,
) -> Encoding:
    """The family's preset, its settings for collection ``dataset``, then the recipe's overrides;
    ``dtype: auto`` fixed where the pooling or ``decoder`` (whether the model is a causal
    decoder, where its config is at hand) says, else left to the stage."""
    if family not in PRESETS:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    fields = {**PRESETS[family], **collection_defaults(family, dataset, overrides)}
    encoding = Encoding(**{**fields, **(overrides or {})})
    if encoding.dtype == "auto":
        if encoding.pooling == "last" or decoder:
            precision = "bfloat16"
        elif encoding.pooling == "cls" or decoder is False:  # cls on a decoder is refused
            precision = "float32"
        else:
            return encoding  # the stage reads the model's config
        encoding = encoding.model_copy(update={"dtype": precision})
    return encoding

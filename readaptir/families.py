"""Retriever families: how each one turns queries and passages into vectors.

A family is a preset of encoding fields; a recipe may override any of them. ``None`` for pooling,
normalisation or a max length in the ``sentence-transformers`` preset means "as the model's own
sentence-transformers configuration says" (read at encoding time from the model folder).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Pooling = Literal["last", "mean", "cls"]
FAMILIES = ("repllama", "e5-mistral", "sentence-transformers", "custom")

# Used by e5-mistral when the recipe names no task instruction.
E5_DEFAULT_INSTRUCTION = "Given a query, retrieve relevant passages that answer the query"


class Encoding(BaseModel):
    """Everything that decides the text fed to the model and how its states become a vector.

    Templates use ``{text}`` (query or passage body), ``{title}`` (passages) and ``{instruction}``
    (queries). A passage whose title is empty has the result stripped of surrounding whitespace.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    query_template: str = "{text}"
    passage_template: str = "{title} {text}"
    query_instruction: str = ""
    pooling: Pooling | None = "mean"
    normalize: bool | None = True
    append_eos: bool = False
    max_query_length: int | None = 512
    max_passage_length: int | None = 512


PRESETS: dict[str, dict] = {
    "repllama": dict(
        query_template="query: {text}",
        passage_template="passage: {title} {text}",
        pooling="last",
        normalize=True,
        append_eos=True,
        max_query_length=512,
        max_passage_length=512,
    ),
    "e5-mistral": dict(
        query_template="Instruct: {instruction}\nQuery: {text}",
        passage_template="{title} {text}",
        query_instruction=E5_DEFAULT_INSTRUCTION,
        pooling="last",
        normalize=True,
        append_eos=True,
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
    ),
    "custom": {},
}


def resolve_encoding(family: str, overrides: dict | None = None) -> Encoding:
    """The family's preset with the recipe's overrides applied."""
    if family not in PRESETS:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    return Encoding(**{**PRESETS[family], **(overrides or {})})

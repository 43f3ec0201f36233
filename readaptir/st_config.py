"""What a sentence-transformers model folder says about encoding, and the settings finally used.

A family preset may leave pooling, normalisation, lower-casing or the max lengths unset (``None``):
they are then read from the model's own sentence-transformers files (``modules.json``, the pooling
module's ``config.json``, ``sentence_bert_config.json``), so a sentence-transformers model encodes
here exactly as it does with the sentence-transformers library. What this module cannot
reproduce fails instead of being skipped: modules other than Transformer, Pooling and Normalize
(a Dense projection changes the vectors), and prompts the recipe's templates do not carry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from readaptir.artifacts import read_json, read_json_mapping
from readaptir.families import Encoding, Pooling

LOG = logging.getLogger(__name__)

FALLBACK_POOLING: Pooling = "mean"
FALLBACK_NORMALIZE = True
FALLBACK_MAX_LENGTH = 512
# Tokenizers without a real limit report a huge sentinel as their model_max_length.
_SANE_MAX_LENGTH = 100_000

_ST_POOLING: dict[str, Pooling] = {"cls": "cls", "mean": "mean", "lasttoken": "last"}
_ST_LEGACY_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass(frozen=True)
class STConfig:
    """What a sentence-transformers model folder says about pooling, normalisation and length.

    ``pooling`` is the sentence-transformers mode name (``mean``, ``cls``, ``lasttoken``, ...).
    """

    pooling: str | None
    normalize: bool  # a Normalize module
    max_seq_length: int | None
    do_lower_case: bool = False
    query_prompt: str = ""  # config_sentence_transformers.json's prompt for queries
    passage_prompt: str = ""  # ... and for documents
    similarity: str | None = None  # similarity_fn_name, one sentence-transformers knows
    similarity_file: str = field(default="", compare=False)  # where it is set


@dataclass(frozen=True)
class Resolved:
    """The encoding settings actually used, with every ``None`` of the family filled in."""

    pooling: Pooling
    normalize: bool
    max_query_length: int | None  # None: not resolved, for a stage that encodes only passages
    max_passage_length: int | None  # and the other way round
    lowercase: bool = False


def _st_pooling_mode(config: dict) -> str | None:
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        if isinstance(mode, list):
            mode = mode[0] if len(mode) == 1 else "+".join(mode)
        return mode
    active = [name for key, name in _ST_LEGACY_POOLING.items() if config.get(key)]
    return "+".join(active) if active else None


# Modules whose effect is reproduced here; any other changes the vectors and is refused.
_KNOWN_MODULES = (".Transformer", ".Pooling", ".Normalize")
# sentence-transformers' prompt names for documents, in the order its encode_document tries them
_DOCUMENT_PROMPTS = ("document", "passage", "corpus")
_ST_SIMILARITIES = ("cosine", "dot", "euclidean", "manhattan")


def _prompts(config: dict) -> tuple[str, str]:
    """(query prompt, passage prompt) that sentence-transformers would prepend by default."""
    prompts = config.get("prompts") or {}
    default = prompts.get(config.get("default_prompt_name") or "", "")
    passage = next((prompts[n] for n in _DOCUMENT_PROMPTS if n in prompts), default)
    return prompts.get("query", default), passage


def _inferred_max_length(model_dir: Path) -> int | None:
    """sentence-transformers' limit when ``sentence_bert_config.json`` sets none (newer releases
    leave it out): the smaller of the model's position table and the tokenizer's
    ``model_max_length``, whichever of them is known."""

    def field(name: str, key: str) -> Any:
        path = model_dir / name
        return read_json_mapping(path).get(key) if path.is_file() else None

    positions = field("config.json", "max_position_embeddings")
    tokenizer = field("tokenizer_config.json", "model_max_length")
    limits = [positions] if isinstance(positions, int) and positions > 0 else []  # XLNet's -1: none
    if isinstance(tokenizer, int) and tokenizer < _SANE_MAX_LENGTH:
        limits.append(tokenizer)
    return min(limits, default=None)


def _unit_length(st: STConfig) -> bool:
    """Whether the vectors are made unit length before the search's dot products, so that they
    rank as the model's own similarity function does (sentence-transformers' cosine unless
    ``similarity_fn_name`` names another; Euclidean distance of unit vectors ranks as cosine)."""
    if st.similarity == "manhattan" or (st.similarity == "euclidean" and not st.normalize):
        raise ValueError(
            f"{st.similarity_file}: similarity_fn_name {st.similarity!r} does not rank as the "
            "search here does (by dot product, of unit vectors for cosine); set "
            "retriever.encoding.normalize to search by dot product anyway"
        )
    said = _said_unit_length(st)
    if said is not None:
        return said
    LOG.warning(
        "the model names no similarity_fn_name and has no Normalize module: scored by "
        "cosine, sentence-transformers' default; set retriever.encoding.normalize: false "
        "for a model trained for the dot product"
    )
    return True


def _said_unit_length(st: STConfig) -> bool | None:
    """Unit vectors (a Normalize module, or a similarity that ranks as cosine of them), or not
    (the dot product); None where the files say neither."""
    if st.normalize or st.similarity in ("cosine", "euclidean"):
        return True
    return False if st.similarity == "dot" else None


def _warn_where_set_otherwise(encoding: Encoding, st: STConfig, sides: tuple[str, ...]) -> None:
    """Warn where the encoding sets the pooling or normalisation otherwise than the model's own
    sentence-transformers files, or a length past theirs: a family's fixed preset (``custom``'s
    mean pooling and 512 tokens, say) over a model made to be used another way."""
    own_pooling = _ST_POOLING.get(st.pooling or "")
    own_normalize = _said_unit_length(st)
    differs = []
    if encoding.pooling is not None and own_pooling not in (None, encoding.pooling):
        differs.append(f"pooling {encoding.pooling} (the model's: {own_pooling})")
    if encoding.normalize is not None and own_normalize not in (None, encoding.normalize):
        differs.append(f"normalize {encoding.normalize} (the model's: {own_normalize})")
    for side in sides:
        length = getattr(encoding, f"max_{side}_length")
        if length is not None and st.max_seq_length is not None and length > st.max_seq_length:
            differs.append(f"max_{side}_length {length} (the model's: {st.max_seq_length})")
    if differs:
        LOG.warning(
            "the encoding sets %s, unlike the model's sentence-transformers files: is the "
            "retriever's family right? (family sentence-transformers takes the model's own)",
            "; ".join(differs),
        )


def read_st_config(model_dir: Path | None) -> STConfig | None:
    """The sentence-transformers settings stored in ``model_dir``; None when it has none."""
    if model_dir is None or not (Path(model_dir) / "modules.json").is_file():
        return None
    model_dir = Path(model_dir)
    modules = read_json(model_dir / "modules.json")
    types = [m.get("type", "") for m in modules]
    for module in modules:
        kind = module.get("type", "")
        if not kind.endswith(_KNOWN_MODULES):
            raise ValueError(
                f"{model_dir / 'modules.json'}: module {module.get('path') or kind} ({kind}) "
                "is not applied here (only Transformer, Pooling and Normalize are); the "
                "vectors would not be the model's"
            )
    pooling, include_prompt = None, True
    for m in modules:
        cfg = model_dir / m.get("path", "") / "config.json"
        if m.get("type", "").endswith(".Pooling") and cfg.is_file():
            settings = read_json_mapping(cfg)
            pooling = _st_pooling_mode(settings)
            include_prompt = settings.get("include_prompt", True)
    max_len = None
    lower = False
    bert_cfg = model_dir / "sentence_bert_config.json"
    if bert_cfg.is_file():
        settings = read_json_mapping(bert_cfg)
        max_len = settings.get("max_seq_length")
        lower = bool(settings.get("do_lower_case", False))
    if max_len is None:
        max_len = _inferred_max_length(model_dir)
    st_path = model_dir / "config_sentence_transformers.json"
    st_settings = read_json_mapping(st_path) if st_path.is_file() else {}
    similarity = st_settings.get("similarity_fn_name")
    if similarity not in _ST_SIMILARITIES:  # sentence-transformers ignores another: cosine
        similarity = None
    query_prompt, passage_prompt = _prompts(st_settings)
    if (query_prompt or passage_prompt) and not include_prompt:
        raise ValueError(
            f"{model_dir}: its pooling leaves the prompt's tokens out (include_prompt false), "
            "which is not reproduced here"
        )
    return STConfig(
        pooling,
        any(t.endswith(".Normalize") for t in types),
        max_len,
        do_lower_case=lower,
        query_prompt=query_prompt,
        passage_prompt=passage_prompt,
        similarity=similarity,
        similarity_file=str(st_path),
    )


def resolve_fields(
    encoding: Encoding, st: STConfig | None, sides: tuple[str, ...] = ("query", "passage")
) -> Resolved:
    """Fill the encoding's ``None`` fields from the model's sentence-transformers settings, for
    the ``sides`` that will be encoded (a stage embedding only passages is given no query
    settings, and neither checks nor resolves them)."""

    def fallback(name: str, value: Any) -> Any:
        LOG.warning(
            "%s unset and not in the model's sentence-transformers files; using %s", name, value
        )
        return value

    if st is not None:
        for what, prompt, template in (
            ("query", st.query_prompt, encoding.query_template),
            ("passage", st.passage_prompt, encoding.passage_template),
        ):
            if what not in sides:
                continue
            # what the template puts before the text, its instruction filled in
            fixed = {"text": "", "title": "", "instruction": encoding.query_instruction}
            prefix = template.format_map(fixed).strip()
            if prompt and not prefix:
                raise ValueError(
                    f"the model prepends the prompt {prompt!r} to every {what} "
                    "(config_sentence_transformers.json), and templates here are the whole "
                    f"input: set retriever.encoding.{what}_template to start with it, e.g. "
                    f"{prompt + ('{text}' if what == 'query' else '{title} {text}')!r}"
                )
            if prompt and not prefix.startswith(prompt.strip()):
                LOG.warning(
                    "%s template starts %r, not with the model's default prompt %r",
                    what, prefix, prompt,
                )  # fmt: skip
    pooling = encoding.pooling
    if pooling is None:
        if st is None or st.pooling is None:
            pooling = fallback("pooling", FALLBACK_POOLING)
        elif st.pooling in _ST_POOLING:
            pooling = _ST_POOLING[st.pooling]
        else:
            raise ValueError(
                f"sentence-transformers pooling {st.pooling!r} is not supported; "
                f"supported: {', '.join(_ST_POOLING)}"
            )
    normalize = encoding.normalize
    if normalize is None:
        normalize = (
            _unit_length(st) if st is not None else fallback("normalize", FALLBACK_NORMALIZE)
        )
    st_len = st.max_seq_length if st is not None else None
    lengths = {}
    for side in ("query", "passage"):
        name = f"max_{side}_length"
        value = getattr(encoding, name)
        if side not in sides:
            value = None
        elif value is None:
            value = st_len if st_len is not None else fallback(name, FALLBACK_MAX_LENGTH)
        lengths[name] = value
    if st is not None:
        _warn_where_set_otherwise(encoding, st, sides)
    lowercase = encoding.lowercase
    if lowercase is None:
        # Unlike pooling, lower-casing has a safe default: sentence-transformers' own (off).
        lowercase = st.do_lower_case if st is not None else False
    return Resolved(pooling=pooling, normalize=normalize, **lengths, lowercase=lowercase)

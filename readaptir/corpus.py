"""BEIR-format collections: ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``.

Real collections are untidy (missing titles, empty documents, ids that look like numbers, judgments
naming documents that are not in the corpus), so the loaders accept what is harmless, report what is
odd (judgments on absent documents are kept and counted, as in BEIR), and fail with the file and
line for what cannot be read.
"""

from __future__ import annotations

import codecs
import json
import logging
from collections.abc import Iterator, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

LOG = logging.getLogger(__name__)
T = TypeVar("T", bound=Sized)

CORPUS_FILE = "corpus.jsonl"
QUERIES_FILE = "queries.jsonl"
QRELS_DIR = "qrels"
QRELS_HEADER = "query-id"


class CorpusError(ValueError):
    """A collection file that cannot be read; the message names the file (and line)."""


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str


@dataclass
class Collection:
    passages: list[Passage]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    warnings: list[str] = field(default_factory=list)


def _lines(path: Path, name: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line of a UTF-8 file, without a byte-order mark before the
    first; a line that is not UTF-8 is an error naming ``name`` and the line."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            skip = len(codecs.BOM_UTF8) if lineno == 1 and raw.startswith(codecs.BOM_UTF8) else 0
            try:
                text = raw[skip:].decode("utf-8")
            except UnicodeDecodeError as err:
                byte = skip + err.start + 1  # of the line as it is in the file
                raise CorpusError(
                    f"{name} line {lineno}: not UTF-8 text (byte {byte} of the line)"
                ) from None
            yield lineno, text


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSONL file."""
    if not path.is_file():
        raise CorpusError(f"{path}: file not found")
    for lineno, line in _lines(path, str(path)):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{path} line {lineno}: not valid JSON ({err})") from None
        if not isinstance(obj, dict):
            kind = type(obj).__name__
            raise CorpusError(f"{path} line {lineno}: expected a JSON object, got {kind}")
        yield lineno, obj


def _id(obj: dict, where: str) -> str:
    value = obj.get("_id")
    # JSON numbers are accepted as ids but kept as text, like ids that merely look numeric.
    if value is None or isinstance(value, (bool, dict, list)) or value == "":
        raise CorpusError(f"{where}: missing or empty '_id'")
    if any(ch.isspace() for ch in str(value)):
        # found here, not after hours of encoding when the run file is written
        raise CorpusError(f"{where}: '_id' {str(value)!r} holds whitespace, which TREC runs cannot")
    return _text(str(value), "_id", where)


def _text(value: str, key: str, where: str) -> str:
    """``value``, unless a JSON escape left half of a UTF-16 surrogate pair in it (``\\ud83d``
    without its partner): no tokenizer takes that, and no UTF-8 run file can hold it."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise CorpusError(
                f"{where}: '{key}' holds {value[err.start]!r} at character {err.start + 1}, "
                "half of a surrogate pair, which is not text (an escape without its partner)"
            ) from None
    return value


def _str_field(obj: dict, key: str, where: str, required: bool = False) -> str:
    """``obj[key]`` as text; absent or null is empty, but a ``required`` key must be there: a
    collection that names its text otherwise (``contents``, ``body``) is not read as empty."""
    if required and key not in obj:
        raise CorpusError(f"{where}: no '{key}' field (it has {', '.join(map(repr, obj))})")
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CorpusError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return _text(value, key, where)


def iter_passages(dataset_dir: Path) -> Iterator[Passage]:
    """Every passage of ``corpus.jsonl`` in file order, read lazily (ids checked for duplicates)."""
    path = Path(dataset_dir) / CORPUS_FILE
    seen: set[str] = set()
    for lineno, obj in _records(path):
        where = f"{path} line {lineno}"
        pid = _id(obj, where)
        if pid in seen:
            raise CorpusError(f"{where}: duplicate id {pid!r}")
        seen.add(pid)
        text = _str_field(obj, "text", where, required=True)
        yield Passage(pid, _str_field(obj, "title", where), text)


def has_passages(corpus_file: Path, block: int = 1 << 20) -> bool:
    """Whether a corpus file holds more than white space (and a byte-order mark): its first
    block decides for any real corpus, without the file being parsed."""
    with Path(corpus_file).open("rb") as handle:
        data = handle.read(block).removeprefix(codecs.BOM_UTF8)
        while data:
            if data.strip():
                return True
            data = handle.read(block)
    return False


def passage_ids(dataset_dir: Path) -> set[str]:
    """The ids of ``corpus.jsonl``'s passages, every line checked as ``iter_passages`` does.

    A cheap first pass (no text is kept) so that a bad line fails before hours of encoding.
    """
    return _some({p.id for p in iter_passages(dataset_dir)}, dataset_dir)


def load_corpus(dataset_dir: Path) -> list[Passage]:
    """Every passage of ``corpus.jsonl`` in file order."""
    return _some(list(iter_passages(dataset_dir)), dataset_dir)


def _some(passages: T, dataset_dir: Path) -> T:
    """``passages``, unless there are none: a collection without passages is an error."""
    if not passages:
        raise CorpusError(f"{Path(dataset_dir) / CORPUS_FILE}: no passages")
    return passages


def load_queries(dataset_dir: Path) -> dict[str, str]:
    """Query id → text, in file order."""
    path = Path(dataset_dir) / QUERIES_FILE
    queries: dict[str, str] = {}
    for lineno, obj in _records(path):
        where = f"{path} line {lineno}"
        qid = _id(obj, where)
        if qid in queries:
            raise CorpusError(f"{where}: duplicate id {qid!r}")
        queries[qid] = _str_field(obj, "text", where, required=True)
    if not queries:
        raise CorpusError(f"{path}: no queries")
    return queries


# pytrec_eval holds grades as C ints: one outside them scored other queries' judgments wrongly
GRADE_LIMIT = 2**31 - 1


def _grade(raw: str, where: str) -> int:
    try:
        value = float(raw)
    except ValueError:
        raise CorpusError(f"{where}: score {raw!r} is not a number") from None
    if not value.is_integer():
        raise CorpusError(f"{where}: score {raw!r} is not a whole number")
    if abs(value) > GRADE_LIMIT:
        raise CorpusError(
            f"{where}: score {raw!r} is past ±{GRADE_LIMIT}, which trec_eval cannot hold"
        )
    return int(value)


def _is_number(raw: str) -> bool:
    try:
        float(raw)
    except ValueError:
        return False
    return True


def load_qrels(dataset_dir: Path, split: str) -> dict[str, dict[str, int]]:
    """Query id → {document id → grade} from ``qrels/<split>.tsv``."""
    return _read_qrels(dataset_dir, split)[0]


def _read_qrels(dataset_dir: Path, split: str) -> tuple[dict[str, dict[str, int]], list[str]]:
    """``load_qrels``, and a warning where repeated judgments disagree (the highest grade is
    kept). A first line whose first field is ``query-id`` or whose score is not a number is a
    header (BEIR skips the first line, whatever it holds); a file may also have none."""
    qdir = Path(dataset_dir) / QRELS_DIR
    path = qdir / f"{split}.tsv"
    if not path.is_file():
        available = sorted(p.stem for p in qdir.glob("*.tsv")) if qdir.is_dir() else []
        listed = ", ".join(available) if available else "none"
        raise CorpusError(f"{path}: no judgments for split {split!r} (available splits: {listed})")
    name = str(path)
    qrels: dict[str, dict[str, int]] = {}
    conflicts = 0
    first = True
    for lineno, line in _lines(path, name):
        if not line.strip():
            continue
        line = line.rstrip("\r\n")
        if "\r" in line:  # lines that end in a carriage return alone read as one line
            raise CorpusError(
                f"{name} line {lineno}: a carriage return within the line; lines end in LF or CRLF"
            )
        fields = line.split("\t")
        if len(fields) != 3:
            fields = line.split()
        if first:
            first = False
            if fields[0].strip() == QRELS_HEADER:
                continue
            if len(fields) == 3 and not _is_number(fields[2].strip()):
                LOG.warning("%s line %d taken for a header: %s", name, lineno, " ".join(fields))
                continue
        where = f"{name} line {lineno}"
        if len(fields) != 3:
            raise CorpusError(f"{where}: expected 'query-id<TAB>corpus-id<TAB>score'")
        qid, did, raw = (f.strip() for f in fields)
        if not qid or not did:
            raise CorpusError(f"{where}: empty query or document id")
        grade = _grade(raw, where)
        judged = qrels.setdefault(qid, {})
        if did in judged and judged[did] != grade:
            conflicts += 1
            grade = max(grade, judged[did])
        judged[did] = grade
    if not qrels:
        raise CorpusError(f"{path}: no judgments")
    warnings = []
    if conflicts:
        warnings.append(
            f"{QRELS_DIR}/{split}.tsv: {conflicts} repeated judgments disagree; kept the highest "
            "grade of each"
        )
        LOG.warning("%s", warnings[-1])
    return qrels, warnings


def passage_text(p: Passage, template: str) -> str:
    """The passage as the model reads it; an empty title leaves no stray whitespace."""
    return _fill(template, title=p.title, text=p.text)


def query_text(text: str, template: str, instruction: str = "") -> str:
    """The query as the model reads it, with the task instruction filled in."""
    return _fill(template, text=text, instruction=instruction)


def _fill(template: str, **values: str) -> str:
    try:
        return template.format_map(values).strip()
    except KeyError as err:
        known = ", ".join("{" + k + "}" for k in values)
        raise ValueError(f"template {template!r} uses {{{err.args[0]}}}; known: {known}") from None


def _sample(ids: set[str], n: int = 3) -> str:
    return ", ".join(repr(i) for i in sorted(ids)[:n])


def load_collection(dataset_dir: Path, split: str) -> Collection:
    """Corpus, queries and the split's judgments (see ``usable_judgments``)."""
    dataset_dir = Path(dataset_dir)
    passages = load_corpus(dataset_dir)
    queries = load_queries(dataset_dir)
    raw = load_qrels(dataset_dir, split)
    qrels, warnings = usable_judgments(raw, queries, {p.id for p in passages}, split)
    return Collection(passages=passages, queries=queries, qrels=qrels, warnings=warnings)


def retrievable(qrels: dict[str, dict[str, int]], doc_ids: set[str]) -> set[str]:
    """The judged queries with a judgment on a passage of the corpus; the others score 0 whatever
    a run holds."""
    return {q for q, judged in qrels.items() if not doc_ids.isdisjoint(judged)}


Judgments = tuple[dict[str, dict[str, int]], list[str], set[str]]  # qrels, warnings, retrievable


def load_judgments(dataset_dir: Path, split: str) -> Judgments:
    """The split's usable judgments, the warnings of ``usable_judgments``, and the ``retrievable``
    queries.

    The corpus is only streamed for its ids, so scoring MS MARCO does not hold its 8.8M passages.
    """
    queries = load_queries(dataset_dir)
    raw, read = _read_qrels(dataset_dir, split)
    qrels, warnings, wanted = judgments_from(
        raw, queries, passage_ids(dataset_dir), dataset_dir, split
    )
    return qrels, read + warnings, wanted


def judgments_from(
    raw: dict[str, dict[str, int]],
    queries: dict[str, str],
    doc_ids: set[str],
    dataset_dir: Path,
    split: str,
) -> Judgments:
    """``load_judgments`` of a split's files already read. A query with no judgment on a passage
    of the corpus is left out of the retrievable ones (one judged only grade 0 stays: it scores 0
    too, as in BEIR); none left is an error: every score would be 0."""
    qrels, warnings = usable_judgments(raw, queries, doc_ids, split)
    wanted = retrievable(qrels, doc_ids)
    if not wanted:
        why = (
            f"every judged document is absent from {CORPUS_FILE}"
            if qrels
            else f"no judged query is in {QUERIES_FILE}"
        )
        path = Path(dataset_dir) / QRELS_DIR / f"{split}.tsv"
        raise CorpusError(f"{path}: no query can be scored: {why}")
    return qrels, warnings, wanted


def usable_judgments(
    raw: dict[str, dict[str, int]], queries: dict[str, str], doc_ids: set[str], split: str
) -> tuple[dict[str, dict[str, int]], list[str]]:
    """The judgments of known queries, and a warning for each oddity met.

    Judgments naming an unknown query are dropped: it cannot be searched. Judgments naming a
    document absent from the corpus are kept, as BEIR and MTEB keep them: the document counts as
    relevant and no run can return it (public collections judge documents later removed).
    """
    name = f"{QRELS_DIR}/{split}.tsv"
    warnings: list[str] = []
    unknown_q = {q for q in raw if q not in queries}
    if unknown_q:
        n = sum(len(raw[q]) for q in unknown_q)
        warnings.append(
            f"{name}: {n} judgments name {len(unknown_q)} unknown queries "
            f"(e.g. {_sample(unknown_q)}); ignored"
        )
    qrels = {q: dict(judged) for q, judged in raw.items() if q not in unknown_q}
    blank = {q for q in qrels if not queries[q].strip()}
    if blank:
        warnings.append(
            f"{QUERIES_FILE}: {len(blank)} judged queries have no text (e.g. {_sample(blank)}); "
            "each is searched as its template with empty text"
        )
    absent = [(q, d) for q, judged in qrels.items() for d in judged if d not in doc_ids]
    if absent:
        docs = {d for _, d in absent}
        warnings.append(
            f"{name}: {len(absent)} judgments name {len(docs)} documents absent from the corpus "
            f"(e.g. {_sample(docs)}); they count, and no run can retrieve them"
        )
        hopeless = len(qrels) - len(retrievable(qrels, doc_ids))
        if hopeless:
            warnings.append(f"{name}: {hopeless} queries judge only absent documents; they score 0")
    for w in warnings:
        LOG.warning("%s", w)
    return qrels, warnings


def write_collection(
    root: Path, corpus: list[dict], queries: list[dict], qrels: list[tuple], split: str = "test"
) -> Path:
    """Write a BEIR-format folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv (with header)."""
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    rows = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in qrels]
    (root / "qrels" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root

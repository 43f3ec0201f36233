from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import write_beir

from readaptir.corpus import (
    Collection,
    CorpusError,
    Passage,
    iter_passages,
    load_collection,
    load_corpus,
    load_judgments,
    load_qrels,
    load_queries,
    passage_ids,
    passage_text,
    query_text,
    usable_judgments,
)

CORPUS = [
    {"_id": "0042", "title": "Numbers", "text": "an id that looks numeric"},
    {"_id": "d1", "text": "no title at all"},
    {"_id": "d2", "title": "Empty", "text": ""},
    {"_id": 7, "title": None, "text": "a JSON number as id"},
]
QUERIES = [
    {"_id": "q1", "text": "first"},
    {"_id": "007", "text": "second"},
    {"_id": "q3", "text": "x"},
]
QRELS = [("q1", "0042", 2), ("q1", "d1", 1), ("007", "d2", 0), ("007", "7", -1)]


@pytest.fixture
def beir(tmp_path: Path) -> Path:
    return write_beir(tmp_path / "beir", CORPUS, QUERIES, QRELS)


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


def test_corpus_quirks(beir):
    passages = load_corpus(beir)
    assert [p.id for p in passages] == ["0042", "d1", "d2", "7"]
    assert all(isinstance(p.id, str) for p in passages)
    assert passages[1] == Passage("d1", "", "no title at all")
    assert passages[2].text == "" and passages[3].title == ""


def test_queries_keep_order_and_string_ids(beir):
    assert load_queries(beir) == {"q1": "first", "007": "second", "q3": "x"}


def test_qrels_graded_and_header_optional(beir):
    expected = {"q1": {"0042": 2, "d1": 1}, "007": {"d2": 0, "7": -1}}
    assert load_qrels(beir, "test") == expected
    # Without the header line, and with blank lines, the result is the same.
    path = beir / "qrels" / "test.tsv"
    _write_lines(path, [f"{q}\t{d}\t{s}" for q, d, s in QRELS] + [""])
    assert load_qrels(beir, "test") == expected


def test_passage_text_strips_empty_title():
    p = Passage("x", "", "body")
    assert passage_text(p, "{title} {text}") == "body"
    assert passage_text(Passage("x", "T", "body"), "passage: {title} {text}") == "passage: T body"
    assert (
        query_text("q", "Instruct: {instruction}\nQuery: {text}", "find")
        == "Instruct: find\nQuery: q"
    )
    with pytest.raises(ValueError, match="instruction"):
        passage_text(p, "{instruction} {text}")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"_id": "a", "text": ', r"corpus\.jsonl line 3: not valid JSON"),
        ('["a", "b"]', r"corpus\.jsonl line 3: expected a JSON object"),
        ('{"title": "t", "text": "no id"}', r"corpus\.jsonl line 3: missing or empty '_id'"),
        ('{"_id": true, "text": "t"}', r"corpus\.jsonl line 3: missing or empty '_id'"),
        ('{"_id": "a", "text": "again"}', r"corpus\.jsonl line 3: duplicate id 'a'"),
        ('{"_id": "c", "text": 5}', r"corpus\.jsonl line 3: 'text' must be a string"),
        (  # a collection that names its text otherwise is not read as empty passages
            '{"_id": "c", "title": "t", "contents": "words"}',
            r"corpus\.jsonl line 3: no 'text' field \(it has '_id', 'title', 'contents'\)",
        ),
    ],
)
def test_malformed_corpus_names_the_line(beir, line, message):
    _write_lines(beir / "corpus.jsonl", ['{"_id": "a", "text": "t"}', "", line])
    with pytest.raises(CorpusError, match=message):
        load_corpus(beir)


def test_text_that_is_not_utf8_names_the_file_and_line(beir):
    corpus = beir / "corpus.jsonl"
    corpus.write_bytes(b'{"_id": "a", "text": "t"}\n\n{"_id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match=r"corpus\.jsonl line 3: not UTF-8 text \(byte 26 "):
        load_corpus(beir)
    qrels = beir / "qrels" / "test.tsv"
    qrels.write_bytes(qrels.read_bytes() + b"q\xff\td1\t1\n")
    with pytest.raises(CorpusError, match=r"qrels/test\.tsv line \d+: not UTF-8 text"):
        load_qrels(beir, "test")


def test_malformed_queries_name_the_line(beir):
    _write_lines(
        beir / "queries.jsonl", ['{"_id": "q", "text": "t"}', '{"_id": "r", "query": "u"}']
    )
    with pytest.raises(CorpusError, match=r"queries\.jsonl line 2: no 'text' field"):
        load_queries(beir)
    _write_lines(beir / "queries.jsonl", ['{"_id": "q", "text": "t"}', '{"_id": "q", "text": "u"}'])
    with pytest.raises(CorpusError, match=r"queries\.jsonl line 2: duplicate id 'q'"):
        load_queries(beir)


def test_missing_and_empty_files(tmp_path, beir):
    with pytest.raises(CorpusError, match="corpus.jsonl: file not found"):
        load_corpus(tmp_path / "nowhere")
    (beir / "corpus.jsonl").write_text("\n\n")
    with pytest.raises(CorpusError, match="no passages"):
        load_corpus(beir)
    with pytest.raises(CorpusError, match=r"split 'dev' \(available splits: test\)"):
        load_qrels(beir, "dev")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("q1\td1", "line 3: expected"),
        ("q1\t\t1", "line 3: empty query or document id"),  # else a judgment no run can meet
        ("q1\td1\thigh", "line 3: score 'high' is not a number"),
        # pytrec_eval holds grades as C ints: past them it scored other queries wrongly, or crashed
        ("q1\td1\t4294967296", r"line 3: score '4294967296' is past ±2147483647"),
        ("q1\td1\t-2147483649", r"line 3: score '-2147483649' is past ±2147483647"),
    ],
)
def test_malformed_qrels_name_the_line(beir, line, message):
    _write_lines(beir / "qrels" / "test.tsv", ["query-id\tcorpus-id\tscore", "q1\td1\t1", line])
    with pytest.raises(CorpusError, match=r"qrels/test\.tsv " + message):
        load_qrels(beir, "test")


def test_collection_keeps_absent_documents_and_drops_unknown_queries(beir, caplog):
    qrels = [*QRELS, ("q1", "x1", 1), ("q1", "x2", 1), ("007", "x1", 1), ("ghost", "d1", 1)]
    write_beir(beir, CORPUS, QUERIES, qrels)
    with caplog.at_level(logging.WARNING, logger="readaptir.corpus"):
        col = load_collection(beir, "test")
    assert isinstance(col, Collection)
    # as in BEIR and MTEB: a judged document missing from the corpus still counts as relevant
    assert col.qrels == {
        "q1": {"0042": 2, "d1": 1, "x1": 1, "x2": 1},
        "007": {"d2": 0, "7": -1, "x1": 1},
    }
    assert "q3" in col.queries and "q3" not in col.qrels  # unjudged queries are simply absent
    assert col.warnings == [
        "qrels/test.tsv: 1 judgments name 1 unknown queries (e.g. 'ghost'); ignored",
        "qrels/test.tsv: 3 judgments name 2 documents absent from the corpus (e.g. 'x1', 'x2'); "
        "they count, and no run can retrieve them",
    ]
    assert "absent from the corpus" in caplog.text


def test_query_judging_only_absent_documents_is_kept(beir):
    write_beir(beir, CORPUS, QUERIES, [("q1", "d1", 1), ("q3", "gone", 1)])
    col = load_collection(beir, "test")
    assert col.qrels == {"q1": {"d1": 1}, "q3": {"gone": 1}}
    assert any("1 queries judge only absent documents; they score 0" in w for w in col.warnings)


def test_corpus_lines_are_json_objects(beir):
    # write_beir writes one object a line; a pretty-printed file is rejected with its line.
    (beir / "corpus.jsonl").write_text(json.dumps(CORPUS[0], indent=1))
    with pytest.raises(CorpusError, match="line 1"):
        load_corpus(beir)


def test_passages_are_read_lazily(beir):
    lines = ['{"_id": "a", "text": "t"}', "", '{"_id": "b", "text": "u"}', "not json"]
    _write_lines(beir / "corpus.jsonl", lines)
    with pytest.raises(CorpusError, match="line 4: not valid JSON"):
        passage_ids(beir)  # the checking pass fails at once
    passages = iter_passages(beir)
    assert [next(passages).id, next(passages).id] == ["a", "b"]  # read before the bad line
    with pytest.raises(CorpusError, match="line 4: not valid JSON"):
        next(passages)
    _write_lines(beir / "corpus.jsonl", lines[:3])
    assert len(passage_ids(beir)) == 2  # blank lines do not count
    with pytest.raises(CorpusError, match="file not found"):
        passage_ids(beir / "nowhere")


def test_usable_judgments_without_loading_the_corpus():
    raw = {"q1": {"d1": 1, "gone": 2}, "q2": {"gone": 1}, "ghost": {"d1": 1}}
    qrels, warnings = usable_judgments(raw, {"q1": "a", "q2": "b"}, {"d1", "d2"}, "dev")
    assert qrels == {"q1": {"d1": 1, "gone": 2}, "q2": {"gone": 1}}
    assert warnings == [
        "qrels/dev.tsv: 1 judgments name 1 unknown queries (e.g. 'ghost'); ignored",
        "qrels/dev.tsv: 2 judgments name 1 documents absent from the corpus (e.g. 'gone'); "
        "they count, and no run can retrieve them",
        "qrels/dev.tsv: 1 queries judge only absent documents; they score 0",
    ]
    blank = {"q1": "a", "q2": " \n", "q3": ""}
    _, warnings = usable_judgments({"q1": {"d1": 1}, "q2": {"d1": 1}}, blank, {"d1"}, "dev")
    assert warnings == [  # q3 has no text but no judgment either: it is never searched
        "queries.jsonl: 1 judged queries have no text (e.g. 'q2'); "
        "each is searched as its template with empty text"
    ]


def test_ids_with_whitespace_fail_at_load(beir):
    _write_lines(beir / "corpus.jsonl", ['{"_id": "d 1", "text": "t"}'])
    with pytest.raises(CorpusError, match=r"corpus\.jsonl line 1: '_id' 'd 1' holds whitespace"):
        passage_ids(beir)


@pytest.fixture
def qrels_dir(tmp_path):
    return write_beir(tmp_path / "beir", [{"_id": "d1", "text": "t"}], [{"_id": "q1", "text": "q"}],
                      [("q1", "d1", 1)])  # fmt: skip


def _qrels(root, lines):
    (root / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")


def test_repeated_judgments_that_disagree_keep_the_highest_grade(qrels_dir, caplog):
    _qrels(qrels_dir, ["q1\td1\t1", "q1\td1\t2", "q1\td1\t0", "q1\td2\t1", "q1\td2\t1"])
    with caplog.at_level(logging.WARNING, logger="readaptir.corpus"):
        assert load_qrels(qrels_dir, "test") == {"q1": {"d1": 2, "d2": 1}}
    assert "2 repeated judgments disagree; kept the highest grade" in caplog.text
    # and the score stage's warnings, which its metrics file keeps, say so too
    qrels, warnings, _ = load_judgments(qrels_dir, "test")
    assert qrels == {"q1": {"d1": 2, "d2": 1}}
    assert (
        "qrels/test.tsv: 2 repeated judgments disagree; kept the highest grade of each" in warnings
    )


def test_a_byte_order_mark_and_a_header_of_other_names_are_read_as_beir_reads_them(qrels_dir):
    """BEIR skips the first line whatever it holds; a BOM is not part of the first field."""
    for lines in (
        ["qid\tdocid\trel", "q1\td1\t2"],
        ["\ufeffq1\td1\t2"],
        ["\ufeffquery-id\tc\ts", "q1\td1\t2"],
    ):
        _qrels(qrels_dir, lines)
        assert load_qrels(qrels_dir, "test") == {"q1": {"d1": 2}}, lines
    _qrels(qrels_dir, ["q1\td1", "q1\td1\t2"])  # two fields: not a header but a broken line
    with pytest.raises(CorpusError, match=r"line 1: expected 'query-id<TAB>corpus-id<TAB>score'"):
        load_qrels(qrels_dir, "test")
    (qrels_dir / "corpus.jsonl").write_text('\ufeff{"_id": "d1", "text": "t"}\n')
    assert load_corpus(qrels_dir) == [Passage("d1", "", "t")]
    (qrels_dir / "corpus.jsonl").write_bytes(
        b"\xef\xbb\xbfab\xff\n"
    )  # counted from the file's first byte
    with pytest.raises(CorpusError, match=r"line 1: not UTF-8 text \(byte 6 of the line\)"):
        load_corpus(qrels_dir)


@pytest.mark.parametrize("key", ["text", "_id", "title"])
def test_half_a_surrogate_pair_is_refused_naming_the_line(beir, key):
    """A JSON escape of half a pair decodes to a string no tokenizer takes and no UTF-8 file
    holds: found at load, not as a tokenizer's traceback or when the run file is written."""
    record = {"_id": "b", "title": "t", "text": "price film"}
    record[key] += "\ud83d"
    _write_lines(
        beir / "corpus.jsonl",
        [r'{"_id": "a", "text": "caf\u00e9 \ud83d\ude00"}', json.dumps(record)],  # a whole pair
    )
    with pytest.raises(
        CorpusError, match=rf"corpus\.jsonl line 2: '{key}' holds '\\ud83d' at character"
    ):
        load_corpus(beir)
    _write_lines(beir / "queries.jsonl", [json.dumps({"_id": "q", "text": "x\udc80"})])
    with pytest.raises(CorpusError, match=r"queries\.jsonl line 1: 'text' holds '\\udc80'"):
        load_queries(beir)


def test_qrels_scores_are_whole_numbers_and_columns_may_be_space_separated(qrels_dir):
    _qrels(qrels_dir, ["query-id corpus-id score", "q1 d1 2", "q1  d2\t1.0"])
    assert load_qrels(qrels_dir, "test") == {"q1": {"d1": 2, "d2": 1}}
    _qrels(qrels_dir, ["q1\td1\t1", "q1\td2\t1.5"])
    with pytest.raises(CorpusError, match=r"line 2: score '1\.5' is not a whole number"):
        load_qrels(qrels_dir, "test")


def test_qrels_with_lines_ending_in_a_carriage_return_alone_are_refused(qrels_dir):
    """Such a file read as one line, its header, and then as "no judgments"."""
    (qrels_dir / "qrels" / "test.tsv").write_bytes(b"query-id\tcorpus-id\tscore\rq1\td1\t1\r")
    with pytest.raises(CorpusError, match=r"test\.tsv line 1: a carriage return within the line"):
        load_qrels(qrels_dir, "test")
    (qrels_dir / "qrels" / "test.tsv").write_bytes(b"query-id\tcorpus-id\tscore\r\nq1\td1\t1\r\n")
    assert load_qrels(qrels_dir, "test") == {"q1": {"d1": 1}}

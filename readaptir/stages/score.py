"""Score a TREC run against a split's judgments with pytrec_eval, following BEIR's conventions."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from readaptir.corpus import Judgments, load_judgments

LOG = logging.getLogger(__name__)

# canonical prefix → pytrec_eval measure; MRR is recip_rank over a run cut to its top k (as BEIR).
_MEASURES = {
    "nDCG": "ndcg_cut",
    "Recall": "recall",
    "MRR": "recip_rank",
    "MAP": "map_cut",
    "P": "P",
}
_NEEDS_CUTOFF = {"nDCG", "Recall", "MRR", "P"}
_METRIC = re.compile(r"^\s*([A-Za-z]+)\s*(?:@\s*(\d+))?\s*$")
SUPPORTED = "nDCG@k, Recall@k, MRR@k, MAP, MAP@k, P@k"


def parse_metric(name: str) -> tuple[str, str, int | None]:
    """(canonical name, pytrec_eval measure, cutoff) for a metric name such as ``ndcg@10``.

    The measure is what pytrec_eval is asked for (``ndcg_cut`` with cutoff 10 means
    ``ndcg_cut.10``, reported as ``ndcg_cut_10``); ``MAP`` alone is ``map`` with no cutoff.
    """
    match = _METRIC.match(name)
    prefix = None
    if match:
        prefix = next((p for p in _MEASURES if p.lower() == match.group(1).lower()), None)
    if prefix is None:
        raise ValueError(f"unknown metric {name!r}; supported: {SUPPORTED}")
    cutoff = int(match.group(2)) if match.group(2) is not None else None
    if cutoff is None:
        if prefix in _NEEDS_CUTOFF:
            raise ValueError(
                f"metric {name!r} needs a cutoff, e.g. {prefix}@10; supported: {SUPPORTED}"
            )
        return prefix, "map", None
    if cutoff < 1:
        raise ValueError(f"metric {name!r}: the cutoff must be positive; supported: {SUPPORTED}")
    return f"{prefix}@{cutoff}", _MEASURES[prefix], cutoff


def read_run(run_file: Path) -> dict[str, dict[str, float]]:
    """Query id → {document id → score} from a TREC run (``qid Q0 docid rank score tag``)."""
    run_file = Path(run_file)
    run: dict[str, dict[str, float]] = {}
    repeats = 0
    with run_file.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 6:
                raise ValueError(
                    f"{run_file.name} line {lineno}: expected 6 fields, got {len(fields)}"
                )
            qid, _, did, _, raw, _ = fields
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(
                    f"{run_file.name} line {lineno}: score {raw!r} is not a number"
                ) from None
            ranked = run.setdefault(qid, {})
            if did in ranked:
                repeats += 1
                value = max(value, ranked[did])
            ranked[did] = value
    if repeats:
        LOG.warning(
            "%s: %d repeated (query, document) pairs; kept the best score", run_file, repeats
        )
    return run


def cut_run(run: dict[str, dict[str, float]], k: int) -> dict[str, dict[str, float]]:
    """Each query's top ``k`` documents in trec_eval's order (ties: doc id descending)."""
    cut = {}
    for qid, docs in run.items():
        ranked = sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)
        cut[qid] = dict(ranked[:k])
    return cut


def _evaluate(qrels, run, measures: set[str]) -> dict[str, dict[str, float]]:
    import pytrec_eval

    return pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)


def score(
    run_file: Path,
    dataset_dir: Path,
    split: str,
    metrics: list[str],
    *,
    ignore_identical_ids: bool = False,
    depth: int | None = None,
    judgments: Judgments | None = None,
) -> dict:
    """Metrics of ``run_file`` on ``split``, mean over every judged query.

    As in BEIR, queries without judgments are skipped, and with ``ignore_identical_ids`` a run entry
    whose document id equals its query id is removed first (collections such as ArguAna and Quora
    contain the query itself); ``depth`` then keeps each query's top ``depth`` (the search fetched
    one more for the removed entry). Judgments on documents absent from the corpus count, as in
    BEIR and MTEB: relevant documents no run can return. Unlike a plain pytrec_eval/BEIR mean,
    which averages over the queries present in the run, a judged query missing from the run
    scores 0 on every metric and still counts in the mean, so a run that silently drops queries
    cannot look better than it is.

    ``judgments`` (``load_judgments``'s result) spares reading the corpus again when several runs
    of one collection are scored. Returns ``{"metrics": {name: mean}, "per_query": {qid: {name:
    value}}, "queries": n, "warnings": [...]}`` with metric names in canonical spelling and
    nothing rounded.
    """
    parsed = [parse_metric(m) for m in metrics]
    if not parsed:
        raise ValueError(f"no metrics asked for; supported: {SUPPORTED}")
    qrels, warnings, retrievable = judgments or load_judgments(dataset_dir, split)
    warnings = list(warnings)
    if not qrels:
        raise ValueError(f"{dataset_dir}: split {split!r} has no usable judgments")

    run = {q: docs for q, docs in read_run(run_file).items() if q in qrels}
    first_is_self = sum(1 for q, docs in run.items() if docs and max(docs, key=docs.get) == q)
    if not ignore_identical_ids and first_is_self > len(run) / 2:
        warnings.append(
            f"{first_is_self} of {len(run)} queries rank the passage with their own id first: "
            "they look like passages of the corpus (as in ArguAna and Quora), found again; set "
            "eval.ignore_identical_ids: true to leave each query's own passage out"
        )
        LOG.warning("%s", warnings[-1])
    if ignore_identical_ids:
        removed = sum(1 for q, docs in run.items() if q in docs)
        run = {q: {d: s for d, s in docs.items() if d != q} for q, docs in run.items()}
        if removed:
            LOG.info("ignored %d run entries whose document id is the query id", removed)
    if depth is not None:
        run = cut_run(run, depth)
    # queries judging only absent passages are not embedded and have their own warning
    missing = [q for q in retrievable if q not in run or not run[q]]
    if missing:
        warnings.append(
            f"{len(missing)} of {len(retrievable)} judged queries have no results in the run; "
            "they score 0"
        )
        LOG.warning("%s", warnings[-1])

    per_query: dict[str, dict[str, float]] = {q: {} for q in qrels}
    plain = {(c, m, k) for c, m, k in parsed if m != "recip_rank"}
    if plain:
        asked = {m if k is None else f"{m}.{k}" for _, m, k in plain}
        results = _evaluate(qrels, run, asked)
        for canonical, measure, k in plain:
            key = measure if k is None else f"{measure}_{k}"
            for q in qrels:
                per_query[q][canonical] = float(results.get(q, {}).get(key, 0.0))
    for canonical, _, k in parsed:
        if canonical.startswith("MRR@"):
            results = _evaluate(qrels, cut_run(run, k), {"recip_rank"})
            for q in qrels:
                per_query[q][canonical] = float(results.get(q, {}).get("recip_rank", 0.0))

    names = list(dict.fromkeys(c for c, _, _ in parsed))
    means = {n: sum(per_query[q][n] for q in qrels) / len(qrels) for n in names}
    return {"metrics": means, "per_query": per_query, "queries": len(qrels), "warnings": warnings}

"""A recipe's result: the retriever alone against the readapted retriever, query by query.

With ``alpha: auto`` the judged queries are split once: α is chosen on the tuning part and every
reported figure (both columns, the comparison) comes from the evaluation part only.
"""

from __future__ import annotations

import logging
from pathlib import Path

from readaptir.stats import compare, query_split

LOG = logging.getLogger(__name__)

PerQuery = dict[str, dict[str, float]]  # query id -> metric -> value


def mean_over(per_query: PerQuery, qids: list[str], metric: str) -> float:
    return sum(per_query.get(q, {}).get(metric, 0.0) for q in qids) / len(qids) if qids else 0.0


def select_alpha(
    grid: dict[str, float], per_query: dict[str, PerQuery], tune: list[str], metric: str
) -> tuple[str, dict[str, float]]:
    """The grid role whose run scores best on the tuning queries (ties: the smallest α)."""
    scores = {role: mean_over(per_query[role], tune, metric) for role in grid}
    best = max(grid, key=lambda role: (scores[role], -grid[role]))
    return best, scores


def evaluate(
    runs: dict[str, Path],
    dataset_dir: Path,
    split: str,
    metrics: list[str],
    ignore_identical_ids: bool,
    select: dict | None = None,
    depth: int | None = None,
) -> tuple[dict, dict]:
    """(metrics summary, per-query scores) for the ``baseline`` run against the readapted one.

    ``runs`` maps roles to TREC run files: ``baseline`` and ``readapted``, or with ``select``
    (α auto) ``baseline`` and one role per α of ``select['grid']``. Each query's ranking is cut
    to its top ``depth`` after identical ids are dropped.
    """
    from readaptir.corpus import load_judgments
    from readaptir.stages.score import parse_metric, score

    wanted = list(dict.fromkeys(metrics + ([select["metric"]] if select else [])))
    judgments = load_judgments(dataset_dir, split)  # read once for every run
    results = {
        role: score(
            run,
            dataset_dir,
            split,
            wanted,
            ignore_identical_ids=ignore_identical_ids,
            depth=depth,
            judgments=judgments,
        )  # fmt: skip
        for role, run in runs.items()
    }
    per_query = {role: r["per_query"] for role, r in results.items()}
    judged = sorted(per_query["baseline"])
    summary: dict = {}
    if select:
        tune, reported = query_split(judged, select["fraction"], select["seed"])
        if not tune or not reported:  # the split gives each part one of two queries or more
            raise ValueError(
                f"alpha: auto needs at least two judged queries, to choose α on some and report "
                f"on the others; {dataset_dir} ({split}) has {len(judged)}: set alpha"
            )
        metric = parse_metric(select["metric"])[0]
        best, scores = select_alpha(select["grid"], per_query, tune, metric)
        chosen = select["grid"][best]
        LOG.info("alpha %g chosen on %d tuning queries (%s)", chosen, len(tune), metric)
        summary["alpha"] = chosen
        summary["alpha_selection"] = {
            "metric": metric,
            "tuning_queries": len(tune),
            "scores": {f"{select['grid'][r]:g}": v for r, v in scores.items()},
        }
        readapted_role = best
    else:
        tune, reported, readapted_role = [], judged, "readapted"
    base_pq = {q: per_query["baseline"][q] for q in reported}
    ra_pq = {q: per_query[readapted_role].get(q, {}) for q in reported}
    report_names = [parse_metric(m)[0] for m in metrics]
    base = {m: mean_over(base_pq, reported, m) for m in report_names}
    ra = {m: mean_over(ra_pq, reported, m) for m in report_names}
    summary.update(
        {
            "queries": len(reported),
            "retriever": base,
            "readapted": ra,
            "change": {m: ra[m] - base[m] for m in report_names},
            "comparison": {
                m: compare(
                    {q: v.get(m, 0.0) for q, v in base_pq.items()},
                    {q: v.get(m, 0.0) for q, v in ra_pq.items()},
                )
                for m in report_names
            },
        }
    )
    warnings = sorted({w for r in results.values() for w in r["warnings"]})
    if warnings:
        summary["warnings"] = warnings
    details = {"baseline": base_pq, "readapted": ra_pq, "tuning_queries": tune}
    return summary, details

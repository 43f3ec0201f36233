"""Sweeps, α chosen on withheld queries, report tables and diffs across recipe versions."""

import csv
import io
import json
import os
import re
import subprocess

import numpy as np
import pytest
import yaml
from conftest import write_beir
from test_plan import by_kind, project  # noqa: F401  (fixture)

from readaptir import plots, report
from readaptir.evaluation import evaluate, select_alpha
from readaptir.plan import plan_recipes
from readaptir.recipe_files import load_recipes
from readaptir.stats import compare, query_split, randomization_test


def test_sweep_expands_to_named_variants_sharing_adapter_and_delta(project):  # noqa: F811
    (project / "recipes" / "ra-full.yaml").unlink()
    (project / "recipes" / "ra-half.yaml").write_text(
        "extends: _common.yaml\nreadapt: {alpha: [0, 0.25, 0.5], beta: [1.0, 0.5]}\n"
    )
    recipes = load_recipes(project / "recipes")
    assert [r.name for r in recipes] == [
        "ra-half-a0-b1",
        "ra-half-a0-b0p5",
        "ra-half-a0p25-b1",
        "ra-half-a0p25-b0p5",
        "ra-half-a0p5-b1",
        "ra-half-a0p5-b0p5",
    ]
    assert {r.sweep for r in recipes} == {"ra-half"}
    kinds = by_kind(plan_recipes(recipes, project))
    assert len(kinds["adapter"]) == 1 and len(kinds["delta"]) == 1
    assert len(kinds["merge"]) == 5  # α=0, β=1 is the retriever itself
    assert len(kinds["score"]) == 6
    # dvc.yaml lists the α curves `readaptir plots` writes only where a recipe is a sweep: listed
    # without one, `dvc plots show` fails to load them
    from readaptir.dvcfile import render

    def plotted(recipes):
        listed = yaml.safe_load(render(plan_recipes(recipes, project))["dvc.yaml"])["plots"]
        return {path.split("/")[0] for entry in listed for path in entry}

    assert plotted(recipes) == {"plots", "artifacts"}
    single = [r for r in recipes if r.name == "ra-half-a0p5-b1"]
    assert plotted([r.model_copy(update={"_sweep": None}) for r in single]) == {"artifacts"}


def test_alpha_auto_builds_the_grid_and_one_score(project):  # noqa: F811
    (project / "recipes" / "ra-full.yaml").unlink()
    (project / "recipes" / "ra-half.yaml").write_text(
        "extends: _common.yaml\nreadapt: {alpha: auto, alpha_grid: [0, 0.5, 1]}\n"
    )
    plan = plan_recipes(load_recipes(project / "recipes"), project)
    score = plan.stages["score-ra-half"]
    assert set(score.inputs) == {"baseline", "alpha-0", "alpha-1", "alpha-2"}
    assert score.inputs["alpha-0"] == score.inputs["baseline"]
    assert score.params["select"]["grid"] == {"alpha-0": 0.0, "alpha-1": 0.5, "alpha-2": 1.0}
    assert len(by_kind(plan)["merge"]) == 2


def write_run(path, scores: dict[str, dict[str, float]]):
    lines = []
    for qid, docs in scores.items():
        ranked = sorted(docs.items(), key=lambda kv: -kv[1])
        lines += [f"{qid} Q0 {d} {i + 1} {s} test" for i, (d, s) in enumerate(ranked)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_alpha_auto_never_reports_on_tuning_queries(tmp_path):
    n = 40
    corpus = [{"_id": f"d{i}", "title": "", "text": f"doc {i}"} for i in range(n)]
    queries = [{"_id": f"q{i}", "text": f"query {i}"} for i in range(n)]
    data = write_beir(tmp_path / "beir", corpus, queries, [(f"q{i}", f"d{i}", 1) for i in range(n)])
    rng = np.random.default_rng(0)

    def run(name, hit_rate):  # the relevant doc ranks first for a share of queries
        scores = {}
        for i in range(n):
            docs = {f"d{j}": float(rng.random()) for j in rng.choice(n, 5, replace=False)}
            docs[f"d{i}"] = 2.0 if rng.random() < hit_rate else -1.0
            scores[f"q{i}"] = docs
        return write_run(tmp_path / f"{name}.trec", scores)

    runs = {"baseline": run("b", 0.3), "alpha-0": run("a0", 0.2), "alpha-1": run("a1", 0.9)}
    select = {
        "grid": {"alpha-0": 0.25, "alpha-1": 0.75},
        "fraction": 0.5,
        "seed": 3,
        "metric": "nDCG@10",
    }
    summary, details = evaluate(runs, data, "test", ["nDCG@10", "MRR@10"], True, select)
    tune, held = query_split([f"q{i}" for i in range(n)], 0.5, 3)
    assert summary["alpha"] == 0.75
    assert summary["alpha_selection"]["tuning_queries"] == len(tune) == 20
    assert details["tuning_queries"] == tune
    assert set(details["baseline"]) == set(details["readapted"]) == set(held)
    assert not set(held) & set(tune) and summary["queries"] == len(held)
    # the reported figure is the mean over the evaluation queries only
    held_mean = np.mean([details["readapted"][q]["nDCG@10"] for q in held])
    assert summary["readapted"]["nDCG@10"] == pytest.approx(held_mean)
    c = summary["comparison"]["nDCG@10"]
    assert c["wins"] + c["ties"] + c["losses"] == len(held)
    # one judged query cannot be both tuned on and reported on: α would be picked on nothing
    write_beir(tmp_path / "beir", corpus, queries, [("q0", "d0", 1)])
    with pytest.raises(ValueError, match=r"needs at least two judged queries.* has 1: set alpha"):
        evaluate(runs, data, "test", ["nDCG@10"], True, select)


def test_query_split_is_deterministic_disjoint_and_order_free():
    ids = [f"q{i}" for i in range(101)]
    tune, held = query_split(ids, 0.3, seed=1)
    assert (tune, held) == query_split(list(reversed(ids)), 0.3, seed=1)
    assert len(tune) == 30 and sorted(tune + held) == sorted(ids)
    assert query_split(ids, 0.3, seed=2) != (tune, held)


def test_randomization_test_and_win_tie_loss():
    base = {f"q{i}": 0.5 for i in range(50)}
    assert compare(base, dict(base)) == {"wins": 0, "ties": 50, "losses": 0, "p_value": 1.0}
    better = {q: v + 0.2 for q, v in base.items()}
    better["q0"] = 0.1
    result = compare(base, better)
    assert (result["wins"], result["ties"], result["losses"]) == (49, 0, 1)
    assert result["p_value"] < 0.001
    noise = np.random.default_rng(0).normal(0, 0.1, 200)
    assert randomization_test(np.zeros(200), noise) > 0.05


def metrics_file(name, dataset, label, base, ra, alpha=0.5, in_domain=False, p=0.5):
    return {
        "recipe": name,
        "dataset": dataset,
        "label": label,
        "alpha": alpha,
        "beta": 1.0,
        "in_domain": in_domain,
        "sweep": None,
        "queries": 10,
        "retriever": {"nDCG@10": base},
        "readapted": {"nDCG@10": ra},
        "change": {"nDCG@10": ra - base},
        "comparison": {"nDCG@10": {"wins": 5, "ties": 3, "losses": 2, "p_value": p}},
    }


METRICS = {
    "r-marco": metrics_file("r-marco", "msmarco", "RepLLaMA", 0.40, 0.41, in_domain=True),
    "r-sf": metrics_file("r-sf", "scifact", "RepLLaMA", 0.745, 0.763, p=0.01),
    "e-sf": metrics_file("e-sf", "scifact", "e5", 0.714, 0.733),
    "e-marco": metrics_file("e-marco", "msmarco", "e5", 0.43, 0.42, in_domain=True),
    "r-sweep": {**metrics_file("r-sweep", "scifact", "RepLLaMA", 0.745, 0.70), "sweep": "x"},
}


def test_paper_table_numbers_equal_the_metrics_files():
    header, rows = report.paper_rows(METRICS, "nDCG@10")
    assert header == ["dataset", "RepLLaMA Base", "RepLLaMA RA", "e5 Base", "e5 RA"]
    assert rows[0] == ["msmarco", 0.40, 0.41, 0.43, 0.42]
    assert rows[1] == ["scifact", 0.745, 0.763, 0.714, 0.733]  # the sweep variant stays out
    assert rows[2][0] == "Average" and rows[2][2] == pytest.approx((0.41 + 0.763) / 2)
    assert rows[3] == ["Zero-shot average", 0.745, 0.763, 0.714, 0.733]
    md = report.table(METRICS, "paper", fmt="md")
    assert re.search(r"\| scifact +\| 74\.5 +\| 76\.3† +\| 71\.4 +\| 73\.3 +\|", md)  # † p<0.05
    data = json.loads(report.table(METRICS, "paper", fmt="json"))
    assert data[1]["e5 RA"] == 0.733
    csv_text = report.table(METRICS, "recipes", fmt="csv")
    assert "r-sf,scifact,0.5,1.0,0.745,0.763" in csv_text
    with pytest.raises(report.ReportError, match=r"no metrics file holds 'ndcg@10'; they hold"):
        report.table(METRICS, "recipes", metric="ndcg@10")  # a typo, not an empty table
    sweeps_only = {"r-sweep": METRICS["r-sweep"]}  # an empty table would say nothing
    with pytest.raises(report.ReportError, match=r"every recipe .* is a sweep.*--table alpha"):
        report.table(sweeps_only, "paper")
    assert "r-sweep" in report.table(sweeps_only, "recipes")


def test_recipes_without_the_metric_are_named(caplog):
    other = metrics_file("r-fiqa", "fiqa", "RepLLaMA", 0.3, 0.31)
    for side in ("retriever", "readapted", "change", "comparison"):
        other[side] = {"MRR@10": 0.3}
    with caplog.at_level("WARNING", logger="readaptir.report"):
        header, rows = report.paper_rows({**METRICS, "r-fiqa": other}, "nDCG@10")
        report.table({**METRICS, "r-fiqa": other}, "paper")
    assert "fiqa" not in [row[0] for row in rows]  # no score to show
    assert "1 recipes have no nDCG@10 (their eval.metrics leave it out)" in caplog.text
    assert caplog.text.count("r-fiqa") == 1
    caplog.clear()  # two versions (diff): a recipe lacking it at one of them says which
    report.check_metric("nDCG@10", {"r-fiqa": other}, {"r-fiqa": METRICS["r-sf"]}, at=("A", "B"))
    assert "no nDCG@10 (their eval.metrics leave it out), so no score here: r-fiqa (at A)" in (
        caplog.text
    )


def test_two_recipes_in_one_cell_is_an_error():
    clash = {**METRICS, "r-sf2": metrics_file("r-sf2", "scifact", "RepLLaMA", 0.7, 0.71)}
    with pytest.raises(report.ReportError, match="'r-sf' and 'r-sf2' both fill RepLLaMA"):
        report.paper_rows(clash, "nDCG@10")


def test_diff_between_two_committed_recipe_versions(tmp_path, caplog, monkeypatch):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    def commit(alpha, ra, message):
        params = {"recipes": {"r-sf": {"readapt": {"alpha": alpha, "beta": 1.0}}}}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        (tmp_path / "metrics").mkdir(exist_ok=True)
        (tmp_path / "metrics" / "r-sf.json").write_text(
            json.dumps(metrics_file("r-sf", "scifact", "R", 0.745, ra, alpha=alpha))
        )
        git("add", "-A")
        git("-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", message)

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    with pytest.raises(report.ReportError, match="'HEAD': .* is not in a git repository"):
        report.diff(tmp_path, "HEAD")
    git("init", "-q")
    with pytest.raises(report.ReportError, match="'HEAD': the git repository of .* no commits yet"):
        report.diff(tmp_path, "HEAD")
    (tmp_path / "README").write_text("before the project")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "start")
    commit(0.5, 0.763, "a")
    commit(0.25, 0.770, "b")
    before = report.diff(tmp_path, "HEAD~2", "HEAD")  # from before the project: all added
    assert "no recipes built at HEAD~2: every recipe counts as added" in caplog.text
    assert before.splitlines()[2].replace(" ", "").startswith("|r-sf|added|-|0.7450|-|0.7700|-|")
    with pytest.raises(report.NothingBuilt, match="nor at HEAD~2: nothing to compare"):
        report.diff(tmp_path, "HEAD~2", "HEAD~2")
    caplog.clear()
    text = report.diff(tmp_path, "HEAD~1", "HEAD")
    row = next(line for line in text.splitlines() if line.startswith("| r-sf"))
    assert "readapt.alpha: 0.5 -> 0.25" in row and "+0.0070" in row
    git("update-ref", "refs/exps/ab/cdef/my-exp", "HEAD~1")  # where DVC keeps an experiment
    by_name = report.diff(tmp_path, "my-exp", "HEAD")
    assert "RA my-exp" in by_name and by_name.splitlines()[2:] == text.splitlines()[2:]
    assert "are one commit" not in caplog.text
    report.diff(tmp_path, "my-exp", "HEAD~1")  # a zero change that is no finding
    assert "my-exp and HEAD~1 are one commit: nothing can have changed" in caplog.text
    with pytest.raises(report.ReportError, match="'nope' is neither a git revision nor"):
        report.diff(tmp_path, "nope")


def test_alpha_table_keeps_beta_sweeps_apart_and_auto_alpha_zero_stays_in_the_paper_table():
    sweep = {}
    for alpha in (0.5, 1.0):
        for beta in (0.5, 1.0):
            m = metrics_file(f"s-{alpha}-{beta}", "scifact", "R", 0.7, alpha * beta, alpha=alpha)
            sweep[m["recipe"]] = {**m, "beta": beta, "sweep": "s"}
    header, rows = report.alpha_rows(sweep, "nDCG@10")
    assert header[-2:] == ["a=0.5", "a=1"]
    assert [r[3:] for r in rows] == [[0.5, 0.25, 0.5], [1.0, 0.5, 1.0]]
    text = report.table(sweep, "alpha")  # scores in the score format, not α's
    assert text.splitlines()[2].replace(" ", "").endswith("|0.5|0.2500|0.5000|")
    auto = {
        **metrics_file("auto", "scifact", "R", 0.7, 0.7, alpha=0.0),
        "alpha_selection": {"metric": "nDCG@10", "tuning_queries": 5, "scores": {}},
    }
    alone = metrics_file("alone", "scifact", "R", 0.7, 0.7, alpha=0.0)
    with pytest.raises(report.ReportError, match="both fill R on scifact"):
        report.paper_rows(
            {
                "auto": auto,
                "alone": alone,
                "other": metrics_file("other", "scifact", "R", 0.7, 0.8),
            },
            "nDCG@10",
        )
    _, rows = report.paper_rows({"auto": auto, "alone": alone}, "nDCG@10")
    assert rows[0] == ["scifact", 0.7, 0.7]


def test_alpha_ties_go_to_the_smallest_alpha():
    per_query = {r: {"q1": {"m": 0.5}, "q2": {"m": 0.5}} for r in ("hi", "lo", "mid")}
    grid = {"hi": 0.75, "lo": 0.25, "mid": 0.5}  # the largest first: order cannot decide
    best, scores = select_alpha(grid, per_query, ["q1", "q2"], "m")
    assert best == "lo" and scores == {"hi": 0.5, "lo": 0.5, "mid": 0.5}


def _ranked_runs(tmp_path, n: int = 20):
    """n queries, q<i> judging d<i>; ``run(name, first)`` writes a run that ranks each query's
    document first for the queries in ``first``, second for the others."""
    corpus = [{"_id": f"d{i}", "text": f"doc {i}"} for i in range(n)]
    queries = [{"_id": f"q{i}", "text": f"query {i}"} for i in range(n)]
    data = write_beir(tmp_path / "beir", corpus, queries, [(f"q{i}", f"d{i}", 1) for i in range(n)])

    def run(name: str, first: set[str]):
        lines = []
        for i in range(n):
            judged, other = f"d{i}", f"d{(i + 1) % n}"
            top, second = (judged, other) if f"q{i}" in first else (other, judged)
            lines += [f"q{i} Q0 {top} 1 0.9 t", f"q{i} Q0 {second} 2 0.5 t"]
        path = tmp_path / f"{name}.trec"
        path.write_text("\n".join(lines) + "\n")
        return path

    return data, [f"q{i}" for i in range(n)], run


def test_alpha_is_chosen_on_the_tuning_queries_only(tmp_path):
    data, qids, run = _ranked_runs(tmp_path)
    tune, held = query_split(qids, 0.5, 7)
    # α 0.25 is perfect on the tuning queries alone, α 0.75 on the evaluation ones alone
    runs = {
        "baseline": run("b", set()),
        "alpha-0": run("a0", set(tune)),
        "alpha-1": run("a1", set(held)),
    }
    select = {
        "grid": {"alpha-0": 0.25, "alpha-1": 0.75},
        "fraction": 0.5,
        "seed": 7,
        "metric": "MRR@10",
    }
    summary, _ = evaluate(runs, data, "test", ["MRR@10"], False, select)
    assert summary["alpha"] == 0.25
    assert summary["alpha_selection"]["scores"] == {"0.25": 1.0, "0.75": 0.5}
    assert summary["readapted"]["MRR@10"] == pytest.approx(0.5)  # on the evaluation queries


def test_change_and_wins_are_readapted_against_the_retriever(tmp_path):
    data, qids, run = _ranked_runs(tmp_path)
    runs = {"baseline": run("b", set()), "readapted": run("r", set(qids[:15]))}
    summary, _ = evaluate(runs, data, "test", ["MRR@10"], False)
    assert summary["retriever"]["MRR@10"] == pytest.approx(0.5)
    assert summary["readapted"]["MRR@10"] == pytest.approx((15 + 5 * 0.5) / 20)
    assert summary["change"]["MRR@10"] == pytest.approx(0.375)  # readapted − retriever
    c = summary["comparison"]["MRR@10"]
    assert (c["wins"], c["ties"], c["losses"]) == (15, 5, 0)


def test_randomization_test_is_two_sided_and_never_zero():
    base, better = np.zeros(50), np.full(50, 0.2)
    # no sign flip of 50 equal differences is more extreme but all-plus and all-minus:
    # p = (0 + 1) / (samples + 1), never 0; a loss is as significant as a win of its size
    assert randomization_test(base, better, samples=1000) == pytest.approx(1 / 1001)
    assert randomization_test(better, base, samples=1000) == pytest.approx(1 / 1001)
    noise = np.random.default_rng(1).normal(0, 0.1, 30)
    assert randomization_test(base[:30], noise) == randomization_test(noise, base[:30])
    # flips whose mean ties the observed one count: with three queries better by 1 each, two of
    # the eight sign patterns (all +, all −) reach it, so p is about 1/4
    assert randomization_test(np.zeros(3), np.ones(3)) == pytest.approx(0.25, abs=0.02)


def test_a_missing_query_scores_zero_and_float_noise_is_a_tie():
    result = compare({"q1": 0.5, "q2": 0.5}, {"q1": 0.5})
    assert (result["wins"], result["ties"], result["losses"]) == (0, 1, 1)
    result = compare({"q1": 0.3}, {"q1": 0.1 + 0.2})  # 0.30000000000000004
    assert (result["wins"], result["ties"], result["losses"]) == (0, 1, 0)


def test_query_split_rounds_and_leaves_both_parts_a_query():
    ids = [f"q{i}" for i in range(10)]
    assert len(query_split(ids, 0.01, 0)[0]) == 1
    assert len(query_split(ids, 0.99, 0)[1]) == 1
    assert len(query_split(ids, 0.36, 0)[0]) == 4  # round(3.6), not int(3.6)


def test_average_of_a_column_with_a_missing_cell_is_blank():
    partial = {**METRICS, "e-nf": metrics_file("e-nf", "nfcorpus", "e5", 0.3, 0.4)}
    header, rows = report.paper_rows(partial, "nDCG@10")
    assert [r[0] for r in rows] == [
        "msmarco",
        "nfcorpus",
        "scifact",
        "Average",
        "Zero-shot average",
    ]
    assert rows[1] == ["nfcorpus", None, None, 0.3, 0.4]
    average = dict(zip(header, rows[3], strict=True))
    assert average["RepLLaMA Base"] is None and average["RepLLaMA RA"] is None
    assert average["e5 RA"] == pytest.approx((0.42 + 0.4 + 0.733) / 3)


def test_dagger_only_below_the_threshold():
    at = {"r": metrics_file("r", "scifact", "R", 0.7, 0.8, p=0.05)}
    below = {"r": metrics_file("r", "scifact", "R", 0.7, 0.8, p=0.0499)}
    assert "†" not in report.table(at, "paper").split("\n\n")[0]
    assert "80.0†" in report.table(below, "paper")


def test_only_changes_are_signed_and_a_p_value_is_not_rounded_across_the_threshold(tmp_path):
    """A label or revision holding "change" is a name, not a difference; a p just under 0.05,
    marked †, does not print as 0.05."""
    r = metrics_file("r", "scifact", "R unchanged", 0.745, 0.763, p=500 / 10001)
    assert re.search(r"\| scifact +\| 74\.5 +\| 76\.3† +\|", report.table({"r": r}, "paper"))
    row = report.table({"r": r}, "recipes").splitlines()[2]
    assert re.search(r"\| 0\.7450 +\| 0\.7630 +\| \+0\.0180 +\| 5/3/2 +\| 0\.049995 +\|$", row)
    assert report._p_text(0.05) == "0.05" and report._p_text(0.0123456) == "0.0123"

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"recipes": {"r": {}}}))
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "r.json").write_text(json.dumps(r))
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "0")
    git("branch", "alpha-change")  # a revision whose name holds "change": its scores are scores
    table = report.diff(tmp_path, "alpha-change").splitlines()
    assert "| Base alpha-change " in table[0]
    assert re.search(
        r"\| - +\| 0\.7450 +\| 0\.7450 +\| 0\.7630 +\| 0\.7630 +\| \+0\.0000 +\|$", table[2]
    )


def test_readapted_recipe_wins_a_cell_whatever_the_name_order():
    alone = metrics_file("alone", "scifact", "R", 0.7, 0.7, alpha=0.0)
    ra = metrics_file("ra", "scifact", "R", 0.7, 0.8)
    for ordered in ({"alone": alone, "ra": ra}, {"ra": ra, "alone": alone}):
        _, rows = report.paper_rows(ordered, "nDCG@10")
        assert rows[0] == ["scifact", 0.7, 0.8]


def test_paper_csv_is_unscaled_and_recipes_columns_are_in_order(caplog):
    rows = list(csv.DictReader(io.StringIO(report.table(METRICS, "paper", fmt="csv"))))
    assert rows[1]["dataset"] == "scifact" and rows[1]["e5 RA"] == "0.733"
    # the test behind the Markdown table's † is in the machine-readable ones too
    assert list(rows[1])[1:4] == ["RepLLaMA Base", "RepLLaMA RA", "RepLLaMA RA p"]
    assert rows[1]["RepLLaMA RA p"] == "0.01" and rows[2]["RepLLaMA RA p"] == ""  # the average
    as_json = json.loads(report.table(METRICS, "paper", fmt="json"))
    assert as_json[1]["e5 RA p"] == 0.5
    # a sweep variant left out of the table is said to be, not silently missing
    assert "the variants of 1 sweep(s) are left out of this table (see `--table alpha`): x" in (
        caplog.text
    )
    with pytest.raises(report.ReportError, match=r"no recipe with metrics is a sweep"):
        report.table({k: v for k, v in METRICS.items() if k != "r-sweep"}, "alpha")
    recipes = {
        r["recipe"]: r
        for r in csv.DictReader(io.StringIO(report.table(METRICS, "recipes", fmt="csv")))
    }
    assert recipes["r-sf"]["W/T/L"] == "5/3/2"  # wins/ties/losses
    as_json = {r["recipe"]: r for r in json.loads(report.table(METRICS, "recipes", fmt="json"))}
    counts = {k: as_json["r-sf"][k] for k in ("W/T/L", "wins", "ties", "losses")}
    assert counts == {"W/T/L": "5/3/2", "wins": 5, "ties": 3, "losses": 2}  # numbers for scripts
    assert float(recipes["r-sf"]["change"]) == pytest.approx(0.763 - 0.745)
    assert float(recipes["e-marco"]["change"]) == pytest.approx(0.42 - 0.43)  # a loss is negative
    assert float(recipes["r-sf"]["p"]) == 0.01


def test_diff_row_lists_only_changed_parameters_and_keeps_a_before_b(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    def commit(alpha, base, ra, message, **added):
        params = {"recipes": {"r-sf": {"readapt": {"alpha": alpha, "beta": 1.0, **added}}}}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        (tmp_path / "metrics").mkdir(exist_ok=True)
        (tmp_path / "metrics" / "r-sf.json").write_text(
            json.dumps(metrics_file("r-sf", "scifact", "R", base, ra, alpha=alpha))
        )
        git("add", "-A")
        git("-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", message)

    git("init", "-q")
    commit(0.5, 0.745, 0.763, "a")
    commit(0.25, 0.750, 0.770, "b", delta="stored")  # a key one version has, the other not
    text = report.diff(tmp_path, "HEAD~1", "HEAD")
    header = [c.strip() for c in text.splitlines()[0].strip("|").split("|")]
    row = next(line for line in text.splitlines() if line.startswith("| r-sf"))
    cells = dict(zip(header, (c.strip() for c in row.strip("|").split("|")), strict=True))
    # beta did not change
    assert (
        cells["changed parameters"] == "readapt.alpha: 0.5 -> 0.25, readapt.delta: None -> stored"
    )
    assert (cells["Base HEAD~1"], cells["Base HEAD"]) == ("0.7450", "0.7500")
    assert (cells["RA HEAD~1"], cells["RA HEAD"]) == ("0.7630", "0.7700")
    assert cells["RA change"] == "+0.0070"


def _sweep():
    out = {}
    for alpha in (1.0, 0.0, 0.5):  # not in α order
        m = metrics_file(f"s-{alpha}", "scifact", "R", 0.6, 0.6 + alpha / 10, alpha=alpha)
        out[m["recipe"]] = {**m, "sweep": "s"}
    return out


def test_alpha_points_are_sorted_and_keep_ra_and_retriever_apart():
    points = plots.alpha_points(_sweep(), "nDCG@10")
    assert [p["alpha"] for p in points] == [0.0, 0.5, 1.0]  # in α order
    assert [p["nDCG@10"] for p in points] == pytest.approx([0.6, 0.65, 0.7])
    assert {p["retriever"] for p in points} == {0.6}
    assert {p["curve"] for p in points} == {"s (R, scifact, β=1)"}


@pytest.mark.parametrize(
    "text, message",
    [
        ("step,loss\n1,2.0\nx,y\n", r"training_log\.csv:3: expected a step and a loss, found 'x'"),
        ("steps,losses\n1,2.0\n", r"training_log\.csv:1: no step and loss columns"),
        ("step,loss\n1,abc\n", r"training_log\.csv:2: expected a step and a loss, .* 'abc'"),
        (b"step,loss\n1,\xff\n", r"training_log\.csv: not UTF-8 text"),
        ("step,loss\n1," + "9" * 200_000 + "\n", r"training_log\.csv:2: field larger than"),
    ],
)
def test_a_damaged_training_log_is_named_with_its_line(tmp_path, text, message):
    log = tmp_path / "training_log.csv"
    log.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=message):
        plots.loss_curve(log)
    log.write_text("step,epoch,loss,lr,tokens\n1,0,2.5,1e-4,10\n2,0,2.0,1e-4,20\n")
    assert plots.loss_curve(log) == ([1, 2], [2.5, 2.0])


def test_write_plots_csv_and_a_loss_curve_per_adapter_only(tmp_path):
    stages = {
        "adapter-a": {"kind": "adapter", "id": "aaa"},
        "embed-b": {"kind": "embed", "id": "bbb"},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"stages": stages}))
    for spec in stages.values():
        folder = tmp_path / "artifacts" / spec["kind"] / spec["id"]
        folder.mkdir(parents=True)
        (folder / "training_log.csv").write_text("step,loss\n1,2.0\n2,1.5\n")
    assert plots.adapter_logs(tmp_path) == {
        "adapter-a": tmp_path / "artifacts" / "adapter" / "aaa" / "training_log.csv"
    }
    written, removed = plots.write_plots(tmp_path, _sweep(), "nDCG@10")
    assert sorted(p.name for p in written) == [
        "alpha_curves.csv",
        "alpha_curves.png",
        "loss_adapter-a.png",
    ]
    assert removed == []
    rows = list(csv.DictReader((tmp_path / plots.ALPHA_CSV).open()))
    assert [(r["alpha"], r["retriever"], r["nDCG@10"]) for r in rows] == [
        ("0.0", "0.6", "0.6"),
        ("0.5", "0.6", "0.65"),
        ("1.0", "0.6", "0.7"),
    ]
    # an adapter whose log is yet to come (training, or not pulled) keeps its curve
    (tmp_path / "artifacts" / "adapter" / "aaa" / "training_log.csv").unlink()
    written, removed = plots.write_plots(tmp_path, _sweep(), "nDCG@10")
    assert removed == [] and (tmp_path / "plots" / "loss_adapter-a.png").is_file()
    # the sweep became one α and the adapter another: no curve of them is left standing
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"stages": {}}))
    (tmp_path / "plots" / "notes.png").write_bytes(b"")  # not a file of ours
    one = {k: {**v, "sweep": None} for k, v in _sweep().items() if v["alpha"] == 0.5}
    written, removed = plots.write_plots(tmp_path, one, "nDCG@10")
    assert [p.name for p in written] == ["alpha_curves.csv"]
    assert [p.name for p in removed] == ["alpha_curves.png", "loss_adapter-a.png"]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "alpha_curves.csv",
        "notes.png",
    ]


def test_metrics_of_an_earlier_build_of_a_recipe_are_left_out(tmp_path, caplog):
    """Built with α=0.25 but not yet run: the α=0.5 scores must not stand for α=0.25's."""

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    def build(alpha, stage):
        params = {"recipes": {"r-sf": {"readapt": {"alpha": alpha}}}, "scores": {"r-sf": stage}}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    git("init", "-q")
    build(0.5, "a" * 16)
    (tmp_path / "metrics").mkdir()
    m = {**metrics_file("r-sf", "scifact", "R", 0.745, 0.763), "stage": "a" * 16}
    (tmp_path / "metrics" / "r-sf.json").write_text(json.dumps(m))
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "a")
    build(0.25, "b" * 16)
    assert report.load(tmp_path)[1] == {}
    assert "1 metrics file(s) are of an earlier build of their recipe, left out" in caplog.text
    row = report.diff(tmp_path, "HEAD").splitlines()[2]
    assert "readapt.alpha: 0.5 -> 0.25" in row and row.replace(" ", "").endswith("|0.7630|-|-|")
    del m["stage"]  # written before the record: kept, with a warning
    (tmp_path / "metrics" / "r-sf.json").write_text(json.dumps(m))
    assert list(report.load(tmp_path)[1]) == ["r-sf"]
    assert "1 metrics file(s) record no score stage" in caplog.text
    # built, never run (a sweep's new variant): named too, not silently missing from a curve
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["recipes"]["r-new"], params["scores"]["r-new"] = {}, "c" * 16
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert list(report.load(tmp_path)[1]) == ["r-sf"]
    assert "1 recipe(s) built but with no metrics/<recipe>.json, left out" in caplog.text
    # α set in params.yaml after the build (`dvc exp run -S`), no stage rerun: not α=0.25's scores
    from readaptir.graph import recipe_digest

    built = {"readapt": {"alpha": 0.5}}
    m = {**m, "stage": "b" * 16, "recipe_digest": recipe_digest(built)}
    (tmp_path / "metrics" / "r-sf.json").write_text(json.dumps(m))
    assert report.load(tmp_path)[1] == {}
    assert "1 metrics file(s) are of another version of their recipe than params.yaml holds" in (
        caplog.text
    )
    params["recipes"]["r-sf"] = built
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert list(report.load(tmp_path)[1]) == ["r-sf"]


def test_recipes_edited_since_the_last_build_are_named(tmp_path, caplog):
    """An edit not built changes no stage: `dvc repro` runs nothing, and the results of the
    recipes as built would pass for the edited ones (in a commit of `dvc exp run` too)."""
    from readaptir.recipe_files import load_recipes
    from readaptir.report import load

    recipes = tmp_path / "recipes"
    recipes.mkdir()

    def write(name, alpha):
        text = f"base: b\nretriever: r\ncorpus: data/scifact\nreadapt: {{alpha: {alpha}}}\n"
        (recipes / f"{name}.yaml").write_text(text)

    write("r-sf", 0.5)
    write("r-two", 0.5)
    built = {r.name: r.resolved() for r in load_recipes(recipes)}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"recipes": built, "scores": {}}))
    load(tmp_path)
    assert "recipes of the last `readaptir build`" not in caplog.text
    (recipes / "r-two.yaml").write_text(
        (recipes / "r-two.yaml").read_text() + "# a comment changes nothing built\n"
    )
    load(tmp_path)
    assert "recipes of the last `readaptir build`" not in caplog.text
    write("r-sf", 0.25)
    write("r-new", 0.5)
    (recipes / "r-two.yaml").unlink()
    load(tmp_path)
    said = (
        "recipes/ and the recipes of the last `readaptir build` (params.yaml), whose results these "
        "are, differ (changed: r-sf; new: r-new; gone: r-two): run `readaptir build`, then "
        "`dvc repro`"
    )
    assert said in caplog.text
    (recipes / "r-sf.yaml").write_text("base: b\nretriever: r\ncorpus: data/scifact\nalpha: 1\n")
    caplog.clear()
    load(tmp_path)
    assert re.search(r"recipes/ do not load \(\S*recipes/r-sf\.yaml:4: alpha: unknown", caplog.text)


def test_recipes_left_out_for_one_reason_are_one_warning(tmp_path, caplog):
    """A new sweep of twenty variants, built and not yet run: one line naming them, not twenty."""
    names = [f"sweep-a{i:02d}" for i in range(20)]
    params = {"recipes": {"r-sf": {}, **{n: {} for n in names}}, "scores": {"r-sf": "a" * 16}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "metrics").mkdir()
    m = {**metrics_file("r-sf", "scifact", "R", 0.745, 0.763), "stage": "a" * 16}
    (tmp_path / "metrics" / "r-sf.json").write_text(json.dumps(m))
    assert list(report.load(tmp_path)[1]) == ["r-sf"]
    assert [r.getMessage() for r in caplog.records] == [
        "20 recipe(s) built but with no metrics/<recipe>.json, left out (run `dvc repro`): "
        + ", ".join(names[:8])
        + " and 12 more"
    ]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"readapted": {"nDCG@10": "high"}}, "readapted.nDCG@10: expected a number, found 'high'"),
        ({"retriever": [0.7]}, "retriever: expected scores by metric name"),
        ({"readapted": None}, "readapted: expected scores by metric name"),
        ({"dataset": None}, None),  # present: a null dataset is only a label
        (
            {"readapted": {"nDCG@10": float("nan")}},
            "readapted.nDCG@10: expected a number, found nan",
        ),
        ({"alpha": "0.5"}, "alpha: expected a number, found '0.5'"),
        ({"beta": True}, "beta: expected a number, found True"),
        ({"dataset": ["x"]}, "dataset: expected a name, found ['x']"),
        ({"label": 5}, "label: expected a name, found 5"),
        ({"in_domain": "yes"}, "in_domain: expected true or false, found 'yes'"),
        ({"comparison": [1]}, "comparison: expected tests by metric name, found [1]"),
        ({"comparison": {"nDCG@10": 5}}, "comparison.nDCG@10: expected wins, ties, losses and"),
        (
            {"comparison": {"nDCG@10": {"wins": 1, "ties": 0, "losses": -1, "p_value": 1}}},
            "comparison.nDCG@10.losses: expected a count, found -1",
        ),
        (
            {"comparison": {"nDCG@10": {"wins": 1, "ties": 0, "losses": 0, "p_value": "x"}}},
            "comparison.nDCG@10.p_value: expected a p-value, found 'x'",
        ),
        ({"readapted": {}}, "readapted: no 'nDCG@10', which the other run has"),
    ],
)
def test_a_metrics_file_not_as_the_score_stage_writes_it_is_named(tmp_path, change, message):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"recipes": {"r-sf": {}}}))
    (tmp_path / "metrics").mkdir()
    m = {**metrics_file("r-sf", "scifact", "R", 0.745, 0.763), **change}
    (tmp_path / "metrics" / "r-sf.json").write_text(json.dumps(m))
    if message is None:
        assert list(report.load(tmp_path)[1]) == ["r-sf"]
        return
    with pytest.raises(report.ReportError, match=re.escape(f"metrics/r-sf.json: {message}")):
        report.load(tmp_path)
    (tmp_path / "metrics" / "r-sf.json").write_text("{}")
    with pytest.raises(report.ReportError, match="metrics/r-sf.json: no 'dataset'"):
        report.load(tmp_path)


@pytest.mark.parametrize(
    "params, key",
    [
        ({"recipes": ["a", "b"]}, "recipes"),
        ({"recipes": {1: {}, "b": {}}}, "recipes"),
        ({"recipes": {"a": "x"}}, "recipes"),
        ({"recipes": {"a": {}}, "scores": ["x"]}, "scores"),
        ({"recipes": {"a": {}}, "scores": {"a": 5}}, "scores"),
    ],
)
def test_a_params_file_not_as_build_writes_it_is_named(tmp_path, params, key):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(report.ReportError, match=rf"params\.yaml: {key}: not as `readaptir build`"):
        report.load(tmp_path)


def test_plots_without_metrics_or_of_a_metric_no_file_holds_are_errors(tmp_path):
    from click.testing import CliRunner

    from readaptir.cli import main

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"recipes": {"r-sf": {}}}))
    result = CliRunner().invoke(main, ["plots", "--root", str(tmp_path)])
    assert result.exit_code == 1  # as report says: not an empty CSV and exit 0
    assert "no metrics yet: run `dvc repro` first" in result.output
    (tmp_path / "metrics").mkdir()
    m = metrics_file("r-sf", "scifact", "R", 0.745, 0.763)
    (tmp_path / "metrics" / "r-sf.json").write_text(json.dumps(m))
    result = CliRunner().invoke(main, ["plots", "--metric", "map", "--root", str(tmp_path)])
    assert result.exit_code == 1
    assert "no metrics file holds 'MAP'; they hold nDCG@10" in result.output
    assert not (tmp_path / "plots").exists()
    result = CliRunner().invoke(main, ["plots", "--root", str(tmp_path)])
    assert result.exit_code == 0
    assert "no α curve: no sweep (`readapt.alpha: [...]`) with metrics yet" in result.output


@pytest.mark.parametrize("command", [["diff", "HEAD"], ["report"], ["build"], ["init"]])
def test_a_root_that_is_not_a_folder_is_named(tmp_path, command):
    from click.testing import CliRunner

    from readaptir.cli import main

    (tmp_path / "file").write_text("x")
    cases = [("file", "file' is a file")]
    if command != ["init"]:  # init makes its folder
        cases.append(("missing", "missing' does not exist"))
    for root, said in cases:
        result = CliRunner().invoke(main, [*command, "--root", str(tmp_path / root)])
        assert result.exit_code == 2 and said in result.output, result.output


def test_metric_option_takes_a_recipes_spelling(tmp_path):
    """`--metric ndcg@10` is nDCG@10, as in a recipe's eval.metrics; an unknown one is refused."""
    from click.testing import CliRunner

    from readaptir.cli import main

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"recipes": {"r-sf": {}}}))
    (tmp_path / "metrics").mkdir()
    m = metrics_file("r-sf", "scifact", "R", 0.745, 0.763)
    (tmp_path / "metrics" / "r-sf.json").write_text(json.dumps(m))
    args = ["report", "--root", str(tmp_path), "--table", "recipes", "--format", "csv"]
    result = CliRunner().invoke(main, [*args, "--metric", "ndcg @ 10"])
    assert result.exit_code == 0 and "r-sf,scifact,0.5,1.0,0.745,0.763" in result.output
    result = CliRunner().invoke(main, [*args, "--metric", "bleu@4"])
    assert result.exit_code == 2 and "unknown metric 'bleu@4'" in result.output
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("readaptir, version ")


def test_a_reader_that_goes_away_ends_a_command_quietly(tmp_path):
    """`readaptir report | head -1`: no "Error: Broken pipe" once head has what it wanted."""
    import sys

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"recipes": {"r-sf": {}}}))
    (tmp_path / "metrics").mkdir()
    m = metrics_file("r-sf", "scifact", "R", 0.745, 0.763)
    (tmp_path / "metrics" / "r-sf.json").write_text(json.dumps(m))
    read, write = os.pipe()
    os.close(read)  # the reader has gone before the command writes
    command = [sys.executable, "-m", "readaptir", "report", "--root", str(tmp_path)]
    done = subprocess.run(command, stdout=write, stderr=subprocess.PIPE, text=True)
    os.close(write)
    assert "Broken pipe" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_broken_pipe_other_than_the_output_is_an_error():
    """Only the reader of standard output going away ends a command quietly."""
    import errno

    import click

    from readaptir.cli import user_errors

    @user_errors
    def writes_to_a_worker():
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    with pytest.raises(click.ClickException, match="Broken pipe"):
        writes_to_a_worker()


def test_ctrl_c_exits_as_a_shell_reports_an_interrupt(tmp_path, monkeypatch):
    """128 + SIGINT, as for any program a terminal interrupts (click's own Abort gives 1); the
    multi-process launcher turns a passed-on Ctrl-C into the same KeyboardInterrupt."""
    from click.testing import CliRunner

    from readaptir import cli

    def interrupted(root):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_plan", interrupted)
    result = CliRunner().invoke(cli.main, ["validate", "--root", str(tmp_path)])
    assert result.exit_code == 130 and "Aborted!" in result.output

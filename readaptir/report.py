"""Tables of results, read from the metrics files of a workspace or of a git revision.

- ``paper``: the RE-AdaptIR Table 1 layout: a row per dataset, ``Base`` and ``RA`` columns per
  retriever label, an average row and a zero-shot average (datasets not marked ``in_domain``);
  RA cells marked † where the paired randomisation test gives p < 0.05.
- ``recipes``: a row per recipe with α, β, both scores, the change and per-query win/tie/loss.
- ``alpha``: sweeps: a row per (label, dataset), a column per α.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from readaptir.artifacts import parse_mapping, read_text
from readaptir.dvcfile import ROOT_PARAMS
from readaptir.graph import recipe_digest
from readaptir.recipe import RecipeError
from readaptir.recipe_files import load_recipes, recipe_files

LOG = logging.getLogger(__name__)
SIGNIFICANCE = 0.05
WORKSPACE = "workspace"


class ReportError(ValueError):
    pass


class NothingBuilt(ReportError):
    """A workspace or revision with no recipes built (before the project began, say)."""


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def resolve_rev(root: Path, rev: str) -> str:
    """A git revision, or a DVC experiment's name (its ref under refs/exps), as a commit."""
    found = _git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if found.returncode == 0:
        return found.stdout.strip()
    refs = _git(root, "for-each-ref", "--format=%(refname)", "refs/exps").stdout.split()
    named = [ref for ref in refs if ref.rsplit("/", 1)[-1] == rev]
    if len(named) == 1:
        return _git(root, "rev-parse", named[0]).stdout.strip()
    if _git(root, "rev-parse", "--git-dir").returncode:
        raise ReportError(f"{rev!r}: {root} is not in a git repository")
    if _git(root, "rev-parse", "--verify", "--quiet", "HEAD").returncode:
        raise ReportError(f"{rev!r}: the git repository of {root} has no commits yet")
    raise ReportError(f"{rev!r} is neither a git revision nor a DVC experiment of {root}")


def _git_show(root: Path, rev: str, path: str) -> str | None:
    result = _git(root, "show", f"{rev}:./{path}")  # ./: relative to the project, not the repo
    return result.stdout if result.returncode == 0 else None


def _read(root: Path, rev: str, path: str) -> str | None:
    if rev == WORKSPACE:
        file = Path(root) / path
        return read_text(file) if file.is_file() else None
    return _git_show(root, rev, path)


# a recipe whose metrics file is left out of report, diff and plots (or is in, with a doubt)
FLAGS = {
    "missing": "%d recipe(s) built but with no metrics/<recipe>.json%s, left out "
    "(run `dvc repro`): %s",
    "unrecorded": "%d metrics file(s)%s record no score stage (older than that record), so whether "
    "they are of the recipe as now built is unknown (`dvc repro` makes sure): %s",
    "stale": "%d metrics file(s)%s are of an earlier build of their recipe, left out "
    "(run `dvc repro`): %s",
    "foreign": f"%d metrics file(s)%s are of another version of their recipe than {ROOT_PARAMS} "
    "holds, left out: the recipe was built since and not yet run (run `dvc repro`), or set there "
    "by hand or by `dvc exp run -S` (edit recipes/, `readaptir build`, `dvc repro`): %s",
}


def _load_metrics(
    root: Path, rev: str, name: str, recipe: dict, stage: str | None, into: dict[str, dict]
) -> str | None:
    """Recipe ``name``'s metrics file put ``into`` the metrics unless it is not of the recipe as
    built; the reason (a key of ``FLAGS``) when it is left out or doubtful."""
    found = _read(root, rev, f"metrics/{name}.json")
    if found is None:  # a sweep's new variant, say: a curve without it would look whole
        return "missing"
    where = f"metrics/{name}.json" + ("" if rev == WORKSPACE else f" at {rev[:12]}")
    m = parse_mapping(found, where, fmt="json")
    check_scores(m, where)
    if stage is not None and "stage" in m and m["stage"] != stage:
        return "stale"
    if m.get("recipe_digest") not in (None, recipe_digest(recipe)):
        return "foreign"
    into[name] = m
    return "unrecorded" if stage is not None and "stage" not in m else None


def _named(names: list[str], shown: int = 8) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def load(root: Path, rev: str = WORKSPACE) -> tuple[dict[str, dict], dict[str, dict]]:
    """(resolved recipes, metrics) by recipe name, from the workspace or a git revision (or a
    DVC experiment's name)."""
    if rev != WORKSPACE:
        rev = resolve_rev(Path(root), rev)
    # the root params.yaml holds every recipe in both layouts (see dvcfile)
    where = str(Path(root) / ROOT_PARAMS) if rev == WORKSPACE else f"{ROOT_PARAMS} at {rev}"
    params = parse_mapping(_read(root, rev, ROOT_PARAMS) or "", where)
    recipes, built = params.get("recipes") or {}, params.get("scores") or {}
    for key, value, held in (("recipes", recipes, dict), ("scores", built, str)):
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, held) for k, v in value.items()
        ):
            raise ReportError(
                f"{where}: {key}: not as `readaptir build` writes it (recipe names to their "
                f"{'settings' if held is dict else 'score stages'}): run `readaptir build` again"
            )
    if not recipes:
        if rev == WORKSPACE:
            raise NothingBuilt(f"no built recipes in {root}: run `readaptir build` first")
        raise NothingBuilt(f"no built recipes at git revision {rev}: none was built and committed")
    metrics: dict[str, dict] = {}
    flagged: dict[str, list[str]] = {reason: [] for reason in FLAGS}
    for name in sorted(recipes):
        reason = _load_metrics(root, rev, name, recipes[name], built.get(name), metrics)
        if reason:
            flagged[reason].append(name)
    at = "" if rev == WORKSPACE else f" at {rev[:12]}"
    for reason, names in flagged.items():
        if names:  # a hundred-variant sweep: one line, not a hundred
            LOG.warning(FLAGS[reason], len(names), at, _named(names))
    unbuilt = _unbuilt(root, recipes) if rev == WORKSPACE else None
    if unbuilt:
        LOG.warning("%s", unbuilt)
    return recipes, metrics


def _unbuilt(root: Path, built: dict[str, dict]) -> str | None:
    """How the workspace's recipe files and the recipes of the last build (``params.yaml``)
    differ: a recipe edited and not built again changes no stage, so `dvc repro` runs nothing and
    the old results would pass for the new recipe. (A revision's files are left alone: they would
    be read with today's schema, its ``params.yaml`` was written with its own.)"""
    folder = Path(root) / "recipes"
    try:
        if not folder.is_dir() or not recipe_files(folder):
            return None  # nothing to compare (metrics files alone)
        now = {r.name: recipe_digest(r.resolved()) for r in load_recipes(folder)}
    except (RecipeError, OSError) as err:
        return f"recipes/ do not load ({err}), so whether these results are theirs is unknown"
    then = {name: recipe_digest(recipe) for name, recipe in built.items()}
    changes = [
        ("changed", sorted(n for n in now.keys() & then.keys() if now[n] != then[n])),
        ("new", sorted(now.keys() - then.keys())),
        ("gone", sorted(then.keys() - now.keys())),
    ]
    said = [f"{what}: {_named(names)}" for what, names in changes if names]
    if not said:
        return None
    return (
        f"recipes/ and the recipes of the last `readaptir build` ({ROOT_PARAMS}), whose results "
        f"these are, differ ({'; '.join(said)}): run `readaptir build`, then `dvc repro`"
    )


def check_scores(m: dict, where: str) -> None:
    """A metrics file as the score stage writes it: the collection, α, β and both runs' scores
    (numbers by metric name); anything else is an error naming the file and key."""
    for key in ("dataset", "alpha", "beta", "retriever", "readapted"):
        if key not in m:
            raise ReportError(f"{where}: no {key!r}: not a metrics file of a score stage")
    for side in ("retriever", "readapted"):
        if not isinstance(m[side], dict):
            raise ReportError(f"{where}: {side}: expected scores by metric name")
        for metric, value in m[side].items():
            _expect(_is_number(value), where, f"{side}.{metric}", "a number", value)
    for metric in sorted(m["retriever"].keys() ^ m["readapted"].keys()):
        side = "readapted" if metric in m["retriever"] else "retriever"
        raise ReportError(f"{where}: {side}: no {metric!r}, which the other run has")
    for key in ("alpha", "beta"):
        _expect(_is_number(m[key]), where, key, "a number", m[key])
    for key in ("dataset", "label", "sweep"):
        _expect(m.get(key) is None or isinstance(m[key], str), where, key, "a name", m[key])
    in_domain = m.get("in_domain", False)
    _expect(isinstance(in_domain, bool), where, "in_domain", "true or false", in_domain)
    comparisons = m.get("comparison", {})
    _expect(isinstance(comparisons, dict), where, "comparison", "tests by metric name", comparisons)
    for metric, test in comparisons.items():
        key = f"comparison.{metric}"
        _expect(isinstance(test, dict), where, key, "wins, ties, losses and p_value", test)
        for count in ("wins", "ties", "losses"):
            value = test.get(count)
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            _expect(ok, where, f"{key}.{count}", "a count", value)
        p_value = test.get("p_value")
        _expect(
            _is_number(p_value) and 0 <= p_value <= 1, where, f"{key}.p_value", "a p-value", p_value
        )


def _is_number(value: object) -> bool:
    """A finite int or float (JSON's NaN and Infinity are none, nor is true or false)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _expect(ok: bool, where: str, key: str, what: str, value: object) -> None:
    if not ok:
        raise ReportError(f"{where}: {key}: expected {what}, found {value!r}")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _is_retriever_alone(m: dict) -> bool:
    """A recipe that asked for α=0, β=1 (an α chosen by ``alpha: auto`` does not count)."""
    return m.get("alpha") == 0 and m.get("beta") == 1 and "alpha_selection" not in m


def paper_cells(metrics: dict[str, dict], metric: str) -> tuple[list[str], list[str], dict]:
    """Datasets, retriever labels, and {(dataset, label): metrics} of the non-sweep recipes."""
    cells: dict[tuple[str, str], dict] = {}
    # a retriever-alone recipe (α=0, β=1) fills a cell only when no readapted recipe does
    ordered = sorted(metrics.items(), key=lambda item: _is_retriever_alone(item[1]))
    for name, m in ordered:
        if m.get("sweep") or metric not in m.get("retriever", {}):
            continue
        key = (m["dataset"], m.get("label") or name)
        if key in cells and _is_retriever_alone(m):
            continue
        if key in cells:
            raise ReportError(
                f"recipes {cells[key]['recipe']!r} and {name!r} both fill {key[1]} on {key[0]}: "
                "give one a different `label:` (or see `readaptir report --table recipes`)"
            )
        cells[key] = m
    datasets = sorted({d for d, _ in cells})
    labels = list(dict.fromkeys(label for _, label in sorted(cells, key=lambda k: k[1])))
    return datasets, labels, cells


def paper_rows(metrics: dict[str, dict], metric: str) -> tuple[list[str], list[list]]:
    """Header and rows (floats or None) of the Table 1 layout, averages last."""
    datasets, labels, cells = paper_cells(metrics, metric)
    header = ["dataset"] + [f"{label} {col}" for label in labels for col in ("Base", "RA")]
    rows: list[list] = []
    for dataset in datasets:
        row: list = [dataset]
        for label in labels:
            m = cells.get((dataset, label))
            row += [m["retriever"][metric], m["readapted"][metric]] if m else [None, None]
        rows.append(row)
    in_domain = {d for (d, _), m in cells.items() if m.get("in_domain")}
    averages = [("Average", rows)]
    if in_domain:
        averages.append(("Zero-shot average", [r for r in rows if r[0] not in in_domain]))
    for title, chosen in averages:
        columns = [[r[col] for r in chosen] for col in range(1, len(header))]
        rows_avg = [None if not v or None in v else _mean(v) for v in columns]
        rows = [*rows, [title, *rows_avg]]
    return header, rows


class WinsTiesLosses(NamedTuple):
    """Queries the readapted model scores better on, the same on, worse on; shown as w/t/l."""

    wins: int
    ties: int
    losses: int

    def __str__(self) -> str:
        return "/".join(map(str, self))


def recipe_rows(metrics: dict[str, dict], metric: str) -> tuple[list[str], list[list]]:
    header = ["recipe", "dataset", "alpha", "beta", "Base", "RA", "change", "W/T/L", "p"]
    rows = []
    for name, m in metrics.items():
        base, ra = m.get("retriever", {}).get(metric), m.get("readapted", {}).get(metric)
        comparison = m.get("comparison", {}).get(metric, {})
        wtl = (
            WinsTiesLosses(comparison["wins"], comparison["ties"], comparison["losses"])
            if comparison
            else None
        )
        rows.append(
            [
                name,
                m.get("dataset"),
                m.get("alpha"),
                m.get("beta"),
                base,
                ra,
                None if base is None or ra is None else ra - base,
                wtl,
                comparison.get("p_value"),
            ]
        )
    return header, rows


def sweep_curves(metrics: dict[str, dict], metric: str) -> dict[tuple, dict[float, tuple]]:
    """Sweep variants by (sweep, label, dataset, β): {α: (readapted, retriever)}."""
    curves: dict[tuple, dict[float, tuple]] = {}
    for m in metrics.values():
        if m.get("sweep") and metric in m.get("readapted", {}):
            key = (m["sweep"], m.get("label", ""), m["dataset"], m["beta"])
            curves.setdefault(key, {})[m["alpha"]] = (
                m["readapted"][metric],
                m["retriever"][metric],
            )
    return dict(sorted(curves.items()))


def alpha_rows(metrics: dict[str, dict], metric: str) -> tuple[list[str], list[list]]:
    """Sweeps: RA score per α, a row per (sweep, label, dataset, β)."""
    curves = sweep_curves(metrics, metric)
    alphas = sorted({a for c in curves.values() for a in c})
    header = ["sweep", "label", "dataset", "beta"] + [f"a={a:g}" for a in alphas]
    rows = [
        [*key, *(curve[a][0] if a in curve else None for a in alphas)]
        for key, curve in curves.items()
    ]
    return header, rows


# the columns of differences, shown with their sign (by name: others hold revisions and labels)
SIGNED = ("change", "RA change")


def _fmt(value, column: str, scale: float) -> str:
    if value is None:
        return "-"
    if column == "p":
        return _p_text(value)
    if column in ("alpha", "beta"):  # an α sweep's "a=…" columns hold scores
        return f"{value:g}"
    if isinstance(value, float):
        text = f"{value * scale:.1f}" if scale != 1 else f"{value:.4f}"
        return ("+" if value >= 0 else "") + text if column in SIGNED else text
    return str(value)


def _p_text(p: float) -> str:
    """``p`` to 3 significant digits, or more where fewer would round it across
    ``SIGNIFICANCE`` (0.049995 shows as 0.049995, not as 0.05 beside a †)."""
    for digits in range(3, 17):
        text = f"{p:.{digits}g}"
        if (float(text) < SIGNIFICANCE) == (p < SIGNIFICANCE):
            return text
    return f"{p:.17g}"  # as many as a float holds


def render(
    header: list[str],
    rows: list[list],
    fmt: str,
    scale: float = 1.0,
    marks: dict[tuple[int, int], str] | None = None,
) -> str:
    if fmt == "json":
        records = [dict(zip(header, row, strict=True)) for row in rows]
        for record in records:
            counts = record.get("W/T/L")
            if isinstance(counts, WinsTiesLosses):  # the counts as numbers too, for scripts
                record |= {"W/T/L": str(counts), **counts._asdict()}
        return json.dumps(records, indent=2)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
        return buffer.getvalue().rstrip("\n")
    marks = marks or {}
    text = [
        [_fmt(v, header[j], scale) + marks.get((i, j), "") for j, v in enumerate(row)]
        for i, row in enumerate(rows)
    ]
    widths = [max(len(c[k]) for c in [header, *text]) for k in range(len(header))]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += [
        "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
        for cells in text
    ]
    return "\n".join(lines)


def check_metric(metric: str, *metrics: dict[str, dict], at: Sequence[str] = ()) -> None:
    """A metric no metrics file holds is a typo, not an empty table; the recipes whose files
    lack it are named, not left out of averages and tables without a word (with ``at``, the
    names of the versions ``metrics`` are of, those a recipe lacks it at)."""
    held = {name for ms in metrics for m in ms.values() for name in m.get("readapted", {})}
    if held and metric not in held:
        raise ReportError(f"no metrics file holds {metric!r}; they hold {', '.join(sorted(held))}")
    where: dict[str, list[str]] = {}
    for i, ms in enumerate(metrics):
        for n, m in ms.items():
            if metric not in m.get("readapted", {}):
                where.setdefault(n, []).append(at[i] if at else "")
    lacking = [
        n if len(revs) == len(metrics) or not at else f"{n} (at {', '.join(revs)})"
        for n, revs in sorted(where.items())
    ]
    if held and lacking:
        LOG.warning(
            "%d recipes have no %s (their eval.metrics leave it out), so no score here: %s",
            len(lacking), metric, _named(lacking),
        )  # fmt: skip


def table(
    metrics: dict[str, dict], kind: str = "paper", metric: str = "nDCG@10", fmt: str = "md"
) -> str:
    check_metric(metric, metrics)
    sweeps = sorted({m["sweep"] for m in metrics.values() if m.get("sweep")})
    if kind == "paper":
        if metrics and all(m.get("sweep") for m in metrics.values()):
            raise ReportError(
                "every recipe with metrics is a sweep (a list of α, or alpha: auto's grid), "
                "which this table leaves out: see `readaptir report --table alpha` or "
                "`--table recipes`"
            )
        if sweeps:
            LOG.warning(
                "the variants of %d sweep(s) are left out of this table (see `--table alpha`): %s",
                len(sweeps), _named(sweeps),
            )  # fmt: skip
        return _paper_table(metrics, metric, fmt)
    if kind == "recipes":
        return render(*recipe_rows(metrics, metric), fmt)
    if kind == "alpha":
        if not sweeps:
            raise ReportError(
                "no recipe with metrics is a sweep (`readapt.alpha: [...]`): see "
                "`readaptir report` or `--table recipes`"
            )
        return render(*alpha_rows(metrics, metric), fmt)
    raise ReportError(f"unknown table {kind!r}; expected paper, recipes or alpha")


def _paper_table(metrics: dict[str, dict], metric: str, fmt: str) -> str:
    """The Table 1 layout: in Markdown ×100 with † where p < ``SIGNIFICANCE``; in CSV and JSON
    unscaled, with each RA column's p-value in a column after it."""
    header, rows = paper_rows(metrics, metric)
    _, _, cells = paper_cells(metrics, metric)

    def p_value(row: list, column: str) -> float | None:
        comparison = (cells.get((row[0], column[: -len(" RA")])) or {}).get("comparison", {})
        return (comparison.get(metric) or {}).get("p_value")

    ra = [j for j, column in enumerate(header) if column.endswith(" RA")]
    if fmt != "md":
        wide_header: list[str] = []
        wide: list[list] = [[] for _ in rows]
        for j, column in enumerate(header):
            wide_header.append(column)
            for out, row in zip(wide, rows, strict=True):
                out.append(row[j])
            if j in ra:
                wide_header.append(f"{column} p")
                for out, row in zip(wide, rows, strict=True):
                    out.append(p_value(row, column))
        return render(wide_header, wide, fmt)
    marks = {
        (i, j): "†"
        for i, row in enumerate(rows)
        for j in ra
        if (p := p_value(row, header[j])) is not None and p < SIGNIFICANCE
    }
    body = render(header, rows, fmt, scale=100.0, marks=marks)
    return body + (
        f"\n\n{metric} ×100; † RA differs from Base with p < {SIGNIFICANCE} "
        "(paired randomisation test over queries)."
    )


def _flatten(data, prefix: str = "") -> dict[str, object]:
    if isinstance(data, dict):
        out: dict[str, object] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def diff(root: Path, rev_a: str, rev_b: str = WORKSPACE, metric: str = "nDCG@10") -> str:
    """Per recipe: what changed in its parameters beside how its scores moved."""
    if WORKSPACE not in (rev_a, rev_b) and resolve_rev(root, rev_a) == resolve_rev(root, rev_b):
        LOG.warning("%s and %s are one commit: nothing can have changed", rev_a, rev_b)
    loaded: list[tuple[dict, dict] | None] = []
    for rev in (rev_a, rev_b):
        try:
            loaded.append(load(root, rev))
        except NothingBuilt:  # a revision before the project began, say
            loaded.append(None)
    if loaded == [None, None]:
        raise NothingBuilt(f"no recipes built at {rev_a} nor at {rev_b}: nothing to compare")
    for rev, got, other in ((rev_a, loaded[0], "added"), (rev_b, loaded[1], "removed")):
        if got is None:
            LOG.warning("no recipes built at %s: every recipe counts as %s", rev, other)
    (recipes_a, metrics_a), (recipes_b, metrics_b) = (got or ({}, {}) for got in loaded)
    check_metric(metric, metrics_a, metrics_b, at=(rev_a, rev_b))
    header = [
        "recipe",
        "changed parameters",
        f"Base {rev_a}",
        f"Base {rev_b}",
        f"RA {rev_a}",
        f"RA {rev_b}",
        "RA change",
    ]
    rows = []
    for name in sorted(set(recipes_a) | set(recipes_b)):
        if name not in recipes_a or name not in recipes_b:
            changed = "added" if name not in recipes_a else "removed"
        else:
            flat_a, flat_b = _flatten(recipes_a[name]), _flatten(recipes_b[name])
            keys = sorted(k for k in set(flat_a) | set(flat_b) if flat_a.get(k) != flat_b.get(k))
            changed = ", ".join(f"{k}: {flat_a.get(k)} -> {flat_b.get(k)}" for k in keys) or "-"
        a, b = metrics_a.get(name, {}), metrics_b.get(name, {})
        ra_a, ra_b = a.get("readapted", {}).get(metric), b.get("readapted", {}).get(metric)
        rows.append(
            [
                name,
                changed,
                a.get("retriever", {}).get(metric),
                b.get("retriever", {}).get(metric),
                ra_a,
                ra_b,
                None if ra_a is None or ra_b is None else ra_b - ra_a,
            ]
        )
    return render(header, rows, "md")

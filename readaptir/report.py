"""Tables of results: recipe × dataset, retriever alone vs readapted."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def collect(root: Path) -> list[dict]:
    """The metrics of every built recipe (those in params.yaml), in recipe-name order."""
    params_path = Path(root) / "params.yaml"
    if not params_path.is_file():
        raise FileNotFoundError(f"{params_path} not found: run `readaptir build` first")
    recipes = (yaml.safe_load(params_path.read_text()) or {}).get("recipes") or {}
    rows = []
    for name in sorted(recipes):
        path = Path(root) / "metrics" / f"{name}.json"
        if path.is_file():
            rows.append(json.loads(path.read_text()))
        else:
            rows.append({"recipe": name, "missing": True})
    return rows


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def table(rows: list[dict], metric: str = "nDCG@10", fmt: str = "md") -> str:
    """Markdown, CSV or JSON; recipes not yet scored show as missing."""
    records = []
    for row in rows:
        base = row.get("retriever", {}).get(metric)
        ra = row.get("readapted", {}).get(metric)
        records.append(
            {
                "recipe": row["recipe"],
                "dataset": row.get("dataset", "-"),
                "alpha": row.get("alpha"),
                "beta": row.get("beta"),
                "retriever": base,
                "readapted": ra,
                "change": None if base is None or ra is None else ra - base,
            }
        )
    if fmt == "json":
        return json.dumps({"metric": metric, "rows": records}, indent=2)
    header = [
        "recipe",
        "dataset",
        "alpha",
        "beta",
        f"retriever {metric}",
        f"readapted {metric}",
        "change",
    ]
    lines = []
    for r in records:
        lines.append(
            [
                r["recipe"],
                r["dataset"],
                "-" if r["alpha"] is None else f"{r['alpha']:g}",
                "-" if r["beta"] is None else f"{r['beta']:g}",
                _fmt(r["retriever"]),
                _fmt(r["readapted"]),
                _fmt(r["change"], signed=True),
            ]
        )
    if fmt == "csv":
        return "\n".join(",".join(cells) for cells in [header, *lines])
    widths = [max(len(c[i]) for c in [header, *lines]) for i in range(len(header))]
    out = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    out += [
        "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
        for cells in lines
    ]
    return "\n".join(out)

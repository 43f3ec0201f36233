"""Plots: α curves (score against α per dataset) and the knowledge adapter's loss curves.

Written as CSV files that ``dvc plots show`` renders (dvc.yaml lists them) and as PNG files.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from readaptir.artifacts import atomic_file
from readaptir.graph import scores_a_sweep, stage_output

LOG = logging.getLogger(__name__)

PLOTS_DIR = "plots"
ALPHA_CSV = f"{PLOTS_DIR}/alpha_curves.csv"
ALPHA_PNG = f"{PLOTS_DIR}/alpha_curves.png"


def alpha_points(metrics: dict[str, dict], metric: str) -> list[dict]:
    """One point per sweep variant: its α, the readapted score and the retriever's."""
    from readaptir.report import sweep_curves

    return [
        {
            "curve": f"{sweep} ({label}, {dataset}, β={beta:g})",
            "alpha": alpha,
            metric: scores[0],
            "retriever": scores[1],
        }
        for (sweep, label, dataset, beta), curve in sweep_curves(metrics, metric).items()
        for alpha, scores in sorted(curve.items())
    ]


def adapter_logs(root: Path) -> dict[str, Path]:
    """Training logs of the adapters the built plan names, by stage name (existing ones only)."""
    from readaptir.dvcfile import all_stage_specs

    logs = {}
    for name, spec in all_stage_specs(root).items():
        if spec["kind"] == "adapter":
            log = Path(root) / stage_output(spec) / "training_log.csv"
            if log.is_file():
                logs[name] = log
    return logs


def stale_plots(root: Path) -> list[Path]:
    """PNG files of ours no stage of the built plan stands for: the α curves where no recipe is a
    sweep, the loss curve of an adapter no recipe has (not one whose log is yet to come)."""
    from readaptir.dvcfile import all_stage_specs

    specs = all_stage_specs(root)
    out = Path(root) / PLOTS_DIR
    sweeps = any(scores_a_sweep(s["kind"], s.get("params") or {}) for s in specs.values())
    adapters = {f"loss_{name}.png" for name, spec in specs.items() if spec["kind"] == "adapter"}
    stale = [] if sweeps else [Path(root) / ALPHA_PNG]
    stale += [path for path in sorted(out.glob("loss_*.png")) if path.name not in adapters]
    return [path for path in stale if path.is_file()]


def write_plots(
    root: Path, metrics: dict[str, dict], metric: str = "nDCG@10"
) -> tuple[list[Path], list[Path]]:
    """Write the α-curve CSV and the PNG files; returns the files written and those of an earlier
    run removed (``stale_plots``), so that plots/ shows the recipes as built."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(root) / PLOTS_DIR
    out.mkdir(exist_ok=True)
    written = []
    points = alpha_points(metrics, metric)
    with atomic_file(Path(root) / ALPHA_CSV) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["curve", "alpha", "retriever", metric])
        writer.writeheader()
        writer.writerows(points)
    written.append(Path(root) / ALPHA_CSV)
    if points:
        fig, ax = plt.subplots(figsize=(6, 4))
        for curve in dict.fromkeys(p["curve"] for p in points):
            mine = [p for p in points if p["curve"] == curve]
            line = ax.plot(
                [p["alpha"] for p in mine], [p[metric] for p in mine], marker="o", label=curve
            )[0]
            ax.axhline(mine[0]["retriever"], color=line.get_color(), linestyle=":", linewidth=1)
        ax.set(xlabel="α", ylabel=metric, title=f"{metric} against α (dotted: retriever alone)")
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(Path(root) / ALPHA_PNG, dpi=120)
        plt.close(fig)
        written.append(Path(root) / ALPHA_PNG)
    for name, log in adapter_logs(root).items():
        steps, losses = loss_curve(log)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, losses)
        ax.set(xlabel="step", ylabel="loss", title=f"{name}: training loss")
        fig.tight_layout()
        fig.savefig(out / f"loss_{name}.png", dpi=120)
        plt.close(fig)
        written.append(out / f"loss_{name}.png")
    removed = [path for path in stale_plots(root) if path not in written]
    for path in removed:
        path.unlink()
    return written, removed


def loss_curve(log: Path) -> tuple[list[int], list[float]]:
    """Steps and losses of an adapter's ``training_log.csv``; a file not as the adapter stage
    writes it is an error naming it and the line."""
    steps: list[int] = []
    losses: list[float] = []
    with log.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            if not {"step", "loss"} <= set(reader.fieldnames or ()):
                raise ValueError("no step and loss columns, as the adapter stage writes")
            for row in reader:
                try:
                    steps.append(int(row["step"]))
                    losses.append(float(row["loss"]))
                except (TypeError, ValueError):
                    raise ValueError(
                        f"expected a step and a loss, found {row.get('step')!r} and "
                        f"{row.get('loss')!r}"
                    ) from None
        except UnicodeDecodeError:
            raise ValueError(f"{log}: not UTF-8 text: not an adapter's training log") from None
        except ValueError as err:
            raise ValueError(f"{log}:{max(reader.line_num, 1)}: {err}") from None
        except csv.Error as err:  # a field past csv's limit, say: raised before the line counts
            raise ValueError(f"{log}:{reader.line_num + 1}: {err}") from None
    return steps, losses

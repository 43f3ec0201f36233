"""The ``readaptir`` command: a thin layer over the library (parse, call, print)."""

from __future__ import annotations

import functools
import logging
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import click

from readaptir import dvcfile, report, workspace
from readaptir.artifacts import remove
from readaptir.distributed import Ranks, launched_ranks
from readaptir.plan import plan_recipes
from readaptir.recipe_files import load_recipes

LOG = logging.getLogger("readaptir")

# Problems of the user's input: one clear line, exit 1. Anything else is a bug: full traceback.
USER_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    OSError,
    KeyError,
    RuntimeError,
    subprocess.CalledProcessError,
)


def _reader_gone() -> bool:
    """Whether standard output is a pipe no one reads any more (poll reports an error on it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor, or no poll here
        return False


def user_errors(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except BrokenPipeError as err:
            if not _reader_gone():
                raise click.ClickException(str(err)) from err
            # the reader of our output went away (`| head`): it has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error
            sys.exit(1)
        except KeyboardInterrupt:  # Ctrl-C, or SIGINT passed on to torchrun's ranks: 128 + 2,
            click.echo("Aborted!", err=True)  # as a shell reports it (click's own gives 1)
            sys.exit(128 + signal.SIGINT)
        except USER_ERRORS as err:
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                raise  # -v: the whole traceback
            message = str(err.args[0] if isinstance(err, KeyError) and err.args else err)
            raise click.ClickException(_rank_said(message)) from err

    return wrapper


def _rank_said(message: str) -> str:
    """``message`` with the rank that says it, in a rank torchrun started (its summary of a
    failed run may blame a rank that only lost its peer); elsewhere as it is."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # not torchrun's: a WORLD_SIZE set for another
        return message
    try:
        ranks = launched_ranks()
    except ValueError:  # torchrun always sets them, as numbers
        return message
    return f"rank {ranks.rank} of {ranks.world}: {message}" if ranks.world > 1 else message


root_option = click.option(
    "--root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=".",
    show_default=True,
    help="Project root (holds recipes/, dvc.yaml, params.yaml).",
)


def log_level(verbose: bool, ranks: Ranks) -> int:
    """Debug with -v; else info, but only warnings from ranks past the first of a multi-GPU run
    (their progress lines are rank 0's, reduced across ranks: each would print it again)."""
    if verbose:
        return logging.DEBUG
    return logging.INFO if ranks.main else logging.WARNING


@click.group()
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Debug logging, and a full traceback for an error (before the command: -v build).",
)
@click.version_option(package_name="readaptir", prog_name="readaptir")
def main(verbose: bool) -> None:
    """Readapt dense retrievers with unlabeled text: recipes → DVC stages → nDCG@10."""
    logging.basicConfig(
        level=log_level(verbose, launched_ranks()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:  # FAISS says at info level which builds it tried, as errors it recovered from
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)


@main.command()
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=".",
    show_default=True,
    help="Project root, inside a git repository (run git init first); made if it does not exist.",
)
@user_errors
def init(root: Path) -> None:
    """Set up a project in a git repository.

    DVC initialised, its cache links, recipes/ and metrics/, ignore rules.
    """
    for line in workspace.init(root):
        click.echo(line)


def _count(items, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _plan(root: Path):
    recipes = load_recipes(root / "recipes")
    return recipes, plan_recipes(recipes, root)


@main.command()
@root_option
@user_errors
def validate(root: Path) -> None:
    """Check every recipe: schema, paths, shapes. Errors name the file and key."""
    recipes, plan = _plan(root)
    click.echo(f"{_count(recipes, 'recipe')} valid; {_count(plan.stages, 'stage')}")


@main.command()
@root_option
@click.option(
    "--prune",
    is_flag=True,
    help="Remove the folders under artifacts/ that no stage of the recipes makes and no recipe "
    "reads, and the metrics files of recipes no longer built.",
)
@user_errors
def build(root: Path, prune: bool) -> None:
    """Expand the recipes into dvc.yaml and params.yaml.

    Recipes are recipes/**/*.yaml or .yml; files and folders named _* are partials. A block of
    .dvcignore keeps DVC from the hidden files of the local folders stages read.
    """
    running = workspace.dvc_running(root)
    if running:  # a stage still to run would read the new params.yaml beside the old dvc.yaml
        raise click.ClickException(
            f"DVC is running in {root} ({running[0]}): build when it is done; nothing written"
        )
    recipes, plan = _plan(root)
    changed = dvcfile.write(plan, root)
    kinds: dict[str, int] = {}
    for stage in plan.stages.values():
        kinds[stage.kind] = kinds.get(stage.kind, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in kinds.items())
    names = [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in changed]
    state = f"{', '.join(names[:4])}{' …' if len(names) > 4 else ''} ({len(names)} written)"
    state = state if changed else "nothing changed"
    click.echo(
        f"{_count(recipes, 'recipe')} -> {_count(plan.stages, 'stage')} ({summary}); {state}"
    )
    _leftovers(root, plan.leftovers(root), prune)
    _stale_metrics(plan.stale_metrics(root), prune)


def _stale_metrics(files: list[Path], prune: bool) -> None:
    """Say which metrics files no recipe writes any more, or remove them."""
    if not files:
        return
    names = ", ".join(path.name for path in files[:3]) + (" …" if len(files) > 3 else "")
    if prune:
        for path in files:
            path.unlink()
        click.echo(f"removed {len(files)} metrics file(s) of recipes no longer built: {names}")
        return
    click.echo(
        f"{len(files)} metrics file(s) of recipes no longer built are left in metrics/ ({names}; "
        "report leaves them out): `readaptir build --prune` removes them"
    )


def _leftovers(root: Path, stale: list[Path], prune: bool) -> None:
    """Say what stages no recipe has any more left under artifacts/, or remove it."""
    if not stale:
        return
    folders, are, them = ("folder", "is", "it") if len(stale) == 1 else ("folders", "are", "them")
    names = ", ".join(str(p.relative_to(root)) for p in stale[:3]) + (
        " …" if len(stale) > 3 else ""
    )
    if not prune:
        freed = workspace.freed_bytes(stale)
        size = f"{freed / 1e9:.1f} GB" if freed >= 1e8 else f"{freed / 1e6:.2f} MB"
        click.echo(
            f"{len(stale)} {folders} under artifacts/ {are} left over (outputs no stage of these "
            f"recipes makes, or what interrupted runs left: {names}); removing {them} frees "
            f"{size}: `readaptir build --prune`, then `dvc gc -w` for DVC's cached copies"
        )
        return
    failed = remove(stale)
    click.echo(f"removed {len(stale) - len(failed)} of {len(stale)} {folders}: {names}")
    if failed:
        raise click.ClickException("could not remove " + "; ".join(failed))


@main.group()
def stage() -> None:
    """Stage commands (called by dvc repro)."""


@stage.command("run")
@click.argument("name")
@root_option
@click.option(
    "--device",
    default=None,
    help="cpu, cuda, cuda:1 … (default: $READAPTIR_DEVICE, else a delta or merge stage's "
    "readapt.device, else CUDA when present).",
)
@click.option(
    "--spec",
    "spec_file",
    default=None,
    help="The file holding the stage's spec (relative to the root; default: the one of "
    "params.yaml and pipelines/*/specs.yaml that has it).",
)
@click.option(
    "--procs",
    type=int,
    default=None,
    envvar="READAPTIR_PROCS",
    help="Processes for an adapter or embed stage, under torchrun (default: $READAPTIR_PROCS, "
    "else one per visible GPU).",
)
@user_errors
def stage_run(
    name: str, root: Path, device: str | None, spec_file: str | None, procs: int | None
) -> None:
    """Run one stage of the pipeline by NAME."""
    from readaptir.distributed import launched_ranks
    from readaptir.runner import run_stage

    out = run_stage(root, name, device=device, spec_file=spec_file, procs=procs)
    if launched_ranks().world == 1:  # said once, by the process that launched the ranks
        click.echo(f"{name}: wrote {out}")


def _canonical_metric(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """The metric as metrics files name it: ``ndcg@10`` is nDCG@10, as in a recipe."""
    from readaptir.stages.score import parse_metric

    try:
        return parse_metric(value)[0]
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


metric_option = click.option(
    "--metric",
    default="nDCG@10",
    show_default=True,
    callback=_canonical_metric,
    help="nDCG@k, Recall@k, MRR@k, MAP, MAP@k or P@k, spelt as in a recipe (case ignored).",
)


@main.command("report")
@root_option
@metric_option
@click.option(
    "--table",
    "kind",
    type=click.Choice(["paper", "recipes", "alpha"]),
    default="paper",
    show_default=True,
    help="paper: datasets × retriever Base/RA (Table 1); recipes: one row per recipe "
    "with per-query win/tie/loss; alpha: sweeps, a column per α.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["md", "csv", "json"]),
    default="md",
    show_default=True,
    help="md: the paper table ×100 with †, the others unscaled; csv and json: unscaled, each RA "
    "column's p-value beside it.",
)
@click.option(
    "--rev",
    default=report.WORKSPACE,
    show_default=True,
    help="A git revision or DVC experiment name to report instead of the workspace.",
)
@user_errors
def report_cmd(root: Path, metric: str, kind: str, fmt: str, rev: str) -> None:
    """Tables of results from the metrics files."""
    _, metrics = report.load(root, rev)
    if not metrics:
        raise click.ClickException("no metrics yet: run `dvc repro` first")
    click.echo(report.table(metrics, kind=kind, metric=metric, fmt=fmt))


@main.command("diff")
@click.argument("rev_a")
@click.argument("rev_b", default=report.WORKSPACE)
@root_option
@metric_option
@user_errors
def diff_cmd(rev_a: str, rev_b: str, root: Path, metric: str) -> None:
    """Compare two versions, recipe by recipe.

    Changed parameters beside the change in scores.

    REV_A and REV_B are git revisions or DVC experiments; REV_B defaults to the workspace.
    """
    click.echo(report.diff(root, rev_a, rev_b, metric=metric))


@main.command("plots")
@root_option
@metric_option
@user_errors
def plots_cmd(root: Path, metric: str) -> None:
    """Write α curves and adapter loss curves.

    plots/*.png, and plots/alpha_curves.csv, which `dvc plots show` reads.
    """
    from readaptir.plots import ALPHA_PNG, write_plots

    _, metrics = report.load(root)
    if not metrics:
        raise click.ClickException("no metrics yet: run `dvc repro` first")
    report.check_metric(metric, metrics)
    written, removed = write_plots(root, metrics, metric)
    for path in written:
        click.echo(f"wrote {path}")
    if Path(root) / ALPHA_PNG not in written:
        click.echo("no α curve: no sweep (`readapt.alpha: [...]`) with metrics yet")
    for path in removed:
        click.echo(f"removed {path} (of no recipe as now built)")


@main.command()
@click.argument(
    "directory", type=click.Path(file_okay=False, path_type=Path), default="demo-workspace"
)
@click.option(
    "--force", is_flag=True, help="Replace DIRECTORY if it is a demo workspace (or empty)."
)
@user_errors
def demo(directory: Path, force: bool) -> None:
    """Run the offline demo end to end.

    Tiny models and generated data, built and run with DVC.

    DIRECTORY defaults to demo-workspace.
    """
    from readaptir.demo import run_demo

    click.echo(run_demo(directory, force=force))


if __name__ == "__main__":
    sys.exit(main())

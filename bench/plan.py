"""Build and no-op `dvc repro` times for a grid of recipes (default: the paper grid).

The stages cannot run here (7B models, BEIR downloads), so every stage's output is stood in by a
small placeholder and committed with `dvc commit`; a no-op `dvc repro` then does exactly the work
it does on a finished workspace: it checks every stage's dependencies, parameters and outputs.

    python bench/plan.py [--recipes recipes/paper] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from readaptir import dvcfile, workspace  # noqa: E402
from readaptir.plan import plan_recipes  # noqa: E402
from readaptir.recipe_files import load_recipes  # noqa: E402


def timed(func, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = func(*args, **kwargs)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", type=Path, default=ROOT / "recipes" / "paper")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="build the workspace here and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
        workspace.init(root)
        shutil.rmtree(root / "recipes")
        shutil.copytree(args.recipes, root / "recipes")

        build_s, plan = timed(lambda: plan_recipes(load_recipes(root / "recipes"), root))
        write_s, _ = timed(dvcfile.write, plan, root)
        rebuild_s, _ = timed(
            lambda: dvcfile.write(plan_recipes(load_recipes(root / "recipes"), root), root)
        )
        for stage in plan.stages.values():
            out = root / stage.out
            out.mkdir(parents=True, exist_ok=True)
            (out / "placeholder").write_text(stage.id)
            if stage.metrics_file:
                (root / stage.metrics_file).parent.mkdir(exist_ok=True)
                (root / stage.metrics_file).write_text(json.dumps({"placeholder": 1}))
        commit_s, _ = timed(workspace.dvc, root, "commit", "--force", "--quiet", capture=True)
        noop = []
        for _ in range(args.repeat):
            seconds, result = timed(workspace.dvc, root, "repro", capture=True)
            if "Running stage" in result.stdout:
                raise SystemExit("a stage ran: the no-op measurement is not a no-op")
            noop.append(seconds)
        status_s, _ = timed(workspace.dvc, root, "status", "--quiet", capture=True)

    recipes = len(plan.recipes)
    files = len([p for p in dvcfile.render(plan) if p.endswith("dvc.yaml")])
    print(f"recipes: {recipes}   stages: {len(plan.stages)}   dvc.yaml files: {files}")
    print(
        f"readaptir build (plan + write): {build_s + write_s:.2f} s; rebuild unchanged: "
        f"{rebuild_s:.2f} s"
    )
    print(f"dvc commit of placeholder outputs: {commit_s:.1f} s")
    print(
        f"no-op dvc repro: median {statistics.median(noop):.1f} s over {len(noop)} runs "
        f"({', '.join(f'{s:.1f}' for s in noop)}); dvc status: {status_s:.1f} s"
    )
    print(f"per stage: {statistics.median(noop) / len(plan.stages) * 1000:.0f} ms")


if __name__ == "__main__":
    main()

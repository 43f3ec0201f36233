"""A real workspace: git + DVC, `readaptir build`, `dvc repro`, and what reruns after a change."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from readaptir import workspace
from readaptir.cli import main

pytestmark = pytest.mark.slow

COMMON = {
    "base": "models/base",
    "retriever": {"source": "models/retriever", "family": "repllama"},
    "corpus": "data/toy",
    "adapter": {"r": 4, "lora_alpha": 8, "max_length": 32, "batch_size": 4},
}


def git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, check=True, capture_output=True, text=True
    ).stdout


def cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def repro(root: Path) -> list[str]:
    """Names of the stages whose command dvc ran."""
    out = workspace.dvc(root, "repro", capture=True).stdout
    return [n.split("dvc.yaml:")[-1] for n in re.findall(r"Running stage '([^']+)'", out)]


def ndcg_at_10(run_file: Path, qrels_file: Path) -> float:
    """Mean nDCG@10 over the judged queries, by pytrec_eval straight from the two files."""
    import pytrec_eval

    qrels: dict[str, dict[str, int]] = {}
    for line in qrels_file.read_text().splitlines()[1:]:
        query, doc, grade = line.split("\t")
        qrels.setdefault(query, {})[doc] = int(grade)
    run: dict[str, dict[str, float]] = {}
    for line in run_file.read_text().splitlines():
        query, _, doc, _, score, _ = line.split()
        run.setdefault(query, {})[doc] = float(score)
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut_10"}).evaluate(run)
    return sum(v["ndcg_cut_10"] for v in per_query.values()) / len(qrels)


def set_alpha(root: Path, alpha: float) -> None:
    (root / "recipes" / "ra.yaml").write_text(
        f"extends: _common.yaml\nreadapt: {{alpha: {alpha}}}\n"
    )
    cli("build", "--root", str(root))


def test_init_stages_the_dvc_config_it_writes(tmp_path):
    """dvc init stages .dvc/config; a commit without `git add` still holds the cache links."""
    git(tmp_path, "init", "-q")
    cli("init", "--root", str(tmp_path))
    assert ".dvc/config" not in git(tmp_path, "diff", "--name-only")  # nothing left unstaged
    assert "cache" in git(tmp_path, "show", ":.dvc/config")
    ignored = (tmp_path / ".gitignore").read_text().splitlines()
    assert {".readaptir/", "artifacts/*/.work-*", "dvc_plots/"} <= set(ignored)
    cli("init", "--root", str(tmp_path / "sub" / "project"))  # a project in a new folder
    assert (tmp_path / "sub" / "project" / ".dvc").is_dir()
    # a .gitignore of another encoding and line ending keeps its bytes; the entries follow it
    other = tmp_path / "other"
    other.mkdir()
    (other / ".gitignore").write_bytes(b"caf\xe9/\r\n*.tmp")
    cli("init", "--root", str(other))
    written = (other / ".gitignore").read_bytes()
    assert written.startswith(b"caf\xe9/\r\n*.tmp\r\n.readaptir/\r\n")
    assert written.endswith(b"dvc_plots/\r\n") and written.count(b"\r\n") == 6
    cli("init", "--root", str(other))
    assert (other / ".gitignore").read_bytes() == written  # nothing added twice
    shared = tmp_path / "shared-ignore"  # a link to a shared file: the file gets the entries
    shared.write_text("*.log\n")
    shared.chmod(0o640)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / ".gitignore").symlink_to(shared)
    cli("init", "--root", str(linked))
    assert (linked / ".gitignore").is_symlink() and ".readaptir/" in shared.read_text()
    assert shared.stat().st_mode & 0o777 == 0o640
    # a link to nothing (a shared file moved) or a folder: refused before DVC is set up
    for name, make in (
        ("dangling", lambda p: p.symlink_to(tmp_path / "moved")),
        ("dir", Path.mkdir),
    ):
        (tmp_path / name).mkdir()
        make(tmp_path / name / ".gitignore")
        result = CliRunner().invoke(main, ["init", "--root", str(tmp_path / name)])
        said = "is a link to nothing" if name == "dangling" else "is not a file: move it away"
        assert result.exit_code == 1 and said in result.output
        assert not (tmp_path / name / ".dvc").exists() and not (tmp_path / "moved").exists()


@pytest.fixture
def ws(tmp_path, tiny_base, tiny_retriever, tiny_beir) -> Path:
    root = tmp_path / "ws"
    root.mkdir()
    git(root, "init", "-q")
    git(root, "config", "user.email", "t@localhost")
    git(root, "config", "user.name", "t")
    cli("init", "--root", str(root))
    shutil.copytree(tiny_base, root / "models" / "base")
    shutil.copytree(tiny_retriever, root / "models" / "retriever")
    shutil.copytree(tiny_beir, root / "data" / "toy")
    (root / "recipes" / "_common.yaml").write_text(yaml.safe_dump(COMMON))
    (root / "recipes" / "alone.yaml").write_text(
        "extends: _common.yaml\nreadapt: {alpha: 0.0, beta: 1.0}\n"
    )
    set_alpha(root, 0.5)
    return root


def test_build_repro_noop_and_alpha_change(ws):
    dvc = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]
    ran = repro(ws)
    assert sorted(ran) == sorted(dvc)  # everything built once, shared stages once
    specs = yaml.safe_load((ws / "params.yaml").read_text())["stages"]
    for name in ("alone", "ra"):
        metrics = json.loads((ws / "metrics" / f"{name}.json").read_text())
        assert metrics["queries"] == 4
        runs = specs[f"score-{name}"]["inputs"]  # scored again here, from the run files alone
        for side, role in (("retriever", "baseline"), ("readapted", "readapted")):
            run = ws / runs[role] / "run.trec"
            want = ndcg_at_10(run, ws / "data" / "toy" / "qrels" / "test.tsv")
            assert metrics[side]["nDCG@10"] == pytest.approx(want, abs=1e-9)
    alone = json.loads((ws / "metrics" / "alone.json").read_text())
    assert alone["readapted"] == alone["retriever"]  # α=0, β=1 is the retriever itself
    report = cli("report", "--root", str(ws), "--table", "recipes")
    assert "| alone" in report and "| ra" in report

    # outputs are linked from DVC's cache, not copied: a model file exists once on disk
    merged = next((ws / "artifacts" / "merge").glob("*/*.safetensors"))
    assert merged.is_symlink() or merged.stat().st_nlink > 1

    git(ws, "add", "-A")
    git(ws, "commit", "-qm", "first")
    assert repro(ws) == []  # nothing changed: nothing runs
    # hidden files are no part of a model, to DVC as to readaptir's fingerprints: a Finder's
    # .DS_Store, the .cache/ folder `huggingface-cli download --local-dir` leaves
    (ws / "models" / "base" / ".DS_Store").write_bytes(b"\0")
    (ws / "models" / "retriever" / ".cache" / "huggingface").mkdir(parents=True)
    (ws / "models" / "retriever" / ".cache" / "huggingface" / "x.metadata").write_text("x")
    assert "nothing changed" in cli("build", "--root", str(ws))
    assert repro(ws) == []

    set_alpha(ws, 0.25)
    # built but not yet run: α=0.5's scores are not shown as α=0.25's
    stale = cli("report", "--root", str(ws), "--table", "recipes")
    assert "| alone" in stale and "| ra " not in stale
    ran = repro(ws)
    assert sorted(re.sub(r"-[^-]+$", "", n) if n != "score-ra" else n for n in ran) == [
        "embed-ra-toy",
        "merge-retriever",
        "queries-ra-toy",
        "score-ra",
        "search-ra-toy",
    ]
    diff = workspace.dvc(ws, "params", "diff", capture=True).stdout
    assert "recipes.ra.readapt.alpha" in diff and "0.25" in diff
    diff = workspace.dvc(ws, "metrics", "diff", "--all", capture=True).stdout
    assert "metrics/ra.json" in diff and "readapted.nDCG@10" in diff
    assert "metrics/alone.json" not in workspace.dvc(ws, "metrics", "diff", capture=True).stdout

    set_alpha(ws, 0.5)  # back to a version built before: restored, not recomputed
    assert repro(ws) == []
    assert json.loads((ws / "metrics" / "ra.json").read_text())["alpha"] == 0.5

    # a judgment added: queries, runs and scores again, never the passages' embeddings
    qrels = ws / "data" / "toy" / "qrels" / "test.tsv"
    qrels.write_text(qrels.read_text() + "q4\td8\t1\n")
    cli("build", "--root", str(ws))
    kinds = sorted({n.split("-")[0] for n in repro(ws)})
    assert kinds == ["queries", "score", "search"]
    assert json.loads((ws / "metrics" / "ra.json").read_text())["queries"] == 5


def test_failed_stage_leaves_no_output_and_exits_nonzero(ws):
    corpus = ws / "data" / "toy" / "corpus.jsonl"
    corpus.write_text(corpus.read_text() + "{not json\n")
    cli("build", "--root", str(ws))
    embed = next(
        n for n in yaml.safe_load((ws / "dvc.yaml").read_text())["stages"] if n.startswith("embed-")
    )
    result = CliRunner().invoke(main, ["stage", "run", embed, "--root", str(ws)])
    assert result.exit_code != 0
    assert "corpus.jsonl line 13" in result.output
    embed_dir = ws / "artifacts" / "embed"
    assert not embed_dir.exists() or not any(embed_dir.iterdir())


def test_a_broken_queries_file_fails_before_any_passage_is_embedded(ws):
    queries = ws / "data" / "toy" / "queries.jsonl"
    queries.write_text(queries.read_text() + '{"_id": "q9", "query": "no text field"}\n')
    cli("build", "--root", str(ws))
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=ws,
        env=workspace.tool_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "queries.jsonl line" in done.stdout + done.stderr
    ran = re.findall(r"Running stage '([^']+)'", done.stdout)
    assert [n.split("-")[0] for n in ran] == ["queries"]  # the first stage to run, and the last
    assert not (ws / "artifacts" / "embed").exists()


def test_broken_generated_files_are_one_line_errors_naming_them(ws):
    def fails(*args: str) -> str:
        result = CliRunner().invoke(main, [*args, "--root", str(ws)])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        return result.output

    stages = yaml.safe_load((ws / "params.yaml").read_text())["stages"]
    embed = next(n for n in stages if n.startswith("embed-"))
    assert "has no CUDA GPU" in fails("stage", "run", embed, "--device", "cuda")
    assert "'bogus' (from --device): expected cpu, cuda" in fails(
        "stage", "run", embed, "--device", "bogus"
    )
    (ws / "list.yaml").write_text("- 1\n")
    assert "list.yaml: expected a mapping, found list" in fails(
        "stage", "run", embed, "--spec", "list.yaml"
    )
    (ws / "odd.yaml").write_text(yaml.safe_dump({"stages": {embed: {"kind": "scroe"}}}))
    out = fails("stage", "run", embed, "--spec", "odd.yaml")
    assert "odd.yaml: stage " + embed + " has kind 'scroe', not one of adapter" in out
    assert not (ws / "artifacts" / "scroe").exists()
    (ws / "metrics").mkdir(exist_ok=True)
    (ws / "metrics" / "ra.json").write_text("[1, 2]\n")
    assert "metrics/ra.json: expected a mapping, found list" in fails("report")
    (ws / "metrics" / "ra.json").write_text('{"alpha": 0.5,\n')
    assert "metrics/ra.json:2: not valid JSON" in fails("report")
    params = ws / "params.yaml"
    params.write_text("<<<<<<< HEAD\n" + params.read_text())  # an unresolved git merge
    assert re.search(r"params\.yaml:\d+: not valid YAML", fails("report"))
    assert re.search(r"params\.yaml:\d+: not valid YAML", fails("stage", "run", embed))


def test_validate_reports_file_key_and_fails(ws):
    (ws / "recipes" / "broken.yaml").write_text("extends: _common.yaml\nadapter: {r: -1}\n")
    result = CliRunner().invoke(main, ["validate", "--root", str(ws)])
    assert result.exit_code == 1
    assert "broken.yaml:2: adapter.r: Input should be greater than 0" in result.output
    before = (ws / "dvc.yaml").read_bytes()
    assert CliRunner().invoke(main, ["build", "--root", str(ws)]).exit_code == 1
    assert (ws / "dvc.yaml").read_bytes() == before  # nothing half-written


def test_commands_without_a_model_do_not_load_torch(ws):
    """build and validate, and the code of report and of the score stage, start without torch
    (seconds a call): only the stages that run a model or a search pay for it."""
    commands = [["build"], ["validate"]]
    code = (
        "import sys\nfrom readaptir.cli import main\n"
        f"for args in {commands!r}:\n"
        f"    main(args + ['--root', {str(ws)!r}], standalone_mode=False)\n"
        "import readaptir.report, readaptir.runner, readaptir.evaluation, readaptir.stages.score\n"
        "heavy = {'torch', 'transformers', 'peft'}\n"
        "print('loaded:', sorted({m.split('.')[0] for m in sys.modules} & heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ws)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded: []" in done.stdout, done.stdout[-3000:]


def test_split_pipelines_run_and_stale_groups_go(ws, monkeypatch):
    from readaptir import dvcfile

    monkeypatch.setattr(dvcfile, "SPLIT_ABOVE", 0)
    (ws / "recipes" / "ra.yaml").write_text(  # a stored Δ: the "models" group
        "extends: _common.yaml\nreadapt: {alpha: 0.5, delta: stored}\n"
    )
    cli("build", "--root", str(ws))
    assert set(yaml.safe_load((ws / "dvc.yaml").read_text())) == {"plots"}
    assert set(yaml.safe_load((ws / "params.yaml").read_text())) == {"recipes", "scores"}
    groups = sorted(p.name for p in (ws / "pipelines").iterdir())
    assert groups == ["models", "toy"]
    toy = yaml.safe_load((ws / "pipelines" / "toy" / "params.yaml").read_text())
    assert sorted(toy["recipes"]) == ["alone", "ra"]
    stages = {
        n
        for g in groups
        for n in yaml.safe_load((ws / "pipelines" / g / "dvc.yaml").read_text())["stages"]
    }
    assert sorted(repro(ws)) == sorted(stages)
    assert repro(ws) == []
    assert json.loads((ws / "metrics" / "ra.json").read_text())["alpha"] == 0.5
    assert "| ra " in cli("report", "--root", str(ws), "--table", "recipes")
    # α set in the copy the score stage tracks, as `dvc exp run -S` sets it: no stage would
    # merge again, so the score stage refuses rather than credit α=0.3 with α=0.5's scores
    copy = ws / "pipelines" / "toy" / "params.yaml"
    built = copy.read_text()
    edited = yaml.safe_load(built)
    edited["recipes"]["ra"]["readapt"]["alpha"] = 0.3
    copy.write_text(yaml.safe_dump(edited))
    with pytest.raises(RuntimeError, match=r"recipes\.ra is not the recipe `readaptir build`"):
        repro(ws)
    ra = ws / "metrics" / "ra.json"  # DVC removes a stage's outputs before it runs
    assert not ra.exists() or json.loads(ra.read_text())["alpha"] == 0.5
    copy.write_text(built)
    (ws / "recipes" / "ra.yaml").unlink()  # no Δ left: the models group goes
    cli("build", "--root", str(ws))
    assert sorted(p.name for p in (ws / "pipelines").iterdir()) == ["toy"]


def test_growing_past_the_split_reruns_nothing_but_the_scores(ws, monkeypatch):
    """A project that grows into pipelines/ (or shrinks back) keeps its stages' commands, so
    DVC's run cache has every stage it ran; at most the score stages, whose recipe copy moves,
    run again (seconds): never the adapter, the embeddings or the merge."""
    from readaptir import dvcfile

    ran = repro(ws)
    scores = sorted(n for n in ran if n.startswith("score-"))
    assert "adapter" in " ".join(ran)
    for split in (0, 60):  # into pipelines/, then back into one dvc.yaml
        monkeypatch.setattr(dvcfile, "SPLIT_ABOVE", split)
        cli("build", "--root", str(ws))
        assert (ws / "pipelines").is_dir() == (split == 0)
        # the scores at most (back in one dvc.yaml they are in the run cache too)
        assert set(repro(ws)) <= set(scores)
        assert repro(ws) == []


def run_in_processes(ws: Path, name: str, procs: str) -> None:
    """`readaptir stage run NAME --procs PROCS` on the CPU, in a process group of its own, so that
    a hang fails the test with every rank stopped; checks that it ran in PROCS processes."""
    args = ["stage", "run", name, "--root", str(ws), "--device", "cpu", "--procs", procs]
    run = subprocess.Popen(
        [sys.executable, "-m", "readaptir", *args],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = run.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 0, output[-3000:]
    assert ("launching 2 processes" in output) == (procs == "2"), output[-3000:]
    assert output.count(f"{name}: wrote") == 1  # rank 0 alone reports


def test_adapter_stage_on_two_ranks_learns_what_one_process_does(ws):
    """`--procs 2` relaunches the stage under torchrun (gloo on CPU): the same adapter as one."""
    from safetensors.torch import load_file

    adapter = {**COMMON["adapter"], "dropout": 0.0, "lr": 1e-2, "epochs": 3}
    common = {**COMMON, "adapter": adapter}
    (ws / "recipes" / "_common.yaml").write_text(yaml.safe_dump(common))
    cli("build", "--root", str(ws))
    stages = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]
    name = next(n for n in stages if n.startswith("adapter"))

    def train(procs: str) -> dict:
        run_in_processes(ws, name, procs)
        out = next((ws / "artifacts" / "adapter").glob("[!.]*"))
        tensors = load_file(out / "adapter_model.safetensors")
        log = (out / "training_log.csv").read_text().splitlines()
        shutil.rmtree(out)
        return {"tensors": tensors, "log": log}

    two, one = train("2"), train("1")
    assert two["tensors"].keys() == one["tensors"].keys()
    assert len(two["log"]) == len(one["log"]) > 2  # the same steps
    for key, tensor in one["tensors"].items():
        assert torch.allclose(two["tensors"][key], tensor, rtol=1e-4, atol=1e-5), key
    assert any("lora_B" in k and v.abs().max() > 1e-2 for k, v in one["tensors"].items())  # trained
    assert not list((ws / "artifacts" / "adapter").glob(".tmp-*"))  # rank 1 wrote nothing there


def test_embed_stage_on_two_ranks_writes_what_one_process_does(ws):
    import numpy as np

    from readaptir.vectors import load_embeddings

    stages = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]
    name = next(n for n in stages if n.startswith("embed-") and not n.startswith("embed-ra-"))

    def encode(procs: str) -> tuple:
        run_in_processes(ws, name, procs)
        out = next((ws / "artifacts" / "embed").glob("[!.]*"))
        vectors = [v for _, v in load_embeddings(out)]
        shutil.rmtree(out)
        return vectors

    two, one = encode("2"), encode("1")
    assert len(two) == len(one)
    assert all(np.allclose(a, b, atol=1e-3) for a, b in zip(two, one, strict=True))
    left = [p.name for p in (ws / "artifacts" / "embed").iterdir()]
    assert not [n for n in left if n.startswith((".work-", ".tmp-"))]  # no work or temporary folder

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from readaptir import artifacts, dvcfile, fingerprint, graph, workspace
from readaptir.artifacts import files_identity
from readaptir.fingerprint import Fingerprints
from readaptir.graph import stage_id
from readaptir.plan import plan_recipes
from readaptir.recipe import RecipeError
from readaptir.recipe_files import load_recipes


@pytest.fixture
def project(tmp_path, tiny_base, tiny_retriever, tiny_beir) -> Path:
    root = tmp_path / "proj"
    shutil.copytree(tiny_base, root / "models" / "base")
    shutil.copytree(tiny_retriever, root / "models" / "retriever")
    shutil.copytree(tiny_beir, root / "data" / "toy")
    recipes = root / "recipes"
    recipes.mkdir()
    common = {
        "base": "models/base",
        "retriever": {"source": "models/retriever", "family": "repllama"},
        "corpus": "data/toy",
        "adapter": {"r": 4},
        "readapt": {"delta": "stored"},  # Δ as a stage of its own, to see it shared
    }
    (recipes / "_common.yaml").write_text(yaml.safe_dump(common))
    for name, alpha in (("ra-half", 0.5), ("ra-full", 1.0)):
        (recipes / f"{name}.yaml").write_text(
            f"extends: _common.yaml\nreadapt: {{alpha: {alpha}}}\n"
        )
    return root


def plan_of(root):
    return plan_recipes(load_recipes(root / "recipes"), root)


def by_kind(plan):
    out = {}
    for stage in plan.stages.values():
        out.setdefault(stage.kind, []).append(stage)
    return out


def edit(root, name, text):
    (root / "recipes" / f"{name}.yaml").write_text(text)


def test_sweep_shares_adapter_delta_and_baseline(project):
    kinds = by_kind(plan_of(project))
    assert {k: len(v) for k, v in kinds.items()} == {
        "embed": 3,
        "queries": 3,
        "search": 3,
        "adapter": 1,
        "delta": 1,
        "merge": 2,
        "score": 2,
    }
    names = [s.name for s in kinds["score"]]
    assert names == ["score-ra-full", "score-ra-half"]
    baselines = {s.inputs["baseline"] for s in kinds["score"]}
    assert len(baselines) == 1  # one baseline for both recipes


def test_a_negative_alpha_has_its_adapter_and_beta_zero_no_stored_delta(project):
    """α < 0 subtracts the adapter, so it is trained as for α > 0; with β = 0 Δ has no term, and
    no model-sized Δ is stored for it."""
    edit(project, "ra-half", "extends: _common.yaml\nreadapt: {alpha: -0.5, beta: 0}\n")
    edit(project, "ra-full", "extends: _common.yaml\nreadapt: {alpha: 0.5, beta: 0}\n")
    kinds = by_kind(plan_of(project))
    assert "delta" not in kinds and len(kinds["adapter"]) == 1
    adapter = kinds["adapter"][0].name
    assert [m.inputs.get("adapter") for m in kinds["merge"]] == [adapter, adapter]


def test_stage_names_are_readable_and_ids_stable(project):
    first, second = plan_of(project), plan_of(project)
    assert list(first.stages) == list(second.stages)
    assert [s.id for s in first.stages.values()] == [s.id for s in second.stages.values()]
    for name in first.stages:
        assert all(c.isalnum() or c in "-_" for c in name), name
    assert dvcfile.render(first) == dvcfile.render(second)


def ids(plan):
    return {(s.kind, s.desc): s.id for s in plan.stages.values()}


def changed_kinds(before, after):
    a, b = by_kind(before), by_kind(after)
    return {k for k in a if sorted(s.id for s in a[k]) != sorted(s.id for s in b.get(k, []))}


def test_alpha_change_touches_only_merge_embed_queries_search_score(project):
    before = plan_of(project)
    edit(project, "ra-half", "extends: _common.yaml\nreadapt: {alpha: 0.25}\n")
    after = plan_of(project)
    assert changed_kinds(before, after) == {"merge", "embed", "queries", "search", "score"}
    # exactly one stage of each changed kind is new: the other recipe is untouched
    old = {(s.name, s.id) for s in before.stages.values()}
    new = [s for s in after.stages.values() if (s.name, s.id) not in old]
    assert sorted(s.kind for s in new) == ["embed", "merge", "queries", "score", "search"]


def test_adapter_hyperparameter_changes_adapter_not_delta(project):
    before = plan_of(project)
    edit(project, "ra-half", "extends: _common.yaml\nadapter: {lr: 0.001}\n")
    after = plan_of(project)
    assert "delta" not in changed_kinds(before, after)
    assert len(by_kind(after)["adapter"]) == 2


def test_batch_size_leaves_the_adapter_alone_where_batch_tokens_replaces_it(project):
    adapter_ids = []
    for batch in ("{batch_tokens: 256}", "{batch_tokens: 256, batch_size: 64}", "{batch_size: 64}"):
        edit(project, "ra-half", f"extends: _common.yaml\nadapter: {batch}\n")
        edit(project, "ra-full", f"extends: _common.yaml\nadapter: {batch}\n")
        adapter_ids.append([s.id for s in by_kind(plan_of(project))["adapter"]])
    assert adapter_ids[0] == adapter_ids[1] != adapter_ids[2]


def test_corpus_content_changes_embeddings_and_adapter(project):
    before = plan_of(project)
    corpus = project / "data" / "toy" / "corpus.jsonl"
    corpus.write_text(corpus.read_text() + '{"_id": "extra", "title": "", "text": "more"}\n')
    after = plan_of(project)
    kinds = {"adapter", "embed", "queries", "search", "merge", "score"}
    assert changed_kinds(before, after) == kinds


def test_how_a_local_input_is_spelled_or_labelled_changes_no_stage(project):
    before = plan_of(project)

    def recipe(corpus: str) -> None:
        edit(
            project,
            "ra-full",
            f"extends: _common.yaml\nreadapt: {{alpha: 1.0}}\nbase: {project / 'models/base'}/\n"
            f"retriever: {{source: ./models/retriever, family: repllama}}\ncorpus: {corpus}\n",
        )

    def unchanged(plan) -> list:  # whole stages: ids, deps and the paths their specs read
        return sorted(str(s) for s in plan.stages.values() if s.kind != "score")

    recipe("{path: ./data/../data/toy/, name: Toy}")
    after = plan_of(project)
    assert unchanged(after) == unchanged(before)
    # the label is the report's name of the collection, so only the score stage sees it
    assert changed_kinds(before, after) == {"score"}
    assert after.stages["score-ra-full"].params["dataset_name"] == "Toy"
    shutil.copytree(project / "data" / "toy", project / "elsewhere")
    recipe("elsewhere")  # a copy: the same content, so the same stages
    kinds = by_kind(plan_of(project))
    assert (len(kinds["adapter"]), len(kinds["delta"]), len(kinds["embed"])) == (1, 1, 3)
    assert changed_kinds(before, plan_of(project)) == {"score"}


def test_eval_k_changes_search_not_embed(project):
    before = plan_of(project)
    edit(project, "ra-half", "extends: _common.yaml\neval: {k: 5, metrics: [nDCG@5]}\n")
    assert changed_kinds(before, plan_of(project)) == {"search", "score"}


def test_retriever_alone_needs_no_merge(project):
    edit(project, "ra-full", "extends: _common.yaml\nreadapt: {alpha: 0.0, beta: 1.0}\n")
    plan = plan_of(project)
    score = plan.stages["score-ra-full"]
    assert score.inputs["baseline"] == score.inputs["readapted"]
    assert len(by_kind(plan)["merge"]) == 1
    deps = dvcfile.dvc_stage(score, plan)["deps"]
    assert len(deps) == len(set(deps)) and plan.stages[score.inputs["baseline"]].out in deps
    assert score.desc == "Score ra-full: retriever alone (α=0, β=1: nothing to readapt)"
    assert plan.stages["score-ra-half"].desc == "Score ra-half: retriever alone vs readapted"


def test_generated_files_are_byte_stable(project):
    plan = plan_of(project)
    written = {p.name for p in dvcfile.write(plan, project)}
    assert written == {"dvc.yaml", "params.yaml", ".dvcignore"}
    before = {n: (project / n).read_bytes() for n in ("dvc.yaml", "params.yaml", ".dvcignore")}
    assert dvcfile.write(plan_of(project), project) == []
    assert before == {n: (project / n).read_bytes() for n in before}
    dvc = yaml.safe_load(before["dvc.yaml"])
    score = dvc["stages"]["score-ra-half"]
    assert score["metrics"] == [{"metrics/ra-half.json": {"cache": False}}]
    assert "recipes.ra-half" in score["params"]
    params = yaml.safe_load(before["params.yaml"])
    assert params["recipes"]["ra-half"]["readapt"] == {"alpha": 0.5, "beta": 1.0, "delta": "stored"}
    assert all("desc" in s for s in dvc["stages"].values())


def test_a_build_that_fails_to_write_one_file_replaces_none(project, monkeypatch):
    """dvc.yaml and params.yaml change together: a full disk while writing the second left the
    new pipeline beside the old params, whose stages it names no more."""
    from pathlib import Path as RealPath

    dvcfile.write(plan_of(project), project)
    before = {n: (project / n).read_bytes() for n in ("dvc.yaml", "params.yaml")}
    (project / "recipes" / "ra-half.yaml").write_text(
        "extends: _common.yaml\nreadapt: {alpha: 0.3}\n"
    )
    write_text = RealPath.write_text

    def full_disk(path, text, **kwargs):
        if path.name.startswith(".tmp-params.yaml"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(path, text, **kwargs)

    with monkeypatch.context() as patch, pytest.raises(OSError, match="no space left on the disk"):
        patch.setattr(RealPath, "write_text", full_disk)
        dvcfile.write(plan_of(project), project)
    assert before == {n: (project / n).read_bytes() for n in ("dvc.yaml", "params.yaml")}
    assert not list(project.glob(".tmp-*"))
    assert {p.name for p in dvcfile.write(plan_of(project), project)} == {"dvc.yaml", "params.yaml"}


def test_build_never_replaces_files_it_did_not_write(project, tmp_path):
    (project / "dvc.yaml").write_text("stages:\n  mine:\n    cmd: echo hi\n")
    (project / "params.yaml").write_text("")  # empty: nothing to lose
    with pytest.raises(FileExistsError, match=r"dvc\.yaml was not written by `readaptir build`"):
        dvcfile.write(plan_of(project), project)
    assert "mine" in (project / "dvc.yaml").read_text()
    assert (project / "params.yaml").read_text() == ""  # nothing was written
    (project / "dvc.yaml").unlink()
    (project / "dvc.yaml").mkdir()
    with pytest.raises(FileExistsError, match=r"dvc\.yaml is not a file: move it away; nothing"):
        dvcfile.write(plan_of(project), project)
    (project / "dvc.yaml").rmdir()
    written = {p.name for p in dvcfile.write(plan_of(project), project)}
    assert written == {"dvc.yaml", "params.yaml", ".dvcignore"}
    outside = tmp_path / "no-git" / "new" / "project"
    said = rf"{re.escape(str(outside))} is not inside a git repository: `git init`"  # as asked
    with pytest.raises(RuntimeError, match=said):
        workspace.init(outside)
    assert not (tmp_path / "no-git").exists()  # nothing made on the way to the error
    subprocess.run(["git", "init", "-q", str(tmp_path / "repo")], check=True)
    (tmp_path / "repo" / "metrics").write_text("mine\n")  # a file where init puts a folder
    with pytest.raises(FileExistsError, match=r"repo/metrics exists and is not a folder"):
        workspace.init(tmp_path / "repo")
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == [".git", "metrics"]


@pytest.mark.parametrize("cache", ["[]", '{"x": 1}', b"\xff\xfe", '{"x'])
def test_an_unreadable_fingerprint_cache_is_rebuilt(tmp_path, cache):
    (tmp_path / "a.bin").write_text("aaaa")
    want = Fingerprints(tmp_path).file(tmp_path / "a.bin")
    cache_file = Fingerprints(tmp_path).cache_path
    cache_file.parent.mkdir(exist_ok=True)
    if isinstance(cache, bytes):
        cache_file.write_bytes(cache)
    else:
        cache_file.write_text(cache.replace("x", str((tmp_path / "a.bin").resolve())))
    assert Fingerprints(tmp_path).file(tmp_path / "a.bin") == want


def test_validate_in_a_read_only_checkout_warns_that_the_hash_cache_is_not_kept(
    project, monkeypatch, caplog
):
    from readaptir import fingerprint

    def read_only(path, text):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(fingerprint, "atomic_write_text", read_only)
    with caplog.at_level("WARNING", logger="readaptir.fingerprint"):
        plan = plan_of(project)  # what `readaptir validate` does, cache save included
    assert plan.stages and "fingerprints.json not kept (Read-only file system)" in caplog.text


def test_an_edit_of_the_same_size_with_its_time_set_back_is_seen(tmp_path, monkeypatch):
    """A qrels fix flipping one grade, copied with `cp -p` or unpacked with stored times: the
    size and modification time are the old ones, the content is not."""
    path = tmp_path / "test.tsv"
    path.write_text("q1\td1\t1\n")
    before = Fingerprints(tmp_path)
    old = before.file(path)
    before.save()
    stat = path.stat()
    path.write_text("q1\td1\t2\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_mtime_ns == stat.st_mtime_ns and path.stat().st_size == stat.st_size
    after = Fingerprints(tmp_path).file(path)  # through the saved cache
    assert after != old and after == hashlib.sha256(path.read_bytes()).hexdigest()
    # weights are not read again for a moved change time alone (DVC's hard links, a chmod)
    monkeypatch.setattr(fingerprint, "CTIME_BELOW", 4)
    cached = Fingerprints(tmp_path)
    cached.file(path)
    cached.save()
    path.chmod(0o444)
    sha256 = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda: pytest.fail("read again"))
    assert Fingerprints(tmp_path).file(path) == after
    # but a file put in its place (a new download renamed over it: another inode) is read again,
    # even of the same size and modification time
    monkeypatch.setattr(hashlib, "sha256", sha256)
    download = path.with_name("download.tmp")
    download.write_text("q1\td1\t3\n")
    os.utime(download, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(download, path)
    assert Fingerprints(tmp_path).file(path) == sha256(path.read_bytes()).hexdigest() != after


def test_missing_corpus_and_shape_mismatch_name_file_and_key(project, tmp_path, tokenizer):
    from readaptir import tiny

    edit(project, "ra-full", "extends: _common.yaml\ncorpus: data/nowhere\n")
    with pytest.raises(RecipeError, match=r"ra-full\.yaml:2: corpus: corpus folder 'data/nowhere'"):
        plan_of(project)
    edit(project, "ra-full", "extends: _common.yaml\ncorpus: data/toy/corpus.jsonl\n")
    with pytest.raises(
        RecipeError, match=r"'data/toy/corpus\.jsonl' is a file; give the collection"
    ):
        plan_of(project)
    # paths no check of a key catches are still named with the recipe, not bare
    edit(project, "ra-full", "extends: _common.yaml\ncorpus: ~no-such-user-here/sci\n")
    with pytest.raises(RecipeError, match=r"ra-full\.yaml: .*~no-such-user-here is not a home"):
        plan_of(project)
    edit(project, "ra-full", f"extends: _common.yaml\nbase: models/{'b' * 5000}\n")
    with pytest.raises(RecipeError, match=r"ra-full\.yaml: .*File name too long"):
        plan_of(project)
    shutil.copytree(project / "data" / "toy", project / "data" / "odd")
    (project / "data" / "odd" / "queries.jsonl").unlink()
    (project / "data" / "odd" / "queries.jsonl").mkdir()
    edit(project, "ra-full", "extends: _common.yaml\ncorpus: data/odd\n")
    with pytest.raises(RecipeError, match=r"corpus: data/odd/queries\.jsonl is not a file"):
        plan_of(project)
    (project / "data" / "odd" / "queries.jsonl").rmdir()
    shutil.copy(project / "data" / "toy" / "queries.jsonl", project / "data" / "odd")
    for blank in (b"", b"\xef\xbb\xbf\n\n  \n"):  # nothing, or a byte-order mark and blank lines
        (project / "data" / "odd" / "corpus.jsonl").write_bytes(blank)
        with pytest.raises(RecipeError, match=r"corpus: data/odd/corpus\.jsonl is empty"):
            plan_of(project)
    tiny.make_llama(project / "models" / "wide", tokenizer, causal_lm=False, hidden=32)
    edit(project, "ra-full", "extends: _common.yaml\nretriever: {source: models/wide}\n")
    with pytest.raises(RecipeError, match=r"ra-full\.yaml:2: retriever: its hidden_size is 32"):
        plan_of(project)
    config = project / "models" / "wide" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "hidden_size": None}))
    with pytest.raises(RecipeError, match=r"retriever: its hidden_size is None but the base's is"):
        plan_of(project)  # a config lacking the field: the merge would copy it
    shutil.copytree(project / "models" / "retriever", project / "models" / "other")
    other = project / "models" / "other" / "config.json"
    original = json.loads(other.read_text())
    edit(project, "ra-full", "extends: _common.yaml\nretriever: {source: models/other}\n")
    for field, value in (("head_dim", 8), ("attention_bias", True), ("mlp_bias", True)):
        other.write_text(json.dumps({**original, field: value}))
        with pytest.raises(RecipeError, match=rf"retriever: its {field} is {value}"):
            plan_of(project)  # a tensor of another shape, or one more: the merge would fail
    silent = {k: v for k, v in original.items() if k not in ("head_dim", "attention_bias")}
    other.write_text(json.dumps({**silent, "mlp_bias": None}))
    plan_of(project)  # a config silent on them: their defaults depend on the model type
    edit(project, "ra-full", "extends: _common.yaml\nbase: {source: models/base, revision: v2}\n")
    with pytest.raises(RecipeError, match=r"ra-full\.yaml:2: base: revision 'v2' pins a hub model"):
        plan_of(project)  # a local folder has no revisions: its content is what counts
    for not_a_model in (".", "models/base/config.json", "data/toy"):
        edit(project, "ra-full", f"extends: _common.yaml\nbase: {not_a_model}\n")
        with pytest.raises(RecipeError, match=r"ra-full\.yaml:2: base: .* is not a model folder"):
            plan_of(project)
    config = project / "models" / "base" / "config.json"
    good = config.read_text()
    edit(project, "ra-full", "extends: _common.yaml\n")
    for broken, message in (
        (b'{"model_type": ', r":1: not valid JSON"),
        (b"[1]", r": expected a mapping, found list"),
        (b"\xff\xfe{}", r": not UTF-8 text \(byte 0xff at 0\)"),
    ):
        config.write_bytes(broken)  # named as the recipe's base too
        with pytest.raises(
            RecipeError, match=r"_common\.yaml:\d+: base: .*base/config\.json" + message
        ):
            plan_of(project)
    config.write_text("{}")
    with pytest.raises(RecipeError, match=r"_common\.yaml:\d+: base: its model_type is None but "
                       r"the retriever's is 'llama'"):  # fmt: skip
        plan_of(project)  # blamed on the config that lacks it
    config.write_text(good)
    edit(project, "ra-full", "extends: _common.yaml\nadapter: {r: 1000}\n")
    with pytest.raises(
        RecipeError,
        match=r"ra-full\.yaml:2: adapter\.r: 1000 is above the base's hidden size \(64\)",
    ):
        plan_of(project)
    edit(project, "ra-full", "extends: _common.yaml\nadapter: {target_modules: [q_porj, v_prj]}\n")
    with pytest.raises(
        RecipeError,
        match=r"ra-full\.yaml:2: adapter\.target_modules: \['q_porj', 'v_prj'\] match none of the "
        r"base model's Linear modules, which are: .*model\.layers\.\*\.self_attn\.q_proj",
    ):
        plan_of(project)  # found at build time, not when the adapter stage loads the base
    edit(project, "ra-full", "extends: _common.yaml\nadapter: {target_modules: [lm_head]}\n")
    with pytest.raises(RecipeError, match=r"\['lm_head'\] match none"):
        plan_of(project)  # the head serves the loss alone
    edit(project, "ra-full", "extends: _common.yaml\nadapter: {target_modules: [v_prj, q_proj]}\n")
    with pytest.raises(RecipeError, match=r"\['v_prj'\] match none"):
        plan_of(project)  # PEFT would train q_proj alone, silently
    edit(project, "ra-full", "extends: _common.yaml\nadapter: {target_modules: [v_proj, q_proj]}\n")
    kinds = [s.kind for s in plan_of(project).stages.values()]
    assert "adapter" in kinds
    merges = kinds.count("merge")
    # the base's modules are read for the first variant of a sweep, and the rest use them
    edit(project, "ra-full", "extends: _common.yaml\nadapter: {target_modules: [v_proj, q_proj]}\n"
         "readapt: {alpha: [0.25, 0.5]}\n")  # fmt: skip
    assert [s.kind for s in plan_of(project).stages.values()].count("merge") == merges + 1
    corpus = project / "data" / "toy" / "corpus.jsonl"
    passages = corpus.read_text()
    corpus.write_text("")
    edit(project, "ra-full", "extends: _common.yaml\n")
    with pytest.raises(RecipeError, match=r"corpus: data/toy/corpus\.jsonl is empty"):
        plan_of(project)
    corpus.write_text("\ufeff" + " \n" * 3_000_000)  # white space past the first block read
    with pytest.raises(RecipeError, match=r"corpus: data/toy/corpus\.jsonl is empty"):
        plan_of(project)
    corpus.write_text(" \n" * 3_000_000 + passages)  # passages after a long blank stretch
    assert "adapter" in {s.kind for s in plan_of(project).stages.values()}
    corpus.write_text(passages)
    shutil.copytree(project / "models" / "retriever", project / "models" / "bin-only")
    (project / "models" / "bin-only" / "model.safetensors").rename(
        project / "models" / "bin-only" / "pytorch_model.bin"
    )
    edit(project, "ra-full", "extends: _common.yaml\nretriever: {source: models/bin-only}\n")
    with pytest.raises(RecipeError, match=r"ra-full\.yaml:2: retriever: .* no safetensors weights"):
        plan_of(project)  # found at build time, not after the adapter trained
    edit(project, "ra-full", "extends: _common.yaml\n")
    common = project / "recipes" / "_common.yaml"
    common.write_text(common.read_text().replace("corpus: data/toy", "corpus: data/gone"))
    line = common.read_text().splitlines().index("corpus: data/gone") + 1
    with pytest.raises(RecipeError, match=rf"_common\.yaml:{line}: corpus: corpus folder"):
        plan_of(project)  # the parent that sets the key, at its line


def test_direct_route_reads_the_retriever_and_stores_no_delta(project):
    common = yaml.safe_load((project / "recipes" / "_common.yaml").read_text())
    del common["readapt"]
    (project / "recipes" / "_common.yaml").write_text(yaml.safe_dump(common))
    plan = plan_of(project)
    assert "delta" not in by_kind(plan)
    merge = by_kind(plan)["merge"][0]
    assert set(merge.inputs) == {"adapter"} and merge.params["retriever"]["source"] == (
        "models/retriever"
    )


def test_recipe_device_is_runtime_and_the_command_line_wins(project, monkeypatch):
    from readaptir.runner import Context

    before = plan_of(project)
    common = project / "recipes" / "_common.yaml"
    common.write_text(common.read_text().replace("delta: stored", "delta: stored\n  device: cpu"))
    after = plan_of(project)
    assert changed_kinds(before, after) == set()  # the same artifacts, wherever computed
    kinds = by_kind(after)
    assert {s.kind for s in after.stages.values() if s.runtime == {"device": "cpu"}} == {
        "merge",
        "delta",
    }
    assert len(kinds["merge"]) == 2
    spec = {"params": {}, "inputs": {}, "runtime": {"device": "cuda:1"}}
    monkeypatch.delenv("READAPTIR_DEVICE", raising=False)
    with pytest.raises(ValueError, match=r"'cuda:1' \(from the recipe\): this machine has 1 CUDA"):
        with monkeypatch.context() as gpus:
            gpus.setattr(torch.cuda, "is_available", lambda: True)
            gpus.setattr(torch.cuda, "device_count", lambda: 1)
            Context(project, {**spec, "kind": "merge"}, None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert Context(project, spec, None).device == "cuda:1"  # the recipe's choice
    assert Context(project, spec, "cpu").device == "cpu"  # the command line's
    monkeypatch.setenv("READAPTIR_DEVICE", "cpu")
    assert Context(project, spec, None).device == "cpu"  # the machine's
    monkeypatch.setenv("READAPTIR_DEVICE", "gpu")
    with pytest.raises(ValueError, match=r"'gpu' \(from READAPTIR_DEVICE\): expected cpu, cuda"):
        Context(project, {**spec, "kind": "embed"}, None)  # checked at once where one is used
    Context(project, {**spec, "kind": "score"}, None)  # a stage that computes on none
    with pytest.raises(ValueError, match=r"'mps' \(from --device\): expected cpu or cuda"):
        Context(project, {**spec, "kind": "search"}, "mps")


def test_identical_ids_ignored_where_queries_come_from_the_corpus(project):
    def depth_and_flag(plan):
        (score,) = by_kind(plan)["score"][:1]
        depths = {s.params["k"] for s in by_kind(plan)["search"]}
        return depths, score.params["ignore_identical_ids"], score.params["k"]

    assert depth_and_flag(plan_of(project)) == ({100}, False, 100)  # a toy collection
    common = project / "recipes" / "_common.yaml"
    text = common.read_text().replace("corpus: data/toy", "corpus: {path: data/toy, name: ArguAna}")
    common.write_text(text)
    # ArguAna's queries are its passages: one more fetched, the query's own dropped, 100 scored
    assert depth_and_flag(plan_of(project)) == ({101}, True, 100)
    common.write_text(text + "eval: {ignore_identical_ids: false}\n")
    assert depth_and_flag(plan_of(project)) == ({100}, False, 100)


def test_shared_stage_runtime_explicit_value_wins_and_conflicts_fail(project):
    edit(project, "ra-half", "extends: _common.yaml\nreadapt: {alpha: 0.5}\n"
         "adapter: {gradient_checkpointing: true}\n")  # fmt: skip
    (adapter,) = by_kind(plan_of(project))["adapter"]  # ra-full, planned first, left the default
    assert adapter.runtime["gradient_checkpointing"] is True
    edit(project, "ra-full", "extends: _common.yaml\nreadapt: {alpha: 1.0}\n"
         "adapter: {gradient_checkpointing: false}\n")  # fmt: skip
    with pytest.raises(
        RecipeError,
        match=r"ra-half\.yaml:3: adapter\.gradient_checkpointing: True here, but .*ra-full\.yaml "
        r"sets False for the same adapter stage",
    ):
        plan_of(project)


def test_an_explicit_default_counts_as_a_setting(project):
    edit(project, "ra-full", "extends: _common.yaml\nreadapt: {alpha: 1.0}\n"
         "adapter: {gradient_checkpointing: auto}\n")  # fmt: skip
    edit(project, "ra-half", "extends: _common.yaml\nreadapt: {alpha: 0.5}\n"
         "adapter: {gradient_checkpointing: true}\n")  # fmt: skip
    with pytest.raises(RecipeError, match=r"ra-half\.yaml:3: adapter\.gradient_checkpointing: Tr"):
        plan_of(project)


def test_the_repositorys_pipelines_are_the_build_of_its_recipes(tmp_path):
    """dvc.yaml, params.yaml and pipelines/ here are `readaptir build` of recipes/: a change to
    what a build writes must come with the rebuilt files."""
    from click.testing import CliRunner

    from readaptir.cli import main

    repo = Path(__file__).parents[1]
    shutil.copytree(repo / "recipes", tmp_path / "recipes")
    result = CliRunner().invoke(main, ["build", "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    built = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.yaml"))
    built = [p for p in built if p.parts[0] != "recipes"]
    assert built and all((repo / p).read_text() == (tmp_path / p).read_text() for p in built), (
        "run `readaptir build` at the repository root and commit the result"
    )


def test_kind_version_bump_rebuilds_that_kind_and_what_reads_it(project, monkeypatch):
    before = plan_of(project)
    with monkeypatch.context() as m:
        m.setitem(graph.KIND_VERSIONS, "adapter", graph.KIND_VERSIONS["adapter"] + 1)
        assert changed_kinds(before, plan_of(project)) == {
            "adapter", "merge", "embed", "queries", "search", "score"
        }  # fmt: skip
    with monkeypatch.context() as m:
        m.setitem(graph.KIND_VERSIONS, "search", graph.KIND_VERSIONS["search"] + 1)
        assert changed_kinds(before, plan_of(project)) == {"search", "score"}


@pytest.mark.parametrize(
    ("common_extra", "expected"),
    [
        ({"eval": {"metrics": ["nDCG@10"]}}, {"score"}),  # eval metrics
        ({"retriever": {"source": "models/retriever", "family": "repllama",  # encoding dtype
                        "encoding": {"dtype": "float32"}}},
         {"embed", "queries", "search", "score"}),
        ({"retriever": {"source": "models/retriever", "family": "repllama",  # query length
                        "encoding": {"max_query_length": 16}}}, {"queries", "search", "score"}),
        ({"retriever": {"source": "models/retriever", "family": "repllama",  # merge dtype
                        "dtype": "float32"}}, {"merge", "embed", "queries", "search", "score"}),
        ({"base": {"source": "models/base", "dtype": "float32"}},  # adapter (and Δ, merge) dtype
         {"adapter", "merge", "embed", "queries", "search", "score"}),
    ],
)  # fmt: skip
def test_each_setting_is_in_the_ids_of_exactly_the_stages_it_affects(
    project, common_extra, expected
):
    before = plan_of(project)
    common_file = project / "recipes" / "_common.yaml"
    common = {**yaml.safe_load(common_file.read_text()), **common_extra}
    common_file.write_text(yaml.safe_dump(common))
    assert changed_kinds(before, plan_of(project)) == expected


def test_auto_precision_is_fixed_by_a_local_models_config_and_left_to_the_stage_for_a_hubs(
    project, tokenizer
):
    """Where the pooling does not say whether the model is a decoder (sentence-transformers'
    files, mean pooling), a local config does; a hub model's is read when the stage runs."""
    from readaptir import tiny

    def embed_dtypes() -> set[str]:
        return {s.params["encoding"]["dtype"] for s in by_kind(plan_of(project))["embed"]}

    st = "retriever: {source: models/retriever, family: sentence-transformers}\n"
    edit(project, "ra-full", "extends: _common.yaml\n" + st)
    assert embed_dtypes() == {"bfloat16"}  # a Llama: a decoder
    tiny.make_bert(project / "models" / "bert", tokenizer)
    edit(
        project,
        "ra-full",
        "extends: _common.yaml\nbase: models/bert\n"
        + st.replace("models/retriever", "models/bert"),
    )
    (project / "recipes" / "ra-half.yaml").unlink()
    assert embed_dtypes() == {"float32"}  # an encoder: its id as before
    hub = "retriever: {source: org/a-retriever, family: custom}\n"  # mean pooling, a hub model
    edit(project, "ra-full", "extends: _common.yaml\nbase: org/a-base\n" + hub)
    assert embed_dtypes() == {"auto"}
    edit(project, "ra-full", "extends: _common.yaml\n" + hub)  # over a local Llama: its own
    assert embed_dtypes() == {"auto"}


@pytest.mark.parametrize("corpus", [{"path": "data/toy"}, {"beir": "scifact"}])  # local, fetched
def test_split_changes_search_side_not_adapter(project, corpus):
    qrels = project / "data" / "toy" / "qrels"
    shutil.copy(qrels / "test.tsv", qrels / "dev.tsv")
    common_file = project / "recipes" / "_common.yaml"
    common = yaml.safe_load(common_file.read_text())
    common_file.write_text(yaml.safe_dump({**common, "corpus": corpus}))
    before = plan_of(project)
    common_file.write_text(yaml.safe_dump({**common, "corpus": {**corpus, "split": "dev"}}))
    # the adapter trains on passages, not on the judged split: it (and the merge) stay, and so
    # do the passages' embeddings (hours at scale): the queries are embedded apart
    assert changed_kinds(before, plan_of(project)) == {"queries", "search", "score"}


def test_fingerprint_cache_sees_same_size_edits_and_folders_hash_names_and_subfolders(tmp_path):
    root = tmp_path / "proj"
    folder = root / "m"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_text("aaaa")
    (folder / "sub" / "w.bin").write_text("wwww")
    fp = Fingerprints(root)
    file_before, folder_before = fp.path(folder / "a.bin"), fp.path(folder)
    fp.save()
    # same size, new content, later mtime: the cache must not answer
    (folder / "a.bin").write_text("bbbb")
    st = (folder / "a.bin").stat()
    os.utime(folder / "a.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fp2 = Fingerprints(root)  # the cache read back from disk
    assert fp2.path(folder / "a.bin") != file_before
    (folder / "a.bin").write_text("aaaa")
    assert fp2.path(folder) == folder_before  # content back: the same hash
    # a renamed file is a different folder
    (folder / "a.bin").rename(folder / "b.bin")
    assert fp2.path(folder) != folder_before
    (folder / "b.bin").rename(folder / "a.bin")
    assert fp2.path(folder) == folder_before
    # a file in a subfolder counts
    (folder / "sub" / "w.bin").write_text("xxxxx")
    assert fp2.path(folder) != folder_before
    # hidden files do not
    (folder / "sub" / "w.bin").write_text("wwww")
    (folder / ".cache").write_text("anything")
    assert fp2.path(folder) == folder_before


def test_stale_generated_pipelines_go_but_hand_written_ones_stay(project):
    mine = project / "pipelines" / "mine" / "dvc.yaml"
    mine.parent.mkdir(parents=True)
    mine.write_text("stages:\n  mine:\n    cmd: echo hi\n")
    old = project / "pipelines" / "old"
    old.mkdir()
    (old / "dvc.yaml").write_text(dvcfile.HEADER + "stages: {}\n")
    (old / "dvc.lock").write_text("schema: '2.0'\n")
    changed = dvcfile.write(plan_of(project), project)
    assert mine.read_text() == "stages:\n  mine:\n    cmd: echo hi\n"
    assert not old.exists() and old / "dvc.yaml" in changed


def test_dvc_yaml_names_external_inputs_as_deps(project):
    plan = plan_of(project)
    stages = yaml.safe_load(dvcfile.render(plan)["dvc.yaml"])["stages"]
    deps = {n: set(s["deps"]) for n, s in stages.items()}
    kinds = by_kind(plan)
    (adapter,) = kinds["adapter"]
    assert {"models/base", "data/toy/corpus.jsonl"} <= deps[adapter.name]
    (delta,) = kinds["delta"]
    assert {"models/base", "models/retriever"} <= deps[delta.name]
    baseline = next(s for s in kinds["embed"] if "model" not in s.inputs)
    assert deps[baseline.name] == {"models/retriever", "data/toy/corpus.jsonl"}  # no queries
    queries = next(s for s in kinds["queries"] if "model" not in s.inputs)
    assert {"models/retriever", "data/toy/corpus.jsonl", "data/toy/queries.jsonl",
            "data/toy/qrels/test.tsv"} <= deps[queries.name]  # fmt: skip
    score = plan.stages["score-ra-half"]
    assert "data/toy/qrels/test.tsv" in deps[score.name]


@pytest.mark.parametrize("changed", ["data/toy/corpus.jsonl", "models/retriever/config.json"])
def test_stage_refuses_inputs_changed_since_build(project, changed):
    from readaptir.runner import StaleInputError, run_stage

    plan = plan_of(project)
    dvcfile.write(plan, project)
    baseline = next(s for s in by_kind(plan)["embed"] if "model" not in s.inputs)
    path = project / changed
    path.write_text(path.read_text() + "\n")
    with pytest.raises(StaleInputError, match="changed since `readaptir build`"):
        run_stage(project, baseline.name, device="cpu")
    assert not (project / baseline.out).exists()


def test_embed_and_queries_stages_of_a_model_with_prompts_check_their_own_side(project):
    """The passages' stage holds no query settings: the model's query prompt is the queries
    stage's to check, against the recipe's query template."""
    from test_embed import st_modules

    from readaptir.runner import run_stage

    retriever = project / "models" / "retriever"
    (retriever / "1_Pooling").mkdir()
    (retriever / "modules.json").write_text(json.dumps(st_modules()))
    (retriever / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "lasttoken"}))
    prompts = {"prompts": {"query": "query: ", "passage": "passage: "}}
    (retriever / "config_sentence_transformers.json").write_text(json.dumps(prompts))
    plan = plan_of(project)  # repllama's templates start with those prompts
    dvcfile.write(plan, project)
    for kind in ("embed", "queries"):
        stage = next(s for s in by_kind(plan)[kind] if "model" not in s.inputs)
        assert (run_stage(project, stage.name, device="cpu") / "stage.json").is_file()
    edit(project, "ra-half", "extends: _common.yaml\nretriever: {source: models/retriever, "
         "family: repllama, encoding: {query_template: '{text}'}}\n")  # fmt: skip
    plan = plan_of(project)
    dvcfile.write(plan, project)
    queries = next(s for s in by_kind(plan)["queries"] if "model" not in s.inputs and
                   not (project / s.out).exists())  # fmt: skip
    with pytest.raises(ValueError, match=r"prompt 'query: '.*retriever\.encoding\.query_templ"):
        run_stage(project, queries.name, device="cpu")


def test_a_search_spec_of_before_the_queries_stage_asks_for_a_build(project):
    from readaptir.runner import StaleInputError, run_stage

    plan = plan_of(project)
    dvcfile.write(plan, project)
    search = next(iter(by_kind(plan)["search"]))
    params = yaml.safe_load((project / "params.yaml").read_text())
    old = params["stages"][search.name]
    del old["inputs"]["queries"]  # as an earlier build wrote it, and hashed it
    old["id"] = stage_id(
        "search", old["params"], {"embeddings": plan.stages[search.inputs["embeddings"]].id}
    )
    (project / "old.yaml").write_text(yaml.safe_dump(params))
    (project / plan.stages[search.inputs["embeddings"]].out).mkdir(parents=True)
    with pytest.raises(StaleInputError, match="earlier readaptir.*run `readaptir build`"):
        run_stage(project, search.name, spec_file="old.yaml", device="cpu")


def test_generated_parameters_edited_after_the_build_are_refused(project):
    """`dvc exp run -S` edits params.yaml: no stage may run on, or score for, what the build did
    not plan (the merge would keep its old α and the metrics claim the new one)."""
    from readaptir.runner import StaleInputError, run_stage

    plan = plan_of(project)
    dvcfile.write(plan, project)
    merge = next(iter(by_kind(plan)["merge"]))
    built = (project / "params.yaml").read_text()
    params = yaml.safe_load(built)
    params["stages"][merge.name]["params"]["alpha"] = 0.3
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(StaleInputError, match=rf"stages\.{merge.name} does not hash to its id"):
        run_stage(project, merge.name, device="cpu")
    for part in ("params", "inputs"):  # a part edited into another type: the same refusal
        params = yaml.safe_load(built)
        params["stages"][merge.name][part] = 3
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        with pytest.raises(StaleInputError, match=r"does not hash to its id"):
            run_stage(project, merge.name, device="cpu")
    params = yaml.safe_load(built)
    params["recipes"]["ra-half"]["readapt"]["alpha"] = 0.3
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(StaleInputError, match=r"recipes\.ra-half is not the recipe"):
        run_stage(project, "score-ra-half", device="cpu")
    (project / "params.yaml").write_text(built)  # as built: past both checks, to its inputs
    with pytest.raises(FileNotFoundError, match="input 'baseline' of score-ra-half is missing"):
        run_stage(project, "score-ra-half", device="cpu")


# holds a lock as another process would, until killed
_HOLDER = """
import sys, time
from readaptir.artifacts import held_alone
with held_alone(sys.argv[1], "x"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_stage_runs_once_at_a_time(project):
    """A stage left running by a killed `dvc repro` holds its lock: a rerun beside it fails at
    once, naming its pid, instead of training into its work folder; once it ends, runs go on."""
    import socket
    import subprocess
    import sys

    from readaptir.runner import LOCK_DIR, run_stage

    plan = plan_of(project)
    dvcfile.write(plan, project)
    queries = next(s for s in by_kind(plan)["queries"] if "model" not in s.inputs)
    lock = project / LOCK_DIR / f"{queries.name}.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(lock)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        with pytest.raises(RuntimeError, match=rf"stage {queries.name} is already running "
                           rf"\(pid {holder.pid} on {socket.gethostname()}\)"):  # fmt: skip
            run_stage(project, queries.name, device="cpu")
        assert not (project / queries.out).exists()
    finally:
        holder.kill()
        holder.wait()
    assert (run_stage(project, queries.name, device="cpu") / "stage.json").is_file()


def test_a_file_system_without_locks_runs_unguarded(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    from readaptir.artifacts import held_alone

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with caplog.at_level("WARNING"), held_alone(tmp_path / "x.lock", "stage x"):
        ran.append(True)
    assert ran and "no lock on this file system" in caplog.text


def test_a_stage_run_again_writes_the_same_bytes(project):
    """An adapter trained again (dvc repro -f, a lost cache) is the same output to DVC, which
    would otherwise run every stage after it again: its run times are kept beside it."""
    from readaptir.runner import RUNS_DIR, run_stage

    runs = []
    for every in (500, 2):  # how it runs (checkpoints) is no part of what it makes
        _adapter_with(project, checkpoint_every=every)
        plan = plan_of(project)
        dvcfile.write(plan, project)
        adapter = next(iter(by_kind(plan)["adapter"]))
        out = run_stage(project, adapter.name, device="cpu")
        runs.append({p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()})
        shutil.rmtree(out)
    assert runs[0] == runs[1]
    figures = json.loads((project / RUNS_DIR / f"{adapter.name}.json").read_text())
    assert figures["id"] == adapter.id and figures["seconds"] > 0 and "tokens_per_second" in figures


def test_a_kill_between_training_and_publishing_the_adapter_resumes(project, monkeypatch):
    """The adapter's checkpoints outlive its training until the stage's output is in place: a
    stage killed after its last step resumes from there, and its work folder goes after."""
    from readaptir import runner

    common_file = project / "recipes" / "_common.yaml"
    common = yaml.safe_load(common_file.read_text())
    common["adapter"] = {"r": 4, "packing": False, "epochs": 2, "checkpoint_every": 2}
    common_file.write_text(yaml.safe_dump(common))  # 6 steps of 4 passages
    plan = plan_of(project)
    dvcfile.write(plan, project)
    adapter = next(iter(by_kind(plan)["adapter"]))
    publish = runner.write_json

    def killed(path, data):
        if Path(path).name == "stage.json":
            raise KeyboardInterrupt
        publish(path, data)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(runner, "write_json", killed)
        runner.run_stage(project, adapter.name, device="cpu")
    work = project / "artifacts" / "adapter" / f".work-{adapter.id}"
    assert (work / "checkpoint.pt").is_file()
    out = runner.run_stage(project, adapter.name, device="cpu")
    figures = json.loads((project / runner.RUNS_DIR / f"{adapter.name}.json").read_text())
    assert figures["resumed_from"] == 4 and (out / "adapter_model.safetensors").is_file()
    assert not work.exists()


def test_a_failed_relaunch_leaves_no_temporary_output_and_names_the_rank(project, monkeypatch):
    """A rank past the first failing has torchrun stop rank 0 before it removes its unfinished
    output; the launcher, which holds the stage's lock, removes it. A rank's error says which."""
    from click.testing import CliRunner

    from readaptir import runner
    from readaptir.cli import main

    plan = plan_of(project)
    dvcfile.write(plan, project)
    adapter = next(iter(by_kind(plan)["adapter"]))
    out = project / "artifacts" / "adapter" / adapter.id

    def failed(procs, args):
        (out.parent / f".tmp-{out.name}-4242424242").mkdir(parents=True)  # rank 0's, stopped
        raise RuntimeError(f"the {procs}-process run failed (torchrun exit code 1)")

    monkeypatch.setattr(runner, "relaunch", failed)
    with pytest.raises(RuntimeError, match="2-process run failed"):
        runner.run_stage(project, adapter.name, device="cpu", procs=2)
    assert not list(out.parent.glob(".tmp-*")) and not out.exists()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(main, ["stage", "run", "nope", "--root", str(project)])
    assert result.exit_code == 1 and "Error: no stage 'nope'" in result.output  # not torchrun's
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    result = CliRunner().invoke(main, ["stage", "run", "nope", "--root", str(project)])
    assert result.exit_code == 1 and "Error: rank 1 of 2: no stage 'nope'" in result.output


def test_passage_selection_uses_the_evaluated_collections_judgments(project):
    shutil.copytree(project / "data" / "toy", project / "data" / "other")
    qrels = project / "data" / "toy" / "qrels"
    shutil.copy(qrels / "test.tsv", qrels / "dev.tsv")
    common_file = project / "recipes" / "_common.yaml"
    common = yaml.safe_load(common_file.read_text())
    common["corpus"] = {"path": "data/toy", "split": "dev"}
    common["adapter"] = {**common["adapter"], "passages": "judged"}
    common_file.write_text(yaml.safe_dump(common))
    (project / "recipes" / "ra.yaml").write_text("extends: _common.yaml\n")
    plan = plan_of(project)
    (adapter,) = [s for s in plan.stages.values() if s.kind == "adapter"]
    assert adapter.params["train_corpus"]["path"] == "data/toy"
    judgments = adapter.params["selection"]["judgments"]
    assert (judgments["path"], judgments["split"]) == ("data/toy", "dev")
    assert adapter.params["selection"]["passages"] == "judged"
    assert sorted(adapter.deps) == [
        "data/toy/corpus.jsonl",
        "data/toy/qrels/dev.tsv",
        "models/base",
    ]
    # a query's text selects no passage: the adapter (days at 7B) stays; a judgment is another
    queries = project / "data" / "toy" / "queries.jsonl"
    queries.write_text(queries.read_text().replace('"text": "', '"text": "edited ', 1))
    assert changed_kinds(plan, plan_of(project)) == {"queries", "search", "score"}
    (qrels / "dev.tsv").write_text((qrels / "dev.tsv").read_text() + "q1\td9\t1\n")
    assert "adapter" in changed_kinds(plan, plan_of(project))
    # another collection's passages are not what the evaluated split's judgments name
    (project / "recipes" / "ra.yaml").write_text(
        "extends: _common.yaml\nadapter: {train_corpus: data/other}\n"
    )
    with pytest.raises(
        RecipeError, match=r"_common\.yaml:\d+: adapter\.passages: judged selects passages"
    ):
        plan_of(project)


def test_a_peft_retriever_trained_on_another_base_is_warned_about(project, caplog):
    adapter = project / "models" / "lora"
    adapter.mkdir()
    for trained_on, warned in (
        ("meta-llama/Llama-2-7b-chat-hf", True),  # the same shapes: no other check sees it
        ("Meta-Llama/Llama-2-7b-hf", False),  # hub ids do not depend on case
    ):
        config = {"peft_type": "LORA", "r": 4, "base_model_name_or_path": trained_on}
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        edit(
            project,
            "ra-half",
            "base: meta-llama/Llama-2-7b-hf\nretriever: {source: models/lora, family: repllama}\n"
            "corpus: data/toy\n",
        )
        caplog.clear()
        with caplog.at_level("WARNING"):
            plan_of(project)
        said = [r.getMessage() for r in caplog.records if "trained on" in r.getMessage()]
        assert bool(said) == warned, said
        if warned:
            assert "ra-half.yaml" in said[0] and "Llama-2-7b-chat-hf" in said[0]


def test_stages_warn_about_a_hub_peft_retriever_trained_on_another_base(
    project, caplog, monkeypatch
):
    from readaptir import models
    from readaptir.runner import Context

    adapter = project / "models" / "lora"  # stands for the hub's snapshot of the adapter
    adapter.mkdir()
    config = {"peft_type": "LORA", "base_model_name_or_path": "meta-llama/Llama-2-7b-chat-hf"}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    monkeypatch.setattr(models, "local_dir", lambda source, revision=None, check=None: adapter)
    hub = {"source": "castorini/repllama-v1-7b-lora-passage", "revision": "main"}
    local = {"source": "models/lora", "fingerprint": Fingerprints(project).path(adapter)}
    ctx = Context(project, {"kind": "merge", "params": {}, "inputs": {}}, "cpu")
    with caplog.at_level("WARNING"):
        ctx.retriever_dir(hub, {"source": "models/base", "fingerprint": "x"})  # a local base
        ctx.retriever_dir(local, {"source": "meta-llama/Llama-2-7b-hf"})  # build warned already
        assert not caplog.records
        ctx.retriever_dir(hub, {"source": "meta-llama/Llama-2-7b-hf", "revision": "main"})
    said = caplog.records[0].getMessage()
    assert said.startswith("stage merge: the retriever castorini/repllama-v1-7b-lora-passage is")
    assert "Llama-2-7b-chat-hf" in said


def test_a_hub_branch_that_moves_between_stages_is_refused(project, monkeypatch):
    """Each stage records the hub commits it and the stages it reads used; a stage that fetches
    another commit of one (the branch moved on the hub since) fails rather than mix two models'
    results under ids that say `main`."""
    from readaptir import models, runner

    snapshots = project / "hub" / "snapshots"  # as the hub's cache holds them
    for commit in ("a" * 40, "b" * 40):
        (snapshots / commit).mkdir(parents=True)
    at = {"commit": "a" * 40}
    monkeypatch.setattr(
        models, "local_dir", lambda source, revision=None, check=None: snapshots / at["commit"]
    )
    hub = {"source": "meta-llama/Llama-2-7b-hf", "revision": "main"}

    def fetches(ctx, out):
        ctx.model_dir(hub)
        return {}

    monkeypatch.setitem(runner.RUNNERS, "delta", fetches)
    first = {"kind": "delta", "id": "1" * 16, "params": {}, "inputs": {}}
    out = runner._run(project, "delta-first", first, "params.yaml", "cpu", None, rank=False)
    recorded = json.loads((out / "stage.json").read_text())["hub"]
    assert recorded == {"meta-llama/Llama-2-7b-hf@main": "a" * 40}
    # a stage reading that one passes the record on, and checks its own fetch against it
    reader = {"kind": "delta", "id": "2" * 16, "params": {}, "inputs": {"delta": str(out)}}
    out = runner._run(project, "delta-reader", reader, "params.yaml", "cpu", None, rank=False)
    assert json.loads((out / "stage.json").read_text())["hub"] == recorded
    at["commit"] = "b" * 40  # main moved
    later = {**reader, "id": "3" * 16}
    moved = (
        r"Llama-2-7b-hf@main is commit b{40} for this stage but was a{40} for stage delta-first "
        r"\(input delta\) or a stage it reads .* `dvc repro -f -s STAGE`"
    )
    with pytest.raises(runner.StaleInputError, match=moved):
        runner._run(project, "delta-later", later, "params.yaml", "cpu", None, rank=False)
    assert not (project / "artifacts" / "delta" / ("3" * 16)).exists()


def _build(project, *flags, code=0):
    from click.testing import CliRunner

    from readaptir.cli import main

    result = CliRunner().invoke(main, ["build", "--root", str(project), *flags])
    assert result.exit_code == code, result.output
    return result.output


def test_build_names_and_prunes_what_no_stage_makes_any_more(project):
    def merges():
        return {s.out for s in plan_of(project).stages.values() if s.kind == "merge"}

    before = merges()
    edit(project, "ra-half", "extends: _common.yaml\nreadapt: {alpha: 0.25}\n")
    unfinished, done = [project / out for out in sorted(merges())]
    kept = [done, unfinished.with_name(f".work-{unfinished.name}")]  # a killed run resumes
    stale = [project / out for out in sorted(before - merges())]  # α = 0.5, edited away
    stale.append(project / "artifacts" / "embed" / f".work-{'0' * 16}")
    stale.append(project / "artifacts" / "score" / f".tmp-{'1' * 16}-4242424242")  # no such pid
    # what a killed run of a current stage left, once DVC restored its output from the cache
    stale.append(done.with_name(f".work-{done.name}"))
    stale.append(done.with_name(f".tmp-{done.name}-4242424242"))
    stale.append(done.with_name(f".tmp-{done.name}-4242424242-old"))  # a replaced output, left
    running = f"{'2' * 16}"  # a stage run by hand, still going: its folders stay
    kept += [project / "artifacts" / "embed" / f"{p}{running}" for p in ("", ".work-")]
    kept.append(project / "artifacts" / "embed" / f".tmp-{running}-{os.getpid()}")
    mine = [project / "artifacts" / "merge" / "notes", project / "artifacts" / "mine" / ("a" * 16)]
    for folder in kept + stale + mine:
        folder.mkdir(parents=True)
        (folder / "data.bin").write_bytes(b"x" * 2_000_000)
    elsewhere = project / "elsewhere"  # an output linked to another disk: the link goes, not it
    elsewhere.mkdir()
    (elsewhere / "data.bin").write_bytes(b"x" * 2_000_000)
    stale.append(project / "artifacts" / "search" / ("c" * 16))
    stale[-1].parent.mkdir(parents=True)
    stale[-1].symlink_to(elsewhere, target_is_directory=True)
    (project / "artifacts" / "embed" / ("b" * 16)).write_text("a file of the user's")
    mine.append(project / "artifacts" / "embed" / ("b" * 16))
    # a file linked into DVC's cache outlives its output; one linked twice within them does not
    os.link(stale[0] / "data.bin", project / ".dvc-cache-object")
    os.link(stale[1] / "data.bin", stale[2] / "again.bin")
    metrics = project / "metrics"  # of a recipe since removed, and of one built now
    metrics.mkdir()
    (metrics / "gone.json").write_text("{}")
    current = next(s.metrics_file for s in plan_of(project).stages.values() if s.kind == "score")
    (project / current).write_text("{}")
    said = _build(project)
    assert f"{len(stale)} folders under artifacts/ are left over" in said, said
    assert f"removing them frees {2 * (len(stale) - 2):.2f} MB" in said
    assert "1 metrics file(s) of recipes no longer built are left in metrics/ (gone.json;" in said
    assert all(path.exists() for path in kept + stale + mine)  # named, not touched
    assert (metrics / "gone.json").is_file()
    said = _build(project, "--prune")
    assert f"removed {len(stale)} of {len(stale)} folders" in said
    assert "removed 1 metrics file(s) of recipes no longer built: gone.json" in said
    assert not any(path.exists() or path.is_symlink() for path in stale)
    assert all(path.exists() for path in kept + mine) and elsewhere.is_dir()
    assert [p.name for p in metrics.iterdir()] == [Path(current).name]
    assert "left" not in _build(project)


def test_build_waits_for_dvc_and_prune_goes_on_past_a_failure(project, monkeypatch):
    _build(project)
    edit(project, "ra-half", "extends: _common.yaml\nreadapt: {alpha: 0.25}\n")
    stale = [project / "artifacts" / "embed" / f".work-{c * 16}" for c in "01"]
    for folder in stale:
        folder.mkdir(parents=True)
    lock = project / ".dvc" / "tmp" / "rwlock"  # what `dvc repro` holds while a stage runs
    lock.parent.mkdir(parents=True)
    gone = subprocess.Popen(["true"])  # a process that has ended
    gone.wait()
    held = {"pid": os.getpid(), "cmd": "readaptir stage run embed-x"}
    lock.write_text(json.dumps({"write": {"artifacts/embed/x": held}, "read": {}}))
    written = {name: (project / name).read_bytes() for name in ("dvc.yaml", "params.yaml")}
    for flags in (["--prune"], []):  # a stage still to run would read the new params.yaml
        said = _build(project, *flags, code=1)
        assert "DVC is running" in said and "readaptir stage run embed-x" in said
        assert "nothing written" in said and all(path.exists() for path in stale)
        assert all((project / name).read_bytes() == text for name, text in written.items())
    held["pid"] = gone.pid  # a lock left by a run that is over
    lock.write_text(json.dumps({"read": {"artifacts/embed/x": [held]}}))
    rmtree = artifacts.shutil.rmtree

    def fails_on_first(path, **kw):
        if path == stale[0]:
            raise PermissionError(13, "Permission denied")
        rmtree(path, **kw)

    monkeypatch.setattr(artifacts.shutil, "rmtree", fails_on_first)
    said = _build(project, "--prune", code=1)
    assert "removed 1 of 2 folders" in said
    assert f"could not remove {stale[0]}: Permission denied" in said
    assert stale[0].exists() and not stale[1].exists()


def test_prune_keeps_an_output_a_recipe_reads(project):
    """A merged model taken as the next round's retriever is no stage's output any more once
    its α changes, but a recipe reads it."""
    _build(project)
    merges = by_kind(plan_of(project))["merge"]
    merged = project / "artifacts" / "merge" / merges[0].id
    shutil.copytree(project / "models" / "retriever", merged)  # stands for the merge's output
    (project / "recipes" / "round2.yaml").write_text(
        f"extends: _common.yaml\nretriever: {{source: artifacts/merge/{merged.name}}}\n"
    )
    for name in ("ra-half", "ra-full"):
        edit(project, name, "extends: _common.yaml\nreadapt: {alpha: 0.25}\n")
    assert "left over" not in _build(project, "--prune") and merged.is_dir()
    (project / "recipes" / "round2.yaml").unlink()
    assert "removed 1 of 1 folder" in _build(project, "--prune") and not merged.exists()


def test_a_model_folder_behind_a_dangling_link_is_not_taken_for_a_hub_id(project):
    (project / "disk").symlink_to(project / "unmounted", target_is_directory=True)
    edit(project, "ra-half", "extends: _common.yaml\nbase: disk/base\n")
    with pytest.raises(RecipeError, match=r"model folder 'disk/base' does not exist"):
        plan_of(project)


def test_prune_makes_a_read_only_folder_writable_to_empty_it(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "weights").write_text("x")
    folder.chmod(0o555)  # DVC leaves outputs read-only; a user may have done so to folders
    artifacts._writable_and_again(os.unlink, str(folder / "weights"), None)
    assert folder.stat().st_mode & 0o200 and not (folder / "weights").exists()
    assert artifacts.remove([folder]) == [] and not folder.exists()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"peft_type": "IA3"},
            r"only LoRA/DoRA adapters are supported "
            r"\(its adapter_config\.json has peft_type 'IA3'\)",
        ),
        (
            {"peft_type": "LORA", "init_lora_weights": "olora"},
            r"its adapter_config\.json has init_lora_weights 'olora', which replaces the base's",
        ),
    ],
    ids=["ia3", "olora"],
)
def test_a_peft_retriever_the_merge_cannot_apply_fails_at_build(project, config, message):
    adapter = project / "models" / "peft"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    edit(project, "ra-half", "extends: _common.yaml\nretriever: {source: models/peft}\n")
    with pytest.raises(RecipeError, match=rf"ra-half\.yaml:2: retriever: .*models/peft: {message}"):
        plan_of(project)  # not after the adapter trained, in the merge
    edit(project, "ra-half", "extends: _common.yaml\nretriever: {source: models/peft}\n"
                             "readapt: {alpha: 0.0, beta: 1.0}\n")  # fmt: skip
    edit(project, "ra-full", "extends: _common.yaml\nreadapt: {alpha: 0.0, beta: 1.0}\n")
    plan_of(project)  # the retriever alone needs no merge


def test_a_local_model_without_the_tokenizer_a_stage_loads_fails_at_build(project):
    def untokenized(name):
        folder = project / "models" / f"{name}-notok"
        shutil.copytree(project / "models" / name, folder)
        for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt"):
            (folder / f).unlink(missing_ok=True)
        return f"models/{name}-notok"

    retriever, base = untokenized("retriever"), untokenized("base")
    edit(project, "ra-full", f"extends: _common.yaml\nretriever: {{source: {retriever}}}\n")
    with pytest.raises(RecipeError, match=r"ra-full\.yaml:2: retriever: .* no tokenizer files"):
        plan_of(project)  # the retriever-alone embed would fail
    edit(project, "ra-full", f"extends: _common.yaml\nbase: {base}\n")
    with pytest.raises(RecipeError, match=r"ra-full\.yaml:2: base: .* which the adapter trains"):
        plan_of(project)  # the adapter stage would fail, after the retriever-alone stages
    edit(project, "ra-full", f"extends: _common.yaml\nbase: {base}\nreadapt: {{alpha: 0.0}}\n")
    plan_of(project)  # α = 0 trains no adapter: the base's tokenizer is not needed


def test_a_linked_subfolder_counts_as_its_files_and_a_link_loop_is_named(tmp_path):
    """A model folder may link a part (a sentence-transformers Pooling folder, say) from
    elsewhere: its files are the model's, and a change there is a new model."""
    store = tmp_path / "store" / "pool"
    store.mkdir(parents=True)
    (store / "config.json").write_text('{"pooling": "mean"}')
    linked, copied = tmp_path / "proj" / "linked", tmp_path / "proj" / "copied"
    for folder in (linked, copied):
        folder.mkdir(parents=True)
        (folder / "a.bin").write_text("aaaa")
    (linked / "1_Pooling").symlink_to(store, target_is_directory=True)
    shutil.copytree(store, copied / "1_Pooling")
    fp = Fingerprints(tmp_path / "proj")
    before = fp.path(linked)
    assert before == fp.path(copied)  # a linked folder hashes as the files it holds
    assert [row[1] for row in files_identity(linked)] == ["1_Pooling/config.json", "a.bin"]
    (store / "config.json").write_text('{"pooling": "cls"}')
    assert fp.path(linked) != before

    (store / "loop").symlink_to(linked, target_is_directory=True)
    with pytest.raises(ValueError, match=r"1_Pooling/loop links to a folder that holds it"):
        fp.path(linked)


def test_a_hub_retrievers_ids_ask_the_hub_nothing(project, monkeypatch, caplog):
    """Whether a hub retriever is an adapter is not asked at build time: ids are the same on a
    machine that cannot reach the hub. It counts as one, so its baseline depends on Θ."""
    import huggingface_hub

    for name in ("file_exists", "snapshot_download", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, name, lambda *a, **k: pytest.fail("asked the hub"))
    retriever = "retriever: {source: intfloat/e5-mistral-7b-instruct, family: e5-mistral}"
    ids = []
    for revision in ("null", "abc123"):
        base = f"base: {{source: mistralai/Mistral-7B-v0.1, revision: {revision}}}"
        for name in ("ra-half", "ra-full"):
            edit(project, name, f"extends: _common.yaml\n{retriever}\n{base}\n")
        stages = plan_of(project).stages.values()
        baseline = [s for s in stages if s.kind == "embed" and s.params["model"]["retriever"]]
        assert [s.params["model"]["base"]["revision"] for s in baseline] == [
            "main" if revision == "null" else revision
        ]
        ids.append(baseline[0].id)
    assert ids[0] != ids[1]  # another Θ, another baseline: never one made over the other
    # at a branch, a hub model's ids stay when the branch moves: said at every build
    said = (
        "2 hub model(s) at a branch or tag, not a commit: intfloat/e5-mistral-7b-instruct@main, "
        "mistralai/Mistral-7B-v0.1@abc123. Their stages keep their ids"
    )
    assert said in caplog.text
    caplog.clear()
    commit = "b" * 40
    pinned = f"{{source: intfloat/e5-mistral-7b-instruct, family: e5-mistral, revision: {commit}}}"
    base = f"base: {{source: mistralai/Mistral-7B-v0.1, revision: {commit}}}"
    for name in ("ra-half", "ra-full"):
        edit(project, name, f"extends: _common.yaml\nretriever: {pinned}\n{base}\n")
    plan_of(project)
    assert "not a commit" not in caplog.text


def test_a_hub_snapshot_leaves_other_copies_of_its_safetensors_weights(monkeypatch, tmp_path):
    """A 7B repository's .bin (and consolidated) copies would double or triple the download."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    from readaptir import models

    shards = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    tokenizer = ["tokenizer.model", "tokenizer.json", "config.json"]
    repos = {
        "llama": [*shards, "model.safetensors.index.json", *tokenizer,
                  "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                  "consolidated.safetensors", "original/consolidated.00.pth", "flax_model.msgpack"],
        "repllama": ["adapter_config.json", "adapter_model.bin"],  # a PEFT adapter as a pickle
        "contriever": ["config.json", "pytorch_model.bin", "vocab.txt"],  # pickles alone
    }  # fmt: skip
    fetched = {}

    def snapshot(repo_id, revision=None, ignore_patterns=None):
        fetched[repo_id] = list(
            filter_repo_objects(repos[repo_id], ignore_patterns=ignore_patterns)
        )
        return str(tmp_path)

    def model_info(_, repo, revision=None):
        return SimpleNamespace(
            sha="c" * 40, siblings=[SimpleNamespace(rfilename=f) for f in repos[repo]]
        )

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    for repo in repos:
        assert models.local_dir(repo) == tmp_path
    assert fetched["llama"] == [*shards, "model.safetensors.index.json", *tokenizer]
    assert fetched["repllama"] == repos["repllama"] and fetched["contriever"] == repos["contriever"]

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.OfflineModeIsEnabled("offline")

    # the commit the branch names now is checked before the download; the branch is fetched, so
    # that the cache records it for runs offline
    asked = []

    def download(repo_id, revision=None, ignore_patterns=None):
        asked.append(revision)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)

    def moved(commit):
        raise RuntimeError(f"moved to {commit}")

    with pytest.raises(RuntimeError, match="moved to c{40}"):
        models.local_dir("llama", "main", check=moved)
    assert asked == []  # nothing downloaded
    models.local_dir("llama", "main", check=lambda commit: None)
    assert asked == ["main"]
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", offline)
    models.local_dir("llama")  # no listing: the snapshot call takes the cache, or says why not
    assert fetched["llama"] == repos["llama"]

    def unreachable(*args, **kwargs):
        raise ConnectionError("ConnectError: [Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(OSError, match=r"fetching llama@v2 from the hub: ConnectError"):
        models.local_dir("llama", "v2")  # the error names the model
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match=r"fetching llama@v2 from the local hub cache \(offline\)"):
        models.local_dir("llama", "v2")  # and where it was looked for


def test_an_embedding_stage_fetches_the_base_only_for_a_peft_retriever(project, monkeypatch):
    from readaptir import models
    from readaptir.runner import Context, _encoder

    fetched = []

    def local_dir(source, revision=None, check=None):
        fetched.append(source)
        return project / "models" / {"hub/full": "retriever", "hub/lora": "lora"}[source]

    monkeypatch.setattr(models, "local_dir", local_dir)
    lora = project / "models" / "lora"  # stands for the hub's snapshot of an adapter
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    stages = plan_of(project).stages.values()
    encoding = next(s for s in stages if s.kind == "embed").params["encoding"]

    def spec(retriever, base):
        params = {"model": {"retriever": {"source": retriever}, "base": base}, "encoding": encoding}
        return Context(project, {"kind": "queries", "params": params, "inputs": {}}, "cpu")

    _encoder(spec("hub/full", {"source": "hub/base"}), "query")
    assert fetched == ["hub/full"]  # a full retriever encodes without Θ: it is never fetched


def test_one_adapter_trained_elsewhere_serves_every_collection(project):
    """The paper's Table 3: Ψ trained once on one collection (MS MARCO there) and merged for every
    evaluated set: one adapter and one merged model, embedded and scored per collection."""
    for name in ("marco", "other"):
        shutil.copytree(project / "data" / "toy", project / "data" / name)
    corpus = project / "data" / "other" / "corpus.jsonl"
    corpus.write_text(corpus.read_text().replace('"text": "', '"text": "other ', 1))
    for name in ("ra-half", "ra-full"):
        (project / "recipes" / f"{name}.yaml").unlink()
    edit(
        project,
        "transfer",
        "extends: _common.yaml\ncorpus: [data/toy, data/other]\n"
        "adapter: {train_corpus: data/marco}\n",
    )
    kinds = by_kind(plan_of(project))
    (adapter,) = kinds["adapter"]
    assert sorted(adapter.deps) == ["data/marco/corpus.jsonl", "models/base"]
    assert len(kinds["merge"]) == 1 and len(kinds["score"]) == 2
    assert {s.params["recipe"] for s in kinds["score"]} == {"transfer-toy", "transfer-other"}
    merged = kinds["merge"][0].name
    readapted = [s for s in kinds["embed"] if s.inputs.get("model") == merged]
    assert len(readapted) == 2  # the one merged model, embedded for each collection
    # the training collection's passages make another adapter; an evaluated one's do not
    before = plan_of(project)
    corpus.write_text(corpus.read_text().replace('"text": "other ', '"text": "more ', 1))
    assert "adapter" not in changed_kinds(before, plan_of(project))
    marco = project / "data" / "marco" / "corpus.jsonl"
    marco.write_text(marco.read_text().replace('"text": "', '"text": "edited ', 1))
    assert "adapter" in changed_kinds(before, plan_of(project))


def _adapter_with(project, **keys):
    """The adapter stage once ``keys`` are set under ``adapter:`` in ``_common.yaml``."""
    path = project / "recipes" / "_common.yaml"
    common = yaml.safe_load(path.read_text())
    common["adapter"] = {key: value for key, value in common["adapter"].items() if key == "r"}
    path.write_text(yaml.safe_dump({**common, "adapter": {**common["adapter"], **keys}}))
    return by_kind(plan_of(project))["adapter"][0]


def test_build_keeps_dvc_from_hidden_files_of_the_folders_stages_read(project, caplog):
    """DVC hashes a folder dependency with its hidden files, which readaptir's fingerprints leave
    out: build writes the same rule into .dvcignore, in a block of its own beside the user's."""
    ignore = project / ".dvcignore"
    ignore.write_text("# mine\n*.tmp")  # no final newline
    dvcfile.write(plan_of(project), project)
    text = ignore.read_text()
    assert text.startswith("# mine\n*.tmp\n" + dvcfile.IGNORE_BEGIN + "\n")
    assert "/models/base/**/.*\n/models/retriever/**/.*\n" + dvcfile.IGNORE_END + "\n" in text
    assert ignore not in dvcfile.write(plan_of(project), project)  # unchanged: not written
    # the block stays where it is: a negation of the user's after it keeps its meaning
    ignore.write_bytes((text + "!keep\n").replace("\n", "\r\n").encode())
    common_file = project / "recipes" / "_common.yaml"
    common = yaml.safe_load(common_file.read_text())
    shutil.copytree(project / "models" / "base", project / "models" / "my base [v1]")
    common["base"] = "models/my base [v1]"
    common_file.write_text(yaml.safe_dump(common))
    dvcfile.write(plan_of(project), project)
    data = ignore.read_bytes()
    assert data.count(b"\r\n") == data.count(b"\n")  # the file's own line endings
    entries = data.decode().splitlines()
    assert entries[0:2] == ["# mine", "*.tmp"] and entries[-1] == "!keep"
    assert r"/models/my\ base\ \[v1\]/**/.*" in entries and "/models/base/**/.*" not in entries

    # a folder a dvc.lock (here a split project's) recorded with its hidden files keeps them to
    # DVC: its stages would run again; one recorded without them gets its entry
    retriever = project / "models" / "retriever"
    visible = len([p for p in retriever.rglob("*") if p.is_file()])
    (retriever / ".cache").mkdir()
    (retriever / ".cache" / "x.metadata").write_text("x")
    for files, entered in ((visible, True), (visible + 1, False)):
        lock = {"stages": {"a": {"deps": [{"path": "models/retriever", "nfiles": files}]}}}
        (project / "pipelines" / "toy").mkdir(parents=True, exist_ok=True)
        (project / "pipelines" / "toy" / "dvc.lock").write_text(yaml.safe_dump(lock))
        ignore.write_text("")
        caplog.clear()
        with caplog.at_level("WARNING", logger="readaptir.dvcfile"):
            dvcfile.write(plan_of(project), project)
        assert ("/models/retriever/**/.*" in ignore.read_text()) == entered
        said = f"models/retriever: a dvc.lock recorded it with {files} files, its hidden ones"
        assert (said in caplog.text) != entered
    # added by the user among build's entries, it stays there
    text = ignore.read_text().replace(
        dvcfile.IGNORE_END, "/models/retriever/**/.*\n" + dvcfile.IGNORE_END
    )
    ignore.write_text(text)
    assert ignore not in dvcfile.write(plan_of(project), project)

    # a link to a shared file: that file gets the block and keeps its permissions; a link to
    # nothing is refused, nothing written
    shared = project.parent / "shared-dvcignore"
    shared.write_text("*.log\n")
    shared.chmod(0o640)
    ignore.unlink()
    ignore.symlink_to(shared)
    dvcfile.write(plan_of(project), project)
    assert ignore.is_symlink() and dvcfile.IGNORE_BEGIN in shared.read_text()
    assert shared.stat().st_mode & 0o777 == 0o640
    shared.unlink()
    before = (project / "dvc.yaml").read_bytes()
    with pytest.raises(FileNotFoundError, match=r"\.dvcignore is a link to nothing: mend or"):
        dvcfile.write(plan_of(project), project)
    assert (project / "dvc.yaml").read_bytes() == before and not shared.exists()
    ignore.unlink()

    ignore.write_text(f"*.tmp\n{dvcfile.IGNORE_BEGIN}\n/models/base/**/.*\n/mine\n")
    with pytest.raises(ValueError, match=r"\.dvcignore:2: readaptir build's entries .* never end"):
        dvcfile.write(plan_of(project), project)
    assert ignore.read_text().endswith("/mine\n")  # nothing of the user's lost

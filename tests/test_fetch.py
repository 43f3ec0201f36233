"""Collections fetched by a stage of their own: from a zip URL (file:// here), content-checked."""

import hashlib
import json
import shutil
import zipfile

import pytest
from test_plan import project  # noqa: F401  (fixture)

from readaptir.plan import plan_recipes
from readaptir.recipe import RecipeError, load_recipes
from readaptir.stages.fetch import beir_url, fetch


def make_zip(tmp_path, tiny_beir):
    archive = tmp_path / "toy.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(tiny_beir.rglob("*")):
            if path.is_file():
                zipped.write(path, "toy/" + path.relative_to(tiny_beir).as_posix())
    return archive


def test_fetch_unpacks_checks_and_records(tmp_path, tiny_beir):
    archive = make_zip(tmp_path, tiny_beir)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    out = tmp_path / "out"
    out.mkdir()
    info = fetch(archive.as_uri(), "toy", out, sha256=digest)
    assert info["sha256"] == digest
    assert (out / "toy" / "qrels" / "test.tsv").read_text() == (
        tiny_beir / "qrels" / "test.tsv"
    ).read_text()
    shutil.rmtree(out / "toy")
    with pytest.raises(ValueError, match="the recipe's pin"):
        fetch(archive.as_uri(), "toy", out, sha256="0" * 64)
    (tmp_path / "bad.zip").write_text("not a zip")
    with pytest.raises(ValueError, match="is not a zip archive"):
        fetch((tmp_path / "bad.zip").as_uri(), "bad", out)


def test_beir_corpus_is_one_fetch_stage_shared_by_its_users(project):  # noqa: F811
    for name in ("ra-half", "ra-full"):
        alpha = 0.5 if "half" in name else 1
        (project / "recipes" / f"{name}.yaml").write_text(
            f"extends: _common.yaml\ncorpus: beir:scifact\nreadapt: {{alpha: {alpha}}}\n"
        )
    plan = plan_recipes(load_recipes(project / "recipes"), project)
    fetches = [s for s in plan.stages.values() if s.kind == "fetch"]
    assert len(fetches) == 1 and fetches[0].params["url"] == beir_url("scifact")
    users = {s.kind for s in plan.stages.values() if fetches[0].name in s.inputs.values()}
    assert users == {"embed", "queries", "adapter", "score"}
    embed = next(s for s in plan.stages.values() if s.kind == "embed")
    assert embed.params["dataset"]["path"] == f"{fetches[0].out}/scifact"


def _zip(path, root, prefix):
    with zipfile.ZipFile(path, "w") as zipped:
        for f in sorted(root.rglob("*")):
            if f.is_file():
                zipped.write(f, prefix + f.relative_to(root).as_posix())
    return path


@pytest.mark.parametrize("prefix", ["", "beir-export/", "datasets/scifact/"])
def test_fetch_finds_the_collection_wherever_the_archive_holds_it(tmp_path, tiny_beir, prefix):
    archive = _zip(tmp_path / "a.zip", tiny_beir, prefix)
    out = tmp_path / "out"
    out.mkdir()
    info = fetch(archive.as_uri(), "toy", out)  # no pin: the digest is still recorded
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert info["sha256"] == digest
    assert json.loads((out / "fetch.json").read_text())["sha256"] == digest
    assert sorted(p.name for p in out.iterdir()) == ["fetch.json", "toy"]
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        assert (out / "toy" / name).read_bytes() == (tiny_beir / name).read_bytes()


def test_fetch_pin_is_case_blind_and_a_failed_fetch_leaves_nothing(tmp_path, tiny_beir):
    archive = _zip(tmp_path / "toy.zip", tiny_beir, "toy/")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    out = tmp_path / "out"
    out.mkdir()
    fetch(archive.as_uri(), "toy", out, sha256=digest.upper())
    assert (out / "toy" / "corpus.jsonl").is_file()
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(ValueError, match="the recipe's pin"):
        fetch(archive.as_uri(), "toy", bad, sha256="0" * 64)
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as zipped:
        zipped.writestr("README", "no collection here")
    with pytest.raises(ValueError, match="has no corpus.jsonl"):
        fetch((tmp_path / "empty.zip").as_uri(), "toy", bad)
    assert list(bad.iterdir()) == []  # no partial collection, no scratch folder, no fetch.json


def test_a_local_archive_is_known_by_its_content(project, tiny_beir, tmp_path):  # noqa: F811
    archive = make_zip(tmp_path, tiny_beir)
    recipe = project / "recipes" / "ra-half.yaml"
    recipe.write_text(f"extends: _common.yaml\ncorpus: {{url: '{archive.as_uri()}'}}\n")

    def fetch_stage():
        plan = plan_recipes(load_recipes(project / "recipes"), project)
        return next(s for s in plan.stages.values() if s.kind == "fetch")

    first = fetch_stage()
    assert first.params["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert first.deps == (str(archive),)  # dvc repro sees it change too
    with zipfile.ZipFile(archive, "a") as zipped:
        zipped.writestr("toy/extra.txt", "an edit")
    assert fetch_stage().id != first.id  # a new archive is fetched again
    pinned = f"extends: _common.yaml\ncorpus: {{url: '{archive.as_uri()}', sha256: '{'0' * 64}'}}\n"
    recipe.write_text(pinned)
    with pytest.raises(RecipeError, match=r"corpus\.sha256: .* has sha256 [0-9a-f]{64}, not 0+"):
        fetch_stage()
    archive.unlink()
    recipe.write_text(f"extends: _common.yaml\ncorpus: {{url: '{archive.as_uri()}'}}\n")
    with pytest.raises(RecipeError, match=r"corpus\.url: .*toy\.zip does not exist"):
        fetch_stage()
    with pytest.raises(ValueError, match=r"^file:.*toy\.zip: .*No such file"):
        fetch(archive.as_uri(), "toy", tmp_path)

"""Collections fetched by a stage of their own: from a zip URL (file:// here), content-checked."""

import hashlib
import shutil
import zipfile

import pytest
from test_plan import project  # noqa: F401  (fixture)

from readaptir.plan import plan_recipes
from readaptir.recipe import load_recipes
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
    with pytest.raises(ValueError, match="the recipe pins"):
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
    assert users == {"embed", "adapter", "score"}
    embed = next(s for s in plan.stages.values() if s.kind == "embed")
    assert embed.params["dataset"]["path"] == f"{fetches[0].out}/scifact"

"""Collections fetched by a stage of their own: from a zip URL (file:// here), content-checked."""

import hashlib
import json
import shutil
import zipfile

import pytest
from test_plan import project  # noqa: F401  (fixture)

from readaptir.plan import plan_recipes
from readaptir.recipe import RecipeError
from readaptir.recipe_files import load_recipes
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


def _members(path, members: dict[str, str]):
    with zipfile.ZipFile(path, "w") as zipped:
        for name, text in members.items():
            zipped.writestr(name, text)
    return path.as_uri()


def test_an_archive_that_is_not_one_whole_collection_is_refused(tmp_path, tiny_beir):
    """Kept before: the shallowest corpus.jsonl of several (a folder of that name too), or one
    with no queries or judgments, found only when a stage read them after the GPU work."""
    out = tmp_path / "out"
    out.mkdir()
    whole = {
        name: (tiny_beir / name).read_text()
        for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv")
    }
    two = {
        f"{forum}/{name}": text for forum in ("android", "stats") for name, text in whole.items()
    }
    cases = [
        (two, r"holds 2 collections \(android, stats\); a recipe's corpus is one"),
        ({"x/corpus.jsonl": whole["corpus.jsonl"], **{f"x/y/{n}": t for n, t in whole.items()}},
         r"holds 2 collections \(x, x/y\)"),
        ({"s/corpus.jsonl": whole["corpus.jsonl"]}, r"s has corpus\.jsonl but no queries\.jsonl "
         r"and no qrels/\*\.tsv"),
        ({**whole, "corpus.jsonl": "\n  \n"}, r"its corpus\.jsonl is empty"),
        ({"a/corpus.jsonl/readme.txt": "a folder", **{f"b/{n}": t for n, t in whole.items()}},
         None),  # a folder named corpus.jsonl is not a collection
    ]  # fmt: skip
    for i, (members, refusal) in enumerate(cases):
        url = _members(tmp_path / f"{i}.zip", members)
        if refusal is None:
            fetch(url, "toy", out)
            assert (out / "toy" / "qrels" / "test.tsv").is_file()
            continue
        with pytest.raises(ValueError, match=refusal):
            fetch(url, "toy", out)
        assert list(out.iterdir()) == []


def test_a_damaged_archive_says_how(tmp_path, tiny_beir, monkeypatch):
    from readaptir.stages import fetch as fetch_module

    out = tmp_path / "out"
    out.mkdir()
    archive = _zip(tmp_path / "toy.zip", tiny_beir, "toy/")
    data = bytearray(archive.read_bytes())
    at = data.index(b"PK\x03\x04") + 30 + len("toy/corpus.jsonl")  # the first member's bytes
    data[at] ^= 0xFF
    (tmp_path / "crc.zip").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"crc\.zip is not a zip archive that unpacks: BadZipFile: "
                       r"Bad CRC-32"):  # fmt: skip
        fetch((tmp_path / "crc.zip").as_uri(), "toy", out)
    for method, name, raised in (
        (zipfile.ZIP_DEFLATED, "deflated", "error"),  # zlib's
        (zipfile.ZIP_BZIP2, "bzip2", "OSError"),  # bz2's, with no errno
    ):
        with zipfile.ZipFile(tmp_path / f"{name}.zip", "w", method) as zipped:
            zipped.writestr("toy/corpus.jsonl", '{"_id": "d", "text": "a passage"}\n' * 2000)
        data = bytearray((tmp_path / f"{name}.zip").read_bytes())
        at = data.index(b"PK\x03\x04") + 30 + len("toy/corpus.jsonl")
        data[at + 4 : at + 12] = b"\xff" * 8  # the compressed stream itself broken
        (tmp_path / f"{name}.zip").write_bytes(bytes(data))
        said = rf"{name}\.zip is not a zip archive that unpacks: {raised}: "
        with pytest.raises(ValueError, match=said):
            fetch((tmp_path / f"{name}.zip").as_uri(), "toy", out)
    monkeypatch.setattr(
        fetch_module.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1, 1, 1)
    )
    with pytest.raises(ValueError, match=r"toy\.zip unpacks to 0\.0 GB and .* has 0\.0 GB free"):
        fetch(archive.as_uri(), "toy", out)
    assert list(out.iterdir()) == []


def test_a_relative_file_url_is_under_the_project_root_wherever_the_stage_runs(
    tmp_path, tiny_beir, monkeypatch
):
    root = tmp_path / "project"
    (root / "data").mkdir(parents=True)
    _zip(root / "data" / "toy.zip", tiny_beir, "toy/")
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(tmp_path)  # not the root, which the build read the path under
    info = fetch("file:data/toy.zip", "toy", out, root=root)
    assert info["url"] == "file:data/toy.zip" and (out / "toy" / "corpus.jsonl").is_file()


def test_a_download_cut_short_or_stalled_names_the_url(tmp_path, monkeypatch):
    import http.server
    import socket
    import threading

    from readaptir.stages import fetch as fetch_module

    class Cut(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 400)
            if self.path == "/stall.zip":
                stop.wait(5)  # then goes silent, the connection open

        def log_message(self, *args):
            pass

    stop = threading.Event()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Cut)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(fetch_module, "TIMEOUT", 0.5)
    try:
        with pytest.raises(ValueError, match=r"/cut\.zip: received 400 of 1000 bytes"):
            fetch(f"{base}/cut.zip", "toy", out)
        with pytest.raises(
            ValueError,
            match=r"/stall\.zip: the download failed after \d+ bytes: TimeoutError: timed out",
        ):
            fetch(f"{base}/stall.zip", "toy", out)
    finally:
        stop.set()
        server.shutdown()
    hangs_up = socket.create_server(("127.0.0.1", 0))  # reads the request, closes, says nothing

    def answer_nothing():
        connection, _ = hangs_up.accept()
        connection.recv(4096)
        connection.close()

    threading.Thread(target=answer_nothing, daemon=True).start()
    url = f"http://127.0.0.1:{hangs_up.getsockname()[1]}/closed.zip"
    with pytest.raises(ValueError, match=r"/closed\.zip: RemoteDisconnected: "):
        fetch(url, "toy", out)
    hangs_up.close()
    assert list(out.iterdir()) == []

import pytest

from readaptir.demo import run_demo


def test_force_replaces_only_a_demo_workspace(tmp_path):
    project = tmp_path / "project"
    (project / "recipes").mkdir(parents=True)
    (project / "recipes" / "mine.yaml").write_text("base: b\n")
    with pytest.raises(FileExistsError, match="pass --force"):
        run_demo(project)
    with pytest.raises(FileExistsError, match="is not a demo workspace"):
        run_demo(project, force=True)
    assert (project / "recipes" / "mine.yaml").read_text() == "base: b\n"  # nothing deleted
    afile = tmp_path / "a-file"
    afile.write_text("x")
    with pytest.raises(FileExistsError, match="is not a demo workspace"):
        run_demo(afile, force=True)
    assert afile.read_text() == "x"

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from readaptir.recipe import Recipe, RecipeError
from readaptir.recipe_files import expand_sweeps, load_recipe, load_recipes


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


MINIMAL = (
    "base: meta-llama/Llama-2-7b-hf\n"
    "retriever: castorini/repllama-v1-7b-lora-passage\n"
    "corpus: data/scifact\n"
)


def test_minimal_recipe_gets_the_papers_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path / "scifact.yaml", MINIMAL))
    assert recipe.name == "scifact"
    assert recipe.base.source == "meta-llama/Llama-2-7b-hf" and recipe.base.revision is None
    a = recipe.adapter
    assert (a.method, a.r, a.lora_alpha, a.dropout, a.lr, a.batch_size, a.epochs, a.max_length) == (
        "dora",
        32,
        64,
        0.05,
        2e-4,
        4,
        1,
        1024,
    )
    assert a.target_modules is None  # the architecture's default: q/k/v/up/down for Llama
    assert (a.passages, a.packing) == ("all", True)
    assert a.scheduler == "linear"
    assert (recipe.readapt.alpha, recipe.readapt.beta) == (0.5, 1.0)
    assert recipe.eval.k == 100 and recipe.eval.metrics == ["nDCG@10", "Recall@100", "MRR@10"]
    assert recipe.eval.ignore_identical_ids == "auto"
    assert recipe.corpus.split == "test" and recipe.train_corpus == recipe.corpus


def test_extends_merges_nested_keys_and_child_wins(tmp_path):
    write(tmp_path / "_base.yaml", MINIMAL + "adapter: {r: 16, lr: 0.001}\nreadapt: {beta: 0.9}\n")
    child = write(
        tmp_path / "x.yaml", "extends: _base.yaml\nadapter: {r: 8}\nreadapt: {alpha: 0.25}\n"
    )
    recipe = load_recipe(child)
    assert recipe.name == "x"
    assert (recipe.adapter.r, recipe.adapter.lr) == (8, 0.001)
    assert (recipe.readapt.alpha, recipe.readapt.beta) == (0.25, 0.9)


def test_partial_recipes_are_not_built_and_names_must_be_unique(tmp_path):
    write(tmp_path / "r" / "_base.yaml", MINIMAL)
    write(tmp_path / "r" / "a.yaml", "extends: _base.yaml\n")
    write(tmp_path / "r" / "sub" / "b.yaml", "extends: ../_base.yaml\nname: a\n")
    write(tmp_path / "r" / "_parts" / "c.yaml", "extends: ../_base.yaml\nname: a\n")  # partial
    # hidden: a notebook's checkpoint copy and an editor's lock link to nowhere
    write(tmp_path / "r" / ".ipynb_checkpoints" / "a-checkpoint.yaml", "extends: ../_base.yaml\n")
    (tmp_path / "r" / ".#a.yaml").symlink_to("user@host.1234:1700000000")
    with pytest.raises(RecipeError, match=r"b\.yaml:2: name: 'a' is also the name of .*a\.yaml"):
        load_recipes(tmp_path / "r")
    # the file whose own name: makes the clash is blamed, at its line, whichever is read first
    write(tmp_path / "r" / "sub" / "b.yaml", "extends: ../_base.yaml\n")
    write(tmp_path / "r" / "a.yaml", "extends: _base.yaml\nname: b\n")
    with pytest.raises(RecipeError, match=r"/a\.yaml:2: name: 'b' is also the name of .*b\.yaml$"):
        load_recipes(tmp_path / "r")
    # a name both inherit from a parent: the file read second, naming the first
    write(tmp_path / "r" / "_named.yaml", "extends: _base.yaml\nname: b\n")
    write(tmp_path / "r" / "a.yaml", "extends: _named.yaml\n")
    write(tmp_path / "r" / "sub" / "b.yaml", "extends: ../_named.yaml\n")
    with pytest.raises(RecipeError, match=r"/b\.yaml: name: 'b' is also the name of .*/a\.yaml$"):
        load_recipes(tmp_path / "r")
    write(tmp_path / "r" / "sub" / "b.yaml", "extends: ../_base.yaml\n")
    write(tmp_path / "r" / "a.yaml", "extends: _base.yaml\n")
    write(tmp_path / "r" / "sub" / "b.yaml", "extends: ../_base.yaml\nname: A\n")
    with pytest.raises(
        RecipeError, match=r"'A' is also the name of .*a\.yaml \(as 'a': names must"
    ):
        load_recipes(tmp_path / "r")  # they would share output folders where case is ignored
    (tmp_path / "r" / "sub" / "b.yaml").unlink()
    (tmp_path / "r" / "odd.yaml").mkdir()  # a folder, whatever its name, is not a recipe
    write(tmp_path / "r" / "B.YML", "extends: _base.yaml\n")  # the suffix in any case
    write(tmp_path / "r" / "notes.txt", "extends: _base.yaml\n")
    assert [r.name for r in load_recipes(tmp_path / "r")] == ["B", "a"]
    write(tmp_path / "shared" / "c.yaml", MINIMAL)  # a linked folder's recipes are built too
    (tmp_path / "r" / "linked").symlink_to(tmp_path / "shared", target_is_directory=True)
    assert [r.name for r in load_recipes(tmp_path / "r")] == ["B", "a", "c"]


def test_every_problem_of_a_recipe_is_named(tmp_path):
    path = write(tmp_path / "bad.yaml", MINIMAL + "adapter: {r: 0, lr: -1}\nreadapt: {beta: x}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(err.value).startswith(f"{path}:4: adapter.r: Input should be greater than 0")
    assert str(err.value).endswith("(and 2 more: adapter.lr, readapt.beta)")


@pytest.mark.parametrize(
    "extra, key, line, fragment",
    [
        ("adapter:\n  rank: 8\n", "adapter.rank", 5, "unknown key"),
        ("adapter:\n  r: many\n", "adapter.r", 5, "valid integer"),
        ("readapt: {alpha: high}\n", "readapt.alpha", 4, "valid number"),
        ("adapter: {method: qlora}\n", "adapter.method", 4, "'dora' or 'lora'"),
        ("retriever: {source: x, family: colbert}\n", "retriever.family", 4, "repllama"),
        (
            "retriever: {source: x, encoding: {max_query_length: -5}}\n",
            "retriever.encoding.max_query_length",
            4,
            "greater than 1",
        ),
        (
            "retriever: {source: x, encoding: {query_template: 'query:'}}\n",
            "retriever.encoding.query_template",
            4,
            "needs {text}",
        ),
        ("corpus: other\n", "corpus", 4, "appears twice"),
        ("eval: {metrics: [nDCG@10, Bleu@4]}\n", "eval.metrics", 4, "unknown metric 'Bleu@4'"),
        ("eval: {k: 10, metrics: [Recall@100]}\n", "eval.metrics", 4, "eval.k is 10"),
        (
            "eval: {k: 100, metrics: [Recall@101]}\n",
            "eval.metrics",
            4,
            "top 101 of each run, but eval.k is 100",
        ),
        ("readapt: {alpha: auto, tune_fraction: 1}\n", "readapt.tune_fraction", 4, "less than 1"),
        ("readapt: {alpha: auto, tune_fraction: 0}\n", "readapt.tune_fraction", 4, "greater"),
        # the default metrics hold Recall@100: a top-5 run would score it silently wrong
        ("eval: {k: 5}\n", "eval.k", 4, "nDCG@10, Recall@100, MRR@10 need the top 100"),
        ("readapt: {alpha: auto, tune_metric: ndcg}\n", "readapt.tune_metric", 4, "cutoff"),
        ("eval: {k: 0}\n", "eval.k", 4, "greater than 0"),
        ("name: 'bad name!'\n", "name", 4, "letters, digits"),
        ("readapt: {device: gpu}\n", "readapt.device", 4, "should match pattern"),
        # strict types: no coercion of booleans or quoted numbers, no .nan or .inf
        ("adapter: {r: true}\n", "adapter.r", 4, "valid integer, got True"),
        ("readapt: {alpha: '0.5'}\n", "readapt.alpha", 4, "valid number"),
        ("adapter: {packing: 'off'}\n", "adapter.packing", 4, "valid boolean"),
        ("readapt: {alpha: .nan}\n", "readapt.alpha", 4, "finite number, got nan"),
        ("readapt:\n  beta: -.inf\n", "readapt.beta", 5, "finite number"),
        ("adapter: {lr: .inf}\n", "adapter.lr", 4, "finite number"),
        ("adapter: {lr: 1.0e+38}\n", "adapter.lr", 4, "less than or equal to 1"),
        # of a union, the member that got furthest speaks
        ("readapt:\n  alpha: [0.1, x]\n", "readapt.alpha.1", 5, "valid number, got 'x'"),
        ("readapt: {alpha: auto, alpha_grid: [0.5, 0.5]}\n", "readapt.alpha_grid", 4, "two"),
        ("readapt: {alpha: [0.5, 0.5]}\n", "readapt.alpha", 4, "distinct values"),
        ("readapt: {beta: []}\n", "readapt.beta", 4, "at least one value"),
        ("readapt: {alpha: [0.5], alpha_grid: [0, 0, 1]}\n", "readapt.alpha_grid", 4, "twice"),
        ("readapt:\n  alpha: auto\n  tune_metric: P@1000\n", "readapt.tune_metric", 6, "top 1000"),
        ("eval: {metrics: []}\n", "eval.metrics", 4, "at least 1 item"),
        ("eval: {metrics: [MAP, MAP]}\n", "eval.metrics", 4, "appears twice"),
        ("eval: {metrics: [nDCG@10, NDCG@010]}\n", "eval.metrics", 4, "twice: nDCG@10, NDCG@010"),
        ("adapter: {target_modules: []}\n", "adapter.target_modules", 4, "at least 1 item"),
        ("adapter: {target_modules: [v, q, v]}\n", "adapter.target_modules", 4, "twice: v"),
        ("adapter: {weight_decay: -0.1}\n", "adapter.weight_decay", 4, "greater than or equal"),
        ("adapter: {max_grad_norm: 0}\n", "adapter.max_grad_norm", 4, "greater than 0"),
        ('name: "abc\\n"\n', "name", 4, "letters, digits"),
        # keys are names: YAML reads these as null, a number and a boolean
        ("~: 2\n", "~", 4, "a key must be a name; YAML reads this one as null"),
        ("adapter: {1: 2}\n", "adapter.1", 4, "YAML reads this one as int"),
        ("readapt: {true: 2}\n", "readapt.true", 4, "YAML reads this one as bool"),
        # the adapter stage seeds torch with it, which takes -2^63 to 2^64 - 1
        ("adapter: {seed: 18446744073709551616}\n", "adapter.seed", 4, "less than or equal"),
        ("adapter: {seed: -9223372036854775809}\n", "adapter.seed", 4, "greater than or equal"),
        # counts past what tokenizers and torch take failed with a traceback when a stage ran
        (
            "retriever: {source: x, encoding: {max_query_length: 99999999999999999999}}\n",
            "retriever.encoding.max_query_length",
            4,
            "less than or equal to 2147483647",
        ),
        ("adapter: {max_length: 4294967296}\n", "adapter.max_length", 4, "less than or equal"),
        # YAML 1.1 numbers in other bases: read as 8, 3 and 90 before, silently
        ("adapter: {r: 010}\n", "adapter.r", 4, "YAML 1.1 reads 010 as a number in base 8"),
        ("adapter:\n  batch_size: 0b11\n", "adapter.batch_size", 5, "write it in decimal"),
        ("adapter: {max_steps: 1:30}\n", "adapter.max_steps", 4, "or quote it for a string"),
        ("readapt: {alpha: [0.5, 1:30.5]}\n", "readapt.alpha", 4, "base 8, 2 or 60"),
        ("eval: {k: 1000000000000}\n", "eval.k", 4, "less than or equal"),
        (
            "retriever: {source: x, encoding: {query_template: '{text!z}'}}\n",
            "retriever.encoding.query_template",
            4,
            "not a template str.format fills: Unknown conversion specifier z",
        ),
        (
            "retriever: {source: x, encoding: {passage_template: '{text:>9999999999999999999}'}}\n",
            "retriever.encoding.passage_template",
            4,
            "not a template str.format fills",
        ),
    ],
)
def test_bad_values_name_file_key_and_line(tmp_path, extra, key, line, fragment):
    text = MINIMAL if "retriever" not in extra else MINIMAL.replace("retriever: castorini", "#")
    path = write(tmp_path / "bad.yaml", text + extra)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert message.startswith(f"{path}:{line}: {key}:"), message
    assert fragment in message


@pytest.mark.parametrize(
    "corpus, key, fragment",
    [
        ("[]", "corpus", "an empty list"),
        ("{url: 'file:///tmp/x.zip', name: ../../escaped}", "corpus.name", "'../../escaped'"),
        ("{url: 'file:///tmp/x.zip', name: a/b}", "corpus.name", "'a/b' must be letters"),
        ("{url: 'file:///tmp/'}", "corpus.url", "name '' must be"),
        ("'beir:/'", "corpus.beir", "a BEIR set's name (e.g. trec-covid), not '/'"),
        ("'beir:../etc'", "corpus.beir", "not '../etc'"),
        ("{url: notaurl}", "corpus.url", "'notaurl' is not a URL the fetch stage reads (https://"),
        ("'.'", "corpus.path", "no name; set `name:`"),
        ("{beir: scifact, sha256: abc}", "corpus.sha256", "64 lower-case hex digits"),
        (f"{{path: data/x, sha256: '{'a' * 64}'}}", "corpus.sha256", "a local path is hashed as"),
        ("[data/a, {path: data/b, nmae: x}]", "corpus.1.nmae", "unknown key"),
        ("[data/a, 5]", "corpus.1", "got 5"),
        ("{beir: scifact, split: 5, nmae: x}", "corpus.split", "got 5 (YAML read a number: quote"),
        ("{path: data/x, split: ../../x/qrels/test}", "corpus.split", "the name of a qrels file"),
    ],
)
def test_bad_corpora_name_the_key(tmp_path, corpus, key, fragment):
    text = MINIMAL.replace("corpus: data/scifact\n", f"corpus: {corpus}\n")
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert message.startswith(f"{path}:3: {key}:"), message
    assert fragment in message


def test_exponent_numbers_are_numbers_and_quoted_ones_are_not(tmp_path):
    text = MINIMAL + "adapter: {lr: 2e-4, lora_alpha: 1E+2}\nreadapt: {alpha: [.5e0, -1e-1]}\n"
    recipe = load_recipe(write(tmp_path / "a.yaml", text))
    assert (recipe.adapter.lr, recipe.adapter.lora_alpha) == (2e-4, 100.0)
    assert recipe.readapt.alpha == [0.5, -0.1]
    with pytest.raises(RecipeError, match=r"a\.yaml:4: adapter\.lr: .*valid number, got '2e-4'"):
        load_recipe(write(tmp_path / "a.yaml", MINIMAL + "adapter: {lr: '2e-4'}\n"))


def test_a_dangling_link_is_named_by_the_link(tmp_path):
    (tmp_path / "r.yaml").symlink_to(tmp_path / "gone.yaml")
    with pytest.raises(RecipeError, match=r"r\.yaml: a link to .*gone\.yaml, which does not exist"):
        load_recipes(tmp_path)


def test_a_loop_of_links_a_pipe_and_a_device_are_named_as_what_they_are(tmp_path):
    (tmp_path / "l1.yaml").symlink_to("l2.yaml")
    (tmp_path / "l2.yaml").symlink_to("l1.yaml")
    with pytest.raises(
        RecipeError, match=r"l1\.yaml: a link to l2\.yaml, which leads back to itself"
    ):
        load_recipes(tmp_path)
    for path in tmp_path.iterdir():
        path.unlink()
    os.mkfifo(tmp_path / "pipe.yaml")  # reading it would wait for a writer for ever
    with pytest.raises(RecipeError, match=r"pipe\.yaml: not a regular file"):
        load_recipes(tmp_path)
    (tmp_path / "pipe.yaml").unlink()
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")  # reading it would never end
    with pytest.raises(RecipeError, match=r"zero\.yaml: not a regular file"):
        load_recipes(tmp_path)


def test_a_recipe_nested_without_end_is_named(tmp_path):
    path = write(tmp_path / "deep.yaml", MINIMAL + "x: " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(RecipeError, match=r"deep\.yaml: nested too deeply"):
        load_recipe(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x: &a [*a]\n", r":4: x: unknown key"),
        (
            "adapter: {target_modules: &t [q_proj, *t]}\n",
            r":4: adapter\.target_modules\.1: .*string",
        ),
    ],
)
def test_an_alias_that_holds_itself_is_named_by_its_key(tmp_path, text, message):
    path = write(tmp_path / "loop.yaml", MINIMAL + text)
    with pytest.raises(RecipeError, match=r"loop\.yaml" + message):
        load_recipe(path)


def test_a_bad_value_is_shown_cut_short(tmp_path):
    text = MINIMAL.replace(
        "corpus: data/scifact", "corpus: [" + ", ".join([f"[x{i}]" for i in range(10_000)]) + "]"
    )
    with pytest.raises(RecipeError, match=r"corpus\.0: .*got \['x0'\]") as err:
        load_recipe(write(tmp_path / "long.yaml", text))
    assert len(str(err.value)) < 1000


def test_a_chain_of_extends_deeper_than_python_recurses_is_named(tmp_path):
    write(tmp_path / "_p0.yaml", MINIMAL)
    for i in range(1, 1500):
        write(tmp_path / f"_p{i}.yaml", f"extends: _p{i - 1}.yaml\n")
    path = write(tmp_path / "top.yaml", "extends: _p1499.yaml\n")
    with pytest.raises(RecipeError, match=r"top\.yaml: nested too deeply"):
        load_recipe(path)


def test_errors_name_files_inside_the_working_folder_relative_to_it(tmp_path, monkeypatch):
    path = write(tmp_path / "recipes" / "bad.yaml", MINIMAL + "adapter:\n  r: many\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError, match=r"^recipes/bad\.yaml:5: adapter\.r: ") as err:
        load_recipe(path)
    assert err.value.file == str(path.resolve())  # the full path stays on the error


def test_unknown_encoding_field_is_an_error(tmp_path):
    path = write(
        tmp_path / "bad.yaml",
        MINIMAL.replace(
            "retriever: castorini/repllama-v1-7b-lora-passage",
            "retriever: {source: x, encoding: {poolin: last}}",
        ),
    )
    with pytest.raises(RecipeError, match=r"retriever\.encoding.*poolin"):
        load_recipe(path)


def test_missing_required_key_and_broken_files(tmp_path):
    with pytest.raises(RecipeError, match=r"corpus: required key is missing"):
        load_recipe(write(tmp_path / "a.yaml", "base: x\nretriever: y\n"))
    with pytest.raises(RecipeError, match=r"b\.yaml:2: not valid YAML"):
        load_recipe(write(tmp_path / "b.yaml", "base: x\n  retriever: [y\n"))
    with pytest.raises(RecipeError, match=r"n\.yaml:3: not valid YAML: .* #x0000$"):
        load_recipe(write(tmp_path / "n.yaml", "base: x\nretriever: y\ncorpus: a\x00b\n"))
    with pytest.raises(RecipeError, match=r"c\.yaml.*extends.*'nope.yaml'"):
        load_recipe(write(tmp_path / "c.yaml", "extends: nope.yaml\n"))
    write(tmp_path / "d.yaml", "extends: e.yaml\n")
    with pytest.raises(RecipeError, match="circular extends"):
        load_recipe(write(tmp_path / "e.yaml", "extends: d.yaml\n"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match="no recipes"):
        load_recipes(tmp_path / "empty")
    with pytest.raises(RecipeError, match=r"missing: no such folder: not a project .*init"):
        load_recipes(tmp_path / "missing")
    (tmp_path / "file").write_text("base: x\n")
    with pytest.raises(RecipeError, match="file: not a folder"):
        load_recipes(tmp_path / "file")


def test_recipe_is_immutable_and_round_trips():
    recipe = Recipe(name="x", base="b", retriever="r", corpus="c")
    again = Recipe.model_validate(recipe.model_dump(mode="json"))
    assert again == recipe
    with pytest.raises(ValidationError):
        recipe.name = "y"


def test_corpus_list_makes_a_grid_and_extends_takes_several_parents(tmp_path):
    write(tmp_path / "_model.yaml", "base: b\nretriever: r\nlabel: R\n")
    write(
        tmp_path / "_sets.yaml",
        "corpus: [data/scifact, {path: data/msmarco, split: dev,"
        " in_domain: true}]\nreadapt: {alpha: [0.5, 1]}\n",
    )
    write(tmp_path / "grid.yaml", "extends: [_model.yaml, _sets.yaml]\n")
    recipes = load_recipes(tmp_path)
    assert [r.name for r in recipes] == [
        "grid-scifact-a0p5",
        "grid-scifact-a1",
        "grid-msmarco-a0p5",
        "grid-msmarco-a1",
    ]
    marco = recipes[2]
    assert (marco.corpus.split, marco.corpus.in_domain, marco.label) == ("dev", True, "R")
    assert marco.sweep == "grid-msmarco" and marco.file.endswith("grid.yaml")
    # where parents set one key, the later one wins
    write(tmp_path / "_r8.yaml", "adapter: {r: 8, lora_alpha: 8}\n")
    write(tmp_path / "_r16.yaml", "adapter: {r: 16}\n")
    write(tmp_path / "grid.yaml", "extends: [_model.yaml, _sets.yaml, _r8.yaml, _r16.yaml]\n")
    assert {(r.adapter.r, r.adapter.lora_alpha) for r in load_recipes(tmp_path)} == {(16, 8)}
    write(tmp_path / "grid.yaml", "extends: [_model.yaml, _sets.yaml, _r16.yaml, _r8.yaml]\n")
    assert {r.adapter.r for r in load_recipes(tmp_path)} == {8}


def test_a_string_or_list_that_would_drop_a_parents_settings_is_refused(tmp_path):
    write(
        tmp_path / "_p.yaml",
        MINIMAL.replace("corpus: data/scifact", "corpus: {path: d, split: dev}"),
    )
    refusals = {
        "corpus: data/other": r"c\.yaml:2: corpus: a plain string here would drop what the parent "
        r"recipe sets \(split\); write a mapping, e\.g\. corpus: \{path: data/other\}",
        "corpus: [data/a, {path: data/b, split: dev}]": r"c\.yaml:2: corpus: this list replaces "
        r"the parent recipe's corpus \(path, split\) and an item does not set split",
    }
    for text, refusal in refusals.items():
        with pytest.raises(RecipeError, match=refusal):
            load_recipe(write(tmp_path / "c.yaml", f"extends: _p.yaml\n{text}\n"))
    # nothing is lost where every item (or the string) sets what the parent sets
    write(
        tmp_path / "c.yaml",
        "extends: _p.yaml\ncorpus: [{path: a, split: dev}, {path: b, split: test}]\n",
    )
    assert [r.corpus.split for r in load_recipes(tmp_path)] == ["dev", "test"]
    write(tmp_path / "_q.yaml", MINIMAL.replace("corpus: data/scifact", "corpus: {path: d}"))
    write(tmp_path / "c.yaml", "extends: _q.yaml\ncorpus: [data/a, data/b]\n")
    assert [r.corpus.path for r in load_recipes(tmp_path)] == ["data/a", "data/b"]


def test_errors_point_at_the_file_that_sets_the_key(tmp_path):
    write(tmp_path / "_p.yaml", MINIMAL + "adapter:\n  lr: 1e-4\n  r: zero\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path / "f.yaml", "extends: _p.yaml\nadapter:\n  lr: 0.1\n"))
    assert str(err.value).startswith(f"{tmp_path / '_p.yaml'}:6: adapter.r:")


def test_a_string_cannot_silently_drop_inherited_settings(tmp_path):
    write(tmp_path / "_p.yaml", "base: b\nretriever: {source: r, family: repllama}\ncorpus: c\n")
    with pytest.raises(RecipeError, match=r"f\.yaml:2: retriever: .*drop.*sets \(family\)"):
        load_recipe(write(tmp_path / "f.yaml", "extends: _p.yaml\nretriever: other/model\n"))


def test_sweep_names_are_exact():
    recipe = Recipe(
        name="g",
        base="b",
        retriever="r",
        corpus="c",
        readapt={"alpha": [0.5, 0.5000001, 1.0, -0.25]},
    )
    assert [v.name for v in expand_sweeps(recipe)] == ["g-a0p5", "g-a0p5000001", "g-a1", "g-am0p25"]


def test_template_placeholders_are_checked(tmp_path):
    path = write(
        tmp_path / "t.yaml",
        MINIMAL.replace(
            "retriever: castorini/repllama-v1-7b-lora-passage",
            "retriever: {source: x, encoding: {passage_template: '{titel}: {text}'}}",
        ),
    )
    with pytest.raises(RecipeError, match=r"passage_template: unknown placeholder \{titel\}"):
        load_recipe(path)


def test_float16_training_is_refused_when_the_recipe_is_read(tmp_path):
    text = MINIMAL.replace("base: meta-llama/Llama-2-7b-hf", "base: {source: x, dtype: float16}")
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(RecipeError, match=r"bad\.yaml:1: base: .*float16 training needs loss"):
        load_recipe(path)


@pytest.mark.parametrize(
    "value, want",
    [("auto", "auto"), ("true", True), ("false", False), ("0.5", 0.5), ("1", 1.0), ("0", False)],
)
def test_gradient_checkpointing_takes_a_share_of_the_layers(tmp_path, value, want):
    text = MINIMAL + f"adapter:\n  gradient_checkpointing: {value}\n"
    got = load_recipe(write(tmp_path / "a.yaml", text)).adapter.gradient_checkpointing
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("value", ["-0.5", "1.5", "half"])
def test_gradient_checkpointing_out_of_range_is_an_error(tmp_path, value):
    path = write(tmp_path / "a.yaml", MINIMAL + f"adapter:\n  gradient_checkpointing: {value}\n")
    with pytest.raises(
        RecipeError, match=r"a\.yaml:5: adapter\.gradient_checkpointing: .*\[0, 1\]"
    ):
        load_recipe(path)


def test_weight_decay_and_gradient_clipping_are_part_of_the_adapter(
    tmp_path, tiny_base, tiny_retriever, tiny_beir
):
    import shutil

    from readaptir.plan import plan_recipes

    adapter = load_recipe(write(tmp_path / "a.yaml", MINIMAL)).adapter
    assert (adapter.weight_decay, adapter.max_grad_norm) == (0.0, 1.0)  # the HF Trainer's
    for folder, name in ((tiny_base, "base"), (tiny_retriever, "retriever"), (tiny_beir, "toy")):
        shutil.copytree(folder, tmp_path / "proj" / name)
    common = "base: base\nretriever: {source: retriever, family: repllama}\ncorpus: toy\n"
    ids = {}
    for value in ("{}", "{weight_decay: 0.01}", "{max_grad_norm: 0.5}", "{max_grad_norm: null}"):
        path = write(tmp_path / "proj" / "recipes" / "r.yaml", f"{common}adapter: {value}\n")
        plan = plan_recipes([load_recipe(path)], tmp_path / "proj")
        ids[value] = next(s.id for s in plan.stages.values() if s.kind == "adapter")
    assert len(set(ids.values())) == 4  # another value trains another adapter


@pytest.mark.parametrize("name", ["fetch.json", "stage.json"])
def test_a_fetched_collection_may_not_take_the_name_of_a_file_beside_it(tmp_path, name):
    text = MINIMAL.replace("corpus: data/scifact", f"corpus: {{beir: scifact, name: {name}}}")
    with pytest.raises(RecipeError, match=rf"bad\.yaml:3: corpus\.name: '{name}' is the name of"):
        load_recipe(write(tmp_path / "bad.yaml", text))


@pytest.mark.parametrize(
    "family, encoding, dropped",
    [
        ("repllama", "{query_instruction: find papers}", True),  # its template has no place
        ("e5-mistral", "{query_instruction: find papers}", False),
        ("e5-mistral", "{query_template: 'Q: {text}'}", True),  # the preset's instruction
        ("e5-mistral", "{query_template: 'Q: {text}', query_instruction: ''}", False),
        ("custom", "{query_template: '{instruction} {text}', query_instruction: x}", False),
    ],
)
def test_an_instruction_the_template_would_drop_is_refused(tmp_path, family, encoding, dropped):
    retriever = f"retriever: {{source: x, family: {family}, encoding: {encoding}}}"
    text = MINIMAL.replace("retriever: castorini/repllama-v1-7b-lora-passage", retriever)
    path = write(tmp_path / "r.yaml", text)
    if not dropped:
        load_recipe(path)
        return
    with pytest.raises(RecipeError, match=r"retriever\.encoding: query_instruction is set .* no "):
        load_recipe(path)

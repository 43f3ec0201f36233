"""Recipe files: YAML read strictly, ``extends`` merged, errors located at the file and line
that set a key, grids and sweeps expanded, the recipes folder loaded.

The schema the files are validated against is ``readaptir.recipe``.
"""

from __future__ import annotations

import re
import reprlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from readaptir.artifacts import folder_files
from readaptir.recipe import NAME_RE, FieldError, Recipe, RecipeError, shown

# keys a plain string may stand for a mapping under, and the field that string gives
SHORTHAND = {"base": "source", "retriever": "source", "corpus": "path"}


class ShorthandOverride(ValueError):
    """A string that would silently drop settings a parent recipe gave as a mapping."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


def deep_merge(parent: dict, child: dict) -> dict:
    """``child`` over ``parent``; nested mappings merge, everything else is replaced."""
    merged = dict(parent)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        elif key in SHORTHAND and (lost := _dropped(key, merged.get(key), value)):
            raise ShorthandOverride(key, _override_message(key, merged[key], value, lost))
        else:
            merged[key] = value
    return merged


def _dropped(key: str, inherited: Any, value: Any) -> list[str]:
    """The keys of a parent's mapping that ``value`` replacing it would lose: a string sets only
    the path (a corpus's) or source, a list (of corpora) what every one of its items sets."""
    items = value if isinstance(value, list) else [value]
    if not isinstance(inherited, dict) or not all(isinstance(i, (str, dict)) for i in items):
        return []  # nothing inherited, or not a recipe's shape at all (the schema says more)
    given = [set(item) if isinstance(item, dict) else {SHORTHAND[key]} for item in items]
    return sorted(k for k in inherited if not all(k in keys for keys in given))


def _override_message(key: str, inherited: dict, value: Any, lost: list[str]) -> str:
    field = SHORTHAND[key]
    if isinstance(value, str):
        return (
            f"a plain string here would drop what the parent recipe sets ({', '.join(lost)});"
            f" write a mapping, e.g. {key}: {{{field}: {value}}}, and repeat what should stay"
        )
    return (
        f"this list replaces the parent recipe's {key} ({', '.join(sorted(inherited))}) and "
        f"an item does not set {', '.join(lost)}: write each item as a mapping that does"
    )


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, but for numbers like ``2e-4``: a float (as in YAML 1.2 and
    JSON), not a string, so that ``lr: 2e-4`` means what it says under strict types."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _read_yaml(path: Path) -> tuple[dict, yaml.Node | None]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(path, None, "file not found") from None
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        raise RecipeError(path, None, "not UTF-8 text", line) from None
    try:
        data = yaml.load(text, Loader=_RecipeLoader)
        node = yaml.compose(text, Loader=_RecipeLoader)
    except yaml.reader.ReaderError as err:  # a character YAML refuses: at a position, no mark
        line = text[: err.position].count("\n") + 1
        char = f"#x{err.character:04x}" if isinstance(err.character, int) else err.character
        raise RecipeError(path, None, f"not valid YAML: {err.reason} {char}", line) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise RecipeError(
            path, None, f"not valid YAML: {getattr(err, 'problem', err)}", line
        ) from None
    _check_nodes(path, node)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(path, None, "a recipe must be a mapping of keys to values")
    return data, node


_KEY_TAGS = ("tag:yaml.org,2002:str", "tag:yaml.org,2002:merge")  # a name, or ``<<`` (a merge)


# numbers YAML 1.1 reads in another base than they seem to be written in: 010 is 8 (octal),
# 0b11 is 3, 1:30 is 90 (base 60); YAML 1.2 reads the first as 10 and the others as strings
_OTHER_BASES = {
    "tag:yaml.org,2002:int": re.compile(
        r"[-+]?(?:0[0_]*[1-7]_*[0-7][0-7_]*|0b[01_]+|[0-9][0-9_]*(?::[0-5]?[0-9])+)"
    ),
    "tag:yaml.org,2002:float": re.compile(r"[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*"),
}


def _check_nodes(
    path: Path, node: yaml.Node | None, prefix: str = "", done: set[int] | None = None
) -> None:
    """YAML keeps the last of two equal keys silently, and reads 010 as 8; a recipe must do
    neither. Each node is looked at once (``done``), however many aliases name it: aliases of
    aliases would otherwise be walked as many times as they repeat, exponentially."""
    done = set() if done is None else done
    if id(node) in done:
        return
    done.add(id(node))
    if isinstance(node, yaml.ScalarNode) and node.style is None:
        other = _OTHER_BASES.get(node.tag)
        if other is not None and other.fullmatch(node.value):
            raise RecipeError(
                path,
                prefix.rstrip(".") or None,
                f"YAML 1.1 reads {node.value} as a number in base 8, 2 or 60, not as it looks: "
                "write it in decimal, or quote it for a string",
                node.start_mark.line + 1,
            )
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            line = key_node.start_mark.line + 1
            # ~, 1 or true would reach the schema as None, 1, True
            if key_node.tag not in _KEY_TAGS:
                kind = key_node.tag.rsplit(":", 1)[-1]
                raise RecipeError(
                    path, key, f"a key must be a name; YAML reads this one as {kind}", line
                )
            if key_node.value in seen:
                raise RecipeError(path, key, "the same key appears twice", line)
            seen.add(key_node.value)
            _check_nodes(path, value_node, key + ".", done)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_nodes(path, item, prefix, done)


def _line_of(node: yaml.Node | None, loc: tuple, exact: bool = False) -> int | None:
    """The line of the deepest key of ``loc`` found in the YAML node tree (``exact``: of the
    whole of ``loc``, or None)."""
    line = None
    for depth, part in enumerate(loc):
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == str(part)]
            if not match:
                return None if exact and depth < len(loc) else line
            line, node = match[0][0].start_mark.line + 1, match[0][1]
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return None if exact else line
    return line


Chain = list[tuple[Path, "yaml.Node | None"]]  # a recipe file, then its parents, nearest first


def resolve_data(path: Path, _seen: tuple[Path, ...] = ()) -> tuple[dict, Chain]:
    """The recipe's data with its ``extends`` chain merged in, and the files that gave it."""
    path = path.resolve()
    if path in _seen:
        cycle = " -> ".join(p.name for p in (*_seen, path))
        raise RecipeError(path, "extends", f"circular extends: {cycle}")
    data, node = _read_yaml(path)
    refs = data.pop("extends", None)
    if refs is None:
        return data, [(path, node)]
    refs = [refs] if isinstance(refs, str) else refs
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise RecipeError(path, "extends", "expected a recipe file or a list of them")
    merged: dict = {}
    chain: Chain = []
    try:
        for ref in refs:  # later parents override earlier ones; this file overrides all
            parent_path = path.parent / ref
            if not parent_path.is_file():
                line = _line_of(node, ("extends",))
                raise RecipeError(path, "extends", f"no recipe file {ref!r} beside this one", line)
            parent, parent_chain = resolve_data(parent_path, (*_seen, path))
            merged = deep_merge(merged, parent)
            chain = parent_chain + chain
        return deep_merge(merged, data), [(path, node), *chain]
    except ShorthandOverride as err:
        raise RecipeError(path, err.key, str(err), _line_of(node, (err.key,))) from None


_TYPE_TAG = re.compile(r"^(function-|literal\[|list\[|dict\[)|^(float|int|str|bool)$")


# a bad value as an error shows it: long strings and lists cut short (an alias bomb is millions)
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 100
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = 8
_SHOWN.maxlevel = 3

# the input is not of this member of a union at all: the other members say more
_WRONG_KIND = {"model_type", "dict_type", "list_type", "float_type", "int_type", "bool_type"}
_WRONG_KIND |= {"string_type", "literal_error"}


def _most_specific(errors: list[dict]) -> list[dict]:
    """Of the errors a union gives for one value, those of the members that got inside it, else
    any but "not this kind" (``corpus: [a, {nmae: x}]`` is about ``corpus.1.nmae``, not "should
    be a mapping"; ``alpha: .nan`` is "not finite", not "should be a list")."""
    unions: dict[tuple, list[dict]] = {}
    for error in errors:
        loc = error["loc"]
        tagged = [i for i, p in enumerate(loc) if _TYPE_TAG.search(str(p))]
        unions.setdefault(loc[: tagged[0]] if tagged else loc, []).append(error)
    kept = []
    for at, members in unions.items():
        inside = [e for e in members if _depth(e) > len(at)]
        telling = [e for e in members if e["type"] not in _WRONG_KIND]
        kept += inside or telling or members
    return kept


def _depth(error: dict) -> int:
    return sum(1 for p in error["loc"] if not _TYPE_TAG.search(str(p)))


def _located(chain: Chain, err: ValidationError) -> RecipeError:
    """The first problem of a validation error, at its key and line, in a user's words.

    Errors of one key that come from the members of a union (``alpha: 0.5 | [..] | auto``) are
    one problem: their messages are joined.
    """
    problems: dict[tuple, list[dict]] = {}
    for error in _most_specific(err.errors()):
        loc = tuple(p for p in error["loc"] if not _TYPE_TAG.search(str(p)))
        field = error.get("ctx", {}).get("error")
        if isinstance(field, FieldError):
            loc += tuple(field.key.split("."))
        problems.setdefault(loc, []).append(error)
    loc, errors = next(iter(problems.items()))
    first = errors[0]
    if first["type"] == "extra_forbidden":
        message = "unknown key (check its spelling and indentation)"
    elif first["type"] == "missing":
        message = "required key is missing"
    else:
        message = "; or ".join(
            dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in errors)
        )
        if "input" in first and first["type"] != "value_error":
            message += f", got {_SHOWN.repr(first['input'])}"
            if first["type"] == "string_type" and isinstance(first["input"], int | float):
                message += " (YAML read a number: quote it)"  # a revision like 1e45678
    if len(problems) > 1:
        more = [".".join(str(p) for p in other) or "(top level)" for other in list(problems)[1:]]
        listed = ", ".join(more[:8]) + (", …" if len(more) > 8 else "")
        message += f" (and {len(more)} more: {listed})"
    key = ".".join(str(p) for p in loc) or None
    path, line = _setter(chain, loc)
    return RecipeError(path, key, message, line)


def _setter(chain: Chain, loc: tuple) -> tuple[Path, int | None]:
    """The file that sets the key ``loc`` (the recipe itself or a parent) and its line there;
    else the recipe and the line of the nearest key it has."""
    for path, node in chain:
        line = _line_of(node, loc, exact=True)
        if line is not None:
            return path, line
    path, node = chain[0]
    return path, _line_of(node, loc)


def located(file: Path | str, key: str | None, message: str) -> RecipeError:
    """An error about the dotted ``key`` of the recipe in ``file``, at the file and line that
    set it (for problems found after validation, e.g. while planning)."""
    try:
        _, chain = resolve_data(Path(file))
    except RecipeError:
        return RecipeError(file, key, message)
    loc = tuple(int(p) if p.isdigit() else p for p in key.split(".")) if key else ()
    path, line = _setter(chain, loc)
    return RecipeError(path, key, message, line)


def load_recipe(path: Path) -> Recipe:
    path = Path(path)
    if path.is_symlink() and not path.exists():
        try:
            path.resolve(strict=True)
        except FileNotFoundError:
            why = "which does not exist"
        except (OSError, RuntimeError):  # a loop: RuntimeError before Python 3.13
            why = "which leads back to itself (a loop of links)"
        raise RecipeError(path, None, f"a link to {path.readlink()}, {why}")
    if path.exists() and not path.is_file():  # a named pipe would block, a device never end
        raise RecipeError(path, None, "not a regular file")
    try:
        data, chain = resolve_data(path)
    except RecursionError:
        raise RecipeError(
            path,
            None,
            "nested too deeply: an alias that holds itself, nesting hundreds of levels deep, or "
            "a chain of hundreds of extends",
        ) from None
    if "name" not in data:
        data["name"] = path.stem
        if not NAME_RE.fullmatch(path.stem):
            raise RecipeError(
                path,
                "name",
                "the file name is not a valid recipe name (letters, "
                "digits, '-', '_'): rename the file or set `name:`",
            )
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise _located(chain, err) from None
    recipe._file = str(path)
    return recipe


def recipe_files(recipes_dir: Path) -> list[Path]:
    """The buildable recipes of a folder (recursively); partial ones, named ``_*`` or inside a
    ``_*`` folder, excluded, and hidden ones (``.*``: editor locks, notebook checkpoints) too."""
    root = Path(recipes_dir)
    files = [p for p in folder_files(root) if p.suffix.lower() in (".yaml", ".yml")]
    return [p for p in files if not any(part[:1] in "_." for part in p.relative_to(root).parts)]


def _value_tag(value: float) -> str:
    """0.25 -> '0p25', 1.0 -> '1': an exact number in a name DVC parameter paths accept."""
    text = repr(float(value)).removesuffix(".0")
    return text.replace(".", "p").replace("-", "m").replace("+", "")


def slug(text: str, limit: int = 32) -> str:
    """A readable name fragment from a path, hub id or label (letters, digits, '-', '_')."""
    tail = Path(text.rstrip("/")).name or text
    return re.sub(r"[^A-Za-z0-9_-]+", "-", tail).strip("-")[:limit] or "x"


def expand_grid(recipe: Recipe) -> list[Recipe]:
    """A list of corpora makes one recipe per corpus, named ``<name>-<corpus label>``."""
    if not isinstance(recipe.corpus, list):
        return [recipe]
    labels = [c.label for c in recipe.corpus]
    if len(set(labels)) != len(labels):
        raise RecipeError(recipe.file, "corpus", "two corpora of the list have the same name")
    variants = []
    for corpus in recipe.corpus:
        variant = recipe.model_copy(
            update={"name": f"{recipe.name}-{slug(corpus.label, 64)}", "corpus": corpus}
        )
        variant._file = recipe.file
        variants.append(variant)
    return variants


def expand_sweeps(recipe: Recipe) -> list[Recipe]:
    """One recipe per (α, β) of a sweep, named ``<name>-a<α>[-b<β>]``; others unchanged."""
    alphas, betas = recipe.readapt.alpha, recipe.readapt.beta
    if not isinstance(alphas, list) and not isinstance(betas, list):
        return [recipe]
    variants = []
    for alpha in alphas if isinstance(alphas, list) else [alphas]:
        for beta in betas if isinstance(betas, list) else [betas]:
            name = recipe.name
            if isinstance(alphas, list):
                name += f"-a{_value_tag(alpha)}"
            if isinstance(betas, list):
                name += f"-b{_value_tag(beta)}"
            readapt = recipe.readapt.model_copy(update={"alpha": alpha, "beta": beta})
            variant = recipe.model_copy(update={"name": name, "readapt": readapt})
            variant._file, variant._sweep = recipe.file, recipe.name
            variants.append(variant)
    return variants


def _name_clash(later: tuple[str, Path], earlier: tuple[str, Path]) -> RecipeError:
    """Two recipes of one name (or of names differing in case alone): blamed on the one whose
    own ``name:`` (not a parent's) makes the clash, at its line, where only the earlier one's
    does."""
    if later[1] == earlier[1]:
        return RecipeError(
            later[1], "name", f"{later[0]!r} is also the name of another variant of this recipe"
        )

    def blame(this: tuple[str, Path], other: tuple[str, Path], line: int | None) -> RecipeError:
        case = (
            f" (as {other[0]!r}: names must differ in more than case)"
            if other[0] != this[0]
            else ""
        )
        message = f"{this[0]!r} is also the name of {shown(other[1])}{case}"
        return RecipeError(this[1], "name", message, line)

    later_line, earlier_line = _own_line(later[1], "name"), _own_line(earlier[1], "name")
    if later_line is None and earlier_line is not None:
        return blame(earlier, later, earlier_line)
    return blame(later, earlier, later_line)


def _own_line(path: Path, key: str) -> int | None:
    """The line at which the recipe file itself (not a parent) sets the top-level ``key``."""
    return _line_of(_read_yaml(Path(path).resolve())[1], (key,), exact=True)


def load_recipes(recipes_dir: Path) -> list[Recipe]:
    """Every buildable recipe, corpus grids and α/β sweeps expanded; names must be unique."""
    if Path(recipes_dir).exists() and not Path(recipes_dir).is_dir():
        raise RecipeError(recipes_dir, None, "not a folder: recipes are the *.yaml files in one")
    if not Path(recipes_dir).exists():
        raise RecipeError(
            recipes_dir, None, "no such folder: not a project (`readaptir init`, or --root)"
        )
    files = recipe_files(recipes_dir)
    if not files:
        raise RecipeError(recipes_dir, None, "no recipes (*.yaml or *.yml) found")
    # names key output folders: two differing in case alone would share them where the file
    # system ignores case (macOS, Windows)
    recipes, seen = [], {}
    for path in files:
        expanded = [v for r in expand_grid(load_recipe(path)) for v in expand_sweeps(r)]
        for recipe in expanded:
            key = recipe.name.casefold()
            if key in seen:
                raise _name_clash((recipe.name, path), seen[key])
            seen[key] = (recipe.name, path)
            recipes.append(recipe)
    return recipes

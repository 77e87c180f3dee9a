"""Turn a recipe YAML file (plus `key.path=value` overrides) into the typed schema.

Every problem is collected and reported at once, each with file, line and dotted
field path (list items by index: `stages.0.optim.lr`). The YAML is composed into
nodes so that line numbers survive; a small converter driven by the schema's type
hints then builds the dataclasses and runs each section's `problems()`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from posttrain.errors import PosttrainError
from posttrain.recipe import schema
from posttrain.recipe.schema import Recipe

Key = tuple[str, ...]  # a field path; list indices as decimal strings
Where = tuple[str, int | None]  # (file or override description, 1-based line)
_BAD: Any = object()  # a value that failed to convert (its issue is already recorded)


@dataclass
class RecipeIssue:
    file: str  # the recipe file, or "override 'k=v'" for a command-line override
    line: int | None
    field: str  # dotted path, e.g. "stages.0.optim.lr"; "" for the whole file
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class RecipeError(PosttrainError):
    """Everything wrong with one recipe (and its overrides), one line per issue."""

    def __init__(self, file: str, issues: list[RecipeIssue]) -> None:
        self.file = file
        self.issues = issues
        noun = "problem" if len(issues) == 1 else "problems"
        super().__init__("\n  ".join([f"recipe {file} has {len(issues)} {noun}:", *map(str, issues)]))

    def __reduce__(self) -> tuple[type[RecipeError], tuple[str, list[RecipeIssue]]]:  # picklable (e.g. across Ray)
        return RecipeError, (self.file, self.issues)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` and `1.5e3` as floats (YAML 1.1 needs `1.0e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


# ------------------------------------------------------------------ public API
def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override, convert and check a recipe; raise `RecipeError` listing every problem."""
    file, p = str(path), Path(path)
    if not p.is_file():
        why = "does not exist" if not p.exists() else "is not a file"
        raise RecipeError(file, [RecipeIssue(file, None, "", f"the recipe file {why}: {p.resolve()}")])
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(file, [RecipeIssue(file, None, "", f"cannot read the recipe: {e}")]) from None
    issues: list[RecipeIssue] = []
    data, where = _read_yaml(text, file, issues)
    if data is _BAD:
        raise RecipeError(file, issues)
    for item in overrides:
        parsed = _parse_override(item)
        if isinstance(parsed, RecipeIssue):
            issues.append(parsed)
        else:
            _apply_override(data, *parsed, f"override {item!r}", where, issues)

    def locate(key: Key) -> Where:  # the nearest ancestor with a known location
        return next((where[key[:i]] for i in range(len(key), -1, -1) if key[:i] in where), (file, None))

    converter = _Converter(locate)
    recipe = converter.convert(data, Recipe, ())
    issues += converter.issues
    if issues:
        issues.sort(key=lambda i: (i.file != file, i.line or 0))  # stable: same-line issues keep their order
        raise RecipeError(file, issues)
    return recipe


def parse_overrides(items: Sequence[str]) -> list[tuple[list[str], Any]]:
    """`["stages.0.steps=5", ...]` -> `[(["stages", "0", "steps"], 5), ...]`; values are YAML."""
    parsed = [_parse_override(item) for item in items]
    issues = [p for p in parsed if isinstance(p, RecipeIssue)]
    if issues:
        raise RecipeError("overrides", issues)
    return [p for p in parsed if not isinstance(p, RecipeIssue)]


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain data (dicts, lists, scalars) in schema order, e.g. for `posttrain show`."""
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML; loading it gives an equal `Recipe`."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=False)


# ------------------------------------------------------------- YAML -> data
def _dotted(key: Key) -> str:
    return ".".join(key)


def _read_yaml(text: str, file: str, issues: list[RecipeIssue]) -> tuple[Any, dict[Key, Where]]:
    """Plain data plus the line of every key and list item; `_BAD` data if unusable."""
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark, start = e.problem_mark or e.context_mark, e.context_mark
        context = e.context or ""
        if context and start and mark and start.line != mark.line:
            context += f" (from line {start.line + 1})"
        message = ": ".join(str(m) for m in (context, e.problem) if m)
        issues.append(RecipeIssue(file, mark.line + 1 if mark else None, "", f"invalid YAML: {message}"))
        return _BAD, {}
    except yaml.YAMLError as e:
        issues.append(RecipeIssue(file, None, "", f"invalid YAML: {e}"))
        return _BAD, {}
    if not isinstance(root, yaml.MappingNode):
        got = "an empty file" if root is None else "a list" if isinstance(root, yaml.SequenceNode) else "a single value"
        line = None if root is None else root.start_mark.line + 1
        message = f"the top level must be a mapping (name:, model:, data:, stages:, ...), got {got}"
        issues.append(RecipeIssue(file, line, "", message))
        return _BAD, {}
    where: dict[Key, Where] = {(): (file, root.start_mark.line + 1)}
    scalars = _Loader("")

    def build(node: yaml.Node, key: Key) -> Any:
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                where[key + (str(i),)] = (file, item.start_mark.line + 1)
            return [build(item, key + (str(i),)) for i, item in enumerate(node.value)]
        if not isinstance(node, yaml.MappingNode):
            return scalars.construct_object(node)
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                issues.append(RecipeIssue(file, line, _dotted(key), "keys must be plain names, not lists or mappings"))
                continue
            name, child = key_node.value, key + (key_node.value,)
            if name in out:
                first = where[child][1]
                message = f"duplicate key {name!r} (first given on line {first})"
                issues.append(RecipeIssue(file, line, _dotted(child), message))
                continue
            where[child] = (file, line)
            out[name] = build(value_node, child)
        return out

    return build(root, ()), where


# ---------------------------------------------------------------- overrides
def _parse_override(item: str) -> tuple[list[str], Any] | RecipeIssue:
    text, sep, raw = item.partition("=")
    keys = text.strip().split(".")
    location = f"override {item!r}"
    if not sep:
        return RecipeIssue(location, None, "", "expected key.path=value, e.g. stages.0.steps=100")
    if not all(keys):
        return RecipeIssue(location, None, text.strip(), "empty key in the path (expected e.g. stages.0.optim.lr=0.01)")
    try:
        return keys, yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as e:
        return RecipeIssue(location, None, text.strip(), f"cannot parse the value as YAML: {e}")


def _item_names(items: list[Any]) -> list[str | None]:
    """Stage names as `Recipe` will default them: the kind, numbered from the second unnamed one."""
    counts: dict[str, int] = {}
    names: list[str | None] = []
    for item in items:
        name = item.get("name") if isinstance(item, dict) else None
        kind = item.get("kind") if isinstance(item, dict) else None
        if name is None and isinstance(kind, str):
            counts[kind] = counts.get(kind, 0) + 1
            name = kind if counts[kind] == 1 else f"{kind}{counts[kind]}"
        names.append(name if isinstance(name, str) else None)
    return names


def _apply_override(
    data: dict[str, Any], keys: list[str], value: Any, location: str, where: dict[Key, Where], issues: list[RecipeIssue]
) -> None:
    """Set `value` at `keys`, creating missing mappings; list items by index or by stage name."""
    node: Any = data
    done: Key = ()

    def fail(message: str) -> None:
        issues.append(RecipeIssue(location, None, _dotted(done + (key,)), message))

    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            names = _item_names(node)
            if key.isdigit():
                if int(key) >= len(node):
                    return fail(f"index {key} out of range ({_dotted(done)} has {len(node)} items)")
                index = int(key)
            elif names.count(key) == 1:
                index = names.index(key)
            else:
                known = ", ".join(repr(n) for n in names if n is not None) or "none"
                problem = "several items are named" if key in names else "no item named"
                hint = _suggest(key, [n for n in names if n is not None])
                return fail(f"{problem} {key!r}{hint}; names: {known}")
            key = str(index)
        elif isinstance(node, dict):
            if not last and node.get(key) is None:
                node[key] = {}
                where[done + (key,)] = (location, None)
        else:
            return fail(f"{_dotted(done)} is {_show(node)}, not a mapping or list")
        done += (key,)
        if last:
            node[int(key) if isinstance(node, list) else key] = value
        else:
            node = node[int(key) if isinstance(node, list) else key]
    for stale in [k for k in where if k[: len(done)] == done]:
        del where[stale]
    where[done] = (location, None)


# -------------------------------------------------------- data -> dataclasses
def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _suggest(word: Any, options: Sequence[Any]) -> str:
    if not isinstance(word, str):
        return ""
    match = difflib.get_close_matches(word, [str(o) for o in options], n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


_SCALARS: dict[type, str] = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


class _Converter:
    """Builds schema values from plain data, recording an issue for everything wrong."""

    def __init__(self, locate: Callable[[Key], Where]) -> None:
        self.locate = locate
        self.issues: list[RecipeIssue] = []

    def error(self, key: Key, message: str) -> Any:
        file, line = self.locate(key)
        self.issues.append(RecipeIssue(file, line, _dotted(key), message))
        return _BAD

    def convert(self, value: Any, tp: Any, key: Key) -> Any:
        origin, args = get_origin(tp), get_args(tp)
        if tp == schema.Stage:
            return self.stage(value, key)
        if origin in (Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            (inner,) = [a for a in args if a is not type(None)]  # only `X | None` unions besides Stage
            return self.convert(value, inner, key)
        if origin is Literal:
            if any(value == a and type(value) is type(a) for a in args):
                return value
            allowed = ", ".join(_show(a) for a in args)
            return self.error(key, f"expected one of {allowed}; got {_show(value)}{_suggest(value, args)}")
        if origin is list:
            if not isinstance(value, list):
                return self.error(key, f"expected a list, got {_show(value)}")
            items = [self.convert(v, args[0], key + (str(i),)) for i, v in enumerate(value)]
            return _BAD if any(v is _BAD for v in items) else items
        if origin is dict:
            if not isinstance(value, dict):
                return self.error(key, f"expected a mapping, got {_show(value)}")
            if bad_keys := [k for k in value if not isinstance(k, str)]:
                return self.error(key, f"keys must be text, got {bad_keys[0]!r}")
            items = {k: self.convert(v, args[1], key + (k,)) for k, v in value.items()}
            return _BAD if any(v is _BAD for v in items.values()) else items
        if dataclasses.is_dataclass(tp):
            return self.dataclass(value, tp, key)
        if tp in _SCALARS:
            if type(value) is tp or (tp is float and type(value) is int):
                return tp(value)
            scalar = value is not None and not isinstance(value, (dict, list))
            hint = " (quote it to use it as text)" if tp is str and scalar else ""
            return self.error(key, f"expected {_SCALARS[tp]}, got {_show(value)}{hint}")
        raise TypeError(f"the recipe schema uses a type the loader does not support: {tp!r}")

    def stage(self, value: Any, key: Key) -> Any:
        kinds = schema.STAGE_KINDS
        listed = ", ".join(kinds)
        if not isinstance(value, dict):
            return self.error(key, f"expected a stage mapping with a `kind` ({listed}), got {_show(value)}")
        if "kind" not in value:
            return self.error(key + ("kind",), f"missing required key 'kind' (one of: {listed})")
        kind = value["kind"]
        if not isinstance(kind, str) or kind not in kinds:
            hint = _suggest(kind, list(kinds))
            return self.error(key + ("kind",), f"unknown stage kind {_show(kind)}{hint}; kinds: {listed}")
        return self.dataclass(value, kinds[kind], key)

    def dataclass(self, value: Any, cls: type, key: Key) -> Any:
        if not isinstance(value, dict):
            return self.error(key, f"expected a mapping, got {_show(value)}")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        hints = get_type_hints(cls)
        unknown = [name for name in value if name not in fields]
        for name in unknown:
            hint = _suggest(name, list(fields)) or f"; valid keys: {', '.join(fields)}"
            self.error(key + (str(name),), f"unknown key {name!r}{hint}")
        required = [n for n, f in fields.items() if f.default is f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in value]
        for name in missing:
            self.error(key + (name,), f"missing required key {name!r}")
        kwargs = {n: self.convert(value[n], hints[n], key + (n,)) for n in fields if n in value}
        if unknown or missing or any(v is _BAD for v in kwargs.values()):
            return _BAD
        try:
            obj = cls(**kwargs)
        except (ValueError, TypeError) as e:
            return self.error(key, str(e))
        for name, message in getattr(obj, "problems", list)():
            self.error(key + tuple(name.split(".")), message)
        return obj

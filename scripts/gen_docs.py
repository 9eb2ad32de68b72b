"""The documentation site's generated parts, filled in when MkDocs builds (`hooks:` in mkdocs.yml), never committed.

A page asks for one with a marker line, `<!-- gen_docs: NAME -->`, replaced by:
  recipe-reference  every recipe kind's fields (path, type, default, bounds or choices, help) from its pydantic schema
  modules           every module of `workloads` and `cluster` with the first paragraph of its docstring
  per-worker        the per-worker modules `tests/test_layers.py` keeps free of Ray and `cluster/`
So a field's default, bounds and help are written once, in the schema, and the module map follows the tree.
"""

from __future__ import annotations

import ast
import re
import sys
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("workloads", "cluster")  # walked for the module map, in this order


def recipe_schemas() -> list[tuple[str, type]]:
    """Every recipe kind and its schema class: the one place this file learns which kinds exist."""
    if str(REPO) not in sys.path:  # run by MkDocs: the repository's packages are importable from its root
        sys.path.insert(0, str(REPO))
    from workloads.kinds import kinds

    return kinds()


_MARKER = re.compile(r"^<!-- gen_docs: ([a-z-]+) -->$", re.M)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs hook: replace each `<!-- gen_docs: NAME -->` line with its generated Markdown."""
    def fill(match: re.Match) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise ValueError(f"{page.file.src_path}: unknown generated part {name!r}; known: {sorted(GENERATORS)}")
        return GENERATORS[name]()
    return _MARKER.sub(fill, markdown)


# ---------------------------------------------------------------------------------------------
# Recipe reference
# ---------------------------------------------------------------------------------------------


def recipe_reference() -> str:
    """One section per recipe kind: a table of every field, nested blocks flattened to dotted paths."""
    from pydantic import BaseModel

    sections = []
    for kind, schema in recipe_schemas():
        intro = f"Schema `{schema.__module__}.{schema.__qualname__}`."
        doc = _first_paragraph(schema.__doc__) if schema.__doc__ is not BaseModel.__doc__ else ""
        rows = "\n".join(_rows(schema, "", None))
        sections.append(f"## `kind: {kind}`\n\n{intro} {doc}\n\n| field | type | default | bounds / choices | help |\n"
                        f"| --- | --- | --- | --- | --- |\n{rows}\n")
    return "\n".join(sections)


def _rows(schema: type, prefix: str, instance: Any) -> list[str]:
    """Table rows of `schema`'s fields under `prefix`; defaults are read from `instance` when the parent's default
    is a block whose values differ from the block class's own defaults."""
    rows = []
    for name, field in schema.model_fields.items():
        path = f"{prefix}{name}"
        default = getattr(instance, name) if instance is not None else _default(field)
        blocks = _blocks(field.annotation)
        doc = field.description or (_first_paragraph(blocks[0][1].__doc__) if len(blocks) == 1 else "")
        rows.append(f"| `{path}` | {_cell(_type_name(field.annotation))} | {_cell(_default_text(default, blocks))} "
                    f"| {_cell(_bounds(field))} | {_cell(doc)} |")
        for suffix, block in blocks:
            nested = default if isinstance(default, block) else None
            rows.extend(_rows(block, f"{path}{suffix}.", nested))
    return rows


def _blocks(annotation: Any) -> list[tuple[str, type]]:
    """The nested schema blocks inside a field's annotation, each with the path suffix that reaches it: `` for a
    block, `[]` for a list of blocks, `{}` for a mapping, `[type=x]` for one member of a discriminated union."""
    from pydantic import BaseModel

    found: list[tuple[str, type]] = []

    def visit(ann: Any, suffix: str, tag: str | None) -> None:
        origin, args = get_origin(ann), get_args(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            label = ann.model_fields[tag].default if tag else None
            found.append((f"{suffix[:-2]}[{tag}={label}]" if label and suffix.endswith("[]") else suffix, ann))
        elif origin is Annotated:
            visit(args[0], suffix, next((m.discriminator for m in args[1:] if getattr(m, "discriminator", None)),
                                        tag))
        elif origin in (list, tuple, set):
            for arg in args:
                visit(arg, suffix + "[]", tag)
        elif origin is dict:
            visit(args[1], suffix + "{}", tag)
        else:
            for arg in args:
                visit(arg, suffix, tag)

    visit(annotation, "", None)
    return found


def _default(field: Any) -> Any:
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None and not field.default_factory_takes_validated_data:
        return field.default_factory()
    return field.default if field.default is not PydanticUndefined else _REQUIRED


class _Required:
    pass


_REQUIRED = _Required()


def _default_text(value: Any, blocks: list[tuple[str, type]]) -> str:
    import json

    from pydantic import BaseModel, SecretStr

    if value is _REQUIRED:
        return "required"
    if isinstance(value, BaseModel) or (blocks and value == []):
        return "(block below)" if isinstance(value, BaseModel) else "`[]`"
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str) and value.startswith(str(REPO)):
        value = str(Path(value).relative_to(REPO))  # a path in this checkout, as the recipe would write it
    if isinstance(value, list | tuple):
        value = [str(v) if isinstance(v, SecretStr) else v for v in value]
    return f"`{json.dumps(value) if not isinstance(value, str) else value}`"


def _type_name(annotation: Any) -> str:
    """A field's type as a recipe author reads it: `int`, `float | None`, `list[str]`, `block`, `list[block]`."""
    from pydantic import BaseModel

    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " | ".join(dict.fromkeys(type(a).__name__ for a in args))
    if origin in (Union, types.UnionType):
        return " | ".join(dict.fromkeys(_type_name(a) for a in args))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "block"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


_BOUND_SIGNS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "min length", "max_length": "max length"}


def _constraints(metadata: list) -> list[str]:
    found = []
    for item in metadata:
        for attr, sign in _BOUND_SIGNS.items():
            if getattr(item, attr, None) is not None:
                found.append(f"{sign} {getattr(item, attr)}")
        if getattr(item, "pattern", None):
            found.append(f"matches `{item.pattern}`")
    return found


def _bounds(field: Any) -> str:
    """Bounds (`>= 1`, `< 1.0`, min length, pattern), those of each list item, and Literal choices."""
    parts = _constraints(field.metadata)
    item_parts: list[str] = []
    choices: list[Any] = []

    def visit(ann: Any, in_item: bool) -> None:
        origin, args = get_origin(ann), get_args(ann)
        if origin is Literal:
            choices.extend(args)
        elif origin is Annotated:
            (item_parts if in_item else parts).extend(_constraints(list(args[1:])))
            visit(args[0], in_item)
        else:
            for arg in args:
                visit(arg, in_item or origin in (list, tuple, set, dict))

    visit(field.annotation, False)
    if item_parts:
        parts.append("each " + ", ".join(dict.fromkeys(item_parts)))
    if choices:
        parts.append("one of " + ", ".join(f"`{str(c).lower() if isinstance(c, bool) else c}`" for c in choices))
    return "; ".join(parts)


def _cell(text: str) -> str:
    """`text` made safe for one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _first_paragraph(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())


# ---------------------------------------------------------------------------------------------
# Module map and the layer rule
# ---------------------------------------------------------------------------------------------


def modules() -> list[tuple[str, str]]:
    """Every module of the packages in PACKAGES (in that order, each sorted by path), with the first paragraph of its
    docstring (read from the source, not imported)."""
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found.append((name, _first_paragraph(ast.get_docstring(ast.parse(path.read_text())))))
    return found


def module_map() -> str:
    """A table per top-level package and subpackage: module, purpose."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for name, purpose in modules():
        package = name if (REPO / name.replace(".", "/")).is_dir() else name.rpartition(".")[0]
        groups.setdefault(package, []).append((name, purpose))
    return "\n".join(f"### `{package}`\n\n| module | purpose |\n| --- | --- |\n" + "\n".join(
        f"| `{name}` | {_cell(purpose) or '(no docstring)'} |" for name, purpose in rows) + "\n"
        for package, rows in groups.items())


def per_worker() -> str:
    """The per-worker modules `tests/test_layers.py` checks, read from its ALGORITHM tuple (not imported)."""
    tree = ast.parse((REPO / "tests" / "test_layers.py").read_text())
    names = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                 and any(getattr(target, "id", None) == "ALGORITHM" for target in node.targets))
    return "\n".join(f"- `{name}`" for name in names)


GENERATORS = {"recipe-reference": recipe_reference, "modules": module_map, "per-worker": per_worker}

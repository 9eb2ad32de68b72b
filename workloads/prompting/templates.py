"""Prompt templates (zero-shot, few-shot, chain-of-thought, instruction, role) and the YAML prompt library.

A template renders as chat messages or as one completion prompt. Its `{name}` placeholders are its variables:
rendering with one missing, or with one it does not use, is a `TemplateError` naming the variable and the
template. A library file holds named, versioned entries (`prompts: [...]`); `save_version` appends a new
version with its score and lineage and keeps the old ones, so an optimized prompt never overwrites its parent.
Literal braces in a template are doubled (`{{` and `}}`), as in `str.format`.
"""

from __future__ import annotations

import fcntl
import os
import random
import string
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from workloads.common.recipe import format_errors

TemplateKind = Literal["zero_shot", "few_shot", "chain_of_thought", "instruction", "role"]
KINDS: tuple[str, ...] = get_args(TemplateKind)
DEFAULT_LIBRARY = Path(__file__).with_name("library.yaml")
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # no '@': it separates name and version in a reference
_FORMATTED = ("system", "instruction", "template")  # the fields whose placeholders are variables


class TemplateError(ValueError):
    """A template that cannot render, or a library that cannot load; the message names what is wrong."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Demonstration(_Strict):
    """One worked example of a few-shot prompt."""

    input: str | dict[str, Any] = Field(
        ..., description="The rendered question text (like a test case's `input`), or the template's variables."
    )
    output: str = Field(..., description="The answer the model should imitate.")


class Lineage(_Strict):
    """Where a library entry came from, so an optimized prompt can be traced back to its parents."""

    parents: list[str] = Field(default_factory=list, description="name@version of the entries it was derived from.")
    method: str = Field("manual", min_length=1, description="How: manual, rewrite, bootstrap_few_shot, ...")
    details: dict[str, Any] = Field(default_factory=dict, description="Free-form: dev cases, proposer, seed, ...")


class PromptTemplate(_Strict):
    """One library entry: a named, versioned template of one kind."""

    name: str = Field(..., pattern=_NAME, description="Looked up as `name` (latest version) or `name@version`.")
    version: int = Field(1, ge=1, description="Versions of one name are distinct; the highest is the latest.")
    kind: TemplateKind = Field(..., description="zero_shot, few_shot, chain_of_thought, instruction or role.")
    description: str | None = Field(None, description="What this variant tries; not rendered.")
    system: str | None = Field(None, description="System message (required by role: the persona).")
    instruction: str | None = Field(
        None, description="Task text before the question, a blank line between (required by instruction)."
    )
    template: str = Field(..., min_length=1, description="The question, with `{variable}` placeholders.")
    cot_trigger: str = Field(
        "Let's think step by step.", min_length=1, description="chain_of_thought: text after the question."
    )
    demonstrations: list[Demonstration] = Field(default_factory=list, description="few_shot: worked examples.")
    k: int | None = Field(None, ge=0, description="few_shot: demonstrations used (the first k); null: all.")
    input_prefix: str = Field("Q: ", description="Completion form: before each question.")
    output_prefix: str = Field("A:", description="Completion form: before each answer.")
    score: float | None = Field(None, ge=0, le=1, description="Mean dev-split score when it was saved.")
    lineage: Lineage | None = Field(None, description="Its parents and how it was made.")

    @field_validator(*_FORMATTED)
    @classmethod
    def _placeholders_named(cls, value: str | None) -> str | None:
        if value is not None:
            _placeholders(value)
        return value

    @model_validator(mode="after")
    def _kind_fields(self) -> PromptTemplate:
        if self.kind == "role" and not self.system:
            raise ValueError("kind role needs `system` (the persona)")
        if self.kind == "instruction" and not self.instruction:
            raise ValueError("kind instruction needs `instruction`")
        if self.kind != "few_shot" and (self.demonstrations or self.k is not None):
            raise ValueError(f"demonstrations and k are for kind few_shot, not {self.kind}")
        if self.k is not None and self.demonstrations and self.k > len(self.demonstrations):
            raise ValueError(f"k ({self.k}) is more than the {len(self.demonstrations)} demonstrations")
        for i, demo in enumerate(self.demonstrations):
            if isinstance(demo.input, dict):
                _check_variables(set(_placeholders(self.template)), demo.input, f"{self.ref} demonstration {i}")
        return self

    @property
    def ref(self) -> str:
        """`name@version`: how the library and results name this entry."""
        return f"{self.name}@{self.version}"

    @property
    def variables(self) -> list[str]:
        """The variables a render needs, sorted."""
        return sorted({v for field in _FORMATTED if (text := getattr(self, field)) for v in _placeholders(text)})

    def render_messages(
        self, variables: Mapping[str, Any] | None = None, *, demonstrations: Sequence[Mapping[str, Any]] | None = None,
        k: int | None = None,
    ) -> list[dict[str, str]]:
        """Chat messages: system, then each demonstration as a user/assistant pair, then the question."""
        values, demos = self._prepare(variables, demonstrations, k)
        messages = [{"role": "system", "content": self.system.format_map(values)}] if self.system else []
        for question, answer in demos:
            messages += [{"role": "user", "content": self._user_turn(question, values)},
                         {"role": "assistant", "content": answer}]
        question = self.template.format_map(values)
        if self.kind == "chain_of_thought":
            question = f"{question}\n\n{self.cot_trigger}"
        return messages + [{"role": "user", "content": self._user_turn(question, values)}]

    def render_text(
        self, variables: Mapping[str, Any] | None = None, *, demonstrations: Sequence[Mapping[str, Any]] | None = None,
        k: int | None = None,
    ) -> str:
        """One completion prompt: system, instruction, `Q:`/`A:` demonstrations, the question and an open `A:`."""
        values, demos = self._prepare(variables, demonstrations, k)
        parts = [text.format_map(values) for text in (self.system, self.instruction) if text]
        parts += [f"{self.input_prefix}{question}\n{self.output_prefix} {answer}" for question, answer in demos]
        tail = f" {self.cot_trigger}" if self.kind == "chain_of_thought" else ""
        parts.append(f"{self.input_prefix}{self.template.format_map(values)}\n{self.output_prefix}{tail}")
        return "\n\n".join(parts)

    def _user_turn(self, question: str, values: dict[str, Any]) -> str:
        return f"{self.instruction.format_map(values)}\n\n{question}" if self.instruction else question

    def _prepare(
        self, variables: Mapping[str, Any] | None, demonstrations: Sequence[Mapping[str, Any]] | None, k: int | None
    ) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        """Check the variables, then pick the demonstrations (rendered as question and answer text)."""
        values = dict(variables or {})
        _check_variables(set(self.variables), values, f"template {self.ref}")
        if self.kind != "few_shot":
            if demonstrations is not None or k is not None:
                raise TemplateError(f"template {self.ref}: demonstrations and k are for kind few_shot, not {self.kind}")
            return values, []
        demos = self.demonstrations if demonstrations is None else _validate_demos(demonstrations, self.ref)
        k = self.k if k is None else k  # render's k, else the entry's, else every demonstration
        if k is None and not demos:
            raise TemplateError(f"template {self.ref}: no demonstrations; give them in the library entry or to "
                                "render (or k=0)")
        k = len(demos) if k is None else k
        if not 0 <= k <= len(demos):
            raise TemplateError(f"template {self.ref}: k={k} with {len(demos)} demonstrations (0 <= k <= their number)")
        template_vars = set(_placeholders(self.template))
        rendered = []
        for i, demo in enumerate(demos[:k]):
            if isinstance(demo.input, dict):
                _check_variables(template_vars, demo.input, f"template {self.ref} demonstration {i}")
                rendered.append((self.template.format_map(demo.input), demo.output))
            else:
                rendered.append((demo.input, demo.output))
        return values, rendered


def _placeholders(text: str) -> list[str]:
    """The `{name}` placeholders of `text`, in order; positional, attribute and index fields are refused."""
    try:
        fields = [(name, spec) for _, name, spec, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as exc:  # unbalanced braces
        raise ValueError(f"not a valid template ({exc}); write literal braces as {{{{ and }}}}") from None
    for name, spec in fields:
        if not name.isidentifier():
            raise ValueError(f"placeholder {{{name}}}: a placeholder is a variable name such as {{question}}")
        if spec and "{" in spec:
            raise ValueError(f"placeholder {{{name}:{spec}}}: nested placeholders are not supported")
    return [name for name, _ in fields]


def _check_variables(needed: set[str], given: Mapping[str, Any], where: str) -> None:
    missing, unknown = sorted(needed - set(given)), sorted(set(given) - needed)
    if missing:
        raise TemplateError(f"{where}: missing variable(s) {', '.join(missing)}; it uses {sorted(needed)}")
    if unknown:
        raise TemplateError(f"{where}: unknown variable(s) {', '.join(unknown)}; it uses {sorted(needed)}")


def _validate_demos(demos: Sequence[Mapping[str, Any]], ref: str) -> list[Demonstration]:
    try:
        return [d if isinstance(d, Demonstration) else Demonstration.model_validate(d) for d in demos]
    except ValidationError as exc:
        raise TemplateError(format_errors(exc, f"template {ref} demonstrations")) from None


def select_demonstrations(pool: Sequence[Mapping[str, Any]], k: int, seed: int = 0) -> list[dict[str, Any]]:
    """k distinct demonstrations from `pool` ({input, output} rows), seeded, for searching over demo choice."""
    if not 0 <= k <= len(pool):
        raise TemplateError(f"k={k}: the pool has {len(pool)} demonstrations")
    return [{"input": row["input"], "output": row["output"]} for row in random.Random(seed).sample(list(pool), k)]


# ---------------------------------------------------------------------------------------------
# The library file
# ---------------------------------------------------------------------------------------------


class PromptLibrary(_Strict):
    """A library file's contents: `prompts`, each name@version once."""

    prompts: list[PromptTemplate] = Field(default_factory=list)

    @model_validator(mode="after")
    def _refs_unique(self) -> PromptLibrary:
        refs = [p.ref for p in self.prompts]
        duplicated = sorted({r for r in refs if refs.count(r) > 1})
        if duplicated:
            raise ValueError(f"each name@version once; repeated: {', '.join(duplicated)}")
        return self

    def names(self) -> list[str]:
        """Every prompt name in the library, sorted."""
        return sorted({p.name for p in self.prompts})

    def versions(self, name: str) -> list[int]:
        """The versions of `name`, ascending (empty when the library has no such name)."""
        return sorted(p.version for p in self.prompts if p.name == name)

    def get(self, ref: str) -> PromptTemplate:
        """The entry `name@version`, or the latest version of `name`."""
        name, _, version = ref.partition("@")
        versions = self.versions(name)
        if not versions:
            raise TemplateError(f"prompt {name!r} is not in the library; it has: {', '.join(self.names()) or 'none'}")
        if not version:
            wanted = versions[-1]
        elif version.isdigit() and int(version) in versions:
            wanted = int(version)
        else:
            raise TemplateError(f"prompt {ref!r}: no version {version!r}; {name} has versions {versions}")
        return next(p for p in self.prompts if p.name == name and p.version == wanted)


def load_library(path: str | Path = DEFAULT_LIBRARY) -> PromptLibrary:
    """Read and validate a library file; a bad entry raises TemplateError naming its field and what is allowed."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise TemplateError(f"{path}: cannot read the prompt library: {exc}") from None
    try:
        return PromptLibrary.model_validate(raw)
    except ValidationError as exc:
        raise TemplateError(format_errors(exc, str(path))) from None


def save_version(
    template: PromptTemplate, path: str | Path = DEFAULT_LIBRARY, *, score: float | None = None,
    lineage: Lineage | Mapping[str, Any] | None = None,
) -> PromptTemplate:
    """Append `template` as the next version of its name, with its score and lineage; returns the saved entry.

    Older versions stay; a missing file becomes a new library. The file is locked while it is rewritten.
    """
    path = Path(path)
    with _locked(path):
        library = load_library(path) if path.exists() else PromptLibrary()
        fields = template.model_dump(mode="json") | {
            "version": max(library.versions(template.name), default=0) + 1, "score": score,
            "lineage": lineage.model_dump(mode="json") if isinstance(lineage, Lineage) else lineage,
        }
        try:
            entry = PromptTemplate.model_validate(fields)
        except ValidationError as exc:
            raise TemplateError(format_errors(exc, f"new version of {template.name}")) from None
        header = _header_comments(path.read_text()) if path.exists() else ""
        entries = [_entry_dict(p) for p in [*library.prompts, entry]]
        text = header + yaml.dump({"prompts": entries}, Dumper=_BlockDumper, sort_keys=False, allow_unicode=True,
                                  width=120)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
            tmp.write(text)
        os.chmod(tmp.name, path.stat().st_mode & 0o777 if path.exists() else 0o644)  # not the temp file's 0600
        os.replace(tmp.name, path)
    return entry


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on the file's directory (the file itself is replaced, so it cannot hold the lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _entry_dict(entry: PromptTemplate) -> dict[str, Any]:
    """An entry as written to the file: name, version, kind first, then only what differs from the defaults."""
    rest = entry.model_dump(mode="json", exclude_defaults=True)
    return {"name": entry.name, "version": entry.version, "kind": entry.kind} | rest


def _header_comments(text: str) -> str:
    """The comment block at the top of a library file, kept when the file is rewritten."""
    lines = []
    for line in text.splitlines(keepends=True):
        if line.strip() and not line.lstrip().startswith("#"):
            break
        lines.append(line)
    return "".join(lines)


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings as `|` blocks, so rewritten prompts stay readable."""


_BlockDumper.add_representer(
    str, lambda dumper, value: dumper.represent_scalar(
        "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)
)

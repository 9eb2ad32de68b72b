"""The documentation site builds strictly (no broken link or anchor, no page missing from the nav), its generated
reference holds every field of every recipe kind and its module map every module, and the README stays a short front
door whose links all resolve."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
from pydantic import BaseModel

from scripts.gen_docs import PACKAGES, recipe_schemas
from scripts.readme_numbers import README
from tests.conftest import REPO

README_MAX_LINES = 300


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site as `make docs` builds it (mkdocs.yml sets strict: every warning fails the build)."""
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=REPO,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def _page(site: Path, name: str) -> str:
    return (site / name / "index.html").read_text()


def test_the_site_builds_strictly_with_every_page_in_the_nav(site):
    built = {path.parent.name for path in site.glob("*/index.html")}
    assert {path.stem for path in (REPO / "docs").glob("*.md") if path.stem != "index"} <= built


def _field_paths(schema: type, prefix: str = "") -> list[str]:
    """Every field's dotted path, nested blocks included (read from the schema here, not from the generator)."""
    def blocks(annotation) -> list[type]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [block for arg in get_args(annotation) for block in blocks(arg)]

    paths = []
    for name, field in schema.model_fields.items():
        paths.append(prefix + name)
        for block in blocks(field.annotation):
            paths.extend(_field_paths(block, f"{prefix}{name}."))
    return paths


def test_the_recipe_reference_lists_every_field_of_every_kind(site):
    page = _page(site, "reference")
    sections = dict(re.findall(r'<h2 id="kind-([a-z_]+)".*?</h2>(.*?)(?=<h2 |\Z)', page, re.S))
    kinds = [kind for kind, _ in recipe_schemas()]
    assert sorted(sections) == sorted(kinds)
    for kind, schema in recipe_schemas():
        # the page writes list items as `[]`, mapping values as `{}`, a union's member as `[type=NAME]`
        listed = {re.sub(r"\[[^\]]*\]|\{\}", "", html.unescape(code))
                  for code in re.findall(r"<td><code>(.*?)</code></td>", sections[kind])}
        missing = [path for path in _field_paths(schema) if path not in listed]
        assert not missing, f"kind {kind}: fields missing from the reference: {missing}"


def test_the_architecture_page_names_every_module(site):
    page = _page(site, "architecture")
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            assert f"<code>{name}</code>" in page, name


def test_the_readme_is_a_short_front_door():
    lines = len(README.read_text().splitlines())
    assert lines < README_MAX_LINES, f"README.md has {lines} lines: move reference material to docs/"


def test_every_readme_link_resolves(site):
    links = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    assert links
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        path = REPO / target
        assert path.exists(), f"README links to {link}: no such file"
        if anchor:
            page = path.relative_to(REPO / "docs").with_suffix("")
            built = site / ("" if page.name == "index" else page) / "index.html"
            assert f'id="{anchor}"' in built.read_text(), f"README links to {link}: no such anchor"

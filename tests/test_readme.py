"""The numbers in the README and the docs come from committed results (scripts/readme_numbers.py), not typed by hand:
every file holding a generated block (`holders`) holds what the results give."""

from __future__ import annotations

import json

import pytest

from scripts.readme_numbers import (
    BEGIN,
    BENCH_BEGIN,
    BENCH_RESULTS,
    README,
    REAL_BENCH_BEGIN,
    RESULTS,
    SKILL_CARD,
    SKILLS_BEGIN,
    TINY_BEGIN,
    TINY_RESULTS,
    holders,
    real_bench_results,
    rewrite,
    rewrite_bench,
    rewrite_real_bench,
    rewrite_skills,
    rewrite_tiny,
)


@pytest.mark.parametrize("path", holders(BEGIN), ids=lambda p: p.name)
def test_the_demo_numbers_are_the_recorded_results(path):
    text = path.read_text()
    assert rewrite(text, json.loads(RESULTS.read_text())) == text, "run: python scripts/readme_numbers.py"


@pytest.mark.parametrize("path", holders(TINY_BEGIN), ids=lambda p: p.name)
def test_the_tiny_models_build_numbers_are_the_recorded_ones(path):
    text = path.read_text()
    assert rewrite_tiny(text, json.loads(TINY_RESULTS.read_text())) == text, "run: python scripts/readme_numbers.py"


@pytest.mark.parametrize("path", holders(BENCH_BEGIN), ids=lambda p: p.name)
def test_the_bench_numbers_are_the_committed_results(path):
    results = [json.loads(result.read_text()) for result in BENCH_RESULTS]
    text = path.read_text()
    assert rewrite_bench(text, *results) == text, "run: python scripts/readme_numbers.py"


@pytest.mark.parametrize("path", holders(REAL_BENCH_BEGIN), ids=lambda p: p.name)
def test_the_real_model_bench_numbers_are_the_committed_results(path):
    text = path.read_text()
    assert rewrite_real_bench(text, real_bench_results()) == text, "run: python scripts/readme_numbers.py"


@pytest.mark.parametrize("path", holders(SKILLS_BEGIN), ids=lambda p: p.name)
def test_the_real_model_skills_are_the_measured_card(path):
    text = path.read_text()
    assert rewrite_skills(text, json.loads(SKILL_CARD.read_text())) == text, "run: python scripts/readme_numbers.py"


def test_the_readme_shows_what_the_demo_measured():
    assert README in holders(BEGIN)

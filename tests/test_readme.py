"""The README's numbers come from committed results (scripts/readme_numbers.py), not typed by hand."""

from __future__ import annotations

import json

from scripts.readme_numbers import README, RESULTS, rewrite


def test_the_readme_demo_numbers_are_the_recorded_results():
    readme = README.read_text()
    assert rewrite(readme, json.loads(RESULTS.read_text())) == readme, "run: python scripts/readme_numbers.py"


def test_the_readme_bench_numbers_are_the_committed_results():
    from scripts.readme_numbers import BENCH_RESULTS, rewrite_bench

    results = [json.loads(path.read_text()) for path in BENCH_RESULTS]
    readme = README.read_text()
    assert rewrite_bench(readme, *results) == readme, "run: python scripts/readme_numbers.py"


def test_the_readme_real_model_skills_are_the_measured_card():
    from scripts.readme_numbers import SKILL_CARD, rewrite_skills

    readme = README.read_text()
    assert rewrite_skills(readme, json.loads(SKILL_CARD.read_text())) == readme, "run: python scripts/readme_numbers.py"

"""One answer parser and one scorer registry: real-looking replies read right, and fine-tuning evaluation, prompt
evaluation and the RL reward all look their scorer up in the same table."""

from __future__ import annotations

from typing import Literal

import pytest

from tests.conftest import REPO
from workloads.align.rewards import exact_answer
from workloads.prompting.consistency import extract_answer
from workloads.prompting.harness import build_scorers
from workloads.prompting.recipe import EvalRecipe
from workloads.scoring import SCORERS, NumericScorer, ScorerSpec, build_scorer, register_scorer
from workloads.scoring.answers import answer_text, canonical_answer, final_number

QUESTION = "Tom has 1,200 apples and gives away 350. How many are left?"


@pytest.mark.parametrize(("reply", "number"), [
    ("-5", -5), ("The temperature fell to -5 degrees.", -5), ("x = -3.5", -3.5),
    ("5-3=2", 2),  # a minus between numbers is not a sign
    ("1,200", 1200), ("They sold 1,200 tickets.", 1200), ("$1,000.50 in total", 1000.5),
    ("3.5", 3.5), ("It takes 3.5 hours.", 3.5), ("The answer is 42.", 42), ("The answer is 3.5!", 3.5),
    ("Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 72", 72),  # GSM8K
    ("#### 1,234", 1234), ("####-8", -8),
    ("Answer: 850.", 850), ("**Answer:** 850", 850), ("Final Answer: 42\nCheck: 40 + 2 = 42, and 7 * 6 = 42.", 42),
    (f"{QUESTION} 1,200 - 350 = 850. The answer is 850. (Tom started with 1,200.)", 850),  # restated question
    ("The sum of 49 and 97 is 146.", 146), ("49 + 97 = 146", 146),  # restating: the operands come first
    ("Therefore, the total is 17.", 17), ("It is 7, I think?", 7), ("1e3 grams", 1000),
    ("no digits here", None), ("", None), ("Answer: I do not know.", None),
])
def test_final_number_reads_real_answers(reply, number):
    assert final_number(reply) == number


def test_answer_text_and_canonical_forms():
    assert answer_text("Work: 2 + 2.\n#### 4") == "4" and answer_text("The answer is Paris. Sure.") == "Paris"
    assert canonical_answer("-1,200.0") == "-1200" and canonical_answer("$3.50") == "3.5"
    assert canonical_answer("50%") == "50" and canonical_answer(" Paris! ") == "paris"
    assert extract_answer("#### 1,200") == extract_answer("The answer is 1200.") == "1200"  # votes agree


def test_numeric_scorers_on_real_answers():
    final = build_scorer({"type": "final_number"})
    assert final.score("#### 72", "She sold 72 clips.\n#### 72") == 1.0
    assert final.score("It is -5.", "-5") == 1.0 and final.score("It is 5.", "-5") == 0.0
    assert final.score("1,200 in all", "1200") == 1.0 and final.score("200 in all", "1,200") == 0.0
    assert final.score("3.5 hours", 3.5) == 1.0 and final.score("5 hours", "3.5") == 0.0
    assert final.score("146", "no number") == 0.0  # a reference without a number matches nothing
    assert final("The answer is 850.", {"output": "#### 850"}) == 1.0
    loose = build_scorer({"type": "numeric", "tolerance": 0.01, "relative": True})
    assert loose.score("about 1,005", "1,000") == 1.0 and loose.score("1,011", "1,000") == 0.0


def test_the_registry_is_filled_where_scorers_are_defined():
    assert {"exact", "final_number", "numeric"} <= set(SCORERS)  # workloads.scoring's own
    assert {"contains", "regex", "choice", "json_schema", "judge"} <= set(SCORERS)  # workloads.prompting.scorers'
    assert SCORERS["final_number"] is SCORERS["numeric"] is NumericScorer
    with pytest.raises(ValueError, match="'exact' is registered twice"):
        @register_scorer
        class _Another(ScorerSpec):
            type: Literal["exact"] = "exact"


def test_fine_tuning_prompt_evaluation_and_rewards_use_one_registry(monkeypatch):
    """A scorer put in the table under `final_number` is what the RL reward and prompt evaluation score with
    (fine-tuning evaluation: test_generation_score_greedy_replies_scored_and_shared_between_ranks)."""
    seen: list[tuple[str, str]] = []

    class Recorded(NumericScorer):
        def score(self, prediction, reference):
            seen.append((prediction, str(reference)))
            return super().score(prediction, reference)

    monkeypatch.setitem(SCORERS, "final_number", Recorded)
    assert exact_answer([], "#### 7", "7") == 1.0  # the RL reward
    recipe = EvalRecipe.model_validate({"test_set": {"path": str(REPO / "workloads/bundled/arithmetic_test.jsonl")},
                                        "scorers": [{"type": "final_number"}],
                                        "variants": [{"name": "v", "prompt": "p"}]})
    [prompt_scorer] = build_scorers(recipe).values()  # prompt evaluation
    assert prompt_scorer("Answer: 8", {"output": "8"}) == 1.0
    assert seen == [("#### 7", "7"), ("Answer: 8", "8")]

"""Prompting building blocks, pure Python (no Ray, no network): templates and the prompt library, scorers and
the Wilson interval, answer extraction and majority voting."""

from __future__ import annotations

import json

import pytest
import yaml

from workloads.bundled.make_arithmetic import INSTRUCTION, task_prompt
from workloads.prompting.consistency import AnswerExtraction, extract_answer, majority_vote, vote
from workloads.prompting.scorers import pick_label, wilson_interval
from workloads.prompting.templates import (
    KINDS,
    Lineage,
    PromptTemplate,
    TemplateError,
    load_library,
    save_version,
    select_demonstrations,
)
from workloads.scoring import ScorerError, build_scorer
from workloads.scoring.answers import canonical_answer, last_number

CASE = {"instruction": INSTRUCTION, "input": "17 + 72", "output": "The sum of 17 and 72 is 89."}


def _template(**fields) -> PromptTemplate:
    return PromptTemplate.model_validate({"name": "t", "template": "{question}"} | fields)


# --------------------------------------------------------------------------------------------- templates


@pytest.mark.parametrize("kind, extra", [
    ("zero_shot", {}),
    ("instruction", {"instruction": "Answer briefly."}),
    ("role", {"system": "You are {persona}."}),
    ("chain_of_thought", {"instruction": "Solve it."}),
    ("few_shot", {"demonstrations": [{"input": "1 + 1", "output": "2"}, {"input": "2 + 2", "output": "4"}]}),
])
def test_every_kind_renders_as_chat_and_completion(kind, extra):
    template = _template(kind=kind, **extra)
    variables = {"question": "3 + 4"} | ({"persona": "a calculator"} if kind == "role" else {})
    messages = template.render_messages(variables)
    text = template.render_text(variables)
    assert all(set(m) == {"role", "content"} for m in messages)
    assert messages[-1]["role"] == "user" and "3 + 4" in messages[-1]["content"]
    assert text.endswith(("A:", "A: Let's think step by step.")) and "Q: 3 + 4" in text
    if kind == "role":
        assert messages[0] == {"role": "system", "content": "You are a calculator."}
        assert text.startswith("You are a calculator.")
    if kind == "chain_of_thought":
        assert messages[-1]["content"] == "Solve it.\n\n3 + 4\n\nLet's think step by step."
    if kind == "few_shot":
        assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
        assert messages[1]["content"] == "2" and "Q: 2 + 2\nA: 4" in text


def test_bundled_library_variant_matches_the_training_phrasing_exactly():
    library = load_library()
    assert {p.kind for p in library.prompts} == set(KINDS)
    bundled = library.get("arithmetic-bundled")
    assert bundled.render_messages({"input": "17 + 72"}) == task_prompt(17, 72)
    for name in library.names():  # every entry renders a bundled test case both ways
        entry = library.get(name)
        assert entry.variables == ["input"]
        assert "17 + 72" in entry.render_text({"input": "17 + 72"})
        assert "17 + 72" in entry.render_messages({"input": "17 + 72"})[-1]["content"]


def test_missing_and_unknown_variables_are_named():
    template = _template(kind="instruction", instruction="Use {style}.")
    with pytest.raises(TemplateError, match=r"t@1: missing variable\(s\) style"):
        template.render_messages({"question": "q"})
    with pytest.raises(TemplateError, match=r"t@1: unknown variable\(s\) extra"):
        template.render_text({"question": "q", "style": "s", "extra": 1})
    assert template.variables == ["question", "style"]


def test_malformed_templates_are_refused_with_the_field_named():
    for bad in ("{}", "{0}", "{a.b}", "{a[0]}", "open {brace"):
        with pytest.raises(ValueError, match="template"):
            _template(kind="zero_shot", template=bad)
    with pytest.raises(ValueError, match="kind role needs `system`"):
        _template(kind="role")
    with pytest.raises(ValueError, match="demonstrations and k are for kind few_shot"):
        _template(kind="zero_shot", k=2)
    literal = _template(kind="zero_shot", template='{{"x": {question}}}')
    assert literal.render_messages({"question": "1"})[0]["content"] == '{"x": 1}'


def test_few_shot_k_and_demonstrations_given_at_render():
    demos = [{"input": f"{i} + {i}", "output": str(2 * i)} for i in range(5)]
    template = _template(kind="few_shot", demonstrations=demos, k=2)
    assert len(template.render_messages({"question": "q"})) == 5  # the entry's k
    assert len(template.render_messages({"question": "q"}, k=0)) == 1
    other = [{"input": {"question": "9 + 9"}, "output": "18"}]  # variables, rendered by the template
    assert template.render_messages({"question": "q"}, demonstrations=other, k=1)[0]["content"] == "9 + 9"
    with pytest.raises(TemplateError, match="k=6 with 5 demonstrations"):
        template.render_text({"question": "q"}, k=6)
    with pytest.raises(TemplateError, match="no demonstrations"):
        _template(kind="few_shot").render_text({"question": "q"})
    with pytest.raises(TemplateError, match="demonstration 0: unknown variable"):
        template.render_text({"question": "q"}, demonstrations=[{"input": {"question": "x", "y": 1}, "output": ""}] * 2)
    chosen = select_demonstrations(demos, 3, seed=1)
    assert chosen == select_demonstrations(demos, 3, seed=1) and len({d["input"] for d in chosen}) == 3


def test_library_versions_round_trip(tmp_path):
    path = tmp_path / "library.yaml"
    path.write_text("# my prompts\n\nprompts:\n"
                    "- {name: add, version: 1, kind: zero_shot, template: 'What is {input}?'}\n")
    library = load_library(path)
    assert library.get("add").version == 1
    child = library.get("add").model_copy(update={"template": "Compute {input}.\nBe exact."})
    saved = save_version(child, path, score=0.75, lineage={"parents": ["add@1"], "method": "rewrite"})
    assert saved.ref == "add@2"
    third = save_version(child, path, score=0.5, lineage=Lineage(parents=["add@2"], method="bootstrap_few_shot"))
    reloaded = load_library(path)
    assert reloaded.versions("add") == [1, 2, 3]
    assert reloaded.get("add").ref == third.ref == "add@3"  # latest
    assert reloaded.get("add@1").template == "What is {input}?"  # the old version kept
    assert reloaded.get("add@2").score == 0.75 and reloaded.get("add@2").lineage.parents == ["add@1"]
    assert reloaded.get("add@2").render_messages({"input": "1 + 2"})[0]["content"] == "Compute 1 + 2.\nBe exact."
    text = path.read_text()
    assert text.startswith("# my prompts\n\nprompts:") and "|-" in text  # header comment kept, multi-line as a block
    new = save_version(_template(kind="zero_shot", name="fresh"), tmp_path / "sub" / "new.yaml")
    assert new.ref == "fresh@1" and load_library(tmp_path / "sub" / "new.yaml").names() == ["fresh"]
    with pytest.raises(TemplateError, match="no version '9'"):
        reloaded.get("add@9")
    with pytest.raises(TemplateError, match="'missing' is not in the library; it has: add"):
        reloaded.get("missing")


def test_library_errors_name_the_field_and_allowed_values(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"prompts": [{"name": "a", "kind": "fancy", "template": "{x}"}]}))
    with pytest.raises(TemplateError) as err:
        load_library(path)
    assert "prompts.0.kind" in str(err.value) and "'fancy'" in str(err.value) and "zero_shot" in str(err.value)
    path.write_text(yaml.safe_dump({"prompts": [{"name": "a", "kind": "zero_shot", "template": "{x}"}] * 2}))
    with pytest.raises(TemplateError, match="repeated: a@1"):
        load_library(path)
    path.write_text(yaml.safe_dump({"prompts": [{"name": "a", "kind": "zero_shot", "template": "x", "tmpl": 1}]}))
    with pytest.raises(TemplateError, match="prompts.0.tmpl.*unknown field"):
        load_library(path)


# --------------------------------------------------------------------------------------------- scorers


@pytest.mark.parametrize("spec, good, bad", [
    ({"type": "exact"}, "  the SUM of 17 and 72 is 89 ", "The sum of 17 and 72 is 90."),
    ({"type": "contains", "value": "is 89"}, "so it IS  89.", "it is 8 9"),
    ({"type": "contains"}, "Sure. The sum of 17 and 72 is 89.", "The sum is 89."),
    ({"type": "regex", "pattern": r"\bis 89\b"}, "The sum is 89.", "The sum is 890."),
    ({"type": "regex", "pattern": r"\d+", "fullmatch": True}, " 89 ", "89 apples"),
    ({"type": "numeric"}, "The sum of 17 and 72 is 89.", "The sum of 17 and 72 is 88."),
    ({"type": "numeric", "tolerance": 0.01, "reference_field": "value"}, "about 3.145", "about 3.16"),
    ({"type": "numeric", "tolerance": 0.1, "relative": True, "reference_field": "value"}, "3.3", "2.8"),
    ({"type": "choice", "labels": ["positive", "negative"], "reference_field": "label"},
     "Not negative: it is Positive.", "negative"),
    ({"type": "json_schema", "schema": {"type": "object", "required": ["sum"],
                                        "properties": {"sum": {"type": "integer"}}}},
     'Here: ```json\n{"sum": 89}\n```', '{"sum": "89"}'),
    ({"type": "json_match", "reference_field": "record"}, 'Sure: {"name": "Ana Lund", "age": 41}',
     '{"name": "Ana Lund", "age": "41"}'),
])
def test_scorers_on_positive_and_negative_cases(spec, good, bad):
    scorer = build_scorer(spec)
    case = CASE | {"value": 3.14159, "label": "positive", "record": '{"name": "Ana Lund", "age": 41}'}
    assert scorer(good, case) == 1.0
    assert scorer(bad, case) == 0.0
    assert scorer("", case) == 0.0


def test_scorer_helpers():
    assert last_number("The sum of 17 and 72 is 89.") == 89
    assert [last_number(t) for t in ("5-3=2", "x = -3.5", "1,000 apples", "none")] == [2, -3.5, 1000, None]
    assert pick_label("POSITIVE", ["positive", "negative"]) == "positive"
    assert pick_label("neutral-ish", ["neutral", "neutral-ish"]) == "neutral-ish"
    assert pick_label("no idea", ["yes", "no"]) == "no" and pick_label("maybe", ["yes", "no"]) is None
    assert build_scorer({"type": "json_schema", "schema": {"type": "array"}})("not json", {}) == 0.0


def test_scorer_recipe_errors_name_the_field_and_allowed_values():
    allowed = "allowed: choice, contains, exact, final_number, json_match, json_schema"
    with pytest.raises(ScorerError, match=f"field 'type': got 'fuzzy'; {allowed}"):
        build_scorer({"type": "fuzzy"})
    with pytest.raises(ScorerError, match="field 'tolerance': got -1"):
        build_scorer({"type": "numeric", "tolerance": -1})
    with pytest.raises(ScorerError, match="field 'tol'.*unknown field(.|\n)*fields of scorer numeric: type, "
                                          "reference_field, tolerance, relative"):
        build_scorer({"type": "numeric", "tol": 0.1})
    with pytest.raises(ScorerError, match="field 'pattern'.*not a valid regular expression"):
        build_scorer({"type": "regex", "pattern": "("})
    with pytest.raises(ScorerError, match="field 'schema'.*not a valid JSON Schema"):
        build_scorer({"type": "json_schema", "schema": {"type": "bogus"}})
    with pytest.raises(ScorerError, match="needs a `complete"):
        build_scorer({"type": "judge", "rubric": "correct"})
    with pytest.raises(ScorerError, match="no field 'answer'"):
        build_scorer({"type": "exact", "reference_field": "answer"})("x", CASE)
    with pytest.raises(ScorerError, match="not one of the labels"):
        build_scorer({"type": "choice", "labels": ["a", "b"]})("a", CASE)


def test_judge_scorer_with_a_plain_function_and_unparseable_replies():
    seen = []

    def complete(messages):
        seen.append(messages)
        answer = messages[-1]["content"].split("Answer to grade:\n", 1)[1].split("\n\n", 1)[0]
        return {"good": "Mostly right.\nScore: 8", "perfect": "10", "bad": "Score: 0",
                "rambling": "I cannot decide.", "off-scale": "Score: 42"}[answer]

    judge = build_scorer({"type": "judge", "rubric": "The sum must be right.", "max_score": 10}, complete=complete)
    assert [judge(p, CASE) for p in ("good", "perfect", "bad", "rambling", "off-scale")] == [0.8, 1.0, 0.0, 0.0, 0.0]
    assert (judge.calls, judge.unparseable) == (5, 2)
    prompt = seen[0][-1]["content"]
    assert "The sum must be right." in prompt and "17 + 72" in prompt and "is 89." in prompt
    scaled = build_scorer({"type": "judge", "rubric": "r", "min_score": 1, "max_score": 5},
                          complete=lambda messages: "Score: 4")
    assert scaled("x", {}) == 0.75


def test_wilson_interval_known_values():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=5e-4) and high == pytest.approx(0.9433, abs=5e-4)
    low, high = wilson_interval(0, 20)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.1611, abs=5e-4)
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=5e-4) and high == pytest.approx(0.5962, abs=5e-4)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0) and wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


# --------------------------------------------------------------------------------------------- self-consistency


@pytest.mark.parametrize("reply, expected", [
    ("Thought: done\nFinal Answer: The sum of 49 and 97 is 146.", "the sum of 49 and 97 is 146"),
    ("Let me see. Answer: 42\nThat was easy.", "42"),
    ("**Answer:** $1,000.00", "1000"),
    ("First 3 then 4. The answer is Paris. Sure.", "paris"),
    ("We add 17 and 72. Therefore, the sum is 89. Done", "89"),
    ("Therefore, the capital is Lyon.", "lyon"),
    ("17 + 72: carry one, 89", "89"),
    ("I do not know.", None),
])
def test_answer_extraction(reply, expected):
    assert extract_answer(reply) == expected


def test_answer_extraction_numeric_and_recipe_regex():
    assert extract_answer("Final Answer: The sum of 49 and 97 is 146.", AnswerExtraction(numeric=True)) == "146"
    assert extract_answer("Final Answer: no idea", AnswerExtraction(numeric=True)) is None
    boxed = AnswerExtraction(pattern=r"\\boxed\{(?P<answer>[^}]*)\}")
    assert extract_answer(r"\boxed{7} then \boxed{ 9 }", boxed) == "9"
    assert extract_answer("Answer: 7", boxed) is None  # the regex alone decides
    assert extract_answer("3 pears, 12 apples", AnswerExtraction(pattern=r"\d+(?= pears)")) == "3"  # whole match
    with pytest.raises(ValueError, match="not a valid regular expression"):
        AnswerExtraction(pattern="(")
    assert canonical_answer("1,000.50") == "1000.5" and canonical_answer("  Paris! ") == "paris"


def test_majority_vote_on_crafted_samples():
    result = majority_vote(["Answer: 89", "The sum is 89.", "Answer: 88", "89.0", "Final Answer: 98"])
    assert (result.answer, result.confidence, result.tie, result.unparseable) == ("89", 0.6, False, 0)
    assert result.counts == {"89": 3, "88": 1, "98": 1} and result.n == 5


def test_majority_vote_ties_are_broken_by_first_appearance_and_reported():
    result = majority_vote(["Answer: 6", "Answer: 5", "Answer: 5", "Answer: 6", "no idea at all"])
    assert result.answer == "6" and result.tie and result.tied == ("6", "5")
    assert result.confidence == 0.4 and result.unparseable == 1
    assert vote(["b", "a", "a", "b"]).answer == "b" and vote(["a", "b", "b", "a"]).answer == "a"


def test_majority_vote_counts_unparseable_samples():
    result = majority_vote(["no", "idea", "Answer: 3"], AnswerExtraction(numeric=True))
    assert (result.answer, result.unparseable, result.confidence, result.answers) == ("3", 2, 1 / 3, (None, None, "3"))
    nothing = majority_vote(["none", "at all"])
    assert nothing.answer is None and nothing.confidence == 0.0 and nothing.unparseable == 2 and not nothing.tie
    with pytest.raises(ValueError, match="at least one sample"):
        vote([])
    json.dumps(result.counts)  # plain types, ready for results files


def test_completions_variants_render_text_and_refuse_agents():
    from workloads.common.recipe import RecipeError
    from workloads.kinds import load_recipe, validate_recipe
    from workloads.prompting.harness import _request
    from workloads.prompting.recipe import TestSetConfig, VariantConfig
    from workloads.prompting.templates import load_library
    from workloads.search.prompts import variants_of

    template = load_library().get("arithmetic-bundled")
    case, test_set = {"input": "2 + 3", "output": "5"}, TestSetConfig(path="workloads/bundled/arithmetic_test.jsonl")
    text = _request(template, VariantConfig(name="t", prompt=template.name, api="completions"), case, test_set, "tiny")
    chat = _request(template, VariantConfig(name="c", prompt=template.name), case, test_set, "tiny")
    assert text["prompt"] == template.render_text({"input": "2 + 3"}) and "messages" not in text
    assert chat["messages"] == template.render_messages({"input": "2 + 3"}) and "prompt" not in chat
    with pytest.raises(ValueError, match="api must be chat with an agent"):
        VariantConfig(name="a", prompt=template.name, agent="react", api="completions")
    with pytest.raises(RecipeError, match="api"):
        validate_recipe({"kind": "eval", "test_set": {"path": "workloads/bundled/arithmetic_test.jsonl"},
                         "variants": [{"name": "v", "prompt": template.name, "api": "text"}],
                         "scorers": [{"type": "exact"}]}, kind="eval")
    recipe = load_recipe("workloads/configs/tiny-search.yaml", kind="prompt_search").model_copy(deep=True)
    recipe.space.api = ["chat", "completions"]
    grid = variants_of(recipe, load_library(recipe.library))
    assert len(grid) == 2 * len(variants_of(load_recipe("workloads/configs/tiny-search.yaml"), load_library()))
    assert {v.api for v in grid} == {"chat", "completions"}
    assert all(v.name.endswith("|completions") == (v.api == "completions") for v in grid)

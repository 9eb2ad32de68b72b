"""Recipe schemas of prompt engineering: `kind: eval` (`llmc eval`), `kind: prompt_search` (`llmc search`) and
`kind: optimize` (`llmc optimize`), registered beside finetune and serve.

An endpoint is any OpenAI-compatible server (`base_url` and the name of the variable holding its key) or, with
no `base_url`, the model a serve recipe names, started for the run and stopped after it.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from workloads.common.paths import resolve_path
from workloads.common.recipe import StrictModel
from workloads.prompting.consistency import AnswerExtraction
from workloads.prompting.scorers import ScorerConfig
from workloads.prompting.templates import DEFAULT_LIBRARY

DEFAULT_SERVE_RECIPE = "workloads/configs/serve-tiny.yaml"


class EndpointConfig(StrictModel):
    base_url: str | None = Field(None, description="An OpenAI-compatible /v1 URL; null: start `serve` for the run.")
    serve: str = Field(DEFAULT_SERVE_RECIPE, description="Serve recipe started when base_url is null.")
    api_key_env: str | None = Field(None, description="Environment variable holding the endpoint's key.")
    model: str = Field("tiny", min_length=1, description="Model name sent when a variant names none.")
    max_concurrency: int = Field(16, ge=1, le=1024, description="Requests in flight at most (halved on 429/503).")
    max_retries: int = Field(6, ge=0, le=50, description="Retries per request on 429, 5xx and timeouts.")
    timeout_s: float = Field(120.0, gt=0, description="Per-try request timeout.")
    cache: bool | None = Field(None, description="Response cache: null caches temperature-0 requests, true all.")
    batch_prompts: int = Field(16, ge=1, le=256, description="Prompts of `api: completions` variants sent in one "
                               "request (the API's prompt array); chat requests go one at a time. 1: one per request.")

    @model_validator(mode="after")
    def _served_recipe_exists(self) -> EndpointConfig:
        if self.base_url is None and resolve_path(self.serve) is None:
            raise ValueError(f"endpoint.serve: {self.serve!r} not found (or set endpoint.base_url)")
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint.base_url: {self.base_url!r} must start with http:// or https://")
        return self


class TestSetConfig(StrictModel):
    path: str = Field(..., description="JSONL test set: one case (a JSON object) per line.")
    skip: int = Field(0, ge=0, description="Cases skipped first (a dev and a test split from one file).")
    limit: int | None = Field(None, ge=1, description="Score only the first N cases (after `skip`).")
    fields: dict[str, str] = Field(default_factory=dict,
                                   description="Template variable -> case field, where their names differ.")
    reference_field: str = Field("output", min_length=1, description="The case field holding the expected answer.")

    @model_validator(mode="after")
    def _exists(self) -> TestSetConfig:
        if resolve_path(self.path) is None:
            raise ValueError(f"test_set.path: file not found: {self.path!r}")
        return self


class VariantConfig(StrictModel):
    name: str = Field(..., min_length=1, description="Shown in tables, files and plots.")
    prompt: str = Field(..., min_length=1, description="Library entry: NAME (latest version) or NAME@VERSION.")
    model: str | None = Field(None, description="Model or adapter name (BASE:ADAPTER on our server).")
    k: int | None = Field(None, ge=0, description="Few-shot demonstrations to use (few_shot prompts).")
    demo_seed: int | None = Field(None, description="Pick the k demonstrations at random with this seed "
                                                    "(few_shot prompts); null: the first k.")
    api: Literal["chat", "completions"] = Field(
        "chat", description="chat: the prompt's chat messages to /v1/chat/completions (the served model's chat "
        "template applies); completions: its text rendering (system, instruction, Q:/A: demonstrations, open A:) to "
        "/v1/completions, several prompts per request (endpoint.batch_prompts).")
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(32, ge=1, le=4096)
    n: int = Field(1, ge=1, le=64, description="Samples per case; above 1 the answers are voted (self-consistency).")
    agent: Literal["none", "react", "tools", "auto"] = Field(
        "none", description="Each case an agent episode with the calculator tool (the prompt's system text the "
        "agent's instructions, its user turn the question), its final answer scored. react: the ReAct text protocol; "
        "tools: OpenAI tool calling (the endpoint must support `tools`: our server with engine.tool_call_parser set); "
        "auto: tools where the endpoint accepts them, else react.")
    max_steps: int = Field(6, ge=1, le=32, description="Think-act-observe steps an agent episode may take.")

    @model_validator(mode="after")
    def _agent_samples_once(self) -> VariantConfig:
        if self.agent != "none" and self.n != 1:
            raise ValueError(f"variant {self.name!r}: n must be 1 with an agent (one episode per case)")
        if self.agent != "none" and self.api != "chat":
            raise ValueError(f"variant {self.name!r}: api must be chat with an agent (its turns are chat messages)")
        return self


class EvalRecipe(StrictModel):
    kind: Literal["eval"] = "eval"
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)
    test_set: TestSetConfig
    library: str = Field(str(DEFAULT_LIBRARY), description="YAML prompt library the variants name entries of.")
    variants: list[VariantConfig] = Field(..., min_length=1)
    scorers: list[ScorerConfig] = Field(..., min_length=1,
                                        description="The first is the variant's accuracy; the rest are reported.")
    extraction: AnswerExtraction = Field(default_factory=AnswerExtraction,
                                         description="How a voted answer is read from each sample (n > 1).")
    chunk_size: int = Field(64, ge=1, description="Cases sent together; results reach disk after each chunk.")

    def output_dir(self, given: str | Path | None = None) -> Path:
        """Where `llmc eval` writes its results: `given` (--output-dir), else runs/eval."""
        return Path(given or "runs/eval")

    @model_validator(mode="after")
    def _cross_field(self) -> EvalRecipe:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variants: names must be unique, got {names}")
        if resolve_path(self.library) is None:
            raise ValueError(f"library: file not found: {self.library!r}")
        return self




class PromptSpace(StrictModel):
    """The grid searched: every combination of these (combinations a prompt ignores are tried once)."""

    prompt: list[str] = Field(..., min_length=1, description="Library entries (NAME or NAME@VERSION).")
    k: list[int] = Field([0], min_length=1, description="Few-shot demonstrations (few_shot prompts only).")
    demo_seed: list[int | None] = Field([None], min_length=1,
                                        description="Which demonstrations: a seeded pick; null: the first k.")
    temperature: list[float] = Field([0.0], min_length=1)
    model: list[str | None] = Field([None], min_length=1, description="Models or adapters (BASE:ADAPTER).")
    api: list[Literal["chat", "completions"]] = Field(["chat"], min_length=1,
                                                      description="Chat messages, or the prompt's text rendering.")
    max_tokens: int = Field(32, ge=1, le=4096)


class SearchSettings(StrictModel):
    scheduler: Literal["asha", "none"] = Field("asha", description="asha: stop weak trials after a few cases.")
    chunk_size: int = Field(10, ge=1, description="Dev cases scored between reports: ASHA's unit of resource.")
    grace_period: int = Field(10, ge=1, description="Dev cases every trial scores before it may be stopped.")
    reduction_factor: float = Field(2, gt=1, description="ASHA keeps the top 1/reduction_factor at each rung.")
    max_concurrent_trials: int = Field(4, ge=1, description="Trials at once; they share endpoint.max_concurrency "
                                                            "(requests in flight over the whole search).")
    cpus_per_trial: float = Field(0.5, gt=0, description="Logical CPUs a trial holds (it mostly waits on HTTP).")


class PromptSearchRecipe(StrictModel):
    kind: Literal["prompt_search"] = "prompt_search"
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)
    dev_set: TestSetConfig = Field(..., description="Cases every trial is scored on (ASHA stops weak ones early).")
    test_set: TestSetConfig = Field(..., description="Held-out cases only the winner is scored on.")
    library: str = Field(str(DEFAULT_LIBRARY))
    space: PromptSpace
    scorers: list[ScorerConfig] = Field(..., min_length=1, description="The first is the metric searched.")
    extraction: AnswerExtraction = Field(default_factory=AnswerExtraction)
    search: SearchSettings = Field(default_factory=SearchSettings)
    name: str = Field("prompt-search", pattern=r"^[A-Za-z0-9_.-]+$", description="The Tune experiment's name.")

    def output_dir(self, given: str | Path | None = None) -> Path:
        """Where the search writes its results: `given` (--output-dir), else runs/NAME."""
        return Path(given or f"runs/{self.name}")

    @model_validator(mode="after")
    def _cross_field(self) -> PromptSearchRecipe:
        if resolve_path(self.library) is None:
            raise ValueError(f"library: file not found: {self.library!r}")
        if self.search.grace_period < self.search.chunk_size:
            raise ValueError("search.grace_period must be at least search.chunk_size (one report)")
        return self




DEFAULT_META_PROMPT = (
    "Rewrite the following instruction for a language model in {n} different ways. Write each rewrite on its own "
    "line, with no numbering and nothing else.\n\nInstruction: {instruction}"
)


class TeacherConfig(StrictModel):
    prompt: str = Field(..., min_length=1, description="Library entry the teacher runs on the train cases.")
    model: str | None = Field(None, description="Model or adapter (BASE:ADAPTER); null: endpoint.model.")
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(32, ge=1, le=4096)


class StudentConfig(StrictModel):
    model: str | None = Field(None, description="Model or adapter every candidate is scored on; null: endpoint.model.")
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(32, ge=1, le=4096)


class ProposerConfig(StrictModel):
    model: str | None = Field(None, description="Model asked for rewrites of the target's instruction; null: "
                                                "endpoint.model.")
    n: int = Field(4, ge=1, le=32, description="Rewrites asked for, in one reply, one per line (empty and repeated "
                                               "lines are dropped).")
    endpoint: EndpointConfig | None = Field(None, description="Another OpenAI-compatible endpoint (base_url "
                                                              "required); null: the recipe's endpoint.")
    meta_prompt: str = Field(DEFAULT_META_PROMPT, description="What the proposer is asked; {instruction} and {n} "
                                                              "are filled in.")
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(256, ge=1, le=4096)

    @field_validator("meta_prompt")
    @classmethod
    def _meta_placeholders(cls, value: str) -> str:
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        except ValueError as exc:
            raise ValueError(f"not a valid template ({exc}); write literal braces as {{{{ and }}}}") from None
        if "instruction" not in names or not names <= {"instruction", "n"}:
            raise ValueError(f"uses {{instruction}} and optionally {{n}}; got placeholders {sorted(names)}")
        return value

    @model_validator(mode="after")
    def _own_endpoint_has_url(self) -> ProposerConfig:
        if self.endpoint is not None and self.endpoint.base_url is None:
            raise ValueError("proposer.endpoint.base_url: required (a null proposer.endpoint asks the recipe's "
                             "endpoint)")
        return self


class OptimizeRecipe(StrictModel):
    kind: Literal["optimize"] = "optimize"
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)
    train_set: TestSetConfig = Field(..., description="Cases the teacher answers; those it gets right (by the first "
                                                      "scorer) become the demonstrations.")
    dev_set: TestSetConfig = Field(..., description="Cases every candidate is scored on.")
    library: str = Field(str(DEFAULT_LIBRARY), description="YAML prompt library the entries below are looked up in.")
    target: str = Field(..., min_length=1, description="The few_shot entry optimized (NAME or NAME@VERSION); the best "
                                                       "candidate is saved as the next version of its name.")
    teacher: TeacherConfig
    student: StudentConfig = Field(default_factory=StudentConfig)
    max_demos: int = Field(4, ge=1, le=64, description="Demonstrations bootstrapped at most (the teacher stops once "
                                                       "it has them).")
    k: list[Annotated[int, Field(ge=0)]] = Field(
        [0, 2, 4], min_length=1, description="Demonstrations shown: every phrasing is tried with each k (capped at "
        "the number bootstrapped).")
    instruction_candidates: list[str] = Field(
        default_factory=list, description="Library entries whose phrasing (system, instruction and question "
        "template) each replaces the target's in a candidate.")
    proposer: ProposerConfig | None = Field(None, description="A model asked for rewrites of the target's "
                                                              "instruction, each a candidate; null: none.")
    scorers: list[ScorerConfig] = Field(..., min_length=1, description="The first keeps demonstrations and ranks "
                                                                       "candidates; the rest are reported.")
    save_to: str | None = Field(None, description="Library file the best is appended to (begun as a copy of "
                                                  "`library` if missing); null: library.yaml in the output directory "
                                                  "(the shipped library only when named here).")
    chunk_size: int = Field(32, ge=1, description="Cases sent together.")

    def output_dir(self, given: str | Path | None = None) -> Path:
        """Where `llmc optimize` writes its results: `given` (--output-dir), else runs/optimize."""
        return Path(given or "runs/optimize")

    @field_validator("library")
    @classmethod
    def _library_exists(cls, value: str) -> str:
        if resolve_path(value) is None:
            raise ValueError("file not found")
        return value

    @field_validator("k")
    @classmethod
    def _k_within_max_demos(cls, value: list[int], info: ValidationInfo) -> list[int]:
        max_demos = info.data.get("max_demos")  # validated before k (declared before it); absent when invalid
        too_many = [k for k in value if max_demos is not None and k > max_demos]
        if too_many:
            raise ValueError(f"{too_many} more than max_demos ({max_demos}): a candidate shows at most the "
                             "demonstrations bootstrapped")
        return value

    @field_validator("instruction_candidates")
    @classmethod
    def _each_once(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("name each entry once")
        return value



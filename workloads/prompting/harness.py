"""The evaluation harness: prompt variants scored on a JSONL test set through an OpenAI-compatible endpoint.

Each variant renders a library prompt for every case, asks the endpoint (n samples per case are voted when n > 1),
and scores the answer with the recipe's scorers; the first scorer is the variant's accuracy, reported with a 95%
Wilson interval. Cases are read and answered a chunk at a time and every record is appended to `cases.jsonl` as
its chunk finishes, so memory stays flat however large the test set. `iter_variant` is the same loop a chunk at a
time, for searches that stop weak variants early.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from workloads.common.paths import resolve_path
from workloads.common.recipe import RecipeError
from workloads.prompting.client import AsyncLLMClient, Result
from workloads.prompting.consistency import AnswerExtraction, majority_vote
from workloads.prompting.endpoint import Endpoint
from workloads.prompting.recipe import EvalRecipe, TestSetConfig, VariantConfig
from workloads.prompting.scorers import wilson_interval
from workloads.prompting.templates import PromptLibrary, PromptTemplate, load_library, select_demonstrations
from workloads.scoring import Scorer, build_scorer

PASS_SCORE = 0.5  # a case passes when its first scorer gives at least this (exact scorers give 0 or 1)


@dataclass
class Tally:
    """Running totals of one variant: what its row in the summary says."""

    variant: str
    prompt: str  # the library entry, NAME@VERSION
    model: str
    n: int = 0
    passed: int = 0
    score_sums: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    failures: int = 0  # requests that got no answer after every retry
    unparseable: int = 0  # voted samples with no answer to read (n > 1)
    ties: int = 0  # cases whose vote was tied (n > 1)
    retries: int = 0
    cache_hits: int = 0

    @property
    def accuracy(self) -> float:
        return self.passed / self.n if self.n else 0.0

    def summary(self) -> dict[str, Any]:
        low, high = wilson_interval(self.passed, self.n)
        answered = max(self.n - self.failures, 1)
        row = {key: value for key, value in asdict(self).items() if key not in ("score_sums", "latency_s")}
        return {**row, "accuracy": round(self.accuracy, 4), "ci95_low": round(low, 4), "ci95_high": round(high, 4),
                **{f"mean_{name}": round(total / max(self.n, 1), 4) for name, total in self.score_sums.items()},
                "mean_latency_s": round(self.latency_s / answered, 4)}


def read_cases(test_set: TestSetConfig, split: str = "test_set") -> Iterator[dict]:
    """The test set's cases, one line at a time (never the whole file in memory); a bad line names its number and
    the recipe section the set came from (`split`)."""
    path = resolve_path(test_set.path)
    with Path(path).open() as handle:
        count, skipped = 0, 0
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if skipped < test_set.skip:
                skipped += 1
                continue
            try:
                case = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecipeError(f"field '{split}.path': {path} line {number} is not JSON ({exc.msg})") from exc
            if not isinstance(case, dict) or test_set.reference_field not in case:
                raise RecipeError(f"field '{split}.reference_field': {path} line {number} has no "
                                  f"{test_set.reference_field!r} field")
            yield case
            count += 1
            if test_set.limit is not None and count >= test_set.limit:
                return


def count_cases(test_set: TestSetConfig) -> int:
    return sum(1 for _ in read_cases(test_set))


def build_scorers(recipe: EvalRecipe, client: AsyncLLMClient | None = None) -> dict[str, Scorer]:
    """The recipe's scorers by name (`type`, numbered when a type repeats); a judge asks through `client`."""
    complete = None
    if client is not None:
        def complete(messages: list[dict]) -> str:
            return client.run_all([{"messages": messages, "temperature": 0.0, "max_tokens": 64}])[0].text

    scorers: dict[str, Scorer] = {}
    for spec in recipe.scorers:
        name = spec.type if spec.type not in scorers else f"{spec.type}_{len(scorers) + 1}"
        scorers[name] = build_scorer(spec, complete=complete)
    return scorers


def case_variables(template: PromptTemplate, case: dict, test_set: TestSetConfig,
                   split: str = "test_set") -> dict[str, Any]:
    """The values of `template`'s variables in `case` (through `test_set.fields`); a missing one names the field."""
    variables = {}
    for name in template.variables:
        column = test_set.fields.get(name, name)
        if column not in case:
            raise RecipeError(f"field '{split}.fields': prompt {template.ref} needs variable {name!r} and the case "
                              f"has no field {column!r} (fields: {', '.join(case)}); map it with "
                              f"{split}.fields.{name}: FIELD")
        variables[name] = case[column]
    return variables


def _request(template: PromptTemplate, variant: VariantConfig, case: dict, test_set: TestSetConfig,
             model: str) -> dict:
    demos = None
    if variant.demo_seed is not None and template.kind == "few_shot":
        k = len(template.demonstrations) if variant.k is None else variant.k
        demos = select_demonstrations([d.model_dump() for d in template.demonstrations], k, seed=variant.demo_seed)
    render = template.render_text if variant.api == "completions" else template.render_messages
    rendered = render(case_variables(template, case, test_set), demonstrations=demos,
                      k=len(demos) if demos is not None else variant.k)
    return {"prompt" if variant.api == "completions" else "messages": rendered, "model": variant.model or model,
            "temperature": variant.temperature, "max_tokens": variant.max_tokens, "n": variant.n}


def _record(tally: Tally, case: dict, result: Result, scorers: dict[str, Scorer], extraction: AnswerExtraction,
            test_set: TestSetConfig, n: int) -> dict:
    record: dict[str, Any] = {"variant": tally.variant, "case": tally.n, "reference": case[test_set.reference_field]}
    tally.n += 1
    tally.retries += result.retries
    tally.cache_hits += int(result.cached)
    if result.error is not None:
        tally.failures += 1
        scores = {name: 0.0 for name in scorers}
        record.update(error=result.error, prediction=None)
    else:
        tally.prompt_tokens += result.prompt_tokens
        tally.completion_tokens += result.completion_tokens
        tally.latency_s += result.latency_s
        prediction = result.text
        if n > 1:
            vote = majority_vote(result.texts, extraction)
            tally.ties += int(vote.tie)
            tally.unparseable += vote.unparseable
            prediction = vote.answer or ""
            record.update(samples=result.texts, confidence=round(vote.confidence, 4), tie=vote.tie)
        record["prediction"] = prediction
        if "stop_reason" in result.response:  # an agent's episode: how it went, and its transcript
            record["agent"] = {k: result.response[k]
                               for k in ("protocol", "steps", "stop_reason", "tool_calls", "format_errors")}
            record["transcript"] = result.response["messages"]
        scores = {name: float(scorer(prediction, case)) for name, scorer in scorers.items()}
    for name, value in scores.items():
        tally.score_sums[name] = tally.score_sums.get(name, 0.0) + value
    first = next(iter(scores.values()))
    tally.passed += int(first >= PASS_SCORE)
    record.update(scores=scores, passed=first >= PASS_SCORE, latency_s=round(result.latency_s, 4))
    return record


def _run_agents(client: AsyncLLMClient, variant: VariantConfig, requests: list[dict],
                protocol: dict[str, str]) -> list[Result]:
    """One agent episode per request (its system message the instructions, its last user turn the question), all
    concurrently through the client, in the variant's protocol (`auto`: OpenAI tools where the endpoint accepts
    them, probed once per variant and kept in `protocol`); each becomes a Result whose text is the final answer and
    whose response holds the transcript."""
    import asyncio

    from workloads.prompting.react import (
        Usage,
        arun_react,
        arun_tool_calling,
        react_completer,
        supports_tool_calling,
        tool_call_completer,
    )
    from workloads.prompting.tools import default_registry

    registry = default_registry()

    async def episode(request: dict, protocol: str) -> Result:
        messages = request["messages"]
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        params = {"model": request["model"], "temperature": request["temperature"], "max_tokens": request["max_tokens"]}
        usage, start = Usage(), time.monotonic()  # this episode's own tokens: the others run beside it
        if protocol == "tools":
            outcome = await arun_tool_calling(messages[-1]["content"], tool_call_completer(client, usage, **params),
                                              registry, system_prompt=system, max_steps=variant.max_steps)
        else:
            outcome = await arun_react(messages[-1]["content"], react_completer(client, usage, **params), registry,
                                       system_prompt=system, max_steps=variant.max_steps)
        transcript = {"messages": outcome.messages, "steps": len(outcome.steps), "stop_reason": outcome.stop_reason,
                      "tool_calls": outcome.tool_calls, "format_errors": outcome.format_errors, "protocol": protocol}
        return Result([outcome.final_answer or ""], [outcome.stop_reason], usage.prompt_tokens,
                      usage.completion_tokens, time.monotonic() - start, response=transcript, error=outcome.error)

    async def every() -> list[Result]:
        try:
            if "chosen" not in protocol:
                auto = variant.agent == "auto" and requests
                protocol["chosen"] = variant.agent if not auto else (
                    "tools" if await supports_tool_calling(client, requests[0]["model"], registry) else "react")
            return list(await asyncio.gather(*(episode(r, protocol["chosen"]) for r in requests)))
        finally:
            await client.aclose_connections()

    return asyncio.run(every())


def iter_variant(client: AsyncLLMClient, library: PromptLibrary, variant: VariantConfig, cases: Iterator[dict],
                 scorers: dict[str, Scorer], recipe: EvalRecipe) -> Iterator[tuple[list[dict], Tally]]:
    """Answer and score `cases` a chunk at a time: yields each chunk's records and the running tally."""
    template = library.get(variant.prompt)
    tally = Tally(variant.name, template.ref, variant.model or client.model or "")
    protocol: dict[str, str] = {}  # an agent variant's protocol, chosen with its first chunk
    while True:
        chunk = [case for _, case in zip(range(recipe.chunk_size), cases, strict=False)]
        if not chunk:
            return
        requests = [_request(template, variant, case, recipe.test_set, client.model or "") for case in chunk]
        results = (client.run_all(requests) if variant.agent == "none"
                   else _run_agents(client, variant, requests, protocol))
        records = [_record(tally, case, result, scorers, recipe.extraction, recipe.test_set, variant.n)
                   for case, result in zip(chunk, results, strict=True)]
        yield records, tally


def evaluate(recipe: EvalRecipe, client: AsyncLLMClient, output_dir: Path, progress: bool = True,
             library: PromptLibrary | None = None) -> dict:
    """Every variant on the test set; writes cases.jsonl, summary.json, variants.csv and accuracy.png. `library`:
    what `check_recipe` returned, if the caller has checked the recipe already."""
    from tqdm import tqdm

    from workloads.common.reporting import write_csv

    library = library or check_recipe(recipe)
    scorers = build_scorers(recipe, client)
    total = count_cases(recipe.test_set)
    output_dir.mkdir(parents=True, exist_ok=True)
    tallies: list[Tally] = []
    with (output_dir / "cases.jsonl").open("w") as sink:
        for variant in recipe.variants:
            bar = tqdm(total=total, desc=f"eval {variant.name}", unit="case", disable=not progress, leave=True)
            tally = None
            for records, tally in iter_variant(client, library, variant, read_cases(recipe.test_set), scorers,
                                               recipe):
                sink.writelines(json.dumps(r) + "\n" for r in records)
                sink.flush()
                bar.update(len(records))
                bar.set_postfix(accuracy=f"{tally.accuracy:.3f}")
            bar.close()
            tallies.append(tally)
    rows = [t.summary() for t in tallies]
    best = max(rows, key=lambda r: r["accuracy"])
    stats = client.stats
    summary = {"test_set": recipe.test_set.path, "cases": total, "scorer": next(iter(scorers)),
               "best_variant": best["variant"], "best_accuracy": best["accuracy"], "variants": rows,
               "requests": stats.requests, "http_requests": stats.http_requests, "retries": stats.retries,
               "cache_hits": stats.cache_hits, "failures": stats.failures,
               "prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens}
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    write_csv(rows, output_dir / "variants.csv")
    plot_accuracy(rows, output_dir / "accuracy.png", title=f"{recipe.test_set.path}: {total} cases")
    return summary


def plot_accuracy(rows: list[dict], path: Path, title: str) -> Path:
    """One bar per variant with its 95% Wilson interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    acc = [r["accuracy"] for r in rows]
    errors = [[a - r["ci95_low"] for a, r in zip(acc, rows, strict=True)],
              [r["ci95_high"] - a for a, r in zip(acc, rows, strict=True)]]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 2), 3.5))
    ax.bar(names, acc, yerr=errors, capsize=4, color="tab:blue")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (95% Wilson CI)")
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def print_table(summary: dict, output_dir: Path) -> None:
    """The variants, best first, as a table for a person."""
    from workloads.common.reporting import print_rows

    rows = sorted(summary["variants"], key=lambda r: -r["accuracy"])
    print_rows(f"prompt variants on {summary['cases']} cases ({summary['scorer']})",
               ["variant", "prompt", "model", "accuracy", "95% CI", "tokens", "latency s", "failures"],
               [[row["variant"], row["prompt"], row["model"], f"{row['accuracy']:.3f}",
                 f"{row['ci95_low']:.2f}-{row['ci95_high']:.2f}", str(row["prompt_tokens"] + row["completion_tokens"]),
                 f"{row['mean_latency_s']:.3f}", str(row["failures"])] for row in rows],
               f"best: {summary['best_variant']} ({summary['best_accuracy']:.3f}); {summary['requests']} requests, "
               f"{summary['retries']} retries, {summary['cache_hits']} cached; results in {output_dir}", left=3)


def check_recipe(recipe: EvalRecipe) -> PromptLibrary:
    """What can be checked before any endpoint starts: every prompt exists, the first case renders for each."""
    from workloads.prompting.templates import TemplateError

    library = load_library(resolve_path(recipe.library))
    first = next(read_cases(recipe.test_set), None)
    if first is None:
        raise RecipeError(f"field 'test_set.path': {recipe.test_set.path} has no cases")
    for index, variant in enumerate(recipe.variants):
        try:
            _request(library.get(variant.prompt), variant, first, recipe.test_set, recipe.endpoint.model)
        except TemplateError as exc:
            raise RecipeError(f"field 'variants.{index}.prompt': {exc}") from exc
    return library


def run(recipe: EvalRecipe, output_dir: str | Path | None = None, address: str | None = None,
        endpoint: Endpoint | None = None, show: bool = True) -> dict:
    """`llmc eval`: open the endpoint (starting our server if the recipe names none, unless one is handed in),
    evaluate, save; `show` prints progress and the table."""
    from workloads.common.reporting import save_recipe
    from workloads.prompting.endpoint import opened_client

    library = check_recipe(recipe)
    out = recipe.output_dir(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, out)
    with opened_client(recipe.endpoint, address, endpoint) as client:
        summary = evaluate(recipe, client, out, progress=show, library=library)
    if show:
        print_table(summary, out)
    return summary

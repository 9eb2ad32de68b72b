"""The prompt optimizer (`llmc optimize RECIPE`): few-shot bootstrapping as DSPy's BootstrapFewShot does it, plus
instruction candidates, every candidate scored on the dev split and the best saved back to the prompt library.

1. Bootstrap: the teacher (a library prompt on a model) answers train cases through the harness, a chunk at a
   time; the traces (the case's input, the teacher's answer) whose answers score under the recipe's first scorer
   are kept as demonstrations, until there are `max_demos`.
2. Candidates: the target few-shot entry showing k of those demonstrations (each k of the recipe), in its own
   phrasing, in the phrasing (system, instruction and question template) of each library entry the recipe names,
   and with each rewrite of its instruction that a proposer model suggests (one per line of its reply: a junk
   rewrite just scores low).
3. Score: every candidate, and the target as it is, on the dev split through the harness (`evaluate`); the
   client's bounded concurrency answers each chunk of cases at once.
4. Save: the best, when it beats the target as it is, as the target's next version with its dev accuracy and its
   lineage (`templates.save_version`), in `save_to` (by default a copy of the library in the output directory).
Plain Python: no Ray.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from workloads.common import registry
from workloads.common.paths import resolve_path
from workloads.common.recipe import RecipeError, format_errors
from workloads.common.record import current as current_recording
from workloads.prompting.client import AsyncLLMClient
from workloads.prompting.endpoint import Endpoint, opened_client
from workloads.prompting.harness import (
    build_scorers,
    case_variables,
    evaluate,
    iter_variant,
    read_cases,
)
from workloads.prompting.recipe import EvalRecipe, OptimizeRecipe, ProposerConfig, TestSetConfig, VariantConfig
from workloads.prompting.templates import (
    Lineage,
    PromptLibrary,
    PromptTemplate,
    TemplateError,
    load_library,
    save_version,
)
from workloads.scoring import Scorer

METHOD = "bootstrap_few_shot"
AS_IS = "00-as-is"  # the candidate that is the target unchanged: the score to beat
_MARKER = re.compile(r"^\s*(?:(?:rewrite|instruction)\s*\d*\s*[:.)]|[-*\u2022]+|\(?\d+[.):]|\d+\s+-)\s*", re.I)


@dataclass(frozen=True)
class Trace:
    """A teacher's answer that scored: the train case and the answer, a demonstration to be."""

    case: dict
    answer: str


@dataclass(frozen=True)
class Phrasing:
    """Every part of a prompt but its demonstrations, and where it came from."""

    slug: str  # in candidate names: target, an entry's name, rewrite1, ...
    source: str  # in tables: NAME@VERSION of the entry, or the proposer's rewrite
    field: str  # the recipe field it came from, named by errors
    parents: tuple[str, ...]  # NAME@VERSION of the entries it was derived from
    system: str | None
    instruction: str | None
    template: str


@dataclass(frozen=True)
class Candidate:
    """One prompt scored on the dev split: a phrasing with k demonstrations (no phrasing: the target as it is)."""

    name: str  # its entry in candidates.yaml and its variant in dev/
    phrasing: Phrasing | None
    template: PromptTemplate


# ---------------------------------------------------------------------------------------------
# 1. Bootstrap
# ---------------------------------------------------------------------------------------------


def bootstrap(client: AsyncLLMClient, library: PromptLibrary, recipe: OptimizeRecipe, scorers: dict[str, Scorer],
              sink: IO[str] | None = None) -> tuple[list[Trace], int]:
    """Run the teacher on train cases a chunk at a time until `max_demos` answers score; returns the kept traces
    and the number of train cases tried. Every teacher record goes to `sink` (JSONL) with `kept`."""
    teacher = _teacher_variant(recipe)
    seen: list[dict] = []

    def cases() -> Iterator[dict]:
        for case in read_cases(recipe.train_set, split="train_set"):
            seen.append(case)
            yield case

    traces: list[Trace] = []
    as_eval = _as_eval(recipe, "train_set", [teacher])
    for records, _ in iter_variant(client, library, teacher, cases(), scorers, as_eval):
        for record in records:
            kept = record["passed"] and len(traces) < recipe.max_demos
            if kept:
                traces.append(Trace(seen[record["case"]], record["prediction"].strip()))
            if sink is not None:
                sink.write(json.dumps({**record, "kept": kept}) + "\n")
        if len(traces) >= recipe.max_demos:
            break
    return traces, len(seen)


# ---------------------------------------------------------------------------------------------
# 2. Candidates
# ---------------------------------------------------------------------------------------------


def parse_rewrites(reply: str, n: int, exclude: Sequence[str] = ()) -> list[str]:
    """Up to `n` rewrites from a proposer's reply: one per line, list markers ("1.", "-", "Rewrite 2:") and
    enclosing quotes removed; lines with no letter or digit, repeats (ignoring case and spacing) and the texts in
    `exclude` (the instruction being rewritten) dropped."""
    seen = {_normalized(text) for text in exclude}
    rewrites: list[str] = []
    for line in (reply or "").splitlines():
        text = _MARKER.sub("", line).strip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
            text = text[1:-1].strip()
        if not any(ch.isalnum() for ch in text) or _normalized(text) in seen:
            continue
        seen.add(_normalized(text))
        rewrites.append(text)
        if len(rewrites) == n:
            break
    return rewrites


def _normalized(text: str) -> str:
    return " ".join(text.casefold().split())


def propose_rewrites(client: AsyncLLMClient, proposer: ProposerConfig, instruction: str) -> tuple[list[str], str]:
    """Ask the proposer for `proposer.n` rewrites of `instruction` in one request; returns them and its reply (a
    failed request gives no rewrites, its error as the reply: the run goes on without them)."""
    request: dict[str, Any] = {
        "messages": [{"role": "user", "content": proposer.meta_prompt.format(instruction=instruction, n=proposer.n)}],
        "temperature": proposer.temperature, "max_tokens": proposer.max_tokens}
    if proposer.model:
        request["model"] = proposer.model
    result = client.run_all([request])[0]
    if result.error is not None:
        return [], f"(no reply: {result.error})"
    return parse_rewrites(result.text, proposer.n, exclude=[instruction]), result.text


def phrasings(recipe: OptimizeRecipe, library: PromptLibrary, target: PromptTemplate,
              rewrites: Sequence[str] = ()) -> list[Phrasing]:
    """The target's phrasing, each named library entry's and each rewrite's (the target's with the rewrite as its
    instruction), without repeats."""
    found = [Phrasing("target", target.ref, "target", (target.ref,), target.system, target.instruction,
                      target.template)]
    for index, ref in enumerate(recipe.instruction_candidates):
        entry = _entry(library, ref, f"instruction_candidates.{index}")
        found.append(Phrasing(entry.name, entry.ref, f"instruction_candidates.{index}", (target.ref, entry.ref),
                              entry.system, entry.instruction, entry.template))
    for index, text in enumerate(rewrites, start=1):
        found.append(Phrasing(f"rewrite{index}", f"rewrite {index}", "proposer", (target.ref,), target.system,
                              _as_instruction(text, set(target.variables)), target.template))
    unique: dict[tuple, Phrasing] = {}
    for phrasing in found:
        unique.setdefault((phrasing.system, phrasing.instruction, phrasing.template), phrasing)
    return list(unique.values())


def _as_instruction(text: str, variables: set[str]) -> str:
    """A rewrite as instruction text: its `{name}` fields kept when they are plain variables of the target, else
    every brace made literal, so that a proposer's braces never break a render."""
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(text) if name is not None]
    except ValueError:
        fields = None
    if fields is not None and all(name in variables and not spec and not conv for name, spec, conv in fields):
        return text
    return text.replace("{", "{{").replace("}", "}}")


def build_candidates(target: PromptTemplate, phrasings: Sequence[Phrasing], traces: Sequence[Trace],
                     ks: Sequence[int], train_set: TestSetConfig) -> list[Candidate]:
    """The target as it is, then every phrasing x k (k capped at the demonstrations there are) as a few-shot
    entry holding all the demonstrations, each rendered through the phrasing's own question template."""
    candidates = [Candidate(AS_IS, None, _template(target, {"name": AS_IS, "version": 1, "score": None,
                                                           "lineage": {"parents": [target.ref], "method": "as_is"}},
                                                  "target"))]
    ks = sorted({min(k, len(traces)) for k in ks})
    for phrasing in phrasings:
        question = PromptTemplate(name=phrasing.slug, kind="zero_shot", template=phrasing.template)
        demos = [{"input": case_variables(question, trace.case, train_set, "train_set"), "output": trace.answer}
                 for trace in traces]
        for k in ks:
            name = f"{len(candidates):02d}-{phrasing.slug}-k{k}"
            fields = {"name": name, "version": 1, "kind": "few_shot", "system": phrasing.system,
                      "instruction": phrasing.instruction, "template": phrasing.template, "demonstrations": demos,
                      "k": k, "score": None,
                      "description": f"{phrasing.source} with {k} of {len(demos)} bootstrapped demonstrations",
                      "lineage": {"parents": list(phrasing.parents), "method": METHOD}}
            candidates.append(Candidate(name, phrasing, _template(target, fields, phrasing.field)))
    return candidates


def _template(target: PromptTemplate, fields: dict[str, Any], field: str) -> PromptTemplate:
    try:
        return PromptTemplate.model_validate(target.model_dump() | fields)
    except ValidationError as exc:
        raise TemplateError(format_errors(exc, f"field '{field}'")) from None


# ---------------------------------------------------------------------------------------------
# 3. Score, 4. save
# ---------------------------------------------------------------------------------------------


def score_candidates(recipe: OptimizeRecipe, client: AsyncLLMClient, candidates: Sequence[Candidate], out: Path,
                     progress: bool = True) -> dict[str, dict]:
    """Every candidate on the dev split through the harness: written as a library (candidates.yaml) and evaluated
    as its variants (dev/: cases.jsonl, summary.json, variants.csv, accuracy.png); their summary rows by name."""
    path = out / "candidates.yaml"
    path.unlink(missing_ok=True)
    for candidate in candidates:
        save_version(candidate.template, path, lineage=candidate.template.lineage)
    student = recipe.student
    variants = [VariantConfig(name=c.name, prompt=c.name, model=student.model, temperature=student.temperature,
                              max_tokens=student.max_tokens) for c in candidates]
    summary = evaluate(_as_eval(recipe, "dev_set", variants, library=str(path)), client, out / "dev", progress)
    return {row["variant"]: row for row in summary["variants"]}


def save_best(recipe: OptimizeRecipe, out: Path, target: PromptTemplate, best: Candidate, accuracy: float,
              teacher: str, details: dict[str, Any]) -> tuple[PromptTemplate, Path]:
    """Append `best` as the next version of the target's name to `save_to` (begun as a copy of the recipe's library
    when missing), its score the dev accuracy and its parents the entries it came from (`teacher`, NAME@VERSION,
    when it holds demonstrations); returns the saved entry and the file."""
    path = (resolve_path(recipe.save_to) or Path(recipe.save_to)) if recipe.save_to else out / "library.yaml"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(resolve_path(recipe.library), path)
    parents = list(dict.fromkeys([*best.phrasing.parents, *([teacher] if best.template.demonstrations else [])]))
    entry = best.template.model_copy(update={
        "name": target.name, "description": f"{METHOD} from {target.ref}: {best.template.description}"})
    saved = save_version(entry, path, score=round(accuracy, 4),
                         lineage=Lineage(parents=parents, method=METHOD, details=details))
    return saved, path


def optimize(recipe: OptimizeRecipe, client: AsyncLLMClient, library: PromptLibrary, out: Path,
             progress: bool = True) -> dict:
    """Bootstrap, build the candidates, score them, save the best; writes bootstrap.jsonl, candidates.yaml, dev/,
    candidates.csv and summary.json under `out` and returns the summary."""
    from workloads.common.reporting import write_csv

    out.mkdir(parents=True, exist_ok=True)
    target, teacher = library.get(recipe.target), library.get(recipe.teacher.prompt)
    teacher_model = recipe.teacher.model or recipe.endpoint.model
    student_model = recipe.student.model or recipe.endpoint.model
    scorers = build_scorers(_as_eval(recipe, "train_set", [_teacher_variant(recipe)]), client)
    with (out / "bootstrap.jsonl").open("w") as sink:
        traces, tried = bootstrap(client, library, recipe, scorers, sink)
    _say(progress, f"{len(traces)} demonstrations bootstrapped from {tried} train cases ({teacher.ref} on "
                   f"{teacher_model})")
    rewrites, reply = [], None
    if recipe.proposer is not None:
        with _proposer_client(recipe, client) as proposer_client:
            rewrites, reply = propose_rewrites(proposer_client, recipe.proposer, target.instruction)
        _say(progress, f"proposer: {len(rewrites)} usable rewrites of {recipe.proposer.n} asked for {rewrites}")
    candidates = build_candidates(target, phrasings(recipe, library, target, rewrites), traces, recipe.k,
                                  recipe.train_set)
    _say(progress, f"scoring {len(candidates) - 1} candidates and {target.ref} as it is on the dev split")
    scored = score_candidates(recipe, client, candidates, out, progress)

    rows = [_row(c, scored[c.name], target) for c in candidates]
    baseline, tried_rows = rows[0], rows[1:]
    best_row = max(tried_rows, key=lambda r: (r["accuracy"], -r["prompt_tokens"]))  # ties: the shorter prompt
    best = next(c for c in candidates if c.name == best_row["candidate"])
    details = {"teacher": f"{teacher.ref} on {teacher_model}",
               "student_model": student_model, "demos_kept": len(traces), "train_cases_tried": tried,
               "candidates_tried": len(tried_rows), "phrasing": best_row["source"], "k": best_row["k"],
               "dev_set": recipe.dev_set.path, "dev_cases": best_row["n"], "baseline_accuracy": baseline["accuracy"],
               "proposer": (recipe.proposer.model or recipe.endpoint.model) if recipe.proposer else None}
    saved, saved_to = None, None
    if best_row["accuracy"] > baseline["accuracy"]:
        saved, saved_to = save_best(recipe, out, target, best, best_row["accuracy"], teacher.ref, details)
        if (run := current_recording()) is not None:  # an `llmc optimize` run: the new version in MLflow's registry too
            registry.register_prompt(run.uri, saved, saved_to, run)
    stats = client.stats
    summary = {
        "best_candidate": best.name, "best_source": best_row["source"], "best_k": best_row["k"],
        "best_dev_accuracy": best_row["accuracy"], "best_dev_ci95": [best_row["ci95_low"], best_row["ci95_high"]],
        "best_saved_as": saved.ref if saved else None, "best_library": str(saved_to) if saved_to else None,
        "target": target.ref, "baseline_dev_accuracy": baseline["accuracy"],
        "improvement": round(best_row["accuracy"] - baseline["accuracy"], 4), "scorer": next(iter(scorers)),
        **{key: details[key] for key in ("teacher", "student_model", "train_cases_tried", "demos_kept",
                                         "candidates_tried", "dev_set", "dev_cases")},
        "demonstrations": [{"case": t.case, "answer": t.answer} for t in traces],
        "proposals": rewrites, "proposer_reply": reply,
        "requests": stats.requests, "http_requests": stats.http_requests, "retries": stats.retries,
        "cache_hits": stats.cache_hits, "failures": stats.failures,
        "prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
        "candidates": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_csv(rows, out / "candidates.csv")
    return summary


def _row(candidate: Candidate, scored: dict, target: PromptTemplate) -> dict:
    """A candidate's line in the table: where its phrasing came from, its k, its dev scores and its text."""
    template = candidate.template
    k = template.k if template.k is not None else len(template.demonstrations)
    means = {key: value for key, value in scored.items() if key.startswith("mean_") and key != "mean_latency_s"}
    return {"candidate": candidate.name,
            "source": candidate.phrasing.source if candidate.phrasing else f"{target.ref} as it is", "k": k,
            **{key: scored[key] for key in ("n", "accuracy", "ci95_low", "ci95_high")}, **means,
            **{key: scored[key] for key in ("prompt_tokens", "completion_tokens", "failures")},
            "instruction": template.instruction, "template": template.template}


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def check_recipe(recipe: OptimizeRecipe) -> PromptLibrary:
    """What can be checked before any request: every entry exists, the target is few_shot (with an instruction to
    rewrite if there is a proposer), and the teacher and every candidate phrasing render (a train case as the
    demonstration, the first dev case as the question)."""
    try:
        library = load_library(resolve_path(recipe.library))
    except TemplateError as exc:
        raise RecipeError(f"field 'library': {exc}") from exc
    target = _entry(library, recipe.target, "target")
    if target.kind != "few_shot":
        few_shot = sorted({p.name for p in library.prompts if p.kind == "few_shot"})
        raise RecipeError(f"field 'target': {target.ref} is kind {target.kind}; the target is a few_shot entry "
                          f"(this library's: {', '.join(few_shot) or 'none'})")
    if recipe.proposer is not None and not target.instruction:
        raise RecipeError(f"field 'proposer': the target {target.ref} has no instruction to rewrite; target an "
                          "entry with one, or set proposer: null")
    teacher = _entry(library, recipe.teacher.prompt, "teacher.prompt")
    train, dev = _first_case(recipe.train_set, "train_set"), _first_case(recipe.dev_set, "dev_set")
    _render(teacher, train, recipe.train_set, "teacher.prompt", "train_set")
    demo = [Trace(train, str(train[recipe.train_set.reference_field]))]
    try:
        candidates = build_candidates(target, phrasings(recipe, library, target), demo, [0, 1], recipe.train_set)
    except TemplateError as exc:
        raise RecipeError(str(exc)) from exc
    for candidate in candidates:
        _render(candidate.template, dev, recipe.dev_set, candidate.phrasing.field if candidate.phrasing else "target",
                "dev_set")
    return library


def run(recipe: OptimizeRecipe, output_dir: str | Path | None = None, address: str | None = None,
        endpoint: Endpoint | None = None, show: bool = True) -> dict:
    """`llmc optimize`: check the recipe, open the endpoint (our server started if the recipe names none, unless
    one is handed in), optimize, save; `show` prints progress and the table."""
    from workloads.common.reporting import save_recipe

    library = check_recipe(recipe)
    out = recipe.output_dir(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, out)
    with opened_client(recipe.endpoint, address, endpoint) as client:
        summary = optimize(recipe, client, library, out, progress=show)
    if show:
        print_table(summary, out)
    return summary


def print_table(summary: dict, out: Path) -> None:
    """The candidates, best first, and what was saved."""
    from workloads.common.reporting import print_rows

    rows = sorted(summary["candidates"], key=lambda r: -r["accuracy"])
    saved = (f"saved as {summary['best_saved_as']} in {summary['best_library']}" if summary["best_saved_as"]
             else "nothing saved: no candidate beat the target as it is")
    print_rows(f"candidates for {summary['target']} on {summary['dev_cases']} dev cases ({summary['scorer']})",
               ["candidate (phrasing, k)", "accuracy", "95% CI", "prompt tokens", "failures"],
               [[row["candidate"], f"{row['accuracy']:.3f}", f"{row['ci95_low']:.2f}-{row['ci95_high']:.2f}",
                 str(row["prompt_tokens"]), str(row["failures"])] for row in rows],
               f"best: {summary['best_candidate']} ({summary['best_dev_accuracy']:.3f}) against {summary['target']} "
               f"as it is ({summary['baseline_dev_accuracy']:.3f}); {saved}; {summary['demos_kept']} demonstrations "
               f"from {summary['train_cases_tried']} train cases ({summary['teacher']}); {summary['requests']} "
               f"requests; results in {out}", no_wrap=True)


def _teacher_variant(recipe: OptimizeRecipe) -> VariantConfig:
    teacher = recipe.teacher
    return VariantConfig(name="teacher", prompt=teacher.prompt, model=teacher.model,
                         temperature=teacher.temperature, max_tokens=teacher.max_tokens)


def _as_eval(recipe: OptimizeRecipe, split: str, variants: list[VariantConfig],
             library: str | None = None) -> EvalRecipe:
    return EvalRecipe(endpoint=recipe.endpoint, test_set=getattr(recipe, split), library=library or recipe.library,
                      variants=variants, scorers=recipe.scorers, chunk_size=recipe.chunk_size)


@contextlib.contextmanager
def _proposer_client(recipe: OptimizeRecipe, client: AsyncLLMClient) -> Iterator[AsyncLLMClient]:
    """The run's client, or one for the proposer's own endpoint."""
    config = recipe.proposer.endpoint
    if config is None:
        yield client
        return
    with opened_client(config) as own:
        yield own


def _entry(library: PromptLibrary, ref: str, field: str) -> PromptTemplate:
    try:
        return library.get(ref)
    except TemplateError as exc:
        raise RecipeError(f"field '{field}': {exc}") from exc


def _first_case(test_set: TestSetConfig, split: str) -> dict:
    case = next(read_cases(test_set, split=split), None)
    if case is None:
        raise RecipeError(f"field '{split}.path': {test_set.path} has no cases")
    return case


def _render(template: PromptTemplate, case: dict, test_set: TestSetConfig, field: str, split: str) -> None:
    try:
        template.render_messages(case_variables(template, case, test_set, split))
    except TemplateError as exc:
        raise RecipeError(f"field '{field}': {exc}") from exc


def _say(show: bool, text: str) -> None:
    if show:
        print(f"[llmc] {text}", flush=True)

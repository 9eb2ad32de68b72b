"""`llmc search RECIPE`: Ray Tune over prompt variants, each trial scored on the dev split through the endpoint.

Multi-fidelity: a trial reports its accuracy after every chunk of dev cases, and ASHA (the number of cases scored is
its resource) stops the weak ones after a few chunks, as HbBoPs does with Hyperband over validation-set size. Only
the winner (the best trial that scored every dev case) is then scored on the test split.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workloads.prompting.endpoint import Endpoint, open_endpoint, opened_client
from workloads.prompting.harness import build_scorers, check_recipe, count_cases, evaluate, iter_variant, read_cases
from workloads.prompting.recipe import EvalRecipe, PromptSearchRecipe, VariantConfig
from workloads.prompting.templates import PromptLibrary

if TYPE_CHECKING:  # cluster.tune imports Ray: the driver imports it when it runs a search
    from cluster.tune import TrialOutcome

METRIC = "accuracy"
RESOURCE = "cases"


def variants_of(recipe: PromptSearchRecipe, library: PromptLibrary) -> list[VariantConfig]:
    """Every distinct variant of the grid: k and demo_seed only vary few-shot prompts (and demo_seed only k > 0)."""
    space, seen, variants = recipe.space, set(), []
    for prompt in space.prompt:
        few_shot = library.get(prompt).kind == "few_shot"
        for k in space.k if few_shot else [None]:
            for seed in space.demo_seed if few_shot and k else [None]:
                for temperature, model, api in itertools.product(space.temperature, space.model, space.api):
                    key = (prompt, k, seed, temperature, model, api)
                    if key in seen:
                        continue
                    seen.add(key)
                    label = "|".join(str(part) for part in (prompt, f"k={k}" if k is not None else "",
                                                            f"seed={seed}" if seed is not None else "",
                                                            f"t={temperature:g}", model or recipe.endpoint.model,
                                                            api if api != "chat" else "") if part)
                    variants.append(VariantConfig(name=label, prompt=prompt, k=k, demo_seed=seed,
                                                  temperature=temperature, model=model, api=api,
                                                  max_tokens=space.max_tokens))
    return variants


def _as_eval(recipe: PromptSearchRecipe, split: str, variants: list[VariantConfig]) -> EvalRecipe:
    return EvalRecipe(endpoint=recipe.endpoint, test_set=getattr(recipe, split), library=recipe.library,
                      variants=variants, scorers=recipe.scorers, extraction=recipe.extraction,
                      chunk_size=recipe.search.chunk_size)


def prompt_trial(config: dict[str, Any], report, *, recipe: PromptSearchRecipe, endpoint: Endpoint) -> None:
    """One Tune trial: its variant on the dev split, a report after every chunk (plain Python; no Ray here)."""
    from workloads.prompting.templates import load_library

    variant = VariantConfig(**config["variant"])
    as_eval = _as_eval(recipe, "dev_set", [variant])
    with opened_client(recipe.endpoint, endpoint=endpoint) as client:
        library = load_library(recipe.library)
        scorers = build_scorers(as_eval, client)
        for _, tally in iter_variant(client, library, variant, read_cases(recipe.dev_set), scorers, as_eval):
            report({METRIC: tally.accuracy, RESOURCE: tally.n, "passed": tally.passed,
                    "requests": client.stats.http_requests, "tokens": tally.prompt_tokens + tally.completion_tokens})


def _trial_recipe(recipe: PromptSearchRecipe, at_once: int) -> PromptSearchRecipe:
    """The recipe a trial runs: `endpoint.max_concurrency` is the search's budget, shared by the trials that run at
    once, so more trials at once do not multiply the load on the endpoint."""
    share = max(1, recipe.endpoint.max_concurrency // at_once)
    return recipe.model_copy(update={"endpoint": recipe.endpoint.model_copy(update={"max_concurrency": share})})


def run(recipe: PromptSearchRecipe, output_dir: str | Path | None = None, address: str | None = None,
        endpoint: Endpoint | None = None, show: bool = True, variants: list[VariantConfig] | None = None) -> dict:
    """The search, then the winner on the test split; writes summary.json, trials.csv, search.png. An open
    `endpoint` is used instead of the recipe's; `variants` instead of the recipe's grid; `show` prints the plan
    and the trials table."""
    from cluster.runtime import connect
    from cluster.tune import grid, run_search
    from workloads.common.reporting import save_recipe, write_csv

    out = recipe.output_dir(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, out)
    library = check_recipe(_as_eval(recipe, "dev_set", [VariantConfig(name=p, prompt=p) for p in recipe.space.prompt]))
    variants = variants or variants_of(recipe, library)
    check_recipe(_as_eval(recipe, "dev_set", variants))  # every point of the grid renders, before any trial starts
    dev_cases = count_cases(recipe.dev_set)
    stopping = (f"ASHA stops weak ones every {recipe.search.chunk_size} cases" if recipe.search.scheduler == "asha"
                else "no early stopping")
    if show:
        print(f"[llmc] {len(variants)} prompt variants x {dev_cases} dev cases; {stopping}", flush=True)
    with contextlib.nullcontext(endpoint) if endpoint else open_endpoint(recipe.endpoint, address) as endpoint:
        where = connect(address)
        if show:
            print(f"[llmc] {where}", flush=True)
        asha = recipe.search.scheduler == "asha"
        at_once = min(recipe.search.max_concurrent_trials, len(variants))
        started = time.perf_counter()
        outcomes = run_search(
            functools.partial(prompt_trial, recipe=_trial_recipe(recipe, at_once), endpoint=endpoint),
            grid({"variant": [v.model_dump() for v in variants]}), name=recipe.name,
            storage_path=str(out / "tune"), metric=METRIC, mode="max", time_attr=RESOURCE if asha else None,
            max_t=dev_cases, grace_period=recipe.search.grace_period,
            reduction_factor=recipe.search.reduction_factor,
            max_concurrent_trials=at_once, cpus_per_trial=recipe.search.cpus_per_trial, reuse_actors=True)
        trials_s = time.perf_counter() - started
        trials = [_trial_row(o) for o in outcomes]
        failed = [t for t in trials if t["error"]]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(trials)} trials failed; first: {failed[0]['error']}")
        complete = [t for t in trials if t[RESOURCE] == dev_cases]
        best = max(complete, key=lambda t: (t[METRIC], -t["tokens"]))
        winner = VariantConfig(**{**best["config"], "name": best["variant"]})
        started = time.perf_counter()
        with opened_client(recipe.endpoint, endpoint=endpoint) as test_client:
            tested = evaluate(_as_eval(recipe, "test_set", [winner]), test_client, out / "winner", progress=False)
        test_s = time.perf_counter() - started
    row = tested["variants"][0]
    summary = {"best_variant": best["variant"], "best_config": best["config"], "best_dev_accuracy": best[METRIC],
               "best_test_accuracy": row["accuracy"], "best_test_ci95": [row["ci95_low"], row["ci95_high"]],
               "variants": len(variants), "dev_cases": dev_cases, "test_cases": tested["cases"],
               "stopped_early": sum(t["stopped_early"] for t in trials),
               "dev_requests": sum(t["requests"] for t in trials),
               "wall_s": {"trials": round(trials_s, 2), "test": round(test_s, 2)}, "trials": trials}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_csv([{k: v for k, v in t.items() if k not in ("config", "curve")} for t in trials], out / "trials.csv")
    plot_trials(trials, out / "search.png", dev_cases)
    if show:
        _print_trials(summary, out)
    return summary


def _trial_row(outcome: TrialOutcome) -> dict:
    last = outcome.last
    variant = outcome.config.get("variant", {})
    return {"variant": variant.get("name", ""), "config": {k: v for k, v in variant.items() if k != "name"},
            METRIC: round(float(last.get(METRIC, 0.0)), 4), RESOURCE: int(last.get(RESOURCE, 0)),
            "stopped_early": outcome.stopped_early, "requests": int(last.get("requests", 0)),
            "tokens": int(last.get("tokens", 0)), "error": outcome.error,
            "curve": [(int(r.get(RESOURCE, 0)), float(r.get(METRIC, 0.0))) for r in outcome.reports]}


def plot_trials(trials: list[dict], path: Path, dev_cases: int) -> Path:
    """Accuracy against dev cases scored, one line per trial; a cross where ASHA stopped one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for trial in sorted(trials, key=lambda t: -t[METRIC]):
        xs, ys = zip(*trial["curve"], strict=True) if trial["curve"] else ((), ())
        line, = ax.plot(xs, ys, marker="o", markersize=3, linewidth=1, label=trial["variant"][:48])
        if trial["stopped_early"] and xs:
            ax.plot(xs[-1], ys[-1], marker="x", markersize=9, color=line.get_color())
    ax.set_xlabel("dev cases scored (ASHA's resource)")
    ax.set_ylabel("accuracy so far")
    ax.set_xlim(0, dev_cases * 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("prompt search: x = stopped early", fontsize=9)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _print_trials(summary: dict, out: Path) -> None:
    from workloads.common.reporting import print_rows

    trials = sorted(summary["trials"], key=lambda t: (-t[RESOURCE], -t[METRIC]))
    print_rows(f"prompt search: {summary['variants']} variants, {summary['dev_cases']} dev cases",
               ["variant", "dev accuracy", "cases", "stopped"],
               [[t["variant"], f"{t[METRIC]:.3f}", str(t[RESOURCE]), "early" if t["stopped_early"] else ""]
                for t in trials],
               f"best: {summary['best_variant']}: dev {summary['best_dev_accuracy']:.3f}, test "
               f"{summary['best_test_accuracy']:.3f} ({summary['test_cases']} cases); {summary['stopped_early']} "
               f"trials stopped early, {summary['dev_requests']} dev requests; results in {out}")

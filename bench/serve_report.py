"""The Markdown table, the "Reading" notes and the README's sentences for `bench.serve_bench` results.

Everything here is computed from a results file (`serve.json`); a file older than the stock Ray Serve LLM
row reads as "not measured in this run" there. `python -m bench.serve_report [RESULTS_DIR]` rewrites
`serve.md` from `serve.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SIDES = {  # key in a run -> column title
    "endpoint": "llmc endpoint",
    "stock_app": "stock Ray Serve LLM app",
    "sequential_generate": "(a) sequential generate",
    "inprocess_vllm": "(b) in-process vLLM",
}


def _cell(stats: dict[str, Any] | None) -> str:
    return "-" if not stats else f"{stats['tokens_per_s']} ({stats['p50_s']} / {stats['p99_s']})"


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    return a["tokens_per_s"] / b["tokens_per_s"] if a and b and b["tokens_per_s"] else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _levels(run: dict[str, Any]) -> list[str]:
    sides = [run.get(k) for k in ("endpoint", "stock_app", "inprocess_vllm")]
    return sorted({c for side in sides if side and "error" not in side for c in side}, key=int)


def _at(run: dict[str, Any], side: str, level: str) -> dict[str, Any] | None:
    """A side's stats at a concurrency level (sequential generate is one figure for every level)."""
    stats = run.get(side)
    if not stats or "error" in stats:
        return None
    return stats if side == "sequential_generate" else stats.get(level)


def _label(run: dict[str, Any]) -> str:
    return f"{run['model']} ({run['shape']['parameters'] / 1e6:.1f}M)"


def table(results: dict[str, Any]) -> str:
    """One row per model and concurrency: tokens/s (p50 / p99 s) of every side, and the ratios."""
    header = ["model", "concurrency", *SIDES.values(), "llmc x stock", "llmc x (a)", "llmc x (b)", "stock x (b)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in results["runs"]:
        for level in _levels(run):
            cells = {side: _at(run, side, level) for side in SIDES}
            ours, stock = cells["endpoint"], cells["stock_app"]
            ratios = [_ratio(ours, stock), _ratio(ours, cells["sequential_generate"]),
                      _ratio(ours, cells["inprocess_vllm"]), _ratio(stock, cells["inprocess_vllm"])]
            lines.append("| " + " | ".join([_label(run), level, *(_cell(cells[s]) for s in SIDES),
                                            *(_fmt(r) for r in ratios)]) + " |")
    return "\n".join(lines)


def notes(results: dict[str, Any]) -> str:
    """The reading of a run, computed from its results alone: ours against the stock app and the engine."""
    meta, lines = results["meta"], []
    targets = meta.get("targets_at_32", {})
    top = str(max(int(c) for c in meta["requests_per_level"]))
    in_process, size = {}, {run["model"]: run["shape"]["parameters"] for run in results["runs"]}
    for run in results["runs"]:
        ours, stock = _at(run, "endpoint", top), _at(run, "stock_app", top)
        engine, generate = _at(run, "inprocess_vllm", top), _at(run, "sequential_generate", top)
        if ours and engine:
            in_process[run["model"]] = _ratio(ours, engine)
        parts = [f"- {_label(run)}, concurrency {top}:"]
        if ours:
            parts.append(f"the llmc endpoint {ours['tokens_per_s']:.0f} tokens/s (p50 {ours['p50_s']} s)")
        if stock:
            parts.append(f"the stock Ray Serve LLM app (`build_openai_app`, same LLMConfig) "
                         f"{stock['tokens_per_s']:.0f} (p50 {stock['p50_s']} s)")
        if engine:
            parts.append(f"in-process `vllm.LLM.generate` {engine['tokens_per_s']:.0f}")
        line = parts[0] + " " + ", ".join(parts[1:]) + "."
        if ours and stock:
            line += (f" With our ingress (request checks, metrics and API-key middleware; no key set and the "
                     f"response cache off here) the endpoint keeps {_ratio(ours, stock):.2f}x the stock app's "
                     "throughput")
            line += f"; the stock app itself reaches {_ratio(stock, engine):.2f}x the engine." if engine else "."
            per_level = ", ".join(f"{_fmt(_ratio(_at(run, 'endpoint', c), _at(run, 'stock_app', c)))} at {c}"
                                  for c in _levels(run))
            line += f" llmc / stock by concurrency: {per_level}."
        elif ours and "stock_app" not in run:
            line += " The stock Ray Serve LLM app: not measured in this run."
        if ours and engine and generate:
            line += (f" Against the targets: {_ratio(ours, generate):.2f}x sequential generate (target "
                     f"{targets.get('vs_sequential_generate', '-')}x), {_ratio(ours, engine):.2f}x in-process vLLM "
                     f"(target {targets.get('vs_inprocess_vllm', '-')}x).")
        failed = [f"{SIDES[k]} failed ({run[k]['error'][:200]})" for k in SIDES if "error" in (run.get(k) or {})]
        lines.append(line + (" " + "; ".join(failed) + "." if failed else ""))
    if len(in_process) > 1:
        low, high = min(in_process, key=in_process.get), max(in_process, key=in_process.get)
        line = (f"- The endpoint keeps {in_process[low]:.2f}x of in-process vLLM on {low} and {in_process[high]:.2f}x "
                f"on {high}")
        if size[low] < size[high]:
            line += (": the smaller the model, the less decode work per request, and the more of each request is "
                     "HTTP, proxy and ingress (the load generator shares the same cores)")
        lines.append(line + ".")
    return "\n".join(lines)


def _requests(meta: dict[str, Any]) -> str:
    """The requests each side was sent, where the results say (files before `--model` lack the generate count)."""
    if "sequential_generate_requests" not in meta:
        return ""
    levels = ", ".join(f"{n} at concurrency {c}" for c, n in meta["requests_per_level"].items())
    return (f" requests: {levels}, {meta['sequential_generate_requests']} for (a), after "
            f"{meta['warmup_requests']} warm-up requests;")


def write_markdown(results: dict[str, Any], path: Path) -> None:
    meta = results["meta"]
    text = f"""# Serving benchmark

`python -m bench.serve_bench`: {meta['machine']};{_requests(meta)} {meta['new_tokens_per_request']} new tokens per \
request (greedy,
`ignore_eos`); output tokens/s (p50 / p99 latency in s). One replica on embedded Ray for each served side: the
llmc endpoint (`llmc serve`, response cache off, no API key) and the stock Ray Serve LLM app
(`ray.serve.llm.build_openai_app` on the same LLMConfig: same engine, placement and deployment settings, Ray
Serve LLM's own ingress). (a) one `model.generate` at a time; (b) in-process `vllm.LLM.generate`, the prompts fed
`concurrency` at a time. Ratios divide tokens/s. Setting: {meta['note']}.

{table(results)}

Targets at concurrency 32: at least {meta['targets_at_32']['vs_sequential_generate']}x (a) and \
{meta['targets_at_32']['vs_inprocess_vllm']}x (b).

## Reading

{notes(results)}
"""
    path.write_text(text)


def readme_sentences(results: dict[str, Any], source: str) -> str:
    """What the docs say about serving, from the `serve.json` at `source`. A file that records its sizes (written
    since `--model`) also gets them and the ratio to the sequential `generate` loop."""
    meta = results["meta"]
    top = str(max(int(c) for c in meta["requests_per_level"]))
    sized = "sequential_generate_requests" in meta
    parts, missing = [], False
    for run in results["runs"]:
        ours, stock = _at(run, "endpoint", top), _at(run, "stock_app", top)
        engine, generate = _at(run, "inprocess_vllm", top), _at(run, "sequential_generate", top)
        if not ours:
            continue
        text = f"{_label(run)} {ours['tokens_per_s']:.0f} tokens/s ({_fmt(_ratio(ours, engine))}x in-process vLLM"
        if stock:
            text += f", {_fmt(_ratio(ours, stock))}x the stock Ray Serve LLM app"
        else:
            missing = True
        if sized:
            text += f", {_fmt(_ratio(ours, generate))}x a sequential `generate` loop"
        parts.append(text + ")")
    size = (f" ({meta['requests_per_level'][top]} requests of {meta['new_tokens_per_request']} new tokens; "
            f"{meta['sequential_generate_requests']} for the `generate` loop)" if sized else "")
    sentence = f"Serving (`{source}`), at concurrency {top}{size}, the endpoint: " + "; ".join(parts) + "."
    if missing:
        sentence += (" The stock Ray Serve LLM app (`build_openai_app`, same engine settings) is not in that run "
                     "(`python -m bench.serve_bench` measures it).")
    return sentence


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.serve_report [RESULTS_DIR]`: rewrite serve.md from serve.json."""
    import json
    import sys

    args = argv if argv is not None else sys.argv[1:]
    folder = Path(args[0]) if args else Path(__file__).parent / "results"
    write_markdown(json.loads((folder / "serve.json").read_text()), folder / "serve.md")
    print(f"wrote {folder / 'serve.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Driver memory against dataset size (issue 25): the driver path against the streaming path (`data.streaming`).

`python -m bench.data_bench [--rows 20000 400000]` generates alpaca rows of the bundled kind (N of them, in one JSONL
file), then runs `llmc finetune workloads/configs/tiny-lora.yaml` on them for a few steps through each path, one fresh
process per run with its own embedded Ray, and records the driver process's own peak RSS (`ru_maxrss` of that
process, read as it exits: Ray's processes are not in it) and its wall time. Prints a table of the peaks and the
ratio largest / smallest per path, and writes `bench/results/data.{json,md}`. Measured in one run, on a shared
machine: read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

from workloads.common.paths import REPO_ROOT
from workloads.data.formats import write_jsonl

RESULTS = REPO_ROOT / "bench" / "results"
WORK_DIR = REPO_ROOT / "runs" / "bench-data"  # data, run outputs and logs (gitignored)
RECIPE = "workloads/configs/tiny-lora.yaml"
STEPS = 3
COMMON = (f"train.max_steps={STEPS}", "train.eval_every=1000", "train.checkpoint_every=1000", "data.eval_path=null",
          "data.eval_fraction=0.005", "deepspeed.enabled=false", "run.merge_adapter=false")
PATHS = {"driver": ("data.streaming.enabled=false",), "streaming": ("data.streaming.enabled=true",)}
CHILD = "--child"


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    pairs = ((rng.randint(10, 99), rng.randint(10, 99)) for _ in range(n))
    return [{"instruction": f"What is {a} + {b}?", "input": "", "output": f"The sum of {a} and {b} is {a + b}."}
            for a, b in pairs]


def _child(argv: list[str]) -> int:
    """`llmc finetune ARGV` in this process, then this process's peak RSS (bytes) on the last line."""
    from workloads.cli import main

    code = main(argv)
    print(f"PEAK_RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}", flush=True)
    return code


def _run(path: str, data: Path, rows: int) -> dict:
    out = WORK_DIR / f"{path}-{rows}"
    argv = ["finetune", RECIPE, "--output-dir", str(out), "--overwrite", "--set", f"data.path={data}",
            "--set", f"run.name=bench-data-{path}-{rows}"]
    for override in (*COMMON, *PATHS[path]):
        argv += ["--set", override]
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench.data_bench", CHILD, *argv], cwd=REPO_ROOT, text=True,
                          capture_output=True,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})  # its own embedded Ray
    wall = time.perf_counter() - started
    (WORK_DIR / f"{path}-{rows}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        said = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"{path} with {rows} rows failed ({proc.returncode}):\n{said}")
    peak = int(next(line for line in proc.stdout.splitlines()[::-1] if line.startswith("PEAK_RSS")).split()[1])
    return {"path": path, "rows": rows, "driver_peak_rss_mib": round(peak / 2**20, 1), "wall_s": round(wall, 1)}


def render(results: dict) -> str:
    lines = [f"Driver peak RSS of `llmc finetune` ({RECIPE}, {STEPS} steps, LoRA, DDP 2 x 1) against generated rows, "
             f"{results['machine']}:", "", "| path | " + " | ".join(f"{n:,} rows" for n in results["rows"])
             + " | ratio |", "|---|" + "---|" * (len(results["rows"]) + 1)]
    for path in PATHS:
        runs = sorted((r for r in results["runs"] if r["path"] == path), key=lambda r: r["rows"])
        cells = [f"{r['driver_peak_rss_mib']:,.0f} MiB ({r['wall_s']:.0f} s)" for r in runs]
        ratio = runs[-1]["driver_peak_rss_mib"] / runs[0]["driver_peak_rss_mib"]
        lines.append(f"| {path} | {' | '.join(cells)} | {ratio:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        return _child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 400_000])
    args = parser.parse_args()
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "rows": args.rows, "steps": STEPS,
               "runs": []}
    for rows in args.rows:
        data = write_jsonl(_rows(rows), WORK_DIR / f"rows-{rows}.jsonl")
        for path in PATHS:
            results["runs"].append(_run(path, data, rows))
            print(json.dumps(results["runs"][-1]), flush=True)
            (WORK_DIR / "partial.json").write_text(json.dumps(results, indent=2))  # what a stopped bench measured
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "data.md").write_text(render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

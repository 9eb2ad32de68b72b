"""Fine-tuning benchmark (issues 2 and 10): platform overhead, method throughput and peak memory, in one run.

`python -m bench.finetune_bench` (or `make bench`) measures a real model by default (`--model smollm2-135m`: its
shipped LoRA layout against a plain single-process loop, `bench.finetune_real`). `--model tiny` runs the layout
study on the tiny-model factory's models, sequentially on this machine:

1. Peak memory of full / LoRA / QLoRA (NF4) on a 85M-parameter Llama, one fresh subprocess per
   method: load through `workloads.models.loading.load_model` / `attach_lora`, then a few plain AdamW steps.
2. Step time of a plain single-process torch loop (2 threads) on that model, global batch 8 x 64
   tokens, against the real platform path (`workloads.finetune.run`: Ray Train + DDP or DeepSpeed)
   in every layout of `LAYOUTS` (the shipped recipes' layouts among them, named as such), at the shipped
   recipe's report / eval / checkpoint cadence: the median steady step (the run's own `step_seconds`) and,
   beside it, the wall time per step over one whole cadence period (reports, eval and checkpoint included).
   Start-up (wall minus the steps) is reported separately. A plain-loop run comes before the first platform
   run and after every one, to show how much the shared machine drifted meanwhile.
3. ZeRO-2 on 2 workers x 1 CPU (the shipped LoRA layout) with other optimizers and thread settings
   (`VARIANTS`), each step split into its phases by DeepSpeed's own timers and comms logger.
4. Tokens/s of full vs LoRA vs QLoRA on the tiny model, same steps, through the platform path.

Results: a table on stdout, `bench/results/finetune.{json,md,png}`, and the README's benchmark block
(`scripts/readme_numbers.py`). `--only ROWS` or `--quick` runs a part (or the tiny model) into
`runs/bench-finetune/partial/` instead, for checking a row. Timings are printed and recorded, never
asserted: the machine is shared and the numbers are noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from bench._instrument import instrumented_worker
from bench.finetune_report import (
    DISTURBED,
    auto_notes,
    layout_label,
    plot,
    print_tables,
    profile_summary,
    shipped_layouts,
    write_markdown,
)
from workloads.common.paths import REPO_ROOT
from workloads.finetune.recipe import FinetuneRecipe
from workloads.kinds import load_recipe
from workloads.models.recipe import TinyModelConfig

RESULTS = REPO_ROOT / "bench" / "results"
WORK_DIR = REPO_ROOT / "runs" / "bench-finetune"  # run outputs and logs (gitignored)
PARTIAL = WORK_DIR / "partial"  # where --only / --quick runs write their results
BASE_RECIPE = "workloads/configs/tiny-lora.yaml"
# A 76M-class model: 12 layers x 768, fp32, built by the tiny-model factory.
BIG_MODEL = TinyModelConfig(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=2048, pretrain_steps=0)
GLOBAL_BATCH, SEQ_LEN, THREADS = 8, 64, 2
PROBE_PREFIX = "PROBE_RESULT "


@dataclass(frozen=True)
class Layout:
    """One way the platform can run the same global batch."""

    name: str
    deepspeed: bool
    stage: int
    workers: int
    cpus_per_worker: int

    @property
    def label(self) -> str:
        return layout_label(asdict(self))

    @property
    def key(self) -> tuple[bool, int, int, int]:
        return self.deepspeed, self.stage if self.deepspeed else 0, self.workers, self.cpus_per_worker


LAYOUTS = [
    Layout("ray-1x2", False, 0, 1, 2),  # one worker: Strategy wraps nothing in DDP (nothing to all-reduce)
    Layout("ddp-2x1", False, 0, 2, 1),  # real DDP: gloo all-reduce of every gradient
    Layout("ds0-1x2", True, 0, 1, 2),  # DeepSpeed's engine without ZeRO partitioning
    Layout("ds2-1x2", True, 2, 1, 2),
    Layout("ds2-2x1", True, 2, 2, 1),  # shipped by tiny-lora.yaml and tiny-qlora.yaml
    Layout("ds3-2x1", True, 3, 2, 1),  # shipped by tiny-full.yaml
]
SHIPPED = LAYOUTS[4]  # the layout of the LoRA recipes: the method rows and the variants run in it


@dataclass(frozen=True)
class Variant:
    """A change to the shipped ZeRO-2, 2 x 1 run: recipe fields, DeepSpeed config keys (bench-only), threads."""

    name: str
    label: str
    overrides: tuple[str, ...] = ()  # recipe fields, as `--set` takes them
    ds_config: dict = field(default_factory=dict)  # merged into the recipe's DeepSpeed config in the workers
    cpus_per_worker: int = 1  # the worker's torch threads (`torch.set_num_threads(scaling.cpus_per_worker)`)


# `workloads.finetune.plan.deepspeed_config` always sets `torch_adam: true` (torch.optim.AdamW, unfused), also with
# `deepspeed.offload_optimizer`: no recipe field reaches DeepSpeed's CPU Adam, so these variants set it here.
_DS_ADAM = {"optimizer": {"params": {"torch_adam": False}}}
VARIANTS = [
    Variant("ds2-2x1-torch-adamw", "torch AdamW, as shipped"),
    Variant("ds2-2x1-fused-adamw", "torch AdamW fused=True", ds_config={"optimizer": {"params": {"fused": True}}}),
    Variant("ds2-2x1-ds-fusedadam", "DeepSpeed FusedAdam (CPU Adam kernel)", ds_config=_DS_ADAM),
    Variant("ds2-2x1-cpuadam-offload", "DeepSpeedCPUAdam (offload_optimizer: true)",
            overrides=("deepspeed.offload_optimizer=true",), ds_config=_DS_ADAM),
]
THREADS_VARIANT = "-2threads"  # appended to the fastest optimizer variant: the same with 2 threads per worker
# DeepSpeed's own wall-clock timers (forward, backward, step, ZeRO's optimizer phases) and comms logger.
PROFILE_DS_CONFIG = {"wall_clock_breakdown": True, "comms_logger": {"enabled": True, "prof_all": True,
                                                                     "verbose": False}}
# A bigger sibling for the memory probes, where the weights (not activations or imports) dominate.
LARGE_MODEL = TinyModelConfig(hidden_size=1536, num_layers=12, num_heads=12, intermediate_size=4096,
                            pretrain_steps=0)
MODELS = {"85M": BIG_MODEL, "340M": LARGE_MODEL}
MEMORY_VARIANTS = ["full", "lora", "qlora"]
GROUPS = ("memory", "layouts", "variants", "methods")


@dataclass(frozen=True)
class MemoryCase:
    """One model and micro-batch to probe, and the methods to probe it with."""

    model: str
    micro_batch: int
    steps: int
    variants: tuple[str, ...]
    checkpointing: bool = False  # gradient checkpointing, as QLoRA is run in practice


MEMORY_CASES = [
    MemoryCase("85M", 1, 2, tuple(MEMORY_VARIANTS)),  # weights matter most at batch 1
    MemoryCase("85M", GLOBAL_BATCH, 1, ("lora", "qlora")),  # the overhead batch: activations dominate
    MemoryCase("340M", 1, 1, ("lora", "qlora")),
    MemoryCase("340M", 1, 1, ("lora", "qlora"), checkpointing=True),
]


# ---------------------------------------------------------------------------------------------
# Recipes: the shipped tiny-lora recipe with overrides, so every field the bench changes is visible
# ---------------------------------------------------------------------------------------------


def _model_overrides(model: TinyModelConfig) -> list[str]:
    return [f"model.tiny.{k}={v}" for k, v in model.model_dump().items()]


def shipped_cadence() -> dict[str, int]:
    """The base recipe's report / eval / checkpoint cadence, and its period (the steps after which it repeats)."""
    train = load_recipe(BASE_RECIPE, [], kind="finetune").train
    every = {"log_every": train.log_every, "eval_every": train.eval_every, "checkpoint_every": train.checkpoint_every}
    return {**every, "period": math.lcm(*every.values())}


def cadence_steps(warmup: int, period: int) -> int:
    """Steps of a run at the shipped cadence: `warmup`, one whole period, and one more step, so the last
    step's checkpoint (which also exports the model, unlike the period's) falls outside the window."""
    return warmup + period + 1


def bench_recipe(
    method: str, layout: Layout, steps: int, model: TinyModelConfig | None, *, packed: bool,
    micro_batch: int | None = None, cadence: bool = False, extra: tuple[str, ...] = (), base: str = BASE_RECIPE,
) -> FinetuneRecipe:
    """A recipe for `steps` optimizer steps of global batch 8 (x 64 packed tokens when `packed`), from `base`
    with the tiny-factory `model` (None: the base recipe's own model).

    With `cadence` it keeps the base recipe's report / eval / checkpoint cadence and eval set; without, it
    reports, evaluates (nothing: no eval set) and checkpoints once, at the end. `extra`: more `--set` fields.
    """
    micro = micro_batch or (GLOBAL_BATCH // layout.workers if packed else 16)
    overrides = [
        f"train.method={method}",
        f"train.max_steps={steps}",
        f"train.micro_batch_size={micro}",
        "train.warmup_steps=0",
        f"data.max_length={SEQ_LEN}",
        "run.max_failures=0",
        f"deepspeed.enabled={str(layout.deepspeed).lower()}",
        f"deepspeed.stage={layout.stage}",
        f"scaling.num_workers={layout.workers}",
        f"scaling.cpus_per_worker={layout.cpus_per_worker}",
        *(_model_overrides(model) if model is not None else []),
    ]
    if not cadence:
        overrides += [f"train.eval_every={steps}", f"train.checkpoint_every={steps}", f"train.log_every={steps}",
                      "data.eval_path=null", "data.eval_fraction=0"]
    if packed:  # every example exactly SEQ_LEN tokens: GLOBAL_BATCH x SEQ_LEN
        overrides += ["data.packing=true", "data.max_samples=600"]
    return load_recipe(base, [*overrides, *extra], kind="finetune")


# ---------------------------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------------------------


def steady(step_seconds: list[float], warmup: int) -> dict[str, float]:
    """Median / mean / spread of the steps after the first `warmup`."""
    kept = step_seconds[warmup:] or step_seconds
    return {"median_s": statistics.median(kept), "mean_s": statistics.fmean(kept),
            "min_s": min(kept), "max_s": max(kept), "n": len(kept)}


def load_average() -> float:
    return os.getloadavg()[0]


@contextlib.contextmanager
def quiet(log_path: Path) -> Iterator[None]:
    """Send this process's stdout/stderr (and Ray's forwarded worker logs) to `log_path` meanwhile."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with log_path.open("a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def progress_stream() -> TextIO:
    """The terminal's stderr, kept open while `quiet` redirects fd 2 to a log."""
    return os.fdopen(os.dup(2), "w", buffering=1)


# ---------------------------------------------------------------------------------------------
# 1. Plain single-process torch loop: the baseline
# ---------------------------------------------------------------------------------------------


def plain_loop(recipe: FinetuneRecipe, model_path: str) -> dict[str, list[float]]:
    """Seconds per optimizer step of forward/backward/clip/AdamW in this process, same batches as rank 0, and
    of its forward/backward part (the rest is clipping and the optimizer). A LoRA recipe trains the same adapters
    (`attach_lora`, as the workers do); any other method trains every weight."""
    import torch

    from workloads.data.formats import build_datasets
    from workloads.finetune.strategy import lr_lambda
    from workloads.finetune.worker import StepBatches
    from workloads.models.loading import load_model, load_tokenizer
    from workloads.models.lora import attach_lora

    torch.set_num_threads(THREADS)
    torch.manual_seed(recipe.train.seed)
    tokenizer = load_tokenizer(model_path)
    examples, _ = build_datasets(recipe.data, tokenizer, recipe.train.seed)
    batches = StepBatches(examples, recipe, 0, 1, tokenizer.pad_token_id)
    model = load_model(model_path, dtype=recipe.model.dtype)
    if recipe.train.method == "lora":
        model = attach_lora(model, recipe.lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.train.learning_rate, weight_decay=recipe.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe.train, recipe.train.max_steps))
    seconds, forward_backward = [], []
    for step in range(recipe.train.max_steps):
        started = time.perf_counter()
        micro_batches = batches.for_step(step)
        for batch in micro_batches:
            (model(**batch).loss / len(micro_batches)).backward()
        computed = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, recipe.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - started)
        forward_backward.append(computed - started)
    return {"step_seconds": seconds, "forward_backward_seconds": forward_backward}


# ---------------------------------------------------------------------------------------------
# 2. The platform path: workloads.finetune.run, exactly what `llmc finetune` does
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def instrumented(options: dict) -> Iterator[None]:
    """Meanwhile `workloads.finetune.run` starts `bench._instrument.instrumented_worker(options, ...)` on its
    workers instead of `train_worker` (which that calls, instrumented as `options` say)."""
    import workloads.finetune.driver as finetune

    original = finetune.train_worker
    finetune.train_worker = functools.partial(instrumented_worker, options)
    try:
        yield
    finally:
        finetune.train_worker = original


def platform_run(recipe: FinetuneRecipe, name: str, address: str | None, *, ds_config: dict | None = None,
                 profile: bool = False) -> dict[str, Any]:
    """Run the recipe through `workloads.finetune.run`; per-step times from the run's own history, the wall
    time at which rank 0 finished each step, and with `profile` each step's phases (DeepSpeed's timers)."""
    from workloads.finetune.driver import run
    from workloads.finetune.worker import TRAINER_STATE

    out = WORK_DIR / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    record = out / "bench-record.json"
    extra = {**(ds_config or {}), **(PROFILE_DS_CONFIG if profile and recipe.deepspeed.enabled else {})}
    load_before = load_average()
    with instrumented({"record": str(record), "ds_config": extra, "profile": profile}):
        summary = run(recipe, output_dir=str(out), address=address)
    history = json.loads((Path(summary["checkpoint"]) / TRAINER_STATE).read_text())["history"]
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # hundreds of MB per run for the big model
    shutil.rmtree(out / "model", ignore_errors=True)
    # Missing when rank 0 ran on another node (--address): the cadence timing is then left out.
    measured = json.loads(record.read_text()) if record.exists() else {"finished": [], "profile": []}
    return {
        "step_seconds": [r["step_seconds"] for r in history],
        "tokens": [r["tokens"] for r in history],
        "final_loss": history[-1]["loss"],
        "train_seconds": summary["train_seconds"],
        "wall_seconds": summary["wall_seconds"],
        "startup_seconds": summary["wall_seconds"] - summary["train_seconds"],
        "tokens_per_second_all_steps": summary["tokens_per_second"],
        "load_average": [load_before, load_average()],
        "step_finished_at": measured["finished"],
        "profile": measured["profile"],
        "optimizer": measured.get("optimizer"),
        "ds_config_changes": extra,
    }


def cadence_timing(entry: dict[str, Any], warmup: int, period: int) -> dict[str, Any] | None:
    """Wall time per step over one whole cadence period after `warmup` (steps warmup+1 .. warmup+period, with
    every report, eval and checkpoint in between), beside the steps' own time over the same window."""
    finished = {int(step): at for step, at in entry.get("step_finished_at") or []}
    first, last = warmup, warmup + period
    if first not in finished or last not in finished:
        return None
    wall = finished[last] - finished[first]
    steps = entry["step_seconds"][first:last]
    return {"window": [first + 1, last], "seconds_per_step": wall / period, "steps_mean_s": statistics.fmean(steps),
            "cadence_seconds_per_period": wall - sum(steps)}


def steady_tokens_per_second(result: dict[str, Any], warmup: int) -> float:
    return sum(result["tokens"][warmup:]) / sum(result["step_seconds"][warmup:])


# ---------------------------------------------------------------------------------------------
# 3. Peak memory probes: one fresh process per method
# ---------------------------------------------------------------------------------------------


def _proc_status() -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS), RssAnon and RssFile of this process, in KiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0])
    return fields


def _mapped_weights_kib() -> int:
    """Resident KiB of mapped `*.safetensors` files (weights `from_pretrained` left memory-mapped)."""
    total, current = 0, ""
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and not line.endswith(":"):
            current = head[5] if len(head) > 5 else ""
        elif line.startswith("Rss:") and current.endswith(".safetensors"):
            total += int(head[1])
    return total


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux `clear_refs` 5); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _unmap_weights(model) -> None:
    """Copy every tensor still backed by the safetensors mmap into private memory, so the mapping goes.

    `from_pretrained` leaves fp32 weights as views of the file. For QLoRA the unquantized rest (embeddings,
    norms, lm_head) keeps the whole mapping alive, and the pages read while quantizing stay resident:
    RSS then counts the fp32 file although no live tensor needs most of it. After this copy every
    method holds exactly its own bytes, in anonymous memory, as on a GPU.
    """
    import gc

    for tensor in [*model.parameters(), *model.buffers()]:
        if type(tensor).__name__ != "Params4bit":
            tensor.data = tensor.data.clone()
    gc.collect()
    # Quantizing frees hundreds of MB of fp32 temporaries that glibc keeps in its heap; give them back.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def memory_probe(variant: str, model_key: str, steps: int, micro_batch: int,
                 checkpointing: bool = False) -> dict[str, Any]:
    """In this (fresh) process: load the big model for `variant`, train `steps`, return peaks in MiB."""
    import bitsandbytes  # noqa: F401  (imported for every variant, so the import baselines match)
    import peft  # noqa: F401
    import torch

    from workloads.data.formats import build_datasets
    from workloads.finetune.worker import StepBatches
    from workloads.models.loading import load_model, load_tokenizer, resolve_model_path
    from workloads.models.lora import attach_lora

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    method = variant
    recipe = bench_recipe(method, LAYOUTS[0], steps, MODELS[model_key], packed=True, micro_batch=micro_batch)
    model_path = resolve_model_path(recipe.model)
    tokenizer = load_tokenizer(model_path)
    examples, _ = build_datasets(recipe.data, tokenizer, 0)
    batches = StepBatches(examples, recipe, 0, 1, tokenizer.pad_token_id)
    mib = 1024.0
    after_import = _proc_status()
    can_reset = _reset_peak()

    quant = recipe.quantization if method == "qlora" else None
    model = load_model(model_path, dtype=recipe.model.dtype, quantization=quant)
    if checkpointing and method != "qlora":  # as workloads.finetune does; k-bit preparation enables it for QLoRA
        model.gradient_checkpointing_enable()
    if method != "full":
        model = attach_lora(model, recipe.lora, quantized=method == "qlora", gradient_checkpointing=checkpointing)
    after_load = _proc_status()
    mapped_after_load = _mapped_weights_kib()
    _unmap_weights(model)
    mapped_after_copy = _mapped_weights_kib()
    weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if not p.requires_grad})

    before_train = _proc_status()
    _reset_peak()
    model.train()
    optimizer = torch.optim.AdamW(trainable, lr=recipe.train.learning_rate)
    seconds = []
    for step in range(steps):
        started = time.perf_counter()
        for batch in batches.for_step(step):
            model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - started)
    after_train = _proc_status()
    return {
        "variant": variant,
        "micro_batch": micro_batch,
        "checkpointing": checkpointing,
        "rss_after_import_mib": after_import["VmRSS"] / mib,
        "peak_load_mib": after_load["VmHWM"] / mib if can_reset else None,
        "rss_after_load_mib": after_load["VmRSS"] / mib,
        "mapped_weights_after_load_mib": mapped_after_load / mib,
        "mapped_weights_after_copy_mib": mapped_after_copy / mib,
        "rss_before_train_mib": before_train["VmRSS"] / mib,
        "peak_train_mib": after_train["VmHWM"] / mib if can_reset else None,
        # ru_maxrss is the kernel's high-water mark, which `clear_refs` resets too: take the phases' max.
        "peak_rss_mib": max(after_import["VmHWM"], after_load["VmHWM"], after_train["VmHWM"]) / mib
        if can_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / mib,
        "weights_mib": weight_bytes / 2**20,
        "frozen_param_dtypes": frozen_dtypes,
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "step_seconds": seconds,
        "peak_reset_supported": can_reset,
    }


def run_probe(variant: str, case: MemoryCase, log_path: Path) -> dict[str, Any]:
    """`memory_probe` in a child process (so each peak is that method's alone); its logs to `log_path`."""
    command = [sys.executable, "-m", "bench.finetune_bench", "--probe", variant, "--probe-model", case.model,
               "--probe-steps", str(case.steps), "--probe-batch", str(case.micro_batch)]
    command += ["--probe-checkpointing"] if case.checkpointing else []
    with log_path.open("a") as log:
        proc = subprocess.run(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log, text=True, check=False)
        log.write(proc.stdout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(PROBE_PREFIX)]
    if proc.returncode or not lines:
        return {"variant": variant, "micro_batch": case.micro_batch, "checkpointing": case.checkpointing,
                "error": f"exit {proc.returncode}; see {log_path}"}
    return json.loads(lines[-1].removeprefix(PROBE_PREFIX))


# ---------------------------------------------------------------------------------------------
# The whole benchmark
# ---------------------------------------------------------------------------------------------


def plain_between(recipe: FinetuneRecipe, model_path: str) -> dict[str, Any]:
    load_before = load_average()
    return {**plain_loop(recipe, model_path), "load_average": [load_before, load_average()]}


def _wanted(only: set[str] | None, group: str, name: str | None = None) -> bool:
    """Whether `--only` (None: everything) names this row or its group."""
    return only is None or group in only or name in only


def _attempt(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`run()`, or the error it raised: one broken row must not lose the others' numbers."""
    try:
        return run()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _with_shipped(layout: Layout, shipped: dict[tuple, list[str]]) -> dict[str, Any]:
    return {**asdict(layout), "shipped_by": shipped.get(layout.key, [])}


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement asked for, in order: memory probes, then plain/platform runs interleaved (layouts, then
    the ZeRO-2 variants), then methods."""
    from tqdm import tqdm

    from cluster.runtime import connect, shutdown
    from workloads.models.tiny import build_tiny_model

    only = set(args.only.split(",")) if args.only else None
    model = TinyModelConfig() if args.quick else BIG_MODEL
    cadence = shipped_cadence()
    layout_steps = cadence_steps(args.warmup, cadence["period"])
    shipped = shipped_layouts()
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    log = WORK_DIR / "bench.log"
    log.write_text("")
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_start": load_average()},
        "settings": {"global_batch": GLOBAL_BATCH, "seq_len": SEQ_LEN, "steps": layout_steps,
                     "variant_steps": args.steps, "plain_steps": args.plain_steps, "warmup": args.warmup,
                     "method_steps": args.method_steps, "plain_threads": THREADS,
                     "cadence": {**cadence, "recipe": BASE_RECIPE}, "overhead_model": model.model_dump(),
                     "models": {k: v.model_dump() for k, v in MODELS.items()}, "quick": args.quick,
                     "only": sorted(only) if only else None},
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    memory_wanted = not args.skip_memory and (_wanted(only, "memory") if not args.quick else "memory" in (only or ()))
    cases = MEMORY_CASES if memory_wanted else []
    layouts_todo = [layout for layout in LAYOUTS if _wanted(only, "layouts", layout.name)]
    variants_todo = [variant for variant in VARIANTS if _wanted(only, "variants", variant.name)]
    threads_wanted = _wanted(only, "variants", "threads")
    methods_todo = [m for m in ("full", "lora", "qlora") if _wanted(only, "methods", f"tiny-{m}")]
    platform_runs = len(layouts_todo) + len(variants_todo) + threads_wanted
    n_tasks = sum(len(c.variants) for c in cases) + 1 + 2 * platform_runs + bool(platform_runs) + len(methods_todo)
    bar = tqdm(total=n_tasks, file=progress_stream(), desc="finetune bench", unit="run")

    def task(desc: str) -> None:
        bar.set_postfix_str(desc)

    # 1. memory: no Ray, one child process per variant (models built first, so no probe counts the build)
    with quiet(log):
        for key in sorted({case.model for case in cases}):
            build_tiny_model(MODELS[key])
    memory = []
    for case in cases:
        for variant in case.variants:
            task(f"memory {case.model} batch {case.micro_batch} {variant}")
            memory.append({"model": case.model, **run_probe(variant, case, log)})
            bar.update()
    results["memory"] = memory

    # 2. overhead and 3. variants: a plain-loop run before the first platform run and after every one, so
    #    each run's ratio is taken against the plain runs on either side of it (the machine's load drifts).
    layouts: dict[str, Any] = {}
    variants: dict[str, Any] = {}
    plain_runs: list[dict[str, Any]] = []
    methods: dict[str, Any] = {}
    with quiet(log):
        model_path = str(build_tiny_model(model))
        plain_recipe = bench_recipe("full", LAYOUTS[0], args.plain_steps, model, packed=True)
        task("ray init")
        started = time.perf_counter()
        print(connect(args.address), flush=True)
        results["ray_init_seconds"] = time.perf_counter() - started
        bar.update()

        def measured(name: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
            """`run()` between two plain-loop runs (the first platform run gets one before it too)."""
            if not plain_runs:
                task("plain torch loop")
                plain_runs.append(plain_between(plain_recipe, model_path))
                bar.update()
            task(name)
            entry = {**_attempt(run), "plain_neighbours": [len(plain_runs) - 1, len(plain_runs)]}
            bar.update()
            task(f"plain torch loop after {name}")
            plain_runs.append(plain_between(plain_recipe, model_path))
            bar.update()
            return entry

        for layout in layouts_todo:
            recipe = bench_recipe("full", layout, layout_steps, model, packed=True, cadence=True)
            entry = measured(layout.name, lambda r=recipe, n=layout.name: platform_run(r, n, args.address))
            layouts[layout.name] = {"layout": _with_shipped(layout, shipped), **entry}

        def run_variant(variant: Variant) -> None:
            layout = replace(SHIPPED, cpus_per_worker=variant.cpus_per_worker)
            recipe = bench_recipe("full", layout, args.steps, model, packed=True, extra=variant.overrides)
            entry = measured(variant.name, lambda: platform_run(recipe, variant.name, args.address,
                                                                ds_config=variant.ds_config, profile=True))
            variants[variant.name] = {"variant": asdict(variant), "layout": _with_shipped(layout, shipped), **entry}

        for variant in variants_todo:
            run_variant(variant)
        if threads_wanted:  # the fastest optimizer measured above (as shipped if none), with 2 threads per worker
            ok = [v for v in variants_todo if "error" not in variants[v.name]]
            base = min(ok, key=lambda v: statistics.median(variants[v.name]["step_seconds"][args.warmup:]),
                       default=VARIANTS[0])
            run_variant(replace(base, name=base.name + THREADS_VARIANT, cpus_per_worker=2,
                                label=f"{base.label}, 2 threads per worker (scaling.cpus_per_worker: 2)"))

        # 4. tokens/s per method on the tiny model: the shipped layout (ZeRO-2, 2 x 1), same steps
        for method in methods_todo:
            task(f"tiny {method}")
            recipe = bench_recipe(method, SHIPPED, args.method_steps, TinyModelConfig(), packed=False)
            methods[method] = _attempt(lambda r=recipe, m=method: platform_run(r, f"tiny-{m}", args.address))
            bar.update()
        shutdown()
    bar.close()

    for run in plain_runs:
        run["steady"] = steady(run["step_seconds"], args.warmup)

    def plain_median(key: str) -> float | None:  # over every plain run's steady steps
        values = [v for r in plain_runs for v in (r[key][args.warmup:] or r[key])]
        return statistics.median(values) if values else None

    plain_medians = [r["steady"]["median_s"] for r in plain_runs]
    plain_all = plain_median("step_seconds")
    for run in plain_runs:
        run["optimizer_seconds"] = [s - f for s, f in zip(run["step_seconds"], run["forward_backward_seconds"],
                                                          strict=True)]
    results["plain"] = {
        "runs": plain_runs, "median_s": plain_all, "run_medians_s": plain_medians,
        "forward_backward_median_s": plain_median("forward_backward_seconds"),
        "optimizer_median_s": plain_median("optimizer_seconds"),
        "tokens_per_second": GLOBAL_BATCH * SEQ_LEN / plain_all if plain_all else None,
    }
    results["layouts"] = layouts
    results["variants"] = {"layout": _with_shipped(SHIPPED, shipped), "runs": variants}
    summarize_platform_runs(results)
    for entry in methods.values():
        if "error" not in entry:
            entry["steady"] = steady(entry["step_seconds"], args.warmup)
            entry["tokens_per_second_steady"] = steady_tokens_per_second(entry, args.warmup)
    results["methods"] = {"layout": asdict(SHIPPED), "model": TinyModelConfig().model_dump(), "runs": methods}
    results["memory_ratios"] = memory_ratios(memory)
    results["winner"] = winner(layouts)
    results["machine"]["load_average_at_end"] = load_average()
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return results


def summarize_platform_runs(results: dict[str, Any]) -> None:
    """Every platform run's summary (`_summarize`) from the raw timings in `results`; rerunnable on a saved file."""
    settings, plain = results["settings"], results["plain"]
    for entry in [*results["layouts"].values(), *results["variants"]["runs"].values()]:
        if "error" not in entry:
            _summarize(entry, plain["run_medians_s"], plain["median_s"], settings["warmup"],
                       settings["cadence"]["period"])


def _summarize(entry: dict[str, Any], plain_medians: list[float], plain_all: float, warmup: int,
               period: int) -> None:
    """A platform run's steady step, its ratios to the plain loop, its cadence timing and profile medians.

    The neighbour baseline is the mean of the plain runs just before and after it, less any disturbed one (its
    median over DISTURBED x the median plain run: something else took the cores meanwhile); with both disturbed,
    the median over all plain steps."""
    typical = statistics.median(plain_medians)
    kept = [plain_medians[i] for i in entry["plain_neighbours"] if plain_medians[i] <= DISTURBED * typical]
    neighbours = statistics.fmean(kept) if kept else plain_all
    entry["steady"] = steady(entry["step_seconds"], warmup)
    entry["plain_neighbours_s"] = [plain_medians[i] for i in entry["plain_neighbours"]]
    entry["plain_neighbours_disturbed_s"] = [s for s in entry["plain_neighbours_s"] if s not in kept]
    entry["ratio_vs_neighbour_plain"] = entry["steady"]["median_s"] / neighbours
    entry["ratio_vs_plain"] = entry["steady"]["median_s"] / plain_all
    entry["tokens_per_second_steady"] = steady_tokens_per_second(entry, warmup)
    entry["cadence"] = cadence_timing(entry, warmup, period) if len(entry["step_seconds"]) > warmup + period else None
    if entry["cadence"]:
        entry["cadence"]["ratio_vs_neighbour_plain"] = entry["cadence"]["seconds_per_step"] / neighbours
    entry["profile_median"] = profile_summary(entry.get("profile") or [], warmup)


def memory_ratios(memory: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """QLoRA / LoRA per (model, batch, checkpointing): train peak, the same above the import baseline, weights."""
    out = []
    by = {(m["model"], m["micro_batch"], m["checkpointing"], m["variant"]): m for m in memory if "error" not in m}
    for (model, batch, checkpointing, variant), q in by.items():
        lora = by.get((model, batch, checkpointing, "lora"))
        if variant != "qlora" or lora is None:
            continue
        out.append({
            "model": model, "micro_batch": batch, "variant": variant + (" + grad ckpt" if checkpointing else ""),
            "train_peak": q["peak_train_mib"] / lora["peak_train_mib"],
            "train_peak_above_import": (q["peak_train_mib"] - q["rss_after_import_mib"])
            / (lora["peak_train_mib"] - lora["rss_after_import_mib"]),
            "lifetime_peak": q["peak_rss_mib"] / lora["peak_rss_mib"],
            "weights": q["weights_mib"] / lora["weights_mib"],
        })
    return out


def winner(layouts: dict[str, Any]) -> str | None:
    ok = {k: v for k, v in layouts.items() if "error" not in v}
    return min(ok, key=lambda k: ok[k]["steady"]["median_s"]) if ok else None


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.finetune_bench [--model M] [--only ROWS] [--quick]`: measure, then write results, tables
    and plot."""
    from bench._models import DEFAULT_MODEL, REAL_MODELS, is_real, results_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=[*REAL_MODELS, "tiny"],
                        help="a real model by name: its shipped LoRA layout against a plain loop "
                        "(bench.finetune_real), results in bench/results/NAME/; or tiny: the layout study on the "
                        "tiny-model factory's models described above, results in bench/results/")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per variant run (85M model; default "
                        "8) or per platform run (a real model; default 6); the layouts run one whole period of the "
                        "shipped cadence after --warmup, plus one step")
    parser.add_argument("--plain-steps", type=int, default=None, help="optimizer steps per plain-loop run (default 6; "
                        "4 on a real model)")
    parser.add_argument("--warmup", type=int, default=None, help="first steps left out of the steady-state median "
                        "(default 2; 1 on a real model)")
    parser.add_argument("--method-steps", type=int, default=30, help="steps per method run (tiny model)")
    parser.add_argument("--skip-memory", action="store_true", help="leave out the memory probes")
    parser.add_argument("--only", default=None, help="comma-separated groups (" + ", ".join(GROUPS) + ") or rows "
                        "(layouts " + ", ".join(x.name for x in LAYOUTS) + "; variants "
                        + ", ".join(v.name for v in VARIANTS) + ", threads; methods tiny-full, tiny-lora, "
                        "tiny-qlora); results then go to " + str(PARTIAL.relative_to(REPO_ROOT)))
    parser.add_argument("--quick", action="store_true", help="the tiny model instead of the 85M one, 4 variant "
                        "steps, 3 plain steps, 1 warmup step, no memory probes (unless --only memory): a check that "
                        "rows run, not a measurement; results go to " + str(PARTIAL.relative_to(REPO_ROOT)))
    parser.add_argument("--address", default=None, help="a Ray cluster to measure instead of embedded Ray")
    parser.add_argument("--probe", choices=MEMORY_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--probe-model", choices=list(MODELS), default="85M", help=argparse.SUPPRESS)
    parser.add_argument("--probe-batch", type=int, default=GLOBAL_BATCH, help=argparse.SUPPRESS)
    parser.add_argument("--probe-steps", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--probe-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--resummarize", action="store_true", help="recompute every summary and ratio of "
                        "bench/results/finetune.json from its raw timings (after a change to how they are summarized), "
                        "then rewrite the Markdown, plot and README block; measures nothing")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if is_real(args.model) and not args.probe:
        return _real(args, results_dir(args.model))
    for key, value in {"steps": 8, "plain_steps": 6, "warmup": 2}.items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    if args.resummarize:
        results = json.loads((RESULTS / "finetune.json").read_text())
        summarize_platform_runs(results)
        results["winner"] = winner(results["layouts"])
        return _write(results, RESULTS, readme=True)
    if args.probe:
        result = memory_probe(args.probe, args.probe_model, args.probe_steps, args.probe_batch,
                              args.probe_checkpointing)
        print(PROBE_PREFIX + json.dumps(result), flush=True)
        return 0
    if args.quick:
        args.steps, args.plain_steps, args.warmup, args.method_steps = 4, 3, 1, 6
    if args.address is None:
        os.environ.pop("RAY_ADDRESS", None)  # a shared cluster would measure someone else's load
    results = run_bench(args)
    partial = bool(args.only or args.quick)
    return _write(results, PARTIAL if partial else RESULTS, readme=not partial)


def _real(args: argparse.Namespace, folder: Path) -> int:
    """The real-model benchmark (`bench.finetune_real`), sized by REAL_STEPS where the flags leave it."""
    from bench import finetune_real

    sizes = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in finetune_real.REAL_STEPS.items()}
    if args.address is None:
        os.environ.pop("RAY_ADDRESS", None)
    results = finetune_real.run(args.model, sizes["steps"], sizes["plain_steps"], sizes["warmup"], args.address)
    partial = args.quick or args.only
    finetune_real.write(results, PARTIAL if partial else folder)
    if not partial:  # the docs' real-model benchmark block quotes these results: keep it in step
        from scripts.readme_numbers import rewrite_bench_block

        rewrite_bench_block()
    return 0


def _write(results: dict[str, Any], folder: Path, readme: bool) -> int:
    """Results JSON, Markdown, plot and printed tables into `folder`; the README's block too when `readme`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "finetune.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, auto_notes(results), folder / "finetune.md")
    plot(results, folder / "finetune.png")
    print_tables(results, folder)
    if readme:  # the README's benchmark block quotes these results: keep it in step
        from scripts.readme_numbers import rewrite_bench_block

        rewrite_bench_block()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The GPU check: the per-worker training code of every recipe kind on one CUDA device, as a one-worker Ray Train run.

Each step runs the shipped worker functions (`workloads.finetune.worker.train_worker` through
`workloads.finetune.driver.fit`, and `workloads.align.rl_run.rl_worker`) on a tiny recipe for a few steps,
checkpoints, then resumes a second run from the newest checkpoint and goes on: full fine-tuning with DeepSpeed ZeRO-2
and ZeRO-3, LoRA, QLoRA (bitsandbytes 4-bit), PPO and GRPO (rollouts from `model.generate`: vLLM is not carried). The
losses, evaluations and every metric the workers print are reduced by the workloads' own code, over a process group
started as `cluster.train.fit` starts it (its `TorchConfig(backend=...)` read from cluster/train.py; world size 1;
env:// rendezvous, as Ray Train does).

Ray is not installed on the device machine, so `cluster.train` and `cluster.actors` are replaced, for this process
only, by a one-worker stand-in (`_one_worker_train`): its `fit` calls the worker in this process, keeps reported
checkpoints in the run's storage (newest `keep_checkpoints`) and hands the newest to a resumed run, as Ray Train
does for one worker. Anything else a worker asks of `cluster.train` fails loudly. The process group is started once
for all steps (Ray Train starts one per worker process; DeepSpeed here keeps the first group it sees).

    python scripts/gpu_check.py [--wheels DIR] [--out bench/results/gpu_check.json]   # on one CUDA device
    python scripts/gpu_check.py --cpu-smoke --out /tmp/gpu_check.json                 # here: gloo, CPU

Writes the device, versions and each step's outcome (passed, failed or skipped, losses, error text) to `--out`;
exits 1 if any step failed. `--cpu-smoke` runs the same code on CPU over gloo; QLoRA is skipped there (needs CUDA).

The device machine has torch and nothing else of this project and reaches no package index, so the rest travels with the
working tree (64 MiB a call in all). Here, where the project is installed, `python scripts/gpu_check.py --pack
.gpu-carry --cuda X.Y` (X.Y: the device torch's `torch.version.cuda`) puts in `.gpu-carry/` the wheels of the versions
installed here (`ROOTS` and what they require, less what torch requires: transformers, peft, accelerate, deepspeed built
as a pure wheel, bitsandbytes cut to the CUDA build of `--cuda`, pydantic, PyYAML, numpy, huggingface_hub and its
needs...) and the tiny model (`cache/`), and prints the total size (exit 1 at 60 MiB or more, leaving the working tree
room in the 64). On the device: carry `.gpu-carry` and run `python scripts/gpu_check.py --wheels .gpu-carry --out
bench/results/gpu_check.json`: it installs the wheels with `pip install --no-index --no-deps --target .gpu-carry/site`
and reads the tiny model from `.gpu-carry/cache` and
what the driver would hand the workers (read with `datasets`, which is too big to carry) from `driver_data.pkl`.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# What the worker code imports beyond torch; --pack carries these and their requirements, less torch's own.
ROOTS = ("transformers", "tokenizers", "safetensors", "peft", "accelerate", "bitsandbytes", "deepspeed", "pydantic",
         "PyYAML")
STEPS_FINETUNE = {"full-zero2": ("tiny-full.yaml", ["deepspeed.enabled=true", "deepspeed.stage=2"]),
                  "full-zero3": ("tiny-full.yaml", ["deepspeed.enabled=true", "deepspeed.stage=3"]),
                  "lora": ("tiny-lora.yaml", []),
                  "qlora": ("tiny-qlora.yaml", [])}
STEPS_RL = {"ppo": "tiny-ppo.yaml", "grpo": "tiny-grpo.yaml"}
NEEDS_CUDA = {"qlora": "skipped: needs CUDA (bitsandbytes 4-bit on CUDA)"}
DRIVER_DATA = "driver_data.pkl"  # in --pack's directory
FIRST, THEN = 3, 5  # steps (iterations) of the first run, and where the resumed run ends


# ---------------------------------------------------------------------------------------------
# The one-worker stand-in for cluster.train (and cluster.actors)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitResult:  # cluster.train.FitResult's fields
    checkpoint_dir: Path | None
    metrics: dict
    storage_dir: str
    best_checkpoint_dir: Path | None = None


class _Run:
    """What Ray Train keeps for the one running worker: storage, reports, the checkpoint it hands over."""

    storage: Path
    keep: int
    handed: Path | None
    reports: list[dict]
    published: list[dict]
    backend: str
    carried: Path | None = None  # --wheels: the driver's data made by --pack


_RUN = _Run()


def _shipped_backend(use_gpu: bool) -> str:
    """The process-group backend `cluster.train.fit` gives Ray Train, evaluated from its source (no Ray import)."""
    source = (REPO / "cluster" / "train.py").read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "TorchConfig":
            backend = next((k.value for k in node.keywords if k.arg == "backend"), None)
            if backend is not None:
                return _backend_value(backend, use_gpu)
    raise RuntimeError("cluster/train.py no longer calls TorchConfig(backend=...): update gpu_check's stand-in")


def _backend_value(node: ast.expr, use_gpu: bool) -> str:
    """The backend expression's value: a string, or a choice of two on `scaling.use_gpu` (read, never executed)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.IfExp) and ast.unparse(node.test) == "scaling.use_gpu":
        return _backend_value(node.body if use_gpu else node.orelse, use_gpu)
    raise RuntimeError(f"cluster/train.py's backend is `{ast.unparse(node)}`: update gpu_check's reading of it")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _process_group(use_gpu: bool) -> Iterator[str]:
    """World size 1, started as Ray Train starts it: its env vars, env:// rendezvous, the device set first."""
    import torch
    import torch.distributed as dist

    backend = _shipped_backend(use_gpu)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", NODE_RANK="0")
    if "nccl" in backend:
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if use_gpu:
        torch.cuda.set_device(0)
    dist.init_process_group(backend=backend, init_method="env://", rank=0, world_size=1,
                            timeout=timedelta(seconds=1800))
    try:
        yield backend
    finally:
        dist.destroy_process_group()


def _fit(train_fn: Callable[[dict], None], config: dict, *, name: str, storage_path: str, scaling,
         keep_checkpoints: int = 2, on_report: Callable[[dict], None] | None = None, resume: bool = False,
         shared: dict | None = None, **_ignored) -> FitResult:
    """`cluster.train.fit` for one worker in this process: a fresh run clears its storage, a resumed one is handed
    the newest checkpoint there. The process group is the one `main` started for every step (Ray Train starts one
    per worker process; here the runs share the process, and DeepSpeed keeps the first group it saw)."""
    import torch.distributed as dist

    storage = Path(storage_path) / name
    if not resume:
        shutil.rmtree(storage, ignore_errors=True)
    found = sorted(storage.glob("checkpoint_*"))
    if resume and not found:
        raise FileNotFoundError(f"no checkpoint of run {name!r} to resume in {storage}")
    _RUN.storage, _RUN.keep, _RUN.handed = storage, keep_checkpoints, found[-1] if resume else None
    _RUN.reports, _RUN.published = [], []
    if not dist.is_initialized() or (dist.get_backend() == "nccl") != ("nccl" in _shipped_backend(scaling.use_gpu)):
        raise RuntimeError("start the process group first (_process_group), for the scaling the recipe asks for")
    train_fn({**config, **{key: value.shares[0] if isinstance(value, _PerRank) else value
                           for key, value in (shared or {}).items()}})
    for row in _RUN.reports if on_report else ():
        on_report(row)
    found = sorted(storage.glob("checkpoint_*"))
    return FitResult(found[-1] if found else None, _RUN.reports[-1] if _RUN.reports else {}, str(storage))


@dataclass(frozen=True)
class _PerRank:  # cluster.train.per_rank's value: one share per worker; the one worker here takes the first
    shares: tuple


def _per_rank(shares) -> _PerRank:
    if len(shares) != 1:
        raise ValueError(f"{len(shares)} shares for gpu_check's one worker")
    return _PerRank(tuple(shares))


def _report(metrics: dict, checkpoint_dir=None) -> None:
    _RUN.reports.append(dict(metrics))
    if checkpoint_dir:
        kept = sorted(_RUN.storage.glob("checkpoint_*"))
        number = int(kept[-1].name.split("_")[1]) + 1 if kept else 0
        shutil.copytree(checkpoint_dir, _RUN.storage / f"checkpoint_{number:06d}")
        for old in sorted(_RUN.storage.glob("checkpoint_*"))[:-_RUN.keep]:
            shutil.rmtree(old)


def _publish(values: dict) -> None:  # rank 0's reduced values, which Ray would export as gauges
    _RUN.published.append(dict(values))


@contextlib.contextmanager
def _latest_checkpoint() -> Iterator[Path | None]:
    yield _RUN.handed


def _missing(module: str) -> Callable[[str], object]:
    def __getattr__(name: str):
        raise AttributeError(f"{module}.{name} is not in gpu_check's one-worker stand-in (scripts/gpu_check.py): "
                             "the worker code asks for more of Ray than the check provides; add it there")
    return __getattr__


def _one_worker_train() -> None:
    """Put the stand-ins in place of `cluster`, `cluster.train` and `cluster.actors` before workloads import them."""
    if "cluster" in sys.modules:
        raise RuntimeError("cluster is already imported: the stand-in must come first")
    package = types.ModuleType("cluster")
    package.__path__ = []  # nothing else of cluster/ can be imported: a worker that needs it fails loudly
    train = types.ModuleType("cluster.train")
    train.__dict__.update(fit=_fit, world=lambda: (0, 0, 1), report=_report, publish=_publish,
                          latest_checkpoint=_latest_checkpoint, FitResult=FitResult, Shared=object,
                          per_rank=_per_rank, PerRank=_PerRank,
                          WorkerScaling=types.SimpleNamespace,
                          experiment_path=lambda storage_path, name: f"{storage_path.rstrip('/')}/{name}",
                          __getattr__=_missing("cluster.train"))
    actors = types.ModuleType("cluster.actors")
    actors.__getattr__ = _missing("cluster.actors")
    package.train, package.actors = train, actors
    sys.modules.update({"cluster": package, "cluster.train": train, "cluster.actors": actors})


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------


def _recipe(name: str, use_gpu: bool, length: int, work: Path):
    """Step `name`'s tiny recipe, on one worker, checkpointing every step, `length` steps (iterations) long."""
    from workloads.kinds import load_recipe


    common = ["scaling.num_workers=1", f"scaling.use_gpu={str(use_gpu).lower()}", "data.max_samples=160",
              "train.checkpoint_every=1", "train.keep_checkpoints=2", f"train.eval_every={FIRST}",
              f"run.name=gpu-check-{name}", *(["model.dtype=bfloat16"] if use_gpu else [])]
    if name in STEPS_FINETUNE:
        recipe_file, extra = STEPS_FINETUNE[name]
        return load_recipe(REPO / "workloads/configs" / recipe_file, [*common, *extra, "train.log_every=1",
                           f"run.storage_path={work / 'storage'}", f"train.max_steps={length}"], kind="finetune")
    return load_recipe(REPO / "workloads/configs" / STEPS_RL[name], [
        *common, "rl.rollout=generate", "rl.prompts_per_iteration=8", "rl.group_size=4", "rl.eval_prompts=16",
        f"rl.iterations={length}"], kind="align")


def _driver_data(name: str, recipe):
    """What the driver hands the workers: fine-tuning's tokenized examples and eval cases, or RL's training and held-out
    prompts. Read with `datasets` (which the device lacks), so `--pack` makes them here and `--wheels` reads them."""
    if _RUN.carried is not None:  # written by this script's --pack and carried beside the wheels: trusted as they are
        import pickle

        return pickle.loads(_RUN.carried.read_bytes())[name]
    if name in STEPS_FINETUNE:
        from workloads.finetune import driver as finetune

        return finetune.prepare(recipe).data
    from workloads.align.prompts import split_prompts

    return split_prompts(recipe.data, recipe.train.seed)


def _finite(rows: list[dict], keys: tuple[str, ...]) -> bool:
    return all(isinstance(r.get(k), float | int) and math.isfinite(r[k]) for r in rows for k in keys if k in r)


def finetune_step(name: str, use_gpu: bool, work: Path) -> dict:
    """`FIRST` optimizer steps with a checkpoint at each, then a resumed run to step `THEN`; the reduced rows."""
    from workloads.finetune import driver as finetune
    from workloads.models.loading import resolve_model_path

    runs = []
    for steps, resume in ((FIRST, False), (THEN, True)):
        recipe = _recipe(name, use_gpu, steps, work)
        prepared = finetune.Prepared(resolve_model_path(recipe.model), steps, _driver_data(name, recipe))
        result = finetune.fit(recipe, work / name, prepared, resume=resume)
        runs.append(json.loads((result.checkpoint_dir / finetune.TRAINER_STATE).read_text()))
    first, resumed = runs
    history = resumed["history"]
    ok = ([r["step"] for r in history] == list(range(1, THEN + 1)) and history[:FIRST] == first["history"]
          and _finite(history, ("loss", "grad_norm", "eval_loss")) and resumed["restarts"][-1]["from_step"] == FIRST
          and any("eval_loss" in r for r in history))
    return {"passed": ok, "backend": _RUN.backend, "losses": [r["loss"] for r in history],
            "eval_loss": [r["eval_loss"] for r in history if "eval_loss" in r],
            "resumed_from_step": resumed["restarts"][-1]["from_step"], "published_rows": len(_RUN.published)}


def rl_step(method: str, use_gpu: bool, work: Path) -> dict:
    """`FIRST` iterations with a checkpoint at each, then a resumed run to iteration `THEN`, through `rl_worker`."""
    from workloads.align import rl, rl_run
    from workloads.align.rl_checkpoints import checkpoint_dir, list_checkpoints
    from workloads.finetune import driver as finetune
    from workloads.models.loading import resolve_model_path

    run_dir, rows = work / method, None
    for iterations in (FIRST, THEN):
        recipe = _recipe(method, use_gpu, iterations, work)
        train_prompts, held_out = _driver_data(method, recipe)
        checkpoints = checkpoint_dir(recipe, run_dir)
        config = {"recipe": recipe.model_dump(mode="json"), "model_path": resolve_model_path(recipe.model),
                  "run_dir": str(run_dir), "checkpoints": str(checkpoints), "source": None, "engines": []}
        _fit(rl_run.rl_worker, config, name=recipe.run.name, storage_path=str(checkpoints.parent / ".ray"),
             scaling=finetune.worker_scaling(recipe),
             shared={"train_prompts": rl_run.worker_prompts(recipe, train_prompts), "held_out": held_out})
        state = json.loads((list_checkpoints(checkpoints)[-1] / rl.TRAINER_STATE).read_text())
        rows = rows or state["rows"]
    resumed = state["rows"]
    ok = ([r["iteration"] for r in resumed] == list(range(THEN + 1)) and resumed[: FIRST + 1] == rows
          and _finite(resumed[1:], ("mean_reward", "kl", "policy_loss")) and state["restarts"]
          and any(r.get("eval_reward") is not None for r in resumed))
    return {"passed": bool(ok), "backend": _RUN.backend, "mean_reward": [r.get("mean_reward") for r in resumed[1:]],
            "kl": [r.get("kl") for r in resumed[1:]], "policy_loss": [r.get("policy_loss") for r in resumed[1:]],
            "eval_reward": [r["eval_reward"] for r in resumed if r.get("eval_reward") is not None],
            "restarts": state["restarts"]}


def run_steps(names: list[str], use_gpu: bool) -> dict[str, dict]:
    """Each step's outcome: passed or failed (with the error's text), or skipped and why."""
    import torch

    outcomes = {}
    with tempfile.TemporaryDirectory(prefix="llmc-gpu-check-") as tmp:
        for name in names:
            if name in NEEDS_CUDA and not use_gpu:
                outcomes[name] = {"passed": None, "skipped": NEEDS_CUDA[name]}
                continue
            started = time.perf_counter()
            if use_gpu:
                torch.cuda.reset_peak_memory_stats()
            try:
                step = finetune_step if name in STEPS_FINETUNE else rl_step
                outcome = step(name, use_gpu, Path(tmp))
            except Exception as error:  # noqa: BLE001 - a failed step is recorded and the check goes on
                outcome = {"passed": False, "error": f"{type(error).__name__}: {error}",
                           "traceback": traceback.format_exc()[-4000:]}
            outcome["seconds"] = round(time.perf_counter() - started, 1)
            if use_gpu:
                outcome["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            outcomes[name] = outcome
            print(f"[gpu_check] {name}: {json.dumps(outcome)[:600]}", flush=True)
    return outcomes


# ---------------------------------------------------------------------------------------------
# Carrying what the device machine lacks
# ---------------------------------------------------------------------------------------------


def pack(out: Path, cuda: str) -> int:
    """Wheels of the versions installed here (bitsandbytes cut to CUDA `cuda`'s build), the driver's data of every
    step and the tiny model."""
    from importlib.metadata import version

    from workloads.models.cache import cache_dir
    from workloads.models.recipe import TinyModelConfig
    from workloads.models.tiny import build_tiny_model

    out.mkdir(parents=True, exist_ok=True)
    carried = _requirements(ROOTS) - _requirements(("torch",))
    pinned = [f"{name}=={version(name)}" for name in sorted(carried) if name != "deepspeed"]
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(out), *pinned], check=True)
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    f"deepspeed=={version('deepspeed')}"], check=True, env={**os.environ, "DS_BUILD_OPS": "0"})
    for wheel in out.glob("bitsandbytes-*.whl"):
        _keep_cuda_build(wheel, f"cuda{cuda.replace('.', '')}")
    import pickle

    made = {name: _driver_data(name, _recipe(name, False, THEN, out)) for name in [*STEPS_FINETUNE, *STEPS_RL]}
    (out / DRIVER_DATA).write_bytes(pickle.dumps(made))
    model = build_tiny_model(TinyModelConfig())  # copied under its cache key, found there through LLMC_CACHE
    shutil.rmtree(out / "cache", ignore_errors=True)
    shutil.copytree(model, out / "cache" / model.relative_to(cache_dir()))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB")
    return 0 if size < 60 * 2**20 else 1


def _requirements(roots: tuple[str, ...]) -> set[str]:
    """`roots` and every distribution they require (as installed here, extras left out), by normalized name."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found, todo = set(), [canonicalize_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        try:
            needs = requires(name) or []
        except PackageNotFoundError:
            continue
        for line in needs:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return found


def _keep_cuda_build(wheel: Path, keep: str) -> None:
    """Rewrite the bitsandbytes wheel with only its CPU library and `libbitsandbytes_<keep>.so` (it ships one per
    CUDA and ROCm version, over 40 MB together)."""
    import zipfile

    cut = wheel.with_suffix(".cut")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(cut, "w", zipfile.ZIP_DEFLATED) as dst:
        names = [n for n in src.namelist() if "/libbitsandbytes_" not in n or n.endswith(f"_{keep}.so")
                 or n.endswith("_cpu.so")]
        if not any(n.endswith(f"_{keep}.so") for n in names):
            raise SystemExit(f"{wheel.name} has no libbitsandbytes_{keep}.so")
        for name in names:
            data = src.read(name)
            if name.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(keepends=True)
                               if line.split(",")[0] in names or not line.split(",")[0].endswith(".so")).encode()
            dst.writestr(name, data)
    cut.replace(wheel)


def _use_carried(wheels: Path) -> None:
    """Install the carried wheels into `wheels/site` (no index, no dependencies) and put it first on the path."""
    site = wheels / "site"
    if not site.is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                        str(site), *map(str, sorted(wheels.glob("*.whl")))], check=True)
    sys.path.insert(0, str(site))
    if (wheels / "cache").is_dir():
        os.environ["LLMC_CACHE"] = str(wheels / "cache")
    _RUN.carried = wheels / DRIVER_DATA


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "deepspeed", "peft", "bitsandbytes", "accelerate"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/gpu_check.json", help="results (JSON)")
    parser.add_argument("--cpu-smoke", action="store_true", help="run on CPU over gloo; CUDA-only steps skipped")
    parser.add_argument("--steps", nargs="+", choices=[*STEPS_FINETUNE, *STEPS_RL],
                        default=[*STEPS_FINETUNE, *STEPS_RL], help="run only these")
    parser.add_argument("--wheels", type=Path, help="a directory made by --pack, carried to the device machine")
    parser.add_argument("--pack", type=Path, metavar="DIR", help="(here) put the wheels and tiny model into DIR")
    parser.add_argument("--cuda", default="13.0", help="with --pack: the CUDA version of the device's torch")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.pack:
        return pack(args.pack, args.cuda)
    if args.wheels:
        _use_carried(args.wheels)
    _one_worker_train()
    import torch

    use_gpu = not args.cpu_smoke
    if use_gpu and not torch.cuda.is_available():
        parser.error("no CUDA device: pass --cpu-smoke to run the same code on CPU")
    started = time.perf_counter()
    with _process_group(use_gpu) as _RUN.backend:
        steps = run_steps(args.steps, use_gpu)
    device = torch.cuda.get_device_name(0) if use_gpu else f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    results = {"device": device,
               "cuda": torch.version.cuda, "python": platform.python_version(), "versions": _versions(),
               "mode": "cpu-smoke" if args.cpu_smoke else "gpu", "seconds": round(time.perf_counter() - started, 1),
               "steps": steps}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    failed = [name for name, step in steps.items() if step["passed"] is False]
    print(f"[gpu_check] {len(steps) - len(failed)} of {len(steps)} steps passed or skipped; failed: {failed or 'none'}"
          f"; results in {args.out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

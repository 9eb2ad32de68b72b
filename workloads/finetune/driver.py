"""Supervised fine-tuning: full, LoRA and QLoRA, on Ray Train workers with DeepSpeed or DDP.

`python -m workloads.finetune RECIPE` (or `llmc finetune RECIPE`). `run` is the driver (validate, connect, fit,
then write the model, summary.json, metrics.csv and loss_curve.png); `train_worker` (workloads.finetune.worker) is
what each worker runs (setup, loop, save).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from cluster import train as cluster_train
from workloads.common import multinode, reporting, tracking
from workloads.common.recipe import RecipeError
from workloads.common.run import RESUME_LATEST, RunConfig
from workloads.data import prepared as prepared_data
from workloads.data.check import check_data, check_heads, describe
from workloads.data.formats import build_datasets
from workloads.finetune import schedule
from workloads.finetune.evaluation import GenerationCase, generation_cases
from workloads.finetune.plan import train_worker_resources
from workloads.finetune.recipe import FinetuneRecipe
from workloads.finetune.worker import BEST_RANK, TRAINER_STATE, train_worker
from workloads.models.loading import load_tokenizer, resolve_model_path
from workloads.models.lora import merge_adapter

if TYPE_CHECKING:
    from workloads.data.pipeline import Streams


def run(recipe: FinetuneRecipe, output_dir: str | None = None, address: str | None = None,
        overwrite: bool = False, show: bool = True) -> dict:
    """Fine-tune as the recipe says; returns the summary also written to `<run dir>/summary.json` (`show` prints it
    as a table too).

    A run directory that already holds a run is refused unless `overwrite` (or `run.resume_from` continues it).
    """
    from cluster.runtime import connect

    run_dir = recipe.output_dir(output_dir)
    refuse_to_replace(run_dir, recipe.run, overwrite)
    run_dir.mkdir(parents=True, exist_ok=True)
    reporting.save_recipe(recipe, run_dir)
    prepared = prepare(recipe, address)
    print(f"[llmc] {connect(address)}", flush=True)
    storage = storage_of(recipe, run_dir)
    multinode.check_training(recipe.run.storage_path, storage, prepared.model_path)
    resume_from, resume = _resume_plan(recipe, storage, run_dir)
    if not recipe.run.resume_from:
        tracking.reset(recipe.tracking, run_dir)
    print(f"[llmc] run {recipe.run.name}: dashboard {cluster_train.run_url() or '(none)'}", flush=True)
    started = time.perf_counter()
    with note_checkpoints_on_stop(cluster_train.experiment_path(storage, recipe.run.name)), \
            reporting.TrainProgress(prepared.total_steps) as progress:
        result = fit(recipe, run_dir, prepared, resume_from=resume_from, resume=resume, on_report=progress.update)
    wall = time.perf_counter() - started
    if result.checkpoint_dir is None:
        raise RuntimeError(f"training finished without a checkpoint (storage {result.storage_dir})")
    return write_outputs(recipe, run_dir, prepared.model_path, result, wall, show=show)


@dataclass(frozen=True)
class Prepared:
    """What the driver makes once, before Ray: the base model's path, the run's length, and the data every worker
    trains on (tokenized train and eval examples, eval generation cases), or its copy in the object store."""

    model_path: str
    total_steps: int
    data: tuple[list[dict], list[dict], list[GenerationCase]] | cluster_train.Shared
    streams: Streams | None = None  # data.streaming: the pipelines workers stream from (then `data` holds only cases)

    def shared(self) -> Prepared:
        """The same, its data put in the object store once: for several runs (search trials) that share it."""
        return replace(self, data=cluster_train.share(self.data))


def prepare(recipe: FinetuneRecipe, address: str | None = None) -> Prepared:
    """Check the data, then tokenize it once for all workers: bad data fails here, in seconds, naming file, line
    and field, not in every worker after Ray starts; an earlier run's tokenized data is taken instead when nothing it
    depends on changed (data.cache). With data.streaming, only the first rows are checked here; then Ray is connected
    (`address`) and the data becomes Ray Data pipelines (`_prepare_streams`)."""
    model_path = resolve_model_path(recipe.model)
    print(f"[llmc] model {recipe.model.name} -> {model_path}", flush=True)
    tokenizer_args = (model_path, recipe.model.revision, recipe.model.chat_template)
    if recipe.data.streaming.enabled:
        return _prepare_streams(recipe, model_path, load_tokenizer(*tokenizer_args), address)
    generation = {"generate": recipe.eval.generate, "samples": recipe.eval.generate_samples}
    data_key = prepared_data.key(recipe.data, recipe.train.seed, tokenizer_args, generation)
    if (kept := prepared_data.load(data_key)) is not None:
        print(f"[llmc] {kept.description} (tokenized by an earlier run: the files and settings are unchanged)",
              flush=True)
    else:
        tokenizer = load_tokenizer(*tokenizer_args)
        description = describe(check_data(recipe.data, tokenizer))
        print(f"[llmc] {description}", flush=True)
        train_ex, eval_ex = build_datasets(recipe.data, tokenizer, recipe.train.seed)
        cases = generation_cases(recipe, tokenizer) if recipe.eval.generate and eval_ex else []
        kept = prepared_data.PreparedData(description, {"train": train_ex, "eval": eval_ex, "cases": [
            [case.prompt_ids, case.reference] for case in cases]})
        prepared_data.save(data_key, kept)
    data = kept.data
    cases = [GenerationCase(ids, reference) for ids, reference in data["cases"]]
    return Prepared(model_path, _total_steps(recipe, len(data["train"])), (data["train"], data["eval"], cases))


def _prepare_streams(recipe: FinetuneRecipe, model_path: str, tokenizer, address: str | None) -> Prepared:
    """The streaming path's preparation: the first rows of every file checked here, then the pipelines; the train
    examples are counted (a streamed pass, on the cluster) only when num_epochs needs them."""
    from cluster.runtime import connect
    from workloads.data import pipeline

    data, seed = recipe.data, recipe.train.seed
    print(f"[llmc] {describe(check_heads(data, tokenizer))} (the first {data.streaming.check_rows} rows of each "
          "checked here, every row as it streams)", flush=True)
    print(f"[llmc] {connect(address)}", flush=True)
    counted = recipe.train.max_steps is None
    streams = pipeline.build(data, seed, (model_path, recipe.model.revision, recipe.model.chat_template), counted)
    how = {"cached": " (an earlier run's count: the data is unchanged)", "counted": " (counted in a streamed pass)"}
    print(f"[llmc] data streamed with Ray Data: tokenized in batches of {data.streaming.batch_rows} rows on the "
          f"cluster's CPUs{f'; {streams.train_examples} train examples' + how[streams.counted] if counted else ''}",
          flush=True)
    cases = generation_cases(recipe, tokenizer, pipeline.eval_records(data, seed)) \
        if recipe.eval.generate and streams.eval is not None else []
    total = _total_steps(recipe, streams.train_examples) if counted else recipe.train.max_steps
    return Prepared(model_path, total, ([], [], cases), streams)


def storage_of(recipe: FinetuneRecipe, run_dir: Path) -> str:
    """Where the run's checkpoints go: `run.storage_path`, else the run directory's checkpoints/."""
    return recipe.run.storage_path or str(run_dir / "checkpoints")


def fit(recipe: FinetuneRecipe, run_dir: Path, prepared: Prepared, *, resume_from: str | None = None,
        resume: bool = False, on_report: Callable[[dict], None] | None = None,
        callbacks: Sequence = ()) -> cluster_train.FitResult:
    """The recipe's Ray Train run (`train_worker` on its workers), as `llmc finetune` and each hyperparameter-search
    trial start it; `on_report` and `callbacks` see rank 0's reports (see `cluster.train.fit`)."""
    storage = storage_of(recipe, run_dir)
    return cluster_train.fit(
        train_worker,
        {"recipe": recipe.model_dump(mode="json"), "model_path": prepared.model_path, "resume_from": resume_from,
         "fit_id": uuid.uuid4().hex, "tracking_dir": str(tracking.tracking_dir(recipe.tracking, run_dir)),
         "streamed": _streamed(recipe, prepared.streams)},
        name=recipe.run.name,
        resume=resume,
        storage_path=storage,
        scaling=worker_scaling(recipe),
        max_failures=recipe.run.max_failures,
        keep_checkpoints=recipe.train.keep_checkpoints,
        keep_best_by=(BEST_RANK, "max") if recipe.eval.keep_best else None,
        local_copy_to=run_dir / "final_checkpoint" if "://" in storage else None,
        on_report=on_report,
        callbacks=callbacks,
        shared={"data": prepared.data},
        datasets=_datasets(prepared.streams),
    )


def _datasets(streams) -> dict | None:
    """The streamed datasets by the names the workers read them under (`worker.StreamedSteps`, `StreamedEval`)."""
    if streams is None:
        return None
    return {"train": streams.train, **({"eval": streams.eval} if streams.eval is not None else {})}


def _streamed(recipe: FinetuneRecipe, streams) -> dict | None:
    """What a worker of the streaming path needs to know of its data: steps per pass (when counted), whether an eval
    set streams."""
    if streams is None:
        return None
    train, examples = recipe.train, streams.train_examples
    per_epoch = None if examples is None else schedule.steps_per_epoch(
        examples, train.micro_batch_size, train.gradient_accumulation_steps, recipe.scaling.num_workers)
    return {"steps_per_epoch": per_epoch, "eval": streams.eval is not None}


def _total_steps(recipe: FinetuneRecipe, examples: int) -> int:
    """The run's optimizer steps, as the workers resolve them: `max_steps`, or `num_epochs` over `examples`."""
    train, workers = recipe.train, recipe.scaling.num_workers
    if train.max_steps is not None:
        return train.max_steps
    per_epoch = schedule.steps_per_epoch(examples, train.micro_batch_size, train.gradient_accumulation_steps,
                                         workers)
    if per_epoch == 0:
        raise RecipeError(f"field 'train.num_epochs': {examples} training examples cannot fill one optimizer "
                          f"step of {workers} workers x micro_batch_size {train.micro_batch_size} x "
                          f"gradient_accumulation_steps {train.gradient_accumulation_steps}")
    print(f"[llmc] {schedule.describe(train, per_epoch, workers)}", flush=True)
    return schedule.total_steps(train, per_epoch)


def worker_scaling(recipe: FinetuneRecipe) -> cluster_train.WorkerScaling:
    """The recipe's workers for Ray Train, with the resources `llmc validate` plans for them."""
    s = recipe.scaling
    return cluster_train.WorkerScaling(num_workers=s.num_workers, resources_per_worker=train_worker_resources(recipe),
                                       use_gpu=s.use_gpu, accelerator_type=s.accelerator_type,
                                       placement_strategy=s.placement_strategy)


_RUN_OUTPUTS = ("adapter", "model", "merged", "checkpoints", "summary.json")


def refuse_to_replace(run_dir: Path, run: RunConfig, overwrite: bool, resumable: bool = True) -> None:
    """A new run replaces its directory's model and checkpoints, and the checkpoints in its storage
    (`run.storage_path/run.name`, where a run of the same name from another run directory may have left them):
    never silently (fine-tuning's and align's runs)."""
    resume = ", or --set run.resume_from=latest to continue it" if resumable else ""
    found = [name for name in _RUN_OUTPUTS if (run_dir / name).exists()]
    if found and not overwrite and not run.resume_from:
        raise RecipeError(f"field 'run.output_dir': {run_dir} already holds a run ({', '.join(found)}): pass "
                          f"--overwrite to replace it{resume}")
    if run.storage_path is None or overwrite:  # unset: the storage is inside the run directory, checked above
        return
    storage = run.storage_path if "://" in run.storage_path else str(Path(run.storage_path).expanduser().resolve())
    location = cluster_train.experiment_path(storage, run.name)
    if _continues(run.resume_from, location):
        return
    try:
        entries = cluster_train.stored_entries(location)
    except OSError:  # unreachable from here, so nothing here can delete it either: the storage checks that follow
        return  # (workloads.common.multinode, the run's own storage set-up) say what is wrong with it
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise RecipeError(f"field 'run.storage_path': {location} already holds checkpoints of an earlier run named "
                          f"{run.name!r} ({shown}), which this run would delete: pass --overwrite to replace them, "
                          f"or set another run.name or run.storage_path{resume}")


def _continues(resume_from: str | None, location: str) -> bool:
    """Whether a run resuming from `resume_from` continues the run stored in `location` (so keeps it)."""
    if resume_from is None or resume_from == RESUME_LATEST:
        return resume_from == RESUME_LATEST
    if "://" in location:
        return resume_from.rstrip("/").startswith(location.rstrip("/") + "/")
    return Path(resume_from).expanduser().resolve().is_relative_to(location)


@contextlib.contextmanager
def note_checkpoints_on_stop(checkpoints: str) -> Iterator[None]:
    """A requested stop (Ctrl-C, SIGTERM) aborts the run and keeps its checkpoints: the KeyboardInterrupt goes on
    with a note saying where (the entry point's last line; fine-tuning's and align's runs)."""
    try:
        yield
    except KeyboardInterrupt as exc:
        exc.add_note(f"training stopped; its checkpoints stay in {checkpoints} (continue with "
                     "--set run.resume_from=latest)")
        raise


def _resume_plan(recipe: FinetuneRecipe, storage: str, run_dir: Path) -> tuple[str | None, bool]:
    """(checkpoint dir the workers start from, whether Ray Train continues the run name's own storage).

    A run starts fresh: its storage (`storage/run.name`) is cleared, as its summary and model are
    replaced. `run.resume_from: latest` continues the newest checkpoint there instead; an explicit
    checkpoint inside that storage is first copied to `<run dir>/resume_from/`, out of the way.
    """
    resume_from = recipe.run.resume_from
    if resume_from == RESUME_LATEST:
        return None, True
    if resume_from and "://" not in storage:
        source = Path(resume_from).resolve()
        if source.is_relative_to(Path(cluster_train.experiment_path(storage, recipe.run.name)).resolve()):
            copy = run_dir / "resume_from"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(source, copy)
            return str(copy), False
    return resume_from, False


def _best_checkpoint(recipe: FinetuneRecipe, result: cluster_train.FitResult, best_step: int | None) -> Path | None:
    """With eval.keep_best, the kept checkpoint of the best step (it carries the HF export); else None."""
    if not recipe.eval.keep_best or best_step is None or result.best_checkpoint_dir is None:
        return None
    step = json.loads((result.best_checkpoint_dir / TRAINER_STATE).read_text())["step"]
    if step != best_step or not (result.best_checkpoint_dir / "model").is_dir():
        print(f"[llmc] warning: the best step {best_step} has no exported checkpoint in this run's storage (the best "
              f"kept is step {step}): the model is exported from the last step", flush=True)
        return None
    return result.best_checkpoint_dir


def _last(history: list[dict], key: str):
    values = [r[key] for r in history if r.get(key) is not None]
    return values[-1] if values else None


def _notable(recipe: FinetuneRecipe, summary: dict) -> dict:
    """What the printed table shows: summary.json less what says nothing new for this run (a full-length run's
    step counts twice, the best step of a run that neither keeps the best nor stops early)."""
    said = {"total_steps", "stopped_early"} if not summary["stopped_early"] else set()
    if summary["artifact_step"] == summary["steps"]:
        said.add("artifact_step")
    if not (recipe.eval.keep_best or recipe.eval.early_stopping_patience):
        said |= {"best_metric", "best_value", "best_step"}
    return {key: value for key, value in summary.items() if key not in said}


def write_outputs(recipe: FinetuneRecipe, run_dir: Path, model_path: str, result, wall: float,
                  show: bool = True) -> dict:
    """The run's model (adapter), summary.json, metrics.csv and loss_curve.png from its final checkpoint; `show`
    prints the summary table."""
    state = json.loads((result.checkpoint_dir / TRAINER_STATE).read_text())
    history, initial = state["history"], state.get("initial_eval") or {}
    stopping = state.get("early_stopping") or {}
    best = _best_checkpoint(recipe, result, stopping.get("best_step"))
    is_adapter = recipe.train.method != "full"
    artifact = run_dir / ("adapter" if is_adapter else "model")
    shutil.rmtree(artifact, ignore_errors=True)
    shutil.copytree((best or result.checkpoint_dir) / "model", artifact)
    merged = None
    if is_adapter and recipe.run.merge_adapter:
        merged = str(merge_adapter(model_path, artifact, run_dir / "merged", recipe.model))
    train_seconds = sum(r["step_seconds"] for r in history)
    total = state["total_steps"]
    summary = {
        "method": recipe.train.method,
        "model": recipe.model.name,
        "base_model_path": model_path,
        "initial_eval_loss": state.get("initial_eval_loss"),
        "final_eval_loss": _last(history, "eval_loss"),
        "initial_eval_perplexity": initial.get("eval_perplexity"),
        "final_eval_perplexity": _last(history, "eval_perplexity"),
        "initial_eval_exact_match": initial.get("eval_exact_match"),
        "final_eval_exact_match": _last(history, "eval_exact_match"),
        "initial_train_loss": history[0]["loss"] if history else None,
        "final_train_loss": history[-1]["loss"] if history else None,
        "steps": state["step"],
        "total_steps": total,
        "steps_per_epoch": state.get("steps_per_epoch"),
        "epochs": round(state["step"] / state["steps_per_epoch"], 4) if state.get("steps_per_epoch") else None,
        "stopped_early": state["step"] < total,
        "best_metric": stopping.get("metric"),
        "best_value": stopping.get("best_value"),
        "best_step": stopping.get("best_step"),
        "tokens_per_second": sum(r["tokens"] for r in history) / train_seconds if train_seconds else None,
        "train_seconds": train_seconds,
        "wall_seconds": wall,
        "workers": recipe.scaling.num_workers,
        "deepspeed_stage": recipe.deepspeed.stage if recipe.deepspeed.enabled else None,
        "restarts": state["restarts"],
        "artifact": str(artifact),
        "artifact_step": stopping["best_step"] if best else state["step"],
        "merged": merged,
        "checkpoint": str(result.checkpoint_dir),
        "best_checkpoint": str(best) if best else None,
        "storage": result.storage_dir,
        "tracking": tracking.locations(recipe.tracking, tracking.tracking_dir(recipe.tracking, run_dir),
                                       recipe.run.name),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    reporting.write_csv(history, run_dir / "metrics.csv")
    reporting.plot_losses(history, run_dir / "loss_curve.png", title=f"{recipe.train.method} fine-tuning")
    if show:
        reporting.print_summary("fine-tuning summary", _notable(recipe, summary), run_dir)
    return summary


def main(argv: list[str] | None = None) -> int:
    """`python -m workloads.finetune RECIPE [--set K=V] [--output-dir DIR] [--overwrite] [--address A]`: a job."""
    from workloads.common.entrypoint import recipe_job

    return recipe_job(argv, prog="python -m workloads.finetune", description=__doc__.splitlines()[0], kind="finetune")

"""Fine-tuning end to end through the real `llmc` entry point on a real Ray cluster with DeepSpeed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, StartedLlmc, read_metrics_csv, wanted

pytestmark = pytest.mark.slow
CONFIGS = REPO / "workloads" / "configs"


def start_finetune(recipe: str, out: Path, *overrides: str, flags: tuple[str, ...] = ()) -> tuple[Path, StartedLlmc]:
    """`llmc finetune` started in a subprocess; `finish` waits for it."""
    sets = [arg for o in overrides for arg in ("--set", o)]
    return out, StartedLlmc("finetune", str(CONFIGS / recipe), "--output-dir", str(out), *sets, *flags)


def finish(run: tuple[Path, StartedLlmc]) -> tuple[dict, str]:
    """Waits for a started `llmc finetune`; returns the run's summary and what the command printed."""
    out, started = run
    result = started.result()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return json.loads((out / "summary.json").read_text()), result.stdout + result.stderr


@pytest.fixture(scope="module")
def zero3_runs(ray_cluster, tmp_path_factory, request) -> dict[str, tuple[Path, StartedLlmc]]:
    """The full and QLoRA ZeRO-3 runs, started together (4 Train workers on the 8 logical CPUs) and each waited for
    by its test: one run's start-up overlaps the other's training."""
    root, runs = tmp_path_factory.mktemp("zero3"), {}
    if wanted(request, "test_full_finetune_zero3_lowers_the_loss"):
        # 4000 examples / (2 workers x 16) = 125 steps an epoch; 0.24 epochs = 30 steps. Evals at 15 and 30.
        runs["full"] = start_finetune("tiny-full.yaml", root / "full", "train.max_steps=null", "train.num_epochs=0.24",
                                      "train.eval_every=15", "eval.generate=true", "eval.generate_samples=16",
                                      "eval.max_new_tokens=16", "eval.keep_best=true",
                                      "tracking.backends=[tensorboard, mlflow]")
    if wanted(request, "test_qlora_4bit_zero3_lowers_the_loss_and_stops_early"):
        runs["qlora"] = start_finetune("tiny-qlora.yaml", root / "qlora", "deepspeed.stage=3", "train.max_steps=30",
                                       "train.eval_every=5", "eval.early_stopping_patience=1", "eval.min_delta=100",
                                       flags=("--verbose",))
    yield runs
    for _, started in runs.values():
        started.stop()


def checkpoint_dirs(out: Path, run: str = "tiny-lora") -> list[Path]:
    """The run's Ray Train checkpoints (`checkpoints/<run.name>/`), oldest first (not Ray's snapshot file)."""
    return sorted(c for c in (out / "checkpoints" / run).glob("checkpoint_*") if c.is_dir())


def test_lora_zero2_two_workers_learns_survives_a_killed_worker_and_merges(lora_run):
    """One run for three promises (the session's `lora_run`, whose adapter the test server also serves): LoRA on
    ZeRO-2 learns; a worker killed mid-run costs a restart from the last checkpoint, not the run (its 8-bit AdamW
    state goes through DeepSpeed's checkpoint and back); the merged model equals base plus adapter."""
    out, steps, printed, summary = lora_run["out"], lora_run["steps"], lora_run["printed"], lora_run["summary"]
    assert lora_run["killed"] is not None, "no checkpoint and live worker to kill were seen\n" + printed[-3000:]
    failures = [r for r in summary["restarts"] if r["via"] == "failure"]
    assert failures and failures[0]["from_step"] >= 5, (summary["restarts"], printed[-2000:])  # not from scratch
    # One row per step: steps before the checkpoint come from it, the rest were trained after the restart.
    assert [int(r["step"]) for r in read_metrics_csv(out)] == list(range(1, steps + 1))
    # Quiet by default: our lines, one progress bar fed from the driver, the summary; no worker or Ray chatter.
    assert "train: 100%" in printed and f"{steps}/{steps}" in printed and "loss=" in printed, printed[-3000:]
    assert "RayTrainWorker" not in printed and "TrainController" not in printed, printed[-3000:]
    assert "INFO mlflow" not in printed, printed[-3000:]  # creating its new MLflow database said nothing
    # The bar redraws one terminal line with \r (a captured pipe reads each redraw as a line): count the rest.
    assert len([line for line in printed.splitlines() if not line.startswith("train:")]) < 40, printed
    assert summary["method"] == "lora" and summary["workers"] == 2 and summary["deepspeed_stage"] == 2
    assert summary["final_eval_loss"] < 0.85 * summary["initial_eval_loss"], summary
    assert summary["steps"] == steps and summary["tokens_per_second"] > 0
    assert (out / "loss_curve.png").stat().st_size > 0 and (out / "recipe.yaml").exists()
    kept = checkpoint_dirs(out)  # the two newest, and the one the restart resumed from (Ray keeps that one)
    assert [json.loads((c / "trainer_state.json").read_text())["step"] for c in kept][-2:] == [25, 30]
    assert [(c / "model").exists() for c in kept] == [False] * (len(kept) - 1) + [True]  # HF export: last only

    from peft import PeftModel

    from workloads.models.loading import load_model, load_tokenizer

    adapter = Path(summary["artifact"])
    assert (adapter / "adapter_config.json").exists() and not (adapter / "model.safetensors").exists()
    tokenizer = load_tokenizer(summary["base_model_path"])
    batch = tokenizer(["<|im_start|>user\n12 + 30<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt",
                      add_special_tokens=False)
    base = load_model(summary["base_model_path"])
    with torch.no_grad():
        base_logits = base(**batch).logits
        tuned_logits = PeftModel.from_pretrained(base, str(adapter)).eval()(**batch).logits
        merged_logits = load_model(summary["merged"])(**batch).logits
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-3)  # the adapter changed the model
    torch.testing.assert_close(merged_logits, tuned_logits, atol=1e-4, rtol=1e-4)
    from workloads.models.lora import MERGED_FROM  # run.merge_adapter merges as the recipe's model section says

    assert json.loads((Path(summary["merged"]) / MERGED_FROM).read_text()) == {
        "base_model": summary["base_model_path"], "revision": None, "adapter": str(adapter.resolve())}


def test_full_finetune_zero3_lowers_the_loss(zero3_runs, monkeypatch):
    """Also: the length in epochs, generation-scored evals, the best checkpoint kept and exported, trackers."""
    out = zero3_runs["full"][0]
    summary, _ = finish(zero3_runs["full"])
    assert summary["method"] == "full" and summary["deepspeed_stage"] == 3
    assert summary["final_eval_loss"] < 0.85 * summary["initial_eval_loss"], summary
    schedule = (summary["total_steps"], summary["steps"], summary["steps_per_epoch"], summary["epochs"])
    assert schedule == (30, 30, 125, 0.24), summary
    assert summary["stopped_early"] is False and 0.0 <= summary["final_eval_exact_match"] <= 1.0
    assert summary["final_eval_perplexity"] == pytest.approx(math.exp(summary["final_eval_loss"]))
    rows = {int(r["step"]): r for r in read_metrics_csv(out)}
    assert rows[15]["eval_exact_match"] != "" and rows[16]["eval_exact_match"] == ""  # measured at evals only
    # keep_best: checkpoints at each new best (15, maybe 30) and every 20 steps; Ray Train keeps the 2 best-ranked
    # and the newest, so step 15's stays and step 20's (the newest-2 rule would keep it) is gone.
    assert summary["best_metric"] == "eval_loss" and summary["best_step"] in (15, 30)
    assert summary["artifact_step"] == summary["best_step"] and summary["best_checkpoint"], summary
    kept = [json.loads((c / "trainer_state.json").read_text())["step"] for c in checkpoint_dirs(out, "tiny-full")]
    assert kept == [15, 30], kept
    from tests.test_tracking import read_events, scalars

    logged = scalars(read_events(Path(summary["tracking"]["tensorboard"])))
    assert [step for step, _ in logged["train/loss"]] == list(range(1, 31)) and len(logged["eval/exact_match"]) == 3
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when told to
    client = MlflowClient(tracking_uri=summary["tracking"]["mlflow"])
    (run,) = client.search_runs([client.get_experiment_by_name("llmc").experiment_id])
    assert run.info.status == "FINISHED" and len(client.get_metric_history(run.info.run_id, "train/loss")) == 30
    from workloads.models.loading import load_model

    model = load_model(summary["artifact"])  # the gathered ZeRO-3 weights load as a plain model
    assert model.config.model_type == "llama"


def test_qlora_4bit_zero3_lowers_the_loss_and_stops_early(zero3_runs):
    """Early stopping: with min_delta beyond any possible gain, the eval after the first one ends the run."""
    summary, printed = finish(zero3_runs["qlora"])
    assert "(RayTrainWorker" in printed and "[train] step" in printed  # --verbose streams the workers' logs
    assert summary["method"] == "qlora" and summary["deepspeed_stage"] == 3
    assert (summary["steps"], summary["total_steps"], summary["stopped_early"]) == (10, 30, True), summary
    assert summary["best_step"] in (5, 10) and summary["best_metric"] == "eval_loss"
    assert summary["final_eval_loss"] < 0.9 * summary["initial_eval_loss"], summary
    assert (Path(summary["artifact"]) / "adapter_model.safetensors").exists()


def test_workers_train_on_the_data_the_driver_tokenized_once(ray_cluster, tmp_path):
    """`prepare` reads and tokenizes the data (and the eval generation prompts) on the driver; the workers get that
    copy from the object store. Shown by removing the files before the Ray Train run starts: it still trains."""
    import shutil

    import ray

    from workloads.finetune import driver as ft
    from workloads.kinds import load_recipe

    for name in ("arithmetic_train.jsonl", "arithmetic_test.jsonl"):
        shutil.copy(REPO / "workloads" / "bundled" / name, tmp_path / name)
    recipe = load_recipe(CONFIGS / "tiny-lora.yaml", [
        f"data.path={tmp_path / 'arithmetic_train.jsonl'}", f"data.eval_path={tmp_path / 'arithmetic_test.jsonl'}",
        "scaling.num_workers=1", "deepspeed.enabled=false", "train.max_steps=2", "train.eval_every=2",
        "eval.generate=true", "eval.generate_samples=4", "eval.max_new_tokens=4"], kind="finetune")
    prepared = ft.prepare(recipe)
    train_ex, eval_ex, cases = prepared.data
    assert len(train_ex) > 0 and len(eval_ex) > 0 and len(cases) >= 4 and prepared.total_steps == 2
    for name in ("arithmetic_train.jsonl", "arithmetic_test.jsonl"):
        (tmp_path / name).unlink()
    ray.init(ignore_reinit_error=True, log_to_driver=False)  # the session's cluster (RAY_ADDRESS)
    result = ft.fit(recipe, tmp_path / "run", prepared)
    state = json.loads((result.checkpoint_dir / ft.TRAINER_STATE).read_text())
    assert state["step"] == 2 and state["history"][-1]["eval_exact_match"] is not None, state["history"]

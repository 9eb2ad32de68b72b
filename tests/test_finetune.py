"""Fine-tuning end to end through the real `llmc` entry point on a real Ray cluster with DeepSpeed."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_llmc, session_processes

pytestmark = pytest.mark.slow
CONFIGS = REPO / "workloads" / "configs"


def run_finetune(recipe: str, out: Path, *overrides: str, flags: tuple[str, ...] = ()) -> tuple[dict, str]:
    """`llmc finetune` in a subprocess; returns the run's summary and what the command printed."""
    sets = [arg for o in overrides for arg in ("--set", o)]
    result = run_llmc("finetune", str(CONFIGS / recipe), "--output-dir", str(out), *sets, *flags)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return json.loads((out / "summary.json").read_text()), result.stdout + result.stderr


def finetune(recipe: str, out: Path, *overrides: str) -> dict:
    return run_finetune(recipe, out, *overrides)[0]


def checkpoint_dirs(out: Path, run: str = "tiny-lora") -> list[Path]:
    """The run's Ray Train checkpoints (`checkpoints/<run.name>/`), oldest first (not Ray's snapshot file)."""
    return sorted(c for c in (out / "checkpoints" / run).glob("checkpoint_*") if c.is_dir())


def read_metrics(out: Path) -> list[dict]:
    with (out / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_lora_zero2_two_workers_learns_and_merges(ray_cluster, tmp_path):
    out = tmp_path / "lora"
    summary, printed = run_finetune("tiny-lora.yaml", out, "run.merge_adapter=true")
    # Quiet by default: our lines, one progress bar fed from the driver, the summary; no worker or Ray chatter.
    assert "train: 100%" in printed and "60/60" in printed and "loss=" in printed, printed[-3000:]
    assert "RayTrainWorker" not in printed and "TrainController" not in printed, printed[-3000:]
    # The bar redraws one terminal line with \r (a captured pipe reads each redraw as a line): count the rest.
    assert len([line for line in printed.splitlines() if not line.startswith("train:")]) < 40, printed
    assert summary["method"] == "lora" and summary["workers"] == 2 and summary["deepspeed_stage"] == 2
    assert summary["final_eval_loss"] < 0.85 * summary["initial_eval_loss"], summary
    assert summary["steps"] == 60 and summary["tokens_per_second"] > 0
    assert (out / "loss_curve.png").stat().st_size > 0 and (out / "recipe.yaml").exists()
    assert [int(r["step"]) for r in read_metrics(out)] == list(range(1, 61))
    kept = checkpoint_dirs(out)
    assert len(kept) == 2 and [(c / "model").exists() for c in kept] == [False, True]  # HF export: last only

    from peft import PeftModel

    from workloads.models import load_model, load_tokenizer

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


def test_full_finetune_zero3_lowers_the_loss(ray_cluster, tmp_path):
    summary = finetune("tiny-full.yaml", tmp_path / "full", "train.max_steps=30", "train.eval_every=15")
    assert summary["method"] == "full" and summary["deepspeed_stage"] == 3
    assert summary["final_eval_loss"] < 0.85 * summary["initial_eval_loss"], summary
    from workloads.models import load_model

    model = load_model(summary["artifact"])  # the gathered ZeRO-3 weights load as a plain model
    assert model.config.model_type == "llama"


def test_qlora_4bit_zero3_lowers_the_loss(ray_cluster, tmp_path):
    summary, printed = run_finetune("tiny-qlora.yaml", tmp_path / "qlora", "deepspeed.stage=3", "train.max_steps=30",
                                    "train.eval_every=15", flags=("--verbose",))
    assert "(RayTrainWorker" in printed and "[train] step" in printed  # --verbose streams the workers' logs
    assert summary["method"] == "qlora" and summary["deepspeed_stage"] == 3
    assert summary["final_eval_loss"] < 0.9 * summary["initial_eval_loss"], summary
    assert (Path(summary["artifact"]) / "adapter_model.safetensors").exists()


def _train_workers_of(ray_cluster) -> list[int]:
    """PIDs of Ray Train workers of this test session's cluster (not of any other Ray on the machine)."""
    return [pid for pid, args in session_processes(ray_cluster.sid) if args.startswith("ray::RayTrainWorker")]


def test_killed_worker_resumes_from_last_checkpoint(ray_cluster, tmp_path):
    out = tmp_path / "fault"
    steps = 150
    args = ["finetune", str(CONFIGS / "tiny-lora.yaml"), "--output-dir", str(out),
            "--set", f"train.max_steps={steps}", "--set", "train.checkpoint_every=10", "--set", "train.eval_every=50",
            "--set", "train.micro_batch_size=48", "--set", "data.max_length=48"]
    proc = subprocess.Popen([sys.executable, "-m", "workloads.cli", *args], cwd=REPO, env=os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, killed = time.monotonic() + 600, None
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        # `report` is a barrier: once a second checkpoint appears, the first is registered for sure.
        if len(checkpoint_dirs(out)) >= 2:
            workers = _train_workers_of(ray_cluster)
            if workers:
                killed = workers[-1]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    output, _ = proc.communicate(timeout=900)
    assert killed is not None, "no checkpoint and live worker to kill were seen\n" + output[-3000:]
    assert proc.returncode == 0, output[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps
    failures = [r for r in summary["restarts"] if r["via"] == "failure"]
    assert failures and failures[0]["from_step"] >= 10, summary["restarts"]  # it did not start over
    # One row per step: steps before the checkpoint come from it, the rest were trained after the restart.
    assert [int(r["step"]) for r in read_metrics(out)] == list(range(1, steps + 1))


def test_ddp_run_resumes_from_an_explicit_checkpoint(ray_cluster, tmp_path):
    first = finetune("tiny-lora.yaml", tmp_path / "a", "deepspeed.enabled=false", "train.max_steps=20",
                     "train.checkpoint_every=10", "train.lr_scheduler=constant")
    assert first["deepspeed_stage"] is None and first["steps"] == 20
    second = finetune("tiny-lora.yaml", tmp_path / "b", "deepspeed.enabled=false", "train.max_steps=30",
                      "train.checkpoint_every=10", "train.lr_scheduler=constant",
                      f"run.resume_from={first['checkpoint']}")
    assert second["steps"] == 30 and second["restarts"] == [{"from_step": 20, "via": "resume_from"}]
    rows = read_metrics(tmp_path / "b")
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])

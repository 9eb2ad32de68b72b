"""scripts/gpu_check.py: the GPU check's own code path, run here in its `--cpu-smoke` mode (gloo, CPU), and the process
group backend it reads from cluster/train.py."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)  # defines only: the stand-in is installed by main()
    return module


def test_the_check_starts_the_process_group_with_the_backend_the_shipped_code_gives_ray_train():
    check = _script()
    assert "nccl" in check._shipped_backend(use_gpu=True)
    assert "gloo" in check._shipped_backend(use_gpu=False)


def test_pack_carries_what_the_roots_require_as_installed_here_less_torch_and_its_requirements():
    check = _script()
    carried = check._requirements(check.ROOTS) - check._requirements(("torch",))
    assert {"transformers", "peft", "deepspeed", "bitsandbytes", "huggingface-hub", "numpy", "pyyaml"} <= carried
    assert not {"torch", "filelock", "sympy", "ray"} & carried, carried


@pytest.mark.slow  # trains (DeepSpeed on CPU), but in one process with no Ray cluster
def test_cpu_smoke_runs_every_step_through_the_worker_code_and_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, str(REPO / "scripts/gpu_check.py"), "--cpu-smoke", "--out", str(out)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())
    steps = report["steps"]
    assert report["mode"] == "cpu-smoke" and report["versions"]["deepspeed"] and report["versions"]["torch"]
    assert list(steps) == ["full-zero2", "full-zero3", "lora", "qlora", "ppo", "grpo"]
    assert steps["qlora"] == {"passed": None, "skipped": "skipped: needs CUDA (bitsandbytes 4-bit on CUDA)"}
    for name in ("full-zero2", "full-zero3", "lora"):
        step = steps[name]
        assert step["passed"] is True and step["backend"] == "gloo" and step["resumed_from_step"] == 3, step
        assert len(step["losses"]) == 5 and all(math.isfinite(x) for x in step["losses"]), step
        assert len(step["eval_loss"]) == 2 and step["published_rows"] == 2, step  # the resumed run: steps 4 and 5
    # ZeRO-2 and ZeRO-3 train the same full model on the same batches: the same losses, to float32 rounding.
    assert steps["full-zero2"]["losses"] == pytest.approx(steps["full-zero3"]["losses"], rel=1e-4)
    for name in ("ppo", "grpo"):
        step = steps[name]
        assert step["passed"] is True and step["backend"] == "gloo", step
        assert len(step["mean_reward"]) == 5 and step["restarts"] == [{"from_iteration": 3, "via": "restart"}], step
        assert len(step["eval_reward"]) >= 2 and all(0 <= r <= 1 for r in step["eval_reward"]), step
    assert "6 of 6 steps passed or skipped; failed: none" in result.stdout

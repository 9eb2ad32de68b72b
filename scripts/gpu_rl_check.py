"""The PPO/GRPO loop on one GPU as a Train worker runs it: the policy in DeepSpeed ZeRO-2 in bf16 on cuda:0 (a one-rank
NCCL group), rollouts from `model.generate`, a checkpoint every 3 iterations, then a second trainer resumed from the
first checkpoint. No Ray or vLLM is needed, so it runs on a bare GPU machine with the project installed.

    python scripts/gpu_rl_check.py [--out bench/results/gpu_rl_check.json]

Prints, per method, where the policy computes, the DeepSpeed engine's type, every row's reward, KL and losses (all
finite?), the checkpoint's files and the peak GPU memory. bench/results/gpu_rl_check.json: an H200, 2026-11-26.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent
OVERRIDES = ["scaling.use_gpu=true", "model.dtype=bfloat16", "scaling.num_workers=1", "rl.iterations=6",
             "rl.rollout=generate", "rl.eval_prompts=200", "train.eval_every=3", "train.checkpoint_every=3",
             "deepspeed.enabled=true", "deepspeed.stage=2", "rl.prompts_per_iteration=32", "rl.group_size=8"]
KEYS = ("mean_reward", "kl", "entropy", "policy_loss", "value_loss", "generation_s", "training_s")


def check(method: str, work: Path) -> dict:
    """Train `rl.iterations`, checkpointing; resume a new trainer from the first checkpoint and finish the run."""
    from workloads.align.prompts import split_prompts
    from workloads.align.recipe import AlignRecipe  # noqa: F401  (registers kind align)
    from workloads.align.rl import RLTrainer, train
    from workloads.align.rl_checkpoints import list_checkpoints, write_checkpoint
    from workloads.config import load_recipe
    from workloads.models import resolve_model_path

    recipe = load_recipe(REPO / f"workloads/configs/tiny-{method}.yaml", OVERRIDES, kind="align")
    prompts, model = split_prompts(recipe.data, recipe.train.seed), resolve_model_path(recipe.model)
    device, started, checkpoints = torch.device("cuda", 0), time.time(), work / method / "checkpoints"

    def trainer() -> RLTrainer:
        return RLTrainer(recipe, model, *prompts, work_dir=work / method, device=device)

    first = trainer()

    rows = train(first, checkpoint=lambda rows: write_checkpoint(
        first, {"iteration": rows[-1]["iteration"], "rows": rows, "restarts": []}, checkpoints, keep=2))
    earliest = list_checkpoints(checkpoints)[0]
    resumed = trainer()
    state = resumed.load_checkpoint(earliest)
    again = train(resumed, rows=state["rows"])
    weights = next(first.policy.model.parameters())
    return {"seconds": round(time.time() - started, 1), "engine": type(first.engine).__name__,
            "param_device": str(weights.device), "param_dtype": str(weights.dtype),
            "rows": [{k: r.get(k) for k in ("iteration", "eval_reward", *KEYS)} for r in rows],
            "resumed_from": state["iteration"],
            "resumed_rows": [{k: r.get(k) for k in ("iteration", "mean_reward", "kl")}
                             for r in again[state["iteration"] + 1:]],
            "all_finite": all(math.isfinite(r[k]) for r in rows[1:] for k in KEYS if r.get(k) is not None),
            "checkpoint_files": sorted(str(p.relative_to(earliest)) for p in earliest.rglob("*") if p.is_file()),
            "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the results here (JSON)")
    args = parser.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29511"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="llmc-gpu-rl-") as work:
        for method in ("ppo", "grpo"):
            results[method] = check(method, Path(work))
            print(json.dumps({method: results[method]}, indent=1), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()
    return 0 if all(results[m]["all_finite"] for m in ("ppo", "grpo")) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""DeepSpeed or plain DDP behind one object: the train loop calls `train_step`, `save`, `load`, `export`.

The DeepSpeed config comes from `workloads.finetune.plan.deepspeed_config` (pure, so GPU recipes are
checked without a GPU). The optimizer, scheduler and gradient accumulation live here, not in recipes.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from pathlib import Path

import torch

from workloads.common.collectives import barrier, sum_across, world
from workloads.finetune.plan import deepspeed_config
from workloads.finetune.recipe import FinetuneRecipe, TrainConfig
from workloads.models.cache import file_sha256

_STATE_TAG = "state"
_COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Multiplier on the base learning rate at an optimizer step of a `total_steps` run: warmup, then the schedule."""

    warmup, floor = cfg.warmup_for(total_steps), cfg.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if cfg.lr_scheduler == "linear":
            return floor + (1.0 - floor) * (1.0 - progress)
        if cfg.lr_scheduler == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def weights_dtype(recipe: FinetuneRecipe) -> str:
    """The dtype the model is loaded in. DeepSpeed (its bf16/fp16 modes keep fp32 master weights) and QLoRA take
    the recipe's; plain DDP keeps fp32 weights and computes in bf16/fp16 under autocast: mixed precision."""
    if recipe.deepspeed.enabled or recipe.train.method == "qlora":
        return recipe.model.dtype
    return "float32"


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The recipe's optimizer over `params`: torch AdamW, or bitsandbytes' 8-bit (paged) AdamW."""
    kwargs = {"lr": cfg.learning_rate, "weight_decay": cfg.weight_decay, "betas": cfg.adam_betas, "eps": cfg.adam_eps}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb

    return {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[cfg.optimizer](
        params, **kwargs)


class Strategy:
    """Wraps the model for distributed training; one optimizer step per `train_step` call, `total_steps` in all."""

    def __init__(self, model: torch.nn.Module, recipe: FinetuneRecipe, world_size: int, device: torch.device,
                 total_steps: int):
        self.recipe, self.world_size, self.device = recipe, world_size, device
        schedule = lr_lambda(recipe.train, total_steps)
        self.use_deepspeed = recipe.deepspeed.enabled
        params = [p for p in model.parameters() if p.requires_grad]
        if self.use_deepspeed:
            if not recipe.scaling.use_gpu:
                os.environ.setdefault("DS_ACCELERATOR", "cpu")
            import deepspeed

            client = build_optimizer(params, recipe.train) if recipe.train.optimizer != "adamw" else None
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model,
                model_parameters=params,
                optimizer=client,
                config=deepspeed_config(recipe, world_size),
                lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            )
            self.module = self.engine.module
        else:
            model.to(device)
            self.engine = (
                torch.nn.parallel.DistributedDataParallel(model)
                if world_size > 1 and world()[1] > 1 else model
            )
            self.module = model
            self.optimizer = build_optimizer(params, recipe.train)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        # Mixed precision on the plain path (fp32 weights from `weights_dtype`); DeepSpeed casts by its config.
        mixed = not self.use_deepspeed and recipe.model.dtype != "float32" and recipe.train.method != "qlora"
        self.compute_dtype = _COMPUTE_DTYPES[recipe.model.dtype] if mixed else None
        # float16 (GPU only) underflows without loss scaling; bfloat16 has float32's range and needs none.
        self.scaler = torch.amp.GradScaler(device.type) if self.compute_dtype == torch.float16 else None

    @property
    def zero3(self) -> bool:
        return self.use_deepspeed and self.recipe.deepspeed.stage == 3

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def forward_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype is not None):
            return self.engine(**batch).loss

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
        """Forward/backward every micro-batch, then one optimizer step; returns (mean loss, grad norm).

        Under DDP the gradients are all-reduced once per step, in the last micro-batch's backward: the others
        accumulate locally (`no_sync`), as DeepSpeed does at its accumulation boundary."""
        self.engine.train()
        losses = []
        for i, batch in enumerate(micro_batches):
            if self.use_deepspeed:
                loss = self.forward_loss(batch)
                self.engine.backward(loss)  # scales by accumulation steps itself
                self.engine.step()  # steps the optimizer only at the accumulation boundary
            else:
                with self._deferred_sync(last=i == len(micro_batches) - 1):
                    loss = self.forward_loss(batch)
                    scaled = loss / len(micro_batches)
                    (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            losses.append(loss.item())
        if self.use_deepspeed:
            grad_norm = self.engine.get_global_grad_norm()
        else:
            if self.scaler:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients
            trainable = [p for p in self.module.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, self.recipe.train.max_grad_norm)
            if self.scaler:
                self.scaler.step(self.optimizer)  # skipped when the gradients overflowed
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return sum(losses) / len(losses), float(grad_norm if grad_norm is not None else float("nan"))

    def _deferred_sync(self, last: bool):
        """DDP's `no_sync` (forward and backward inside it) for every micro-batch but the last of a step."""
        ddp = isinstance(self.engine, torch.nn.parallel.DistributedDataParallel)
        return self.engine.no_sync() if ddp and not last else nullcontext()

    @torch.no_grad()
    def eval_loss(self, batches: list[dict[str, torch.Tensor]]) -> float:
        """Token-weighted mean loss over this rank's batches, summed across all ranks."""
        self.engine.eval()
        loss_sum, tokens_sum = 0.0, 0
        for batch in batches:
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            loss_sum, tokens_sum = loss_sum + self.forward_loss(batch).item() * tokens, tokens_sum + tokens
        loss_sum, tokens_sum = sum_across([loss_sum, tokens_sum])
        return loss_sum / max(tokens_sum, 1.0)

    # -- checkpoints ----------------------------------------------------------------------------

    def save(self, directory: Path, rank: int, trainable_only: bool) -> None:
        """Optimizer, scheduler and trainable weights of this rank into `directory/state` (all ranks),
        with a manifest of their SHA-256 digests."""
        state_dir = directory / _STATE_TAG
        if self.use_deepspeed:
            self.engine.save_checkpoint(str(state_dir), tag=_STATE_TAG, exclude_frozen_parameters=trainable_only)
        elif rank == 0:
            state_dir.mkdir(parents=True, exist_ok=True)
            weights = {n: p.detach().cpu() for n, p in self.module.named_parameters() if p.requires_grad}
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
            torch.save({"weights": weights, **state}, state_dir / "trainer.pt")
        if state_dir.is_dir():
            write_manifest(state_dir, rank)

    def load(self, directory: Path) -> None:
        """Restore from `directory/state` once its files match the manifests written when it was saved."""
        state_dir = directory / _STATE_TAG
        verify_manifest(state_dir)  # DeepSpeed unpickles its files (torch.load with weights_only=False)
        if self.use_deepspeed:
            path, _ = self.engine.load_checkpoint(str(state_dir), tag=_STATE_TAG, load_module_strict=False)
            if path is None:
                raise FileNotFoundError(f"no DeepSpeed state in {state_dir}")
            return
        state = torch.load(state_dir / "trainer.pt", map_location="cpu", weights_only=True)
        self.module.load_state_dict(state["weights"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def export(self, directory: Path, rank: int, tokenizer) -> None:
        """Rank 0 writes the HF-format model (the adapter alone for LoRA); all ranks must call it."""
        params = [p for p in self.module.parameters() if p.requires_grad or not hasattr(self.module, "peft_config")]
        gather = nullcontext()
        if self.zero3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        with gather:
            if rank == 0:
                self.module.save_pretrained(directory, safe_serialization=True)
                tokenizer.save_pretrained(directory)
        barrier()


# -- checkpoint integrity ----------------------------------------------------------------------

_MANIFEST = "manifest-rank{rank}.json"


class CheckpointIntegrityError(RuntimeError):
    """A checkpoint whose files differ from what was saved: it is not loaded (loading may run pickled code)."""


def write_manifest(state_dir: Path, rank: int) -> Path:
    """SHA-256 of every file this rank wrote under `state_dir` (each rank saves into its own directory)."""
    files = {p.relative_to(state_dir).as_posix(): file_sha256(p) for p in sorted(state_dir.rglob("*"))
             if p.is_file() and not p.name.startswith("manifest-rank")}
    path = state_dir / _MANIFEST.format(rank=rank)
    path.write_text(json.dumps({"sha256": files}, indent=1))
    return path


def verify_manifest(state_dir: Path) -> None:
    """Every file under `state_dir` is listed in a rank's manifest with the digest it was saved with."""
    manifests = sorted(state_dir.glob("manifest-rank*.json"))
    if not manifests:
        raise CheckpointIntegrityError(f"{state_dir}: no manifest-rank*.json; refusing a checkpoint of unknown origin")
    expected: dict[str, str] = {}
    for manifest in manifests:
        expected.update(json.loads(manifest.read_text())["sha256"])
    present = {p.relative_to(state_dir).as_posix() for p in state_dir.rglob("*")
               if p.is_file() and not p.name.startswith("manifest-rank")}
    problems = [f"{name}: not in any manifest" for name in sorted(present - set(expected))]
    problems += [f"{name}: listed but missing" for name in sorted(set(expected) - present)]
    problems += [f"{name}: SHA-256 differs from the saved one" for name in sorted(present & set(expected))
                 if file_sha256(state_dir / name) != expected[name]]
    if problems:
        raise CheckpointIntegrityError(f"checkpoint {state_dir} was changed since it was saved:\n  "
                                       + "\n  ".join(problems[:10]))


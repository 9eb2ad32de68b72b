"""Collectives: one module (workloads.common.collectives) reaches torch.distributed, it reduces where the backend
can, and its sums and the DDP step's gradient accumulation are right on a real two-process gloo group (no Ray)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from workloads.common import collectives

REPO = Path(__file__).resolve().parent.parent
HELPER = REPO / "workloads" / "common" / "collectives.py"


def _distributed_references(path: Path) -> list[str]:
    """Where `path` imports or names torch.distributed (any collective call needs one of these)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name.startswith("torch.distri")]
        elif isinstance(node, ast.ImportFrom) and node.module:
            named = node.module.startswith("torch.distributed") or (
                node.module == "torch" and any(a.name == "distributed" for a in node.names))
            found += [f"line {node.lineno}: from {node.module} import ..."] if named else []
        elif isinstance(node, ast.Attribute) and node.attr == "distributed" and isinstance(node.value, ast.Name) \
                and node.value.id == "torch":
            found.append(f"line {node.lineno}: torch.distributed")
    return found


def test_only_the_collectives_module_reaches_torch_distributed():
    sources = [p for folder in ("cluster", "workloads") for p in sorted((REPO / folder).rglob("*.py"))]
    offenders = {str(p.relative_to(REPO)): refs for p in sources if p != HELPER
                 if (refs := _distributed_references(p))}
    assert offenders == {}, "call workloads.common.collectives instead of torch.distributed"
    assert _distributed_references(HELPER)  # the scan does see an import of torch.distributed


def test_the_backend_chooses_the_reduce_device():
    assert collectives.device_type("nccl") == "cuda"  # NCCL has no CPU path: sums go to the current GPU
    assert collectives.device_type("gloo") == "cpu"
    assert collectives.device_type("cpu:gloo,cuda:nccl") == "cpu"  # a mixed group reduces CPU tensors itself
    # Outside a process group: the CPU, and every collective is the identity.
    assert collectives.world() == (0, 1) and collectives.reduce_device() == torch.device("cpu")
    assert collectives.sum_across([1.5, 2.0]) == [1.5, 2.0]
    collectives.barrier()


def _gloo_worker(rank: int, out: str, model_dir: str) -> None:
    """One of two gloo processes: the helper's sums, then one DDP step of 3 micro-batches per rank, the all-reduces
    DDP makes counted by a communication hook."""
    import torch.distributed as dist  # the test drives the group itself; the code under test goes through the helper

    from workloads.bundled import make_arithmetic as arithmetic
    from workloads.data.formats import collate, tokenize_chat
    from workloads.finetune.strategy import Strategy, weights_dtype
    from workloads.kinds import load_recipe
    from workloads.models.loading import load_model, load_tokenizer
    from workloads.models.lora import attach_lora

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    result: dict = {"world": list(collectives.world()), "device": str(collectives.reduce_device()),
                    "sums": collectives.sum_across([rank + 1.0, 10.0 * (rank + 1), 2.0**53 if rank else 1.0])}
    grads = torch.full((3,), float(rank + 2), dtype=torch.float32)
    collectives.sum_(grads)
    result["in_place"] = grads.tolist()
    collectives.barrier()

    recipe = load_recipe(REPO / "workloads/configs/tiny-lora.yaml",
                         ["deepspeed.enabled=false", "scaling.num_workers=2"])
    tokenizer = load_tokenizer(model_dir)
    pairs = [(3, 4), (12, 30), (55, 21), (9, 90), (7, 70), (41, 8), (23, 23), (60, 5), (1, 99), (18, 2), (4, 44),
             (30, 31)]
    chats = [arithmetic.task_prompt(a, b) + [{"role": "assistant", "content": arithmetic.answer(a, b)}]
             for a, b in pairs]
    examples = [tokenize_chat(chat, tokenizer, 64) for chat in chats]
    micro = [collate(examples[i : i + 2], tokenizer.pad_token_id) for i in range(0, len(examples), 2)]  # 6 of 2

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return attach_lora(load_model(model_dir, dtype=weights_dtype(recipe)), recipe.lora)

    def step_gradients(strategy: Strategy, micro_batches: list) -> dict[str, torch.Tensor]:
        """Run one train step; the gradients the optimizer steps with (after clipping)."""
        seen = {}
        hook = strategy.optimizer.register_step_pre_hook(lambda *_: seen.update(
            {n: p.grad.detach().clone() for n, p in strategy.module.named_parameters() if p.grad is not None}))
        strategy.train_step(micro_batches)
        hook.remove()
        return seen

    ddp = Strategy(model(), recipe, world_size=2, device=torch.device("cpu"), total_steps=4)
    calls = []

    def counting_hook(state, bucket):
        calls.append(bucket.index())
        return dist.all_reduce(bucket.buffer().div_(2), async_op=True).get_future().then(lambda f: f.value()[0])

    ddp.engine.register_comm_hook(None, counting_hook)
    accumulated = step_gradients(ddp, micro[rank * 3 : rank * 3 + 3])  # this rank's 3 micro-batches of the 6
    result["calls_3_micro"], calls[:] = len(calls), []
    ddp.train_step(micro[rank : rank + 1])
    result["calls_1_micro"] = len(calls)
    if rank == 0:  # the same step in one process, all 6 micro-batches accumulated: the reference
        alone = step_gradients(Strategy(model(), recipe, world_size=1, device=torch.device("cpu"), total_steps=4),
                               micro)
        result["grads"] = sorted(alone) == sorted(accumulated) and len(alone) > 0
        result["max_grad"] = max(float(g.abs().max()) for g in alone.values())
        result["max_diff"] = max(float((accumulated[n] - g).abs().max()) for n, g in alone.items())
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_sums_and_ddp_accumulation_on_a_two_process_gloo_group(tmp_path, tiny_model_dir):
    mp.spawn(_gloo_worker, args=(str(tmp_path), str(tiny_model_dir)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, result in enumerate(ranks):
        assert result["world"] == [rank, 2] and result["device"] == "cpu"  # gloo reduces on the CPU
        assert result["sums"] == [3.0, 30.0, 2.0**53 + 1.0]  # float64: a count past float32's range stays exact
        assert result["in_place"] == [5.0, 5.0, 5.0]
        # One all-reduce per bucket per optimizer step, however many micro-batches it accumulates.
        assert result["calls_3_micro"] == result["calls_1_micro"] >= 1
    # The gradients DDP averaged after local accumulation are those of all 6 micro-batches in one process.
    assert ranks[0]["grads"] and ranks[0]["max_grad"] > 1e-3, ranks[0]
    assert ranks[0]["max_diff"] < 1e-5 * ranks[0]["max_grad"], ranks[0]

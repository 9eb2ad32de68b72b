"""`llmc align`: a reward model and DPO from the bundled preference pairs, TRL on a real Ray cluster's Train workers.

Real components throughout: the session's Ray cluster, TRL's RewardTrainer and DPOTrainer, the tiny Llama, and
for DPO the session's trained SFT adapter as the starting policy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, StartedLlmc, read_metrics_csv, run_llmc, wanted

CONFIGS = REPO / "workloads" / "configs"


def start_align(recipe: str, out: Path, *overrides: str) -> tuple[Path, StartedLlmc]:
    """`llmc align` started in a subprocess; `finish` waits for it."""
    sets = [arg for o in overrides for arg in ("--set", o)]
    return out, StartedLlmc("align", str(CONFIGS / recipe), "--output-dir", str(out), *sets)


def finish(run: tuple[Path, StartedLlmc]) -> dict:
    """Waits for a started `llmc align`; returns the run's summary."""
    out, started = run
    result = started.result()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return json.loads((out / "summary.json").read_text())


def assert_sharded(summary: dict, recipe: str) -> None:
    """Each of the 2 workers trained on its own half of the training pairs (dealt by the driver, padded to equal
    length), every pair in one of them, its loader not splitting that half again."""
    from workloads.align.preference import split_pairs
    from workloads.kinds import load_recipe

    loaded = load_recipe(CONFIGS / recipe, kind="align")
    pairs = len(split_pairs(loaded.data, loaded.train.seed)[0])
    half = -(-pairs // 2)
    assert summary["train_pairs"] == pairs, summary  # distinct pairs over both shards: all of them
    assert summary["pairs_per_worker"] == [half, half], summary
    assert summary["batches_per_worker"] == [-(-half // loaded.train.micro_batch_size)] * 2, summary


@pytest.fixture(scope="module")
def align_runs(ray_cluster, tmp_path_factory, request) -> dict[str, tuple[Path, StartedLlmc]]:
    """The reward-model and DPO runs, started together (4 Train workers on the 8 logical CPUs) and each waited for by
    its test: one run's start-up overlaps the other's training."""
    root, runs = tmp_path_factory.mktemp("align"), {}
    if wanted(request, "test_dpo_from_the_sft_adapter_raises_the_held_out_margin"):
        # Before the reward run starts: `lora_run` SIGKILLs a Train worker of the session, which must be its own.
        adapter = request.getfixturevalue("lora_run")["adapter"]
        runs["dpo"] = start_align("tiny-dpo.yaml", root / "dpo", f"dpo.adapter={adapter}")
    if wanted(request, "test_reward_model_ranks_held_out_pairs_well_above_chance"):
        runs["reward"] = start_align("tiny-reward.yaml", root / "reward")
    yield runs
    for _, started in runs.values():
        started.stop()


@pytest.mark.slow
def test_reward_model_ranks_held_out_pairs_well_above_chance(align_runs):
    """2 workers, TRL's RewardTrainer; the saved model, loaded through the public scorer, ranks held-out pairs."""
    out = align_runs["reward"][0]
    summary = finish(align_runs["reward"])
    assert summary["method"] == "reward" and summary["workers"] == 2 and summary["held_out_pairs"] == 200
    assert_sharded(summary, "tiny-reward.yaml")
    assert summary["heldout_pairwise_accuracy"] >= 0.6, summary  # chance is 0.5; 200 pairs: sd 0.035
    assert summary["initial_eval_accuracy"] < summary["heldout_pairwise_accuracy"], summary  # learned, not given
    rows = read_metrics_csv(out)
    assert [int(r["step"]) for r in rows] == list(range(1, summary["steps"] + 1)) and all(r["loss"] for r in rows)
    assert (out / "curves.png").stat().st_size > 0 and (out / "recipe.yaml").exists()

    from workloads.align import load_reward_model, pairwise_accuracy
    from workloads.align.preference import read_pairs

    held_out = read_pairs("workloads/bundled/arithmetic_preference_test.jsonl", "data.eval_path")
    model = load_reward_model(summary["artifact"])
    assert pairwise_accuracy(model, held_out) == pytest.approx(summary["heldout_pairwise_accuracy"])
    first = held_out[0]
    scores = model.score([first["prompt"] + first["chosen"], first["prompt"] + first["rejected"]])
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)


@pytest.mark.slow
def test_dpo_from_the_sft_adapter_raises_the_held_out_margin(align_runs, lora_run):
    """DPO continues the SFT adapter (its frozen copy is the reference) and widens chosen-minus-rejected on held-out
    pairs; the exported adapter is a plain PEFT adapter of the base, as `llmc serve` takes it."""
    out = align_runs["dpo"][0]
    summary = finish(align_runs["dpo"])
    assert summary["method"] == "dpo" and summary["start_adapter"] == str(lora_run["adapter"])
    assert_sharded(summary, "tiny-dpo.yaml")
    assert summary["initial_margin"] == pytest.approx(0.0, abs=1e-6), summary  # reference = starting policy
    assert summary["final_margin"] > 0.1, summary
    assert summary["final_logp_margin"] > summary["initial_logp_margin"] + 1.0, summary
    assert summary["final_eval_loss"] < summary["initial_eval_loss"], summary
    assert len(read_metrics_csv(out)) == summary["steps"] and (out / "curves.png").stat().st_size > 0

    # Servable as the SFT adapter is (the session's server serves that one): same base, rank, tensors; new values.
    adapter, sft = Path(summary["artifact"]), Path(lora_run["adapter"])
    assert not (adapter / "ref").exists() and not (adapter / "training_args.bin").exists()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == summary["base_model_path"]
    from safetensors.torch import load_file

    from workloads.kinds import load_recipe

    tuned, start = load_file(adapter / "adapter_model.safetensors"), load_file(sft / "adapter_model.safetensors")
    assert tuned.keys() == start.keys() and any(not tuned[k].equal(start[k]) for k in tuned)
    serve = load_recipe(CONFIGS / "serve-tiny.yaml", [f"adapters.paths.dpo={adapter}"], kind="serve")
    assert config["r"] <= serve.adapters.max_lora_rank


SCHEMA_ERRORS = {  # override -> (field named, what the message says)
    "method=ppo": ("data", "data.format: ppo samples answers to prompts"),
    "method=sft": ("method", "'reward', 'dpo', 'ppo', 'grpo' or 'rloo'"),
    "data.path=no/such.jsonl": ("data.path", "file not found"),
    "train.learning_rate=-1": ("train.learning_rate", "greater than 0"),
    "dpo.beta=0": ("dpo.beta", "greater than 0"),
}


def test_bad_align_recipe_is_refused_naming_the_field():
    from workloads.common.recipe import RecipeError
    from workloads.kinds import load_recipe

    for override, (field, said) in SCHEMA_ERRORS.items():
        with pytest.raises(RecipeError) as info:
            load_recipe(CONFIGS / "tiny-dpo.yaml", [override], kind="align")
        assert f"field '{field}'" in str(info.value) and said in str(info.value), str(info.value)


def test_a_worker_takes_the_pairs_the_driver_checked_without_looking_for_the_files():
    """The driver hands its checked rows to the TRL workers (`fit(shared=...)`); a worker, maybe on another node
    where the data files do not exist, validates the recipe with its paths already checked."""
    from workloads.align.recipe import AlignRecipe
    from workloads.common.paths import PATHS_CHECKED
    from workloads.common.recipe import RecipeError
    from workloads.kinds import load_recipe

    with pytest.raises(RecipeError, match="field 'data.path'.*file not found"):
        load_recipe(CONFIGS / "tiny-dpo.yaml", ["data.path=/on/the/driver/only.jsonl"], kind="align")
    sent = load_recipe(CONFIGS / "tiny-dpo.yaml", kind="align").model_dump(mode="json")
    sent["data"] |= {"path": "/on/the/driver/only.jsonl", "eval_path": "/on/the/driver/held-out.jsonl"}
    assert AlignRecipe.model_validate(sent, context=PATHS_CHECKED).data.path == "/on/the/driver/only.jsonl"


def test_bad_align_recipe_exits_2_before_any_work(tmp_path):
    """Through the CLI: a method that does not fit the data, and a data file whose rows lack a key: exit 2 naming
    the field, no Ray started, no run directory."""
    broken = tmp_path / "pairs.jsonl"
    broken.write_text(json.dumps({"prompt": "1 + 1", "chosen": "2"}) + "\n")
    out = tmp_path / "run"
    for override, field, said in (("method=grpo", "data", "data.format: grpo samples answers to prompts"),
                                  (f"data.path={broken}", "data.path", "row 1: no rejected")):
        result = run_llmc("align", str(CONFIGS / "tiny-dpo.yaml"), "--output-dir", str(out), "--set", override,
                          timeout=120)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"field '{field}'" in result.stderr and said in result.stderr, result.stderr
        assert "Ray" not in result.stdout + result.stderr
    assert not out.exists()

"""GPU recipes and cluster.yaml, checked without a GPU: schema, DeepSpeed config, placement, resource math."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from tests.conftest import REPO
from workloads.align.plan import rl_plan
from workloads.finetune.plan import finetune_plan
from workloads.kinds import load_recipe
from workloads.serve.plan import serve_plan

CLUSTER = yaml.safe_load((REPO / "cluster.yaml").read_text())
GPU_RECIPES = sorted((REPO / "workloads/configs").glob("llama3-8b-*.yaml"))
FINETUNE_GPU = [p for p in GPU_RECIPES if load_recipe(p).kind == "finetune"]


def _gpu_capacity() -> tuple[int, int]:
    """(GPUs per node, most GPU nodes) of the cluster's GPU worker types."""
    gpu_types = [t for t in CLUSTER["available_node_types"].values() if t.get("resources", {}).get("GPU")]
    assert gpu_types, "cluster.yaml has no GPU worker type"
    per_node = max(t["resources"]["GPU"] for t in gpu_types)
    return per_node, sum(t["max_workers"] for t in gpu_types)


def test_cluster_yaml_matches_rays_launcher_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(CLUSTER, schema)
    assert CLUSTER["head_node_type"] in CLUSTER["available_node_types"]


def test_every_node_installs_the_gpu_extra_and_shares_the_auth_token():
    setup = " ".join(CLUSTER["setup_commands"])
    assert 'pip install -q -e ".[gpu]"' in setup and "torch==2.13.0" in setup
    assert any("auth_token" in dest for dest in CLUSTER["file_mounts"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token" in " ".join(CLUSTER[key])
        assert "--metrics-export-port=8080" in " ".join(CLUSTER[key])  # Prometheus scrapes a known port per node


def test_gpu_recipes_exist_for_every_tiny_method():
    methods = {load_recipe(p).train.method for p in FINETUNE_GPU}
    assert methods == {"full", "lora", "qlora"}


@pytest.mark.parametrize("path", FINETUNE_GPU, ids=lambda p: p.name)
def test_gpu_recipe_fits_the_cluster_and_builds_its_deepspeed_config(path: Path):
    recipe = load_recipe(path)
    plan = finetune_plan(recipe)
    per_node, nodes = _gpu_capacity()
    assert recipe.scaling.use_gpu and recipe.model.dtype == "bfloat16"
    assert plan["total_resources"]["GPU"] <= per_node * nodes
    assert per_node % recipe.scaling.gpus_per_worker == 0  # workers pack whole onto nodes
    bundles = plan["placement_bundles"]
    assert len(bundles) == recipe.scaling.num_workers and all(b["GPU"] == 1 for b in bundles)
    ds = plan["deepspeed_config"]
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["train_batch_size"] == plan["global_batch_size"]
    assert ds["zero_optimization"]["stage"] == recipe.deepspeed.stage
    if recipe.train.method == "full":
        assert ds["zero_optimization"]["stage"] == 3  # 8B full weights + Adam states need sharding
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    if recipe.train.method == "qlora":
        assert recipe.quantization.compute_dtype == "bfloat16"


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_gpu_recipe_differs_from_its_tiny_twin_only_where_scale_does(method: str):
    tiny = load_recipe(REPO / f"workloads/configs/tiny-{method}.yaml").model_dump()
    gpu = load_recipe(REPO / f"workloads/configs/llama3-8b-{method}.yaml").model_dump()
    assert tiny["train"]["method"] == gpu["train"]["method"]
    assert tiny["data"]["format"] == gpu["data"]["format"]
    assert tiny["deepspeed"]["enabled"] and gpu["deepspeed"]["enabled"]
    if method != "full":
        assert tiny["lora"]["target_modules"] == gpu["lora"]["target_modules"]
    assert gpu["run"]["storage_path"].startswith("s3://")  # shared storage across nodes


def _node_types_offering(bundle: dict) -> list[str]:
    """cluster.yaml node types whose declared resources cover `bundle` (the autoscaler launches only these)."""
    return [name for name, node in CLUSTER["available_node_types"].items()
            if all(node.get("resources", {}).get(key, 0) >= amount for key, amount in bundle.items())]


def _gpu_bundles(recipe) -> tuple[str | None, list[dict], dict]:
    """(accelerator type, placement bundles of one run or replica, its total resources) as the plan says."""
    if recipe.kind == "finetune":
        plan = finetune_plan(recipe)
        return recipe.scaling.accelerator_type, plan["placement_bundles"], plan["total_resources"]
    if recipe.kind == "align":  # the Train workers' bundles, then the rollout engines'
        plan = rl_plan(recipe)
        return (recipe.scaling.accelerator_type, plan["placement_bundles"] + plan["engine_bundles"],
                plan["total_resources"])
    plan = serve_plan(recipe)
    return recipe.resources.accelerator_type, plan["placement_bundles_per_replica"], plan["resources_per_replica"]


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.name)
def test_gpu_recipe_pins_a_gpu_type_the_cluster_offers(path: Path):
    """Every bundle, accelerator resource included, fits a node type of cluster.yaml: else it never schedules."""
    accelerator, bundles, total = _gpu_bundles(load_recipe(path))
    assert accelerator, "a GPU recipe pins the GPU type of the cluster it was sized for"
    assert all(b.get(f"accelerator_type:{accelerator}") == 0.001 for b in bundles), bundles
    for bundle in bundles:
        assert _node_types_offering(bundle), f"no node type in cluster.yaml offers {bundle}"
    fitting = [CLUSTER["available_node_types"][n] for n in _node_types_offering({k: 0.001 for k in total})]
    assert total["GPU"] <= sum(n["max_workers"] * n["resources"]["GPU"] for n in fitting)


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.name)
def test_a_gpu_type_the_cluster_lacks_is_caught(path: Path):
    field = "resources" if load_recipe(path).kind == "serve" else "scaling"
    _, bundles, _ = _gpu_bundles(load_recipe(path, [f"{field}.accelerator_type=H100"]))
    assert not _node_types_offering(bundles[0])


@pytest.mark.parametrize("path", FINETUNE_GPU, ids=lambda p: p.name)
def test_train_plan_bundles_are_what_ray_train_asks_for(path: Path):
    from ray.train import ScalingConfig

    from workloads.finetune.driver import worker_scaling

    recipe = load_recipe(path)
    scaling = worker_scaling(recipe)  # what `llmc finetune` hands Ray Train
    asked = ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                          resources_per_worker=scaling.resources_per_worker,
                          accelerator_type=scaling.accelerator_type)._resources_per_worker_not_none
    assert finetune_plan(recipe)["placement_bundles"] == [asked] * recipe.scaling.num_workers


PPO_GPU = REPO / "workloads/configs/llama3-8b-ppo.yaml"


def test_gpu_ppo_places_policy_workers_and_tensor_parallel_engines_on_one_gpu_node():
    """4 policy workers x 1 GPU (ZeRO-2) and 2 engines x 2 GPUs (tensor parallel): 8 GPUs, one p4d node's worth, so
    weight syncs stay on the node; each engine's shards are consecutive bundles of the engines' placement group."""
    recipe = load_recipe(PPO_GPU)
    plan = rl_plan(recipe)
    per_node, nodes = _gpu_capacity()
    e = recipe.rl.engine
    assert recipe.method == "ppo" and recipe.rl.rollout == "vllm" and recipe.scaling.use_gpu
    assert len(plan["engine_bundles"]) == e.engines * e.tensor_parallel_size
    assert all(b["GPU"] == 1 for b in plan["placement_bundles"] + plan["engine_bundles"])
    assert plan["total_resources"]["GPU"] == recipe.scaling.num_workers + e.engines * e.tensor_parallel_size <= per_node
    assert plan["total_resources"]["CPU"] <= max(t["resources"].get("CPU", 0)
                                                 for t in CLUSTER["available_node_types"].values())
    assert plan["prompts_per_worker"] * recipe.scaling.num_workers == recipe.rl.prompts_per_iteration
    ds = plan["deepspeed_config"]
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 2  # the RL loop runs ZeRO 0-2
    assert ds["train_batch_size"] == recipe.train.micro_batch_size * recipe.train.gradient_accumulation_steps * 4
    completions = recipe.rl.prompts_per_iteration // recipe.scaling.num_workers * recipe.rl.group_size
    assert completions % (recipe.train.micro_batch_size * recipe.train.gradient_accumulation_steps) == 0


def test_gpu_ppo_differs_from_its_tiny_twin_only_where_scale_does():
    tiny = load_recipe(REPO / "workloads/configs/tiny-ppo.yaml").model_dump()
    gpu = load_recipe(PPO_GPU).model_dump()
    for key in ("method", "rewards"):
        assert tiny[key] == gpu[key], key
    assert tiny["train"]["method"] == gpu["train"]["method"] == "lora"
    assert tiny["data"]["format"] == gpu["data"]["format"] and tiny["lora"] == gpu["lora"]
    same = ("group_size", "epochs", "clip_range", "gamma", "lam", "value_clip_range", "temperature", "entropy_coef")
    assert {k: tiny["rl"][k] for k in same} == {k: gpu["rl"][k] for k in same}
    assert {k: v for k, v in tiny["rl"]["kl"].items() if k != "horizon"} == \
        {k: v for k, v in gpu["rl"]["kl"].items() if k != "horizon"}  # the horizon scales with the batch
    assert tiny["deepspeed"] == gpu["deepspeed"] == {**gpu["deepspeed"], "enabled": True, "stage": 2}
    assert (tiny["rl"]["rollout"], gpu["rl"]["rollout"]) == ("generate", "vllm")  # the tiny one keeps the fallback


def test_rl_recipes_refuse_what_the_loop_cannot_place():
    from workloads.common.recipe import RecipeError

    with pytest.raises(RecipeError, match=r"scaling\.num_workers.*divisor"):
        load_recipe(PPO_GPU, ["scaling.num_workers=3"])
    with pytest.raises(RecipeError, match=r"deepspeed\.stage.*stage 3 is not supported"):
        load_recipe(PPO_GPU, ["deepspeed.stage=3"])
    with pytest.raises(RecipeError, match=r"rl\.engine\.tensor_parallel_size.*GPUs"):
        load_recipe(REPO / "workloads/configs/tiny-grpo.yaml", ["rl.engine.tensor_parallel_size=2"])


# A bad value of each engine knob a serve recipe and a rollout engine share, and a good one.
ENGINE_KNOBS = {"max_num_seqs": ("0", "32"), "kv_cache_gib": ("0", "2"), "gpu_memory_utilization": ("1.5", "0.5"),
                "tensor_parallel_size": ("0", "1"), "max_num_batched_tokens": ("8", "2048"),
                "enable_prefix_caching": ("maybe", "false"), "enforce_eager": ("maybe", "false")}


def test_rollout_engines_take_the_serve_engines_knobs_with_the_same_checks():
    """rl.engine is the serve engine's schema (one definition): each shared knob is refused, naming it, for the same
    values with the same words in both recipe kinds, and accepted alike."""
    from workloads.align.recipe import RolloutEngineConfig
    from workloads.common.recipe import RecipeError
    from workloads.serve.recipe import EngineConfig, EngineOptions

    assert issubclass(RolloutEngineConfig, EngineOptions) and issubclass(EngineConfig, EngineOptions)
    assert set(RolloutEngineConfig.model_fields) - set(EngineOptions.model_fields) == {"engines", "cpus_per_engine"}
    assert set(ENGINE_KNOBS) == set(EngineOptions.model_fields)
    serve_yaml, grpo_yaml = REPO / "workloads/configs/serve-tiny.yaml", REPO / "workloads/configs/tiny-grpo.yaml"
    for knob, (bad, good) in ENGINE_KNOBS.items():
        said, taken = [], []
        for path, prefix in ((serve_yaml, "engine"), (grpo_yaml, "rl.engine")):
            with pytest.raises(RecipeError) as info:
                load_recipe(path, [f"{prefix}.{knob}={bad}"])
            assert f"field '{prefix}.{knob}'" in str(info.value), str(info.value)
            said.append(str(info.value).split(f"field '{prefix}.{knob}'", 1)[1])
            accepted = load_recipe(path, [f"{prefix}.{knob}={good}"])
            taken.append(getattr(accepted.engine if prefix == "engine" else accepted.rl.engine, knob))
        assert said[0] == said[1] and taken[0] == taken[1] == yaml.safe_load(good), (knob, said, taken)


def test_a_rollout_engines_arguments_follow_its_recipe():
    """The vLLM arguments a rollout engine is built with (the serve engine's builder) are the recipe's: CUDA graphs on
    the GPU twin, eager on the CPU recipe, each knob passed through; context and seed from data and train."""
    from workloads.align.vllm_rollout import engine_recipe, policy_lora_rank
    from workloads.serve.plan import serve_engine_kwargs

    def kwargs(path: Path, *overrides: str) -> dict:
        recipe = load_recipe(path, list(overrides))
        return serve_engine_kwargs(engine_recipe(recipe, policy_lora_rank(recipe)))

    gpu = load_recipe(PPO_GPU)
    assert kwargs(PPO_GPU) == {
        "dtype": gpu.model.dtype, "max_model_len": gpu.data.max_length, "max_num_seqs": 512,
        "tensor_parallel_size": 2, "pipeline_parallel_size": 1, "enable_prefix_caching": True,
        "enforce_eager": False, "seed": gpu.train.seed, "trust_remote_code": False, "gpu_memory_utilization": 0.85,
        "enable_lora": True, "max_lora_rank": 16, "max_loras": 1}
    grpo = REPO / "workloads/configs/tiny-grpo.yaml"
    assert kwargs(grpo)["enforce_eager"] is True and "gpu_memory_utilization" not in kwargs(grpo)
    tuned = kwargs(grpo, "rl.engine.enforce_eager=false", "rl.engine.max_num_batched_tokens=2048",
                   "rl.engine.enable_prefix_caching=false", "rl.engine.max_num_seqs=32", "data.max_length=96",
                   "train.seed=7")
    assert {k: tuned[k] for k in ("enforce_eager", "max_num_batched_tokens", "enable_prefix_caching", "max_num_seqs",
                                  "max_model_len", "seed")} == {
        "enforce_eager": False, "max_num_batched_tokens": 2048, "enable_prefix_caching": False, "max_num_seqs": 32,
        "max_model_len": 96, "seed": 7}

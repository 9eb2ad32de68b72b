"""GPU recipes and cluster.yaml, checked without a GPU: schema, DeepSpeed config, placement, resource math."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from tests.conftest import REPO
from workloads.config import load_recipe
from workloads.plan import finetune_plan

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

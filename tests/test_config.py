"""Recipes: every shipped one validates; broken ones exit 2 naming the field, before any Ray work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run_llmc
from workloads.common.recipe import RecipeError, apply_override
from workloads.finetune.plan import deepspeed_config, finetune_plan
from workloads.finetune.recipe import FinetuneRecipe
from workloads.kinds import load_recipe

RECIPES = sorted((REPO / "workloads" / "configs").glob("*.yaml"))
TINY = REPO / "workloads/configs/tiny-lora.yaml"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path: Path):
    result = run_llmc("validate", str(path), timeout=120)
    assert result.returncode == 0, result.stderr
    assert '"valid": true' in result.stdout


def _broken(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load(TINY.read_text())
    for key, value in changes.items():
        apply_override(raw, f"{key}={value}")
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("changes", "field", "allowed"),
    [
        ({"train.method": "sparse"}, "train.method", "'full', 'lora' or 'qlora'"),
        ({"train.learning_rate": "-0.001"}, "train.learning_rate", "greater than 0"),
        ({"data.path": "no/such/file.jsonl"}, "data.path", "file not found"),
        ({"train.max_steps": "many"}, "train.max_steps", "valid integer"),
        ({"deepspeed.stage": "5"}, "deepspeed.stage", "0, 1, 2 or 3"),
        ({"train.optimiser": "adam"}, "train.optimiser", "unknown field"),
    ],
)
def test_bad_recipe_exits_2_naming_the_field_before_any_work(tmp_path, changes, field, allowed):
    out_dir = tmp_path / "run"
    for command in ("validate", "finetune"):
        extra = ["--output-dir", str(out_dir)] if command == "finetune" else []
        args = [command, str(_broken(tmp_path, **changes)), *extra]
        result = run_llmc(*args, timeout=120)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"field '{field}'" in result.stderr and allowed in result.stderr, result.stderr
        assert "Ray" not in result.stdout + result.stderr  # nothing was started
    assert not out_dir.exists()


def test_every_bad_field_is_reported_at_once(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(_broken(tmp_path, **{"train.method": "x", "scaling.num_workers": "0"}))
    assert "train.method" in str(info.value) and "scaling.num_workers" in str(info.value)


def test_set_overrides_parse_yaml_values():
    recipe = load_recipe(TINY, ["train.learning_rate=1e-4", "lora.target_modules=[q_proj]", "deepspeed.enabled=false"])
    assert recipe.train.learning_rate == 1e-4
    assert recipe.lora.target_modules == ["q_proj"]
    assert recipe.deepspeed.enabled is False


def test_cross_field_rules_name_their_fields():
    with pytest.raises(RecipeError, match="offload_params needs stage 3"):
        load_recipe(TINY, ["deepspeed.stage=2", "deepspeed.offload_params=true"])
    with pytest.raises(RecipeError, match="float16 needs GPUs"):
        load_recipe(TINY, ["model.dtype=float16"])


def test_deepspeed_config_follows_the_recipe():
    recipe = load_recipe(TINY, ["deepspeed.stage=3", "deepspeed.offload_optimizer=true",
                                "train.gradient_accumulation_steps=4"])
    config = deepspeed_config(recipe, world_size=2)
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["train_batch_size"] == recipe.train.micro_batch_size * 4 * 2
    assert config["optimizer"]["params"]["lr"] == recipe.train.learning_rate
    assert config["optimizer"]["params"]["torch_adam"] is False  # offloaded: DeepSpeedCPUAdam, not torch's AdamW
    assert deepspeed_config(load_recipe(TINY), world_size=2)["optimizer"]["params"]["torch_adam"] is True
    plan = finetune_plan(load_recipe(TINY, ["deepspeed.enabled=false"]))
    assert plan["backend"] == "ddp" and plan["deepspeed_config"] is None
    assert isinstance(load_recipe(TINY), FinetuneRecipe)


def test_a_path_found_only_in_the_repository_is_said_on_stderr(tmp_path, monkeypatch, capsys):
    from workloads.common.paths import REPO_ROOT, resolve_path

    monkeypatch.chdir(tmp_path)
    found = resolve_path("workloads/configs/tiny-lora.yaml")
    assert found == REPO_ROOT / "workloads/configs/tiny-lora.yaml"
    assert "is not under" in capsys.readouterr().err
    assert resolve_path("/nonexistent/tiny-lora.yaml") is None and resolve_path("nope.yaml") is None


def test_finetune_refuses_to_replace_a_run_without_overwrite(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    result = run_llmc("finetune", str(REPO / "workloads/configs/tiny-lora.yaml"), "--output-dir", str(tmp_path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "field 'run.output_dir'" in result.stderr and "--overwrite" in result.stderr
    assert (tmp_path / "adapter" / "adapter_config.json").read_text() == "{}"  # nothing deleted

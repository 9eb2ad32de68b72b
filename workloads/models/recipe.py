"""The `model`, `lora` and `quantization` recipe blocks: which model (tiny, a named real model, a GGUF file, a hub id
or a directory), how it is adapted and how its base weights are quantized."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from workloads.common.recipe import StrictModel


class TinyModelConfig(StrictModel):
    """The Llama built on the spot when `model.name` is `tiny`: its shape, then its pretraining.

    It is pretrained once, single process, on generated addition chats in its own phrasing ("What is 49 plus
    97?"), so it can add but has not seen the bundled task's phrasing; the result is cached under a key of
    every field here and the corpus.
    """

    hidden_size: int = Field(128, ge=16, description="Width of the residual stream.")
    num_layers: int = Field(2, ge=1, description="Decoder layers.")
    num_heads: int = Field(4, ge=1, description="Attention heads (also key/value heads).")
    intermediate_size: int = Field(384, ge=16, description="MLP width.")
    vocab_size: int = Field(512, ge=128, description="Most BPE tokens learned from the bundled corpus.")
    max_position_embeddings: int = Field(512, ge=64, description="Longest sequence the model accepts.")
    seed: int = Field(0, description="Seed for weights, tokenizer and pretraining order: same seed, same model.")
    pretrain_steps: int = Field(
        1500, ge=0, description="Optimizer steps of pretraining on the generated corpus; 0: random weights."
    )
    pretrain_batch_size: int = Field(32, ge=1, description="Conversations per pretraining step.")
    pretrain_learning_rate: float = Field(2e-3, gt=0, le=1.0, description="Peak AdamW learning rate (cosine).")
    pretrain_warmup_steps: int = Field(100, ge=0, description="Linear warmup before the cosine decay.")
    pretrain_threads: int = Field(
        1, ge=1, description="torch threads while pretraining; fixed, so a rebuild gives the same weights."
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        return self


class ModelConfig(StrictModel):
    name: str = Field(
        ..., description="`tiny` (built locally and cached), `smollm2-135m` (SmolLM2-135M-Instruct, its GGUF taken "
        "from a PyPI wheel and converted once), a hub id, or a local directory; with `gguf`, the model's label "
        "(default: the file's stem)."
    )
    gguf: str | None = Field(
        None, description="A llama-architecture GGUF file (llama.cpp, ollama) to convert once into a cached "
        "transformers directory and use as the model; its header is checked when the recipe is read."
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype for training and serving (float32 on CPU)."
    )
    trust_remote_code: Literal[False] = Field(False, description="Never: model code is not executed.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of `name`; None: default.")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None, description="Attention kernel for training (transformers' attn_implementation); None: its default."
    )
    chat_template: str | None = Field(
        None, description="A Jinja chat template that replaces the tokenizer's own (for training and data checks)."
    )

    @model_validator(mode="before")
    @classmethod
    def _label_from_gguf(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("gguf") and not data.get("name"):
            return {**data, "name": Path(str(data["gguf"])).stem}
        return data

    @field_validator("gguf")
    @classmethod
    def _gguf_usable(cls, value: str | None) -> str | None:
        if value is None:
            return None
        path = Path(value).expanduser()
        if not path.is_file():
            raise ValueError(f"no GGUF file at {value}")
        from workloads.models.gguf import check_gguf

        check_gguf(path)  # architecture and tensor types, from the header: refused here, before any work
        return str(path.resolve())


def adapter_rank(adapter_dir: Path) -> int:
    """The largest LoRA rank of a PEFT adapter directory: its `r`, or a larger one in its `rank_pattern`."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return max([config.get("r", 0), *(config.get("rank_pattern") or {}).values()])


class LoraConfig(StrictModel):
    r: int = Field(8, ge=1, description="Adapter rank.")
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1,
        description="Module names to adapt, or `all-linear` (every linear layer but the output head).",
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full and saved with the adapter (e.g. lm_head)."
    )
    use_dora: bool = Field(False, description="DoRA: weight-decomposed LoRA (PEFT). vLLM cannot serve DoRA adapters.")
    use_rslora: bool = Field(False, description="rsLoRA: scale by alpha/sqrt(r) instead of alpha/r.")


class QuantizationConfig(StrictModel):
    """bitsandbytes 4-bit base weights for QLoRA."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Matmul dtype; bfloat16 on GPUs."
    )

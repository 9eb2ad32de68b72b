"""LoRA: the PEFT config a recipe's `lora` block makes, attaching adapters for training, and merging an adapter into
a full-precision copy of its base."""

from __future__ import annotations

import json
from pathlib import Path

from workloads.models.loading import load_model, load_tokenizer
from workloads.models.recipe import LoraConfig, ModelConfig


def peft_lora_config(cfg: LoraConfig, task_type: str = "CAUSAL_LM", modules_to_save: tuple[str, ...] = ()):
    """The recipe's LoRA block as a PEFT config; `modules_to_save` adds fully trained modules (a reward head)."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules),
        modules_to_save=list(dict.fromkeys([*cfg.modules_to_save, *modules_to_save])) or None,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        task_type=task_type,
    )


def attach_lora(model, cfg: LoraConfig, quantized: bool = False, gradient_checkpointing: bool = False):
    """Freeze the base and add trainable LoRA adapters (k-bit preparation first for QLoRA)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return get_peft_model(model, peft_lora_config(cfg))


MERGED_FROM = "merged_from.json"  # beside a merged model: the base (and its revision) and the adapter it holds


def merge_adapter(base_path: str, adapter_dir: str | Path, out_dir: str | Path, model: ModelConfig) -> Path:
    """Write base+adapter as one plain model, as the recipe's `model` trained it: the base at `model.revision` in
    `model.dtype` (full precision, never 4-bit), the tokenizer with `model.chat_template` when set (the template
    training rendered chats with), and MERGED_FROM naming base, revision and adapter."""
    from peft import PeftModel

    base = load_model(base_path, dtype=model.dtype, revision=model.revision)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out = Path(out_dir)
    merged.save_pretrained(out)
    load_tokenizer(base_path, model.revision, model.chat_template).save_pretrained(out)
    (out / MERGED_FROM).write_text(json.dumps({"base_model": base_path, "revision": model.revision,
                                               "adapter": str(Path(adapter_dir).resolve())}, indent=2))
    return out

"""Models: the `model`, `lora` and `quantization` blocks (`recipe`), loading and quantization (`loading`), LoRA and
merging (`lora`), the tiny-model factory (`tiny`, `pretrain`), real models from GGUF files (`gguf`), the cache."""

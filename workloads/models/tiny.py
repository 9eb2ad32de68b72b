"""The tiny-model factory: a small Llama and a locally trained BPE tokenizer, pretrained once on generated addition
chats (workloads.models.pretrain) and cached, so every later step loads it through `from_pretrained`; and the
measured skill card of a model."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from workloads.common.paths import REPO_ROOT
from workloads.models.cache import build_once, cache_dir
from workloads.models.recipe import TinyModelConfig

TINY_FACTORY_VERSION = 5  # bump when the factory's output changes, so caches rebuild


# A random lm_head at the usual 0.02 std caps every logit near +-2.5 behind the final RMSNorm, so adapters on
# a frozen random base cannot express a confident answer (LoRA stalled at eval loss ~4 on the bundled task).
# Pretrained heads have a wide range; 5x the std gives a start at ~ln(vocab) and room to learn. It matters for
# pretraining too: 1,000 steps from the usual std added 10% of held-out pairs, from 5x the std 98%.
LM_HEAD_INIT_SCALE = 5.0


SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


# ChatML; {% generation %} marks assistant text for TRL's assistant_only_loss. With `tools`, the system turn lists
# them, one line each (name, parameters, description: the tiny model was pretrained on 64-token chats and copies
# operands badly from much further back, so no more), and assistant `tool_calls` render as
# <tool_call>{"arguments": {...}, "name": ...}</tool_call>, the JSON vLLM's `hermes` tool-call parser reads back (the
# format is learnt from the bundled tool traces; arguments first, so the operands are copied from a question fewer
# tokens back); tool results are `tool` turns. Without tools it renders as before.
CHAT_TEMPLATE = (
    "{% set tools_text %}{% if tools %}{{ '\\n\\nTools:\\n' }}{% for t in tools %}"
    "{% set f = t['function'] if t['function'] is defined else t %}"
    "- {{ f['name'] }}({{ ((f['parameters'] or {})['properties'] or {}) | list | join(', ') }}): "
    "{{ f['description'] or '' }}{% if not loop.last %}{{ '\\n' }}{% endif %}{% endfor %}{% endif %}{% endset %}"
    "{% if tools and messages[0]['role'] != 'system' %}<|im_start|>system\n{{ tools_text[2:] }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] or '' }}"
    "{% for tc in m['tool_calls'] or [] %}{% set f = tc['function'] if tc['function'] is defined else tc %}"
    "{% if loop.first and m['content'] %}{{ '\\n' }}{% endif %}"
    "<tool_call>{\"arguments\": "
    "{% if f['arguments'] is string %}{{ f['arguments'] }}{% else %}{{ f['arguments'] | tojson }}{% endif %}"
    ", \"name\": \"{{ f['name'] }}\"}</tool_call>{% endfor %}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}{% if loop.first and m['role'] == 'system' %}{{ tools_text }}{% endif %}"
    "<|im_end|>{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


BUNDLED = REPO_ROOT / "workloads/bundled"


# The bundled files the tokenizer learns from (and the cache key covers): a file added later (the tool-calling
# traces) does not change the tiny model's merges, so what the model learned and the tests measured stays put.
TOKENIZER_FILES = ("arithmetic_preference_test.jsonl", "arithmetic_preference_train.jsonl",
                   "arithmetic_react_test.jsonl", "arithmetic_react_train.jsonl", "arithmetic_test.jsonl",
                   "arithmetic_train.jsonl")


SKILL_CARD = "skill.json"


def build_tiny_model(cfg: TinyModelConfig, out_dir: Path | None = None) -> Path:
    """Build (or reuse from the cache) the pretrained tiny Llama and its tokenizer; returns the directory.

    The cache key covers the config (shape and pretraining), the factory version and the corpus, so a change to
    any of them builds anew; a lock makes concurrent first uses wait for one build. `out_dir`: a copy there.
    """
    path = tiny_model_path(cfg)
    cached = build_once(path, path / "config.json", lambda: _build_into(cfg, path))
    if out_dir is None:
        return cached
    if not (Path(out_dir) / "config.json").exists():
        shutil.copytree(cached, out_dir, dirs_exist_ok=True)
    return Path(out_dir)


def tiny_model_path(cfg: TinyModelConfig) -> Path:
    """Where the tiny model for `cfg` is cached: keyed by factory version, config, corpus, chat template and the
    tokenizer's bundled files."""
    from workloads.models.pretrain import corpus

    key = hashlib.sha256(
        json.dumps([TINY_FACTORY_VERSION, cfg.model_dump(), corpus(), CHAT_TEMPLATE], sort_keys=True).encode()
        + b"".join((BUNDLED / name).read_bytes() for name in TOKENIZER_FILES)
    ).hexdigest()[:12]
    return cache_dir() / "models" / f"tiny-{key}"


def read_skill_card(model_dir: str | Path) -> dict | None:
    """A model's measured skill: the tiny model's `skill.json` beside its weights, a named real model's card from
    the repository (workloads/bundled/skill_cards); None for other models."""
    from workloads.models.gguf import named_skill_card

    path = Path(model_dir) / SKILL_CARD
    if not path.exists():
        path = named_skill_card(model_dir)
    return json.loads(path.read_text()) if path is not None else None


def _build_into(cfg: TinyModelConfig, target: Path) -> None:
    from workloads.models.pretrain import pretrain, skill_card

    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        tokenizer = _train_tokenizer(cfg)
        model = _init_llama(cfg, tokenizer)
        if cfg.pretrain_steps:
            card = skill_card(model, tokenizer, pretrain(model, tokenizer, cfg))
            (staging / SKILL_CARD).write_text(json.dumps(card, indent=2) + "\n")
            own, task = card["held_out_own_phrasing"], card["held_out_bundled_task"]
            print(f"[tiny] pretrained {cfg.pretrain_steps} steps in {card['pretraining']['seconds']:.0f} s: "
                  f"held-out sums {own['accuracy']:.0%} in its own phrasing, {task['accuracy']:.0%} in the bundled "
                  f"task's ({target / SKILL_CARD})", file=sys.stderr, flush=True)
        tokenizer.save_pretrained(staging)
        model.save_pretrained(staging)
        staging.rename(target)  # atomic: a reader never sees a half-written model
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _corpus_lines() -> list[str]:
    """Text the tokenizer learns its merges from: the pretraining chats and every bundled file's strings."""
    from workloads.models.pretrain import corpus

    lines = [m["content"] for conversation in corpus() for m in conversation]
    for name in TOKENIZER_FILES:
        for row in map(json.loads, (BUNDLED / name).read_text().splitlines()):
            lines.extend(_strings(row))
    return lines + ["user", "assistant", "system", "The answer is", "Question:", "Answer:"]


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [s for item in items for s in _strings(item)]


def _train_tokenizer(cfg: TinyModelConfig):
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    # Digits one token each: arithmetic stays learnable for a tiny model.
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus_lines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",  # ends an assistant turn, so generation stops there
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "</s>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=cfg.max_position_embeddings,
    )


def _init_llama(cfg: TinyModelConfig, tokenizer):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_INIT_SCALE)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model

"""A trained reward model as a scoring function: `load_reward_model(path).score(texts) -> list[float]`.

What `llmc align` with `method: reward` saves (a sequence-classification model with one output, or a LoRA adapter
holding the head) loads here, so PPO and GRPO can use it as their reward. Texts are tokenized as TRL's
RewardTrainer tokenized the training pairs: chat messages through the chat template, strings as given plus EOS.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

Text = str | list[dict]  # a string, or chat messages (prompt and answer together)


class RewardModel:
    """Scores whole texts (prompt plus answer): higher is preferred."""

    def __init__(self, model, tokenizer, batch_size: int = 32):
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.device = next(model.parameters()).device

    def _ids(self, text: Text) -> list[int]:
        if isinstance(text, list):
            return self.tokenizer.apply_chat_template(text, tokenize=True, return_dict=True)["input_ids"]
        eos = self.tokenizer.eos_token
        return self.tokenizer(text=text if text.endswith(eos) else text + eos)["input_ids"]

    @torch.no_grad()
    def score(self, texts: Sequence[Text]) -> list[float]:
        """One reward per text, in order."""
        scores: list[float] = []
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(texts), self.batch_size):
            rows = [self._ids(t) for t in texts[start : start + self.batch_size]]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):  # right padding: the head reads the last real token
                ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            scores += logits[:, 0].float().tolist()
        return scores

    def __call__(self, texts: Sequence[Text]) -> list[float]:
        return self.score(texts)


def load_reward_model(path: str | Path, device: str = "cpu", dtype: str = "float32") -> RewardModel:
    """The reward model saved in `path` (a full model, or a LoRA adapter on the base it names, merged on load)."""
    from transformers import AutoModelForSequenceClassification

    from workloads.models.loading import load_tokenizer, torch_dtype

    path = Path(path)
    adapter = path / "adapter_config.json"
    base = json.loads(adapter.read_text())["base_model_name_or_path"] if adapter.is_file() else str(path)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch_dtype(dtype))
    if adapter.is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    tokenizer = load_tokenizer(str(path))
    model.config.pad_token_id = tokenizer.pad_token_id
    return RewardModel(model.to(device), tokenizer)


def with_prompt(pair: dict, answer: str) -> Text:
    """One side of a preference pair as the whole text the reward model scores."""
    prompt = pair.get("prompt")
    if prompt is None:
        return pair[answer]
    return prompt + pair[answer]


def pairwise_accuracy(model: RewardModel, pairs: list[dict]) -> float:
    """Share of pairs whose chosen answer scores above the rejected one."""
    chosen = model.score([with_prompt(p, "chosen") for p in pairs])
    rejected = model.score([with_prompt(p, "rejected") for p in pairs])
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)

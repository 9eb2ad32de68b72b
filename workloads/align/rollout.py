"""Rollouts for the RL methods: sample k completions per prompt, and the per-token log-probs of a batch of them.

A `Rollout` is one batch as training reads it: each prompt left-padded to a common width, its completion after it,
right-padded, with a mask of the completion's real tokens (the stop token included). `GenerateSampler` samples with
`model.generate` in this process (`rl.rollout: generate`); `workloads.align.vllm_rollout.VLLMSampler` offers the same
`sample`, `sync` and `close` from a vLLM engine (`rl.rollout: vllm`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from workloads.align.estimators import entropy as token_entropy

if TYPE_CHECKING:
    from workloads.align.policy import Policy


@dataclass
class Rollout:
    """Completions of a batch of prompts, `group_size` consecutive rows per prompt."""

    input_ids: torch.Tensor  # (rows, prompt_width + response_width): left-padded prompt, then the completion
    attention_mask: torch.Tensor  # same shape: 1 on real prompt and completion tokens
    response_mask: torch.Tensor  # (rows, response_width): 1 on the completion's tokens, the stop token included
    prompt_width: int
    completions: list[str]  # decoded, special tokens and the stop token left out

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions counted over real tokens only, as `generate` counts them for left-padded prompts."""
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def to(self, device: torch.device) -> Rollout:
        """The same rollout with its tensors on `device`."""
        return Rollout(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device),
                       self.prompt_width, self.completions)

    def select(self, rows: torch.Tensor) -> Rollout:
        """The rows `rows` (indices) as a Rollout of their own."""
        return Rollout(self.input_ids[rows], self.attention_mask[rows], self.response_mask[rows], self.prompt_width,
                       [self.completions[i] for i in rows.tolist()])


def stop_token_ids(model, tokenizer) -> set[int]:
    """Tokens that end a completion: the model's configured end tokens and the tokenizer's eos."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [] if configured is None else [configured])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded to one width, and their attention mask."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
    return ids, mask


class GenerateSampler:
    """Samples completions with the policy's own `model.generate` (plain sampling from the full distribution, so the
    sampled tokens' log-probs are the training forward's at the same temperature)."""

    def __init__(self, tokenizer, max_new_tokens: int, temperature: float):
        self.tokenizer, self.max_new_tokens, self.temperature = tokenizer, max_new_tokens, temperature

    @torch.no_grad()
    def sample(self, model, prompt_ids: list[list[int]], group_size: int, greedy: bool = False) -> Rollout:
        """`group_size` completions of each prompt (token ids of the chat-rendered prompt), or one greedy answer."""
        pad = self.tokenizer.pad_token_id
        ids, mask = (t.to(model.device) for t in left_pad(prompt_ids, pad))
        sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": self.temperature,
                                                          "top_k": 0, "top_p": 1.0}
        was_training = model.training
        model.eval()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                             num_return_sequences=1 if greedy else group_size, pad_token_id=pad, **sampling)
        model.train(was_training)
        return make_rollout(self.tokenizer, ids, mask, 1 if greedy else group_size, out[:, ids.shape[1]:],
                            stop_token_ids(model, self.tokenizer))

    def sync(self, policy: Policy) -> None:
        """Nothing to do: the next rollout samples from the policy itself."""

    def close(self) -> None:
        """Nothing to release."""


def make_rollout(tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, repeats: int,
                 generated: torch.Tensor, stops: set[int]) -> Rollout:
    """A Rollout of left-padded prompts (each repeated for its `repeats` consecutive completions) and their right-padded
    completions, each cut after its first stop token (what follows becomes padding)."""
    stop_ids = torch.tensor(sorted(stops), device=generated.device)
    is_stop = torch.isin(generated, stop_ids)
    after_stop = (is_stop.cumsum(-1) - is_stop.long()) > 0  # strictly after the first stop token
    response_mask = (~after_stop).long()
    generated = generated.masked_fill(after_stop, tokenizer.pad_token_id)
    completions = [tokenizer.decode(row[(m > 0) & ~torch.isin(row, stop_ids)],
                                    skip_special_tokens=True)
                   for row, m in zip(generated, response_mask, strict=True)]
    prompt_ids, prompt_mask = prompt_ids.repeat_interleave(repeats, 0), prompt_mask.repeat_interleave(repeats, 0)
    return Rollout(torch.cat([prompt_ids, generated], 1), torch.cat([prompt_mask, response_mask], 1),
                   response_mask, prompt_ids.shape[1], completions)


@dataclass
class TokenOutputs:
    """What one forward over a Rollout gives, per completion token: (rows, response_width) each."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None  # of the next-token distribution, when asked for
    hidden: torch.Tensor | None  # (rows, response_width, hidden): the last hidden state before each token


def token_outputs(model, rollout: Rollout, temperature: float, entropy: bool = False,
                  hidden: bool = False) -> TokenOutputs:
    """Log-prob of each completion token under `model` at `temperature` (the sampling distribution), and optionally
    the entropy and last hidden state at the position that predicts it. Gradients flow unless under no_grad."""
    out = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                position_ids=rollout.position_ids, output_hidden_states=hidden)
    start = rollout.prompt_width
    logits = out.logits[:, start - 1 : -1].float() / temperature  # position t predicts token t + 1
    targets = rollout.input_ids[:, start:]
    logprobs = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return TokenOutputs(logprobs, token_entropy(logits) if entropy else None,
                        out.hidden_states[-1][:, start - 1 : -1] if hidden else None)

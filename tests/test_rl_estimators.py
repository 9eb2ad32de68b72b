"""RL arithmetic (workloads.align.estimators: PPO, GRPO, RLOO) against values computed by hand, and the methods
(workloads.align.methods) the recipe's `method` names."""

from __future__ import annotations

import math

import pytest
import torch

from workloads.align.estimators import (
    AdaptiveKLController,
    FixedKLController,
    entropy,
    gae,
    grpo_advantages,
    masked_mean,
    masked_whiten,
    policy_loss,
    rloo_advantages,
    token_kl,
    value_loss,
)
from workloads.align.methods import METHODS, method_class
from workloads.align.recipe import RL_METHODS, RlOptions


def test_grpo_advantages_normalize_within_each_group():
    # Group 1: rewards 1, 0, 0, 1 -> mean 0.5, sample std sqrt(1/3); group 2: all equal -> no signal.
    advantages = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]), group_size=4)
    half = 0.5 / math.sqrt(1 / 3)
    assert advantages.tolist() == pytest.approx([half, -half, -half, half, 0, 0, 0, 0], abs=1e-5)
    unscaled = grpo_advantages(torch.tensor([3.0, 1.0, 2.0, 2.0]), group_size=2, scale=False)
    assert unscaled.tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0])


def test_rloo_advantages_subtract_the_mean_of_the_others_in_each_group():
    # Group 1: rewards 1, 0, 0, 1: a 1 against the others' mean 1/3 -> +2/3, a 0 against 2/3 -> -2/3.
    advantages = rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]), group_size=4)
    assert advantages.tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0])  # group 2: no signal
    # Groups of 3: 0 against (1 + 5) / 2 = 3 -> -3; 1 against 2.5 -> -1.5; 5 against 0.5 -> 4.5. Unscaled.
    assert rloo_advantages(torch.tensor([0.0, 1.0, 5.0, 2.0, 2.0, 8.0]), group_size=3).tolist() == \
        pytest.approx([-3.0, -1.5, 4.5, -3.0, -3.0, 6.0])
    # Pairs: each is the other's baseline.
    assert rloo_advantages(torch.tensor([3.0, 1.0]), group_size=2).tolist() == pytest.approx([2.0, -2.0])


def test_each_recipe_method_is_a_registered_class_and_only_ppo_trains_a_critic():
    assert RL_METHODS == tuple(METHODS) == ("ppo", "grpo", "rloo")
    assert {name: method_class(name).name for name in METHODS} == {name: name for name in METHODS}
    assert [name for name in METHODS if method_class(name).needs_critic] == ["ppo"]
    # A method computes with estimators' functions: RLOO charges the summed KL penalty to each completion's score.
    scores, penalty = torch.tensor([1.0, 0.0, 0.5, 0.5]), torch.tensor([[0.1, 0.2], [0.0, 0.0], [0.0, 0.3], [0.0, 0.0]])
    advantages, returns = method_class("rloo")(RlOptions(group_size=2)).advantages(scores, penalty, torch.ones(4, 2),
                                                                                  None)
    assert returns is None and advantages.tolist() == pytest.approx([0.7, -0.7, -0.3, 0.3])


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    mask = torch.ones(1, 3)
    # lambda 1, gamma 1: every advantage is the return (1) minus the value (0.5).
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert advantages.flatten().tolist() == pytest.approx([0.5, 0.5, 0.5])
    assert returns.flatten().tolist() == pytest.approx([1, 1, 1])
    # lambda 0.5: deltas are 0, 0, 0.5 -> A2 = 0.5, A1 = 0 + 0.5 * 0.5 = 0.25, A0 = 0.125.
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert advantages.flatten().tolist() == pytest.approx([0.125, 0.25, 0.5])
    assert returns.flatten().tolist() == pytest.approx([0.625, 0.75, 1.0])
    # gamma 0.9, lambda 1: A2 = 1 - 0.5; A1 = 0.9 * 0.5 - 0.5 + 0.9 * 0.5 = 0.4; A0 = -0.05 + 0.9 * 0.4 = 0.31.
    advantages, _ = gae(rewards, values, mask, gamma=0.9, lam=1.0)
    assert advantages.flatten().tolist() == pytest.approx([0.31, 0.4, 0.5])


def test_gae_ignores_padding_after_the_last_token():
    # The second row ends after 2 tokens: its reward sits on token 2, padding values and rewards count for nothing.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 7.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert advantages.flatten().tolist() == pytest.approx([0.5, 0.5, 0.5, 0.5, 0.5, 0.0])
    assert returns.flatten().tolist() == pytest.approx([1, 1, 1, 1, 1, 0])


def test_policy_loss_clips_the_ratio_against_the_advantage():
    logprobs, old = torch.log(torch.tensor([[1.5, 1.0]])), torch.zeros(1, 2)
    mask = torch.tensor([[1.0, 0.0]])  # the second token is padding
    # A = +1, ratio 1.5: min(1.5, 1.2) -> loss -1.2, clipped.
    loss, clipped = policy_loss(logprobs, old, torch.tensor([1.0]), mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-1.2) and clipped.item() == 1.0
    # A = -1, ratio 1.5: the pessimistic term is the unclipped -1.5 * -1 -> loss 1.5, not clipped.
    loss, clipped = policy_loss(logprobs, old, torch.tensor([[-1.0, 5.0]]), mask, clip_range=0.2)
    assert loss.item() == pytest.approx(1.5) and clipped.item() == 0.0
    # Ratio 1 (the first minibatch of an iteration): the loss is -mean advantage over real tokens.
    loss, _ = policy_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([2.0, -1.0]), torch.ones(2, 2), 0.2)
    assert loss.item() == pytest.approx(-0.5)


def test_policy_loss_gradient_vanishes_once_clipped():
    logprobs = torch.log(torch.tensor([[1.5]])).requires_grad_()
    policy_loss(logprobs, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1), 0.2)[0].backward()
    assert logprobs.grad.item() == 0.0


def test_value_loss_takes_the_larger_of_clipped_and_unclipped():
    mask = torch.ones(1, 1)
    # v = 1 = return, but only 0.2 from the old value 0 counts: 0.5 * (0.2 - 1)^2 = 0.32.
    assert value_loss(torch.tensor([[1.0]]), torch.zeros(1, 1), torch.ones(1, 1), mask, 0.2).item() == \
        pytest.approx(0.32)
    # Within the clip range both terms agree: 0.5 * (0.1 - 1)^2.
    assert value_loss(torch.tensor([[0.1]]), torch.zeros(1, 1), torch.ones(1, 1), mask, 0.2).item() == \
        pytest.approx(0.405)


def test_kl_estimators():
    logprobs, ref = torch.tensor([math.log(0.5), math.log(0.25)]), torch.tensor([math.log(0.25), math.log(0.5)])
    assert token_kl(logprobs, ref, "k1").tolist() == pytest.approx([math.log(2), -math.log(2)])
    # k3 = q/p - 1 - log(q/p): 0.5 - 1 + log 2, and 2 - 1 - log 2; never negative.
    assert token_kl(logprobs, ref, "k3").tolist() == pytest.approx([math.log(2) - 0.5, 1 - math.log(2)])
    assert token_kl(ref, ref, "k3").tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="k1 or k3"):
        token_kl(logprobs, ref, "k2")


def test_masked_helpers_and_entropy():
    values, mask = torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    assert masked_mean(values, mask).item() == 2.0
    whitened = masked_whiten(values, mask)
    assert whitened.flatten().tolist() == pytest.approx([-1.0, 1.0, 0.0], abs=1e-4)
    uniform = entropy(torch.zeros(1, 1, 4))
    assert uniform.item() == pytest.approx(math.log(4))


def test_kl_controllers():
    fixed = FixedKLController(0.1)
    fixed.update(kl=50.0, n_samples=64)
    assert fixed.value == 0.1
    # KL 2 against target 1: error clipped to +0.2, times 10 samples / horizon 100 -> x1.02.
    adaptive = AdaptiveKLController(0.1, target=1.0, horizon=100)
    adaptive.update(kl=2.0, n_samples=10)
    assert adaptive.value == pytest.approx(0.102)
    # KL 0.9: error -0.1 -> x0.99.
    adaptive.update(kl=0.9, n_samples=10)
    assert adaptive.value == pytest.approx(0.102 * 0.99)

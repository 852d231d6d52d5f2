"""RLOO (rloo.py) against the spec's vectors (ALGORITHMS.md section 11.2, produced by running TRL's, verl's,
SkyRL's, rlhf-book's and OpenRLHF's own functions), an independent computation with finite differences, the
on-policy REINFORCE gradient, the KL in the reward, and short runs (1 process and 2 gloo processes)."""
import math

import pytest
import torch

import grpo
import rloo
from helpers import ADV11, F64, assert_finite_differences, padded, toy11, value_and_dj


# -----------------------------------------------------------------------------
# advantages and the KL in the reward


def test_adv_batch_matches_the_frameworks():
    adv = rloo.group_advantages(torch.tensor(ADV11["R"], dtype=F64), 4)
    want = [1, -1 / 3, -1 / 3, -1 / 3, 1 / 3, 1 / 3, -1, 1 / 3, 0, 0, 0, 0]
    assert adv.tolist() == pytest.approx(want, abs=1e-12)
    assert torch.equal(adv[8:], torch.zeros(4, dtype=F64))


def test_leave_one_out_is_grpo_without_std_scaled_by_g_over_g_minus_1():
    r = torch.tensor([0.3, 1.0, 0.0, 1.1, 0.1, 0.0, 1.0, 1.0], dtype=F64)
    G = 4
    loo = torch.stack([r[g * G + i] - (r[g * G:(g + 1) * G].sum() - r[g * G + i]) / (G - 1)
                       for g in range(2) for i in range(G)])
    torch.testing.assert_close(rloo.group_advantages(r, G), loo, atol=1e-15, rtol=0)
    std = r.view(2, G).std(1, unbiased=False).repeat_interleave(G)
    torch.testing.assert_close(rloo.group_advantages(r, G), grpo.group_advantages(r, G) * std * G / (G - 1))


def test_kl_in_the_reward_matches_trl_and_verl():
    # β = 0.05, R = [1, 0, 0, 0], Σ_t (old - ref) = [-0.3, 0.4, 0.3, 0.2]: the loop's R - β k1 through the baseline
    _, old, ref, _, mask, R, _ = toy11()
    kl = ((old - ref) * mask).sum(1)
    assert kl.tolist() == pytest.approx([-0.3, 0.4, 0.3, 0.2], abs=1e-12)
    adv = rloo.group_advantages(R - 0.05 * kl, 4)
    assert adv.tolist() == pytest.approx([1.03, -0.35, -0.343333, -0.336667], abs=1e-6)


# -----------------------------------------------------------------------------
# the loss against the spec (TRL's RLOO loss, given Â)


def test_on_policy_the_gradient_is_reinforce_with_a_token_sum():
    new, _, _, _, mask, _, A = toy11()
    loss, stats = rloo.policy_loss(new, new.detach(), A, mask, 0.2)
    value, dj = value_and_dj(loss, new)
    assert value == pytest.approx(-A.mean().item(), abs=1e-15)  # ρ = 1: -mean(Â), 0 for the spec's toy
    torch.testing.assert_close(dj, A[:, None] / 4 * mask, atol=1e-15, rtol=0)  # Â_i / B on every token: Σ_t
    assert stats["clip_frac"][0].item() == 0


def test_off_policy_matches_trl():
    new, old, _, _, mask, _, A = toy11()
    loss, stats = rloo.policy_loss(new, old, A, mask, 0.2)
    value, dj = value_and_dj(loss, new)
    ratio = torch.exp(((new - old) * mask).sum(1)).detach()
    assert ratio.tolist() == pytest.approx([1.73325, 0.40657, 0.67032, 0.740818], abs=1e-5)
    assert value == pytest.approx(-0.0926023, abs=1e-7)
    want = torch.zeros_like(dj)
    want[3, :4] = 0.0926023  # o1, o2, o3 clip (3 of 4 sequences); o4 unclipped by pessimism: ρ Â / 4
    torch.testing.assert_close(dj, want, atol=1e-7, rtol=0)
    assert stats["clip_frac"][0].item() == 3


# -----------------------------------------------------------------------------
# an independent computation


def independent_objective(new, old, adv, eps):
    """J with python floats: per completion, the clipped surrogate of exp(Σ_t new - old), then the mean."""
    J = 0.0
    for n_i, o_i, a in zip(new, old, adv):
        rho = math.exp(sum(n - o for n, o in zip(n_i, o_i)))
        J += min(rho * a, max(min(rho, 1 + eps), 1 - eps) * a)
    return J / len(new)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_independent_computation_and_finite_differences(seed):
    g = torch.Generator().manual_seed(seed)
    lens = [int(x) for x in torch.randint(1, 5, (12,), generator=g)]
    new = [(torch.randn(n, generator=g, dtype=F64) * 0.3 - 1).tolist() for n in lens]
    old = [[x + 0.2 * float(torch.randn(1, generator=g, dtype=F64)) for x in row] for row in new]
    adv = torch.randn(12, generator=g, dtype=F64).tolist()
    n_t, mask = padded(new, fill=-7.0)
    n_t.requires_grad_(True)
    loss, stats = rloo.policy_loss(n_t, padded(old, fill=3.0)[0], torch.tensor(adv, dtype=F64), mask, 0.2)
    value, dj = value_and_dj(loss, n_t)
    assert 0 < stats["clip_frac"][0] < 12, "the batch should mix clipped and unclipped completions"
    assert value == pytest.approx(-independent_objective(new, old, adv, 0.2), abs=1e-14)
    objective = lambda rows: independent_objective(rows, old, adv, 0.2)
    assert_finite_differences(dj, new, objective, h=1e-6, tol=1e-8)


# -----------------------------------------------------------------------------
# the trainer


def test_config_defaults():
    cfg = rloo.Config()
    assert (cfg.group_size, cfg.batch_prompts, cfg.num_minibatches, cfg.beta, cfg.clip_eps) == (4, 64, 1, 0.03, 0.2)
    assert rloo.TINY["num_minibatches"] == 1

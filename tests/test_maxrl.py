"""MaxRL (maxrl.py) against the spec's vectors (ALGORITHMS.md section 11.7, produced by running prime-rl's,
rlhf-book's and SkyRL's own functions), an independent computation with finite differences, the 1/p weighting
the paper derives, the token-mean over ranks, and short runs (1 process and 2 gloo processes)."""
import math

import pytest
import torch

import grpo
import maxrl
from helpers import ADV11, F64, assert_finite_differences, padded, toy11, value_and_dj


# -----------------------------------------------------------------------------
# advantages


def test_adv_batch_matches_prime_rl_and_rlhf_book():
    adv = maxrl.group_advantages(torch.tensor(ADV11["R"], dtype=F64), 4)
    assert adv.tolist() == pytest.approx([3, -1, -1, -1, 1 / 3, 1 / 3, -1, 1 / 3, 0, 0, 0, 0], abs=1e-12)
    assert torch.equal(adv[8:], torch.zeros(4, dtype=F64))  # no success: exactly 0, never NaN (SkyRL: 1e-6 noise)


def test_a_group_whose_mean_is_not_positive_gets_zero_not_a_million():
    """Issue 37's finding: mean.clamp_min(1e-6) gave ±5e5 to a group with mean <= 0 (prime-rl gives 0)."""
    R = torch.tensor([-1.0, 1.0, 0.0, 0.0, -1.0, -1.0, 0.0, 0.0, 0.5, -0.1, 0.0, 0.0])  # means 0, -0.5, 0.1
    adv = maxrl.group_advantages(R, 4)
    assert torch.equal(adv[:8], torch.zeros(8))
    assert adv[8:].tolist() == pytest.approx([4.0, -2.0, -1.0, -1.0], rel=1e-5)  # a positive mean: (R - r̄)/r̄
    for G in (2, 4, 8):  # rewards >= 0: |Â| <= G - 1
        R = torch.rand(64 * G) * (torch.rand(64 * G) > 0.7)
        assert maxrl.group_advantages(R, G).abs().max() <= G - 1 + 1e-5


def test_all_right_groups_are_zero_and_the_weight_is_one_over_p():
    # one correct sample among G: its Â = (1 - p)/p with p = 1/G, so a hard prompt's right answer weighs ~1/p;
    # GRPO's weight is (1 - p)/sqrt(p(1 - p)) = sqrt((1-p)/p): MaxRL's is its square
    G = 8
    for k in range(1, G):
        r = torch.tensor([1.0] * k + [0.0] * (G - k), dtype=F64)
        p = k / G
        assert maxrl.group_advantages(r, G)[0].item() == pytest.approx((1 - p) / p, abs=1e-12)
        assert grpo.group_advantages(r, G)[0].item() == pytest.approx(math.sqrt((1 - p) / p), abs=1e-12)
    assert torch.equal(maxrl.group_advantages(torch.ones(G), G), torch.zeros(G))


# -----------------------------------------------------------------------------
# the loss against the spec


def test_toy_on_policy_matches_the_paper_form():
    # A = [3, -1, -1, -1] (the toy's R through MaxRL), old = new, token-mean over N = 13: verl `vanilla` gives
    # loss 0.0769231 and dJ = A_i / 13 on every token
    new, _, _, _, mask, R, _ = toy11()
    A = maxrl.group_advantages(R, 4)
    assert A.tolist() == [3, -1, -1, -1]
    loss, stats = maxrl.policy_loss(new, new.detach(), None, A, mask, 0.2, 0.0, mask.sum())
    value, dj = value_and_dj(loss, new)
    assert value == pytest.approx(0.0769231, abs=1e-7)
    want = (A[:, None] / 13 * mask)
    torch.testing.assert_close(dj, want, atol=1e-12, rtol=0)
    assert stats["clip_frac"][0].item() == 0


# -----------------------------------------------------------------------------
# an independent computation


def independent_objective(new, old, adv, eps, num_tokens):
    """J with python floats: every token's clipped surrogate, summed over the batch, / num_tokens."""
    J = 0.0
    for n_i, o_i, a in zip(new, old, adv):
        for n, o in zip(n_i, o_i):
            rho = math.exp(n - o)
            J += min(rho * a, max(min(rho, 1 + eps), 1 - eps) * a)
    return J / num_tokens


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_independent_computation_and_finite_differences(seed):
    g = torch.Generator().manual_seed(seed)
    lens = [int(x) for x in torch.randint(1, 7, (8,), generator=g)]
    new = [(torch.randn(n, generator=g, dtype=F64) * 0.3 - 1).tolist() for n in lens]
    old = [[x + 0.25 * float(torch.randn(1, generator=g, dtype=F64)) for x in row] for row in new]
    adv = maxrl.group_advantages(torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 1], dtype=F64), 4).tolist()
    n_t, mask = padded(new, fill=-7.0)
    n_t.requires_grad_(True)
    N = 20.0  # a mini-batch token count larger than this shard's: other micro-batches and ranks share it
    loss, stats = maxrl.policy_loss(n_t, padded(old, fill=3.0)[0], None, torch.tensor(adv, dtype=F64), mask, 0.2, 0.0, N)
    value, dj = value_and_dj(loss, n_t)
    assert 0 < stats["clip_frac"][0] / stats["clip_frac"][1] < 1, "the batch should mix clipped and unclipped tokens"
    assert value == pytest.approx(-independent_objective(new, old, adv, 0.2, N), abs=1e-14)
    objective = lambda rows: independent_objective(rows, old, adv, 0.2, N)
    assert_finite_differences(dj, new, objective, h=1e-6, tol=1e-8)


def test_token_mean_is_not_a_mean_of_sequence_means():
    # a long and a short completion with the same Â: token-mean gives every token the same weight (1/N), GRPO's
    # sequence mean gives the short one's tokens |long|/|short| times more
    new = [[-1.0, -0.5], [-1.0, -0.5, -0.2, -0.7, -1.3, -0.4]]
    n_t, mask = padded(new)
    n_t.requires_grad_(True)
    A = torch.tensor([1.0, 1.0], dtype=F64)
    _, dj = value_and_dj(maxrl.policy_loss(n_t, n_t.detach(), None, A, mask, 0.2, 0.0, mask.sum())[0], n_t)
    assert (dj * mask).unique().tolist() == [0.0, 1 / 8]


# -----------------------------------------------------------------------------
# the trainer


def test_config_defaults():
    cfg = maxrl.Config()
    assert (cfg.group_size, cfg.batch_prompts, cfg.num_minibatches, cfg.beta, cfg.format_weight, cfg.lr) == (
        16, 16, 1, 0.0, 0.0, 1e-6)
    assert maxrl.TINY["num_minibatches"] == 1

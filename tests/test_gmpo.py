"""GMPO (gmpo.py) against the spec's vectors (ALGORITHMS.md section 11.4: TRL = verl = the authors' code, run
as they are), an independent computation with finite differences, the outlier argument of the paper, and
short runs (1 process and 2 gloo processes)."""
import math

import pytest
import torch

import gmpo
import grpo
from helpers import F64, assert_finite_differences, padded, toy11, value_and_dj


def test_toy_matches_trl_verl_and_the_authors():
    new, old, _, _, mask, _, A = toy11()
    loss, stats = gmpo.policy_loss(new, old, None, A, mask, 0.4, 0.0)
    value, dj = value_and_dj(loss, new)
    assert value == pytest.approx(-0.0885425, abs=1e-7)
    s = stats["seq_ratio"]
    assert s[1] == 4 and s[0].item() == pytest.approx(sum([1.18136, 0.860708, 0.860708, 0.927743]), abs=1e-5)
    want = [[0.0984467, 0.0984467, 0, 0], [0, -0.0268971, 0, -0.0268971], [-0.107588, 0, 0, 0], [0.028992] * 4]
    torch.testing.assert_close(dj, torch.tensor(want, dtype=F64), atol=1e-6, rtol=0)  # the spec's 6 digits
    # clipped: o1 t3 (ℓ = 0.45), o2 t1 and t3 (ℓ = -0.5, -0.6), o3 t2 (ℓ = -0.5)
    assert stats["clip_frac"][0].item() == 4 and stats["clip_frac"][1].item() == 13
    # the authors' per-sequence losses are -Â_i s_i
    per_seq = [-a * x for a, x in zip(A.tolist(), [1.18136, 0.860708, 0.860708, 0.927743])]
    assert per_seq == pytest.approx([-1.18136, 0.430354, 0.860708, -0.463872], abs=1e-6)


def independent_objective(new, old, adv, eps):
    """J with python floats: Â_i times exp of the mean one-sided-clipped log-ratio, averaged over completions."""
    J = 0.0
    for n_i, o_i, a in zip(new, old, adv):
        cs = []
        for n, o in zip(n_i, o_i):
            l = n - o
            b = max(min(l, eps), -eps)
            cs.append(min(l, b) if a > 0 else max(l, b))
        J += a * math.exp(sum(cs) / len(cs))
    return J / len(new)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_independent_computation_and_finite_differences(seed):
    g = torch.Generator().manual_seed(seed)
    lens = [int(x) for x in torch.randint(1, 7, (8,), generator=g)]
    new = [(torch.randn(n, generator=g, dtype=F64) * 0.3 - 1).tolist() for n in lens]
    old = [[x + 0.45 * float(torch.randn(1, generator=g, dtype=F64)) for x in row] for row in new]
    adv = torch.randn(8, generator=g, dtype=F64).tolist()
    n_t, mask = padded(new, fill=-7.0)
    n_t.requires_grad_(True)
    loss, stats = gmpo.policy_loss(n_t, padded(old, fill=3.0)[0], None, torch.tensor(adv, dtype=F64), mask, 0.4, 0.0)
    value, dj = value_and_dj(loss, n_t)
    assert 0 < stats["clip_frac"][0] < stats["clip_frac"][1], "the batch should mix clipped and unclipped tokens"
    assert value == pytest.approx(-independent_objective(new, old, adv, 0.4), abs=1e-14)
    objective = lambda rows: independent_objective(rows, old, adv, 0.4)
    assert_finite_differences(dj, new, objective, h=1e-6, tol=1e-8)


def test_on_policy_the_gradient_is_grpos():
    # ρ = 1: s_i = 1 and every token gets Â_i / (G |o_i|), exactly GRPO's on-policy gradient
    new, _, _, _, mask, _, A = toy11()
    _, g_gmpo = value_and_dj(gmpo.policy_loss(new, new.detach(), None, A, mask, 0.4, 0.0)[0], new)
    new2 = new.detach().clone().requires_grad_(True)
    _, g_grpo = value_and_dj(grpo.policy_loss(new2, new2.detach(), None, A, mask, 0.2, 0.0)[0], new2)
    torch.testing.assert_close(g_gmpo, g_grpo, atol=1e-15, rtol=0)


def test_an_outlier_token_moves_the_geometric_mean_less():
    # one token's ratio runs to 20 (unclipped when Â < 0): the arithmetic mean of the 4 ratios, GRPO's weight, jumps
    # to 5.75; the geometric mean, GMPO's, only to 20^(1/4) = 2.11. A ratio of 0.05 (unclipped when Â > 0) gives 0.47
    low = torch.log(torch.tensor([[1.0, 1.0, 1.0, 0.05]], dtype=F64))
    high = torch.log(torch.tensor([[1.0, 1.0, 1.0, 20.0]], dtype=F64))
    mask, A = torch.ones(1, 4, dtype=F64), torch.tensor([-1.0], dtype=F64)  # Â < 0: high ratios stay unclipped
    s_high = gmpo.policy_loss(high, torch.zeros_like(high), None, A, mask, 0.4, 0.0)[1]["seq_ratio"][0].item()
    assert s_high == pytest.approx(20 ** 0.25) and s_high < (3 + 20) / 4  # 2.11 against GRPO's arithmetic 5.75
    A = torch.tensor([1.0], dtype=F64)  # Â > 0: low ratios stay unclipped
    s_low = gmpo.policy_loss(low, torch.zeros_like(low), None, A, mask, 0.4, 0.0)[1]["seq_ratio"][0].item()
    assert s_low == pytest.approx(0.05 ** 0.25)


def test_config_defaults():
    cfg = gmpo.Config()
    assert (cfg.clip_eps, cfg.beta, cfg.group_size) == (0.4, 0.0, 8)

"""DPPO (dppo.py) against the spec's vectors (ALGORITHMS.md section 11.6: verl, SkyRL and prime-rl run as they are),
an independent computation with finite differences, the trust region on probabilities against the ratio clip,
and short runs (1 process and 2 gloo processes)."""
import math

import pytest
import torch

import dppo
from helpers import F64, assert_finite_differences, padded, toy11, value_and_dj

TV_DJ = [[0.103835, 0.0629793, 0, 0], [-0.0233281, -0.0425066, 0, -0.0425066], [-0.0850131, 0, 0, 0],
         [0.0404335, 0.0233281, 0.0404335, 0.0425066]]


def toy(divergence, delta):
    new, old, _, _, mask, _, A = toy11()
    loss, stats = dppo.policy_loss(new, old, None, A, mask, divergence, delta, 0.0, mask.sum())
    return (*value_and_dj(loss, new), mask, stats, new, old)


def test_tv_matches_verl_skyrl_and_prime_rl():
    value, dj, mask, stats, new, old = toy("tv", 0.2)
    dp = (new.exp() - old.exp()) * mask
    assert dp[0, :3].tolist() == pytest.approx([0.192007, -0.0666852, 0.344699], abs=1e-6)
    assert value == pytest.approx(-0.120162, abs=1e-6)  # SkyRL and prime-rl (kl_tau = 0); verl's value differs
    torch.testing.assert_close(dj, torch.tensor(TV_DJ, dtype=F64), atol=1e-6, rtol=0)
    assert (stats["clip_frac"][0] / stats["clip_frac"][1]).item() == pytest.approx(0.230769, abs=1e-6)


def test_binary_kl_masks_one_token_more():
    value, dj, _, stats, _, _ = toy("kl", 0.05)
    want = torch.tensor(TV_DJ, dtype=F64)
    want[0, 0] = 0  # o1 t1: D = 0.0854751 > 0.05 and π_θ rose under Â > 0
    torch.testing.assert_close(dj, want, atol=1e-6, rtol=0)
    assert value == pytest.approx(-0.0163266, abs=1e-6)  # SkyRL
    assert stats["clip_frac"][0].item() == 4


def independent_objective(new, old, adv, divergence, delta, N):
    J = 0.0
    for n_i, o_i, a in zip(new, old, adv):
        for n, o in zip(n_i, o_i):
            p, mu = math.exp(n), math.exp(o)
            if divergence == "tv":
                up, down = p - mu > delta, p - mu < -delta
            else:
                far = mu * math.log(mu / p) + (1 - mu) * math.log((1 - mu) / (1 - p)) > delta
                up, down = far and p > mu, far and p < mu
            masked = (a > 0 and up) or (a < 0 and down)
            J += 0.0 if masked else math.exp(n - o) * a
    return J / N


@pytest.mark.parametrize("divergence,delta", [("tv", 0.1), ("kl", 0.02)])
@pytest.mark.parametrize("seed", [0, 1])
def test_against_independent_computation_and_finite_differences(seed, divergence, delta):
    g = torch.Generator().manual_seed(seed)
    lens = [int(x) for x in torch.randint(1, 7, (8,), generator=g)]
    new = [(torch.rand(n, generator=g, dtype=F64) * -2.0 - 0.05).tolist() for n in lens]  # probabilities 0.13..0.95
    old = [[x + 0.3 * float(torch.randn(1, generator=g, dtype=F64)) for x in row] for row in new]
    old = [[min(x, -0.01) for x in row] for row in old]
    adv = torch.randn(8, generator=g, dtype=F64).tolist()
    n_t, mask = padded(new, fill=-7.0)
    n_t.requires_grad_(True)
    N = 30.0
    loss, stats = dppo.policy_loss(n_t, padded(old, fill=-3.0)[0], None, torch.tensor(adv, dtype=F64), mask,
                                   divergence, delta, 0.0, N)
    value, dj = value_and_dj(loss, n_t)
    assert 0 < stats["clip_frac"][0] < stats["clip_frac"][1], "the batch should mix masked and kept tokens"
    assert value == pytest.approx(-independent_objective(new, old, adv, divergence, delta, N), abs=1e-14)
    objective = lambda rows: independent_objective(rows, old, adv, divergence, delta, N)
    assert_finite_differences(dj, new, objective, h=1e-7, tol=1e-6, jump=10)


def test_the_region_is_on_probabilities_not_ratios():
    # the same ratio 1.5 under Â > 0: a rare token (μ = 1e-3, moved 5e-4) stays trainable; a likely one (μ = 0.6,
    # moved 0.3) is masked. A ratio clip at 1.2 would mask both
    old = torch.log(torch.tensor([[1e-3, 0.6]], dtype=F64))
    new = (old + math.log(1.5)).requires_grad_(True)
    _, stats = dppo.policy_loss(new, old, None, torch.tensor([1.0], dtype=F64), torch.ones(1, 2, dtype=F64),
                                "tv", 0.2, 0.0, 2.0)
    _, dj = value_and_dj(dppo.policy_loss(new, old, None, torch.tensor([1.0], dtype=F64),
                                          torch.ones(1, 2, dtype=F64), "tv", 0.2, 0.0, 2.0)[0], new)
    assert dj[0, 0].item() == pytest.approx(1.5 / 2) and dj[0, 1].item() == 0 and stats["clip_frac"][0] == 1


def test_config_defaults():
    cfg = dppo.Config()
    assert (cfg.divergence, cfg.delta_tv, cfg.delta_kl, cfg.beta) == ("tv", 0.2, 0.05, 0.0)

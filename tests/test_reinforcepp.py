"""REINFORCE++ (reinforcepp.py) against the spec's vectors (ALGORITHMS.md section 11.3: OpenRLHF, NeMo-RL and verl
run as they are), an independent computation with finite differences, the global token whitening over ranks,
and short runs (1 process and 2 gloo processes), both variants."""
import math

import pytest
import torch

import reinforcepp
from helpers import ADV11, F64, assert_finite_differences, padded, toy11, value_and_dj


def adv_batch():
    """The ADV batch: 12 completions of the spec's lengths, rewards per completion, no KL."""
    mask = torch.zeros(12, 4, dtype=F64)
    for i, n in enumerate(ADV11["lengths"]):
        mask[i, :n] = 1
    return torch.tensor(ADV11["R"], dtype=F64), mask


def test_baseline_variant_matches_openrlhf_and_nemo():
    R, mask = adv_batch()
    adv = reinforcepp.reinforce_advantages(R, torch.zeros_like(mask), mask, 4, 0.0, True)
    want = [2.14908, -0.537271, -0.537271, -0.537271, 0.805906, 0.805906, -1.88045, 0.805906] + [0.134318] * 4
    assert [adv[i, 0].item() for i in range(12)] == pytest.approx(want, abs=1e-5)
    assert torch.equal(adv * (1 - mask), torch.zeros_like(adv))  # nothing on the padding
    # every token of a completion carries its completion's value; the all-wrong group q3 is not 0 (token-weighted)
    assert all(torch.allclose(adv[i, :n], adv[i, :1].expand(n)) for i, n in enumerate(ADV11["lengths"]))


def test_kl_to_go_and_whitening_match_openrlhf():
    _, old, ref, _, mask, R, _ = toy11()
    kl = (old - ref) * mask
    adv = reinforcepp.reinforce_advantages(R, kl, mask, 4, 0.05, False)
    assert adv[0, :3].tolist() == pytest.approx([1.82924, 1.81758, 1.82924], abs=1e-5)  # OpenRLHF o1
    # before whitening, the returns verl and OpenRLHF give: o1 [1.015, 1.01, 1.015], o2 [-0.02, -0.005, 0, 0.01]
    returns = R[:, None] - 0.05 * kl.flip(1).cumsum(1).flip(1)
    assert (returns * mask)[1].tolist() == pytest.approx([-0.02, -0.005, 0, 0.01], abs=1e-12)
    flat = returns[mask.bool()]
    torch.testing.assert_close(adv[mask.bool()], (flat - flat.mean()) / flat.std(unbiased=False))


def test_whitening_in_fp32_matches_float64_when_every_reward_is_equal():
    """Issue 37's finding: with equal rewards the only spread is β x the KL-to-go (~1e-3 of the mean); the one-pass
    fp32 variance E[A²] - mean² lost it and Â was off by 0.14 to 2.06 against float64."""
    g = torch.Generator().manual_seed(0)
    B, T = 64, 40
    mask = (torch.arange(T)[None, :] < torch.randint(5, T + 1, (B, 1), generator=g)).float()
    kl = torch.randn(B, T, generator=g, dtype=torch.float64).abs() * 1e-2 * mask
    R = torch.full((B,), 1.1, dtype=torch.float64)
    want = reinforcepp.reinforce_advantages(R, kl, mask.double(), 8, 0.01, False)  # float64 in, float64 out
    got = reinforcepp.reinforce_advantages(R.float(), kl.float(), mask, 8, 0.01, False)
    assert got.dtype == torch.float32 and (got.double() - want).abs().max() < 1e-3
    returns = (R[:, None] - 0.01 * kl.flip(1).cumsum(1).flip(1))[mask.bool()]  # an independent float64 whitening
    torch.testing.assert_close(want[mask.bool()], (returns - returns.mean()) / returns.std(unbiased=False))


def test_actor_and_k2_loss_match_openrlhf():
    new, old, ref, _, mask, _, A = toy11()
    A_tok = A[:, None] * mask
    loss, stats = reinforcepp.policy_loss(new, old, ref, A_tok, mask, 0.2, 0.01, mask.sum())
    value, dj = value_and_dj(loss, new)
    assert value == pytest.approx(-0.100992, abs=1e-6)
    assert (stats["kl"][0] / stats["kl"][1]).item() == pytest.approx(0.0200962, abs=1e-7)
    want = [[-0.000153846, 0.0630562, -0.000115385, 0], [0.000153846, -0.0426604, 0.000307692, -0.0424297],
            [-0.085167, 0.000230769, 0, 0], [0.0403566, 0.0234819, 0.0403566, 0.0425835]]
    torch.testing.assert_close(dj, torch.tensor(want, dtype=F64), atol=1e-6, rtol=0)


def independent_objective(new, old, ref, adv, eps, beta, N):
    J = 0.0
    for n_i, o_i, r_i, a_i in zip(new, old, ref, adv):
        for n, o, r, a in zip(n_i, o_i, r_i, a_i):
            rho = math.exp(n - o)
            J += min(rho * a, max(min(rho, 1 + eps), 1 - eps) * a) - beta * 0.5 * (n - r) ** 2
    return J / N


@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("seed", [0, 1])
def test_against_independent_computation_and_finite_differences(seed, beta):
    g = torch.Generator().manual_seed(seed)
    lens = [int(x) for x in torch.randint(1, 7, (8,), generator=g)]
    new = [(torch.randn(n, generator=g, dtype=F64) * 0.3 - 1).tolist() for n in lens]
    old = [[x + 0.25 * float(torch.randn(1, generator=g, dtype=F64)) for x in row] for row in new]
    ref = [[x + 0.3 * float(torch.randn(1, generator=g, dtype=F64)) for x in row] for row in new]
    adv = [torch.randn(n, generator=g, dtype=F64).tolist() for n in lens]
    n_t, mask = padded(new, fill=-7.0)
    n_t.requires_grad_(True)
    N = 40.0
    loss, stats = reinforcepp.policy_loss(n_t, padded(old, fill=3.0)[0], padded(ref, fill=-5.0)[0],
                                          padded(adv, fill=9.0)[0], mask, 0.2, beta, N)
    value, dj = value_and_dj(loss, n_t)
    assert 0 < stats["clip_frac"][0] < stats["clip_frac"][1]
    assert value == pytest.approx(-independent_objective(new, old, ref, adv, 0.2, beta, N), abs=1e-14)
    objective = lambda rows: independent_objective(rows, old, ref, adv, 0.2, beta, N)
    assert_finite_differences(dj, new, objective, h=1e-6, tol=1e-8)


def test_config_defaults():
    cfg = reinforcepp.Config()
    assert (cfg.beta, cfg.baseline, cfg.clip_eps, cfg.group_size) == (0.01, False, 0.2, 8)

"""GRPO's pieces against the spec's hand-checked vectors (ALGORITHMS.md section 1) and an
independent per-token computation."""
import math

import pytest
import torch

import grpo
from helpers import REWARDS, padded, toy, value_and_dj


def toy_loss(beta, adv=None):
    """GRPO loss on the spec's toy, dJ/dlogπ per token, the mask and the stats."""
    new, old, ref, mask, rewards = toy()
    adv = grpo.group_advantages(rewards, 4) if adv is None else adv
    loss, stats = grpo.policy_loss(new, old, ref, adv, mask, clip_eps=0.2, beta=beta)
    return (*value_and_dj(loss, new), mask, stats)


def test_advantages_population_std():
    adv = grpo.group_advantages(torch.tensor(REWARDS), 4)
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-6)


def test_zero_variance_groups_give_zero_advantage_not_nan():
    r = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.3, 0.3, 0.3, 0.3, 0.0, 0.0, 0.0, 1.0])
    adv = grpo.group_advantages(r, 4)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[:8], torch.zeros(8))
    assert adv[8:].sum().abs() < 1e-6 and adv[11] > 0


def test_loss_and_gradient_beta0_match_spec():
    loss, g, mask, stats = toy_loss(beta=0.0)
    assert loss == pytest.approx(0.016647, abs=1e-6)
    want = [[0.138146, 0], [0, -0.083333, -0.101784], [-0.305351], [0.102341, 0]]
    for i, row in enumerate(want):
        assert g[i, :len(row)].tolist() == pytest.approx(row, abs=1e-6)
        assert g[i, len(row):].abs().sum() == 0  # padding gets no gradient
    # o1 t2, o2 t1, o4 t2 are clipped: 3 of 8 tokens
    s, n = stats["clip_frac"]
    assert (s / n).item() == pytest.approx(3 / 8)


def test_loss_and_gradient_beta004_match_spec():
    loss, g, _, _ = toy_loss(beta=0.04)
    assert loss == pytest.approx(0.018448, abs=1e-6)
    want = [[0.137240, -0.000906], [0.002162, -0.083651, -0.102648], [-0.307943], [0.102867, -0.001967]]
    for i, row in enumerate(want):
        assert g[i, :len(row)].tolist() == pytest.approx(row, abs=1e-6)


def test_k3_kl_matches_spec():
    _, _, _, stats = toy_loss(beta=0.04)
    kl = [0.018731, 0.018731, 0.148721, 0.004837, 0.040818, 0.040818, 0.005171, 0.106531]
    s, n = stats["kl"]
    assert (s / n).item() == pytest.approx(sum(kl) / 8, abs=1e-6)


def test_trl_advantage_scale_changes_loss_as_spec_says():
    adv = torch.tensor([0.865875, -0.865875, -0.865875, 0.865875], dtype=torch.float64)
    loss, _, _, _ = toy_loss(beta=0.0, adv=adv)
    assert loss == pytest.approx(0.014414, abs=1e-6)


def test_on_policy_gradient_coefficient():
    # Â = 1, logπ = logπ_old = -1.0, logπ_ref = -1.2, β = 0.04 -> GC = 1 + 0.04 (e^-0.2 - 1)
    logp = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    loss, _ = grpo.policy_loss(logp, logp.detach(), torch.tensor([[-1.2]], dtype=torch.float64),
                               torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 1), 0.2, 0.04)
    loss.backward()
    assert -logp.grad.item() == pytest.approx(0.992749, abs=1e-6)


def independent_objective(new, old, ref, adv, eps, beta):
    """J written per token with python floats, straight from eq. (3)."""
    J = 0.0
    for n_i, o_i, r_i, a in zip(new, old, ref, adv):
        s = 0.0
        for n, o, r in zip(n_i, o_i, r_i):
            rho = math.exp(n - o)
            surr = min(rho * a, max(min(rho, 1 + eps), 1 - eps) * a)
            s += surr - beta * (math.exp(r - n) - (r - n) - 1)
        J += s / len(n_i)
    return J / len(new)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_independent_computation_and_finite_differences(seed):
    g = torch.Generator().manual_seed(seed)
    lens = [int(x) for x in torch.randint(1, 6, (6,), generator=g)]
    new = [(torch.randn(n, generator=g, dtype=torch.float64) * 0.3 - 1).tolist() for n in lens]
    old = [[x + 0.2 * float(torch.randn(1, generator=g)) for x in row] for row in new]
    ref = [[x + 0.3 * float(torch.randn(1, generator=g)) for x in row] for row in new]
    adv = torch.randn(6, generator=g, dtype=torch.float64)
    n_t, mask = padded(new)
    n_t.requires_grad_(True)
    loss, _ = grpo.policy_loss(n_t, padded(old)[0], padded(ref)[0], adv, mask, 0.2, 0.04)
    J = independent_objective(new, old, ref, adv.tolist(), 0.2, 0.04)
    assert loss.item() == pytest.approx(-J, abs=1e-12)
    loss.backward()
    h = 1e-6  # central finite differences of the independent J
    for i in range(len(new)):
        for t in range(len(new[i])):
            up = [row[:] for row in new]; up[i][t] += h
            dn = [row[:] for row in new]; dn[i][t] -= h
            fd = (independent_objective(up, old, ref, adv.tolist(), 0.2, 0.04)
                  - independent_objective(dn, old, ref, adv.tolist(), 0.2, 0.04)) / (2 * h)
            assert -n_t.grad[i, t].item() == pytest.approx(fd, abs=1e-6)

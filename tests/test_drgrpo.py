"""Dr. GRPO (drgrpo.py) against the spec's hand-checked vector (ALGORITHMS.md section 1, the Dr. GRPO
critique), an independent per-token computation with finite differences, the exact relation to GRPO's
gradient, the micro-batch scaling of the training loop, and short runs (1 process and 2 gloo processes)."""
import math

import pytest
import torch

import drgrpo
import grpo
from helpers import F64, NEW, REF, REWARDS, padded, toy, value_and_dj

L_TOY = 4  # the spec's constant for the toy


def toy_loss(beta=0.0, max_len=L_TOY, adv=None):
    """Dr. GRPO loss on the conftest toy (junk in the padding), dJ/dlogπ, mask and stats."""
    new, old, ref, mask, rewards = toy()
    adv = drgrpo.group_advantages(rewards, 4) if adv is None else adv
    loss, stats = drgrpo.policy_loss(new, old, ref, adv, mask, 0.2, beta, max_len)
    return (*value_and_dj(loss, new), mask, stats)


def frac(stats, key):
    s, n = stats[key]
    return float(s) / float(n)


# -----------------------------------------------------------------------------
# advantages


def test_advantages_are_centred_not_scaled():
    adv = drgrpo.group_advantages(torch.tensor(REWARDS, dtype=F64), 4)
    assert adv.tolist() == [0.5, -0.5, -0.5, 0.5]
    # a skewed group: GRPO would scale by 1/std = 1/0.433 (the question-difficulty bias); Dr. GRPO does not
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.1, 0.1, 0.0, 0.0])
    assert drgrpo.group_advantages(r, 4).tolist() == pytest.approx([0.25, 0.25, 0.25, -0.75, 0.8, -0.2, -0.3, -0.3])
    assert grpo.group_advantages(r, 4)[3].item() == pytest.approx(-0.75 / math.sqrt(0.1875), abs=1e-6)


def test_all_equal_groups_give_exactly_zero_not_rounding_noise():
    # 0.1 (format only) is not exact in float32: a plain R - mean leaves ±1 ulp; the std test makes it exactly 0
    r = torch.tensor([0.1] * 8 + [0.0] * 8 + [0.3, 0.3, 0.3, 1.3, 0.3, 0.3, 0.3, 0.3])
    assert (r[:8] - r[:8].mean()).abs().max() > 0
    adv = drgrpo.group_advantages(r, 8)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[:16], torch.zeros(16))
    assert adv[16:].sum().abs() < 1e-6 and adv[19] == pytest.approx(0.875)


# -----------------------------------------------------------------------------
# the loss against the spec


def test_shared_toy_matches_spec():
    loss, g, mask, stats = toy_loss()
    assert loss == pytest.approx(-0.002534, abs=1e-6)  # J = 0.002534
    # dJ/dlogπ = [unclipped] ρ Â / (G L): GRPO's clipped tokens (o1 t2, o2 t1, o4 t2) stay at zero
    rho = [[1.105171, 1.349859], [0.740818, 1.0, 1.221403], [1.221403], [0.818731, 1.349859]]
    kept = [[1, 0], [0, 1, 1], [1], [1, 0]]
    for i, (rows, ks) in enumerate(zip(rho, kept)):
        a = 0.5 if i in (0, 3) else -0.5
        want = [k * r * a / (4 * L_TOY) for r, k in zip(rows, ks)]
        assert g[i, :len(rows)].tolist() == pytest.approx(want, abs=1e-6)
        assert g[i, len(rows):].abs().sum() == 0  # padding gets no gradient
    assert frac(stats, "clip_frac") == pytest.approx(3 / 8)


def test_the_constant_is_not_the_length():
    # L = 4 against the toy's own lengths 2, 3, 1, 2: J scales as 1/L, and differs from any per-sequence mean
    loss4, _, _, _ = toy_loss(max_len=4)
    loss8, _, _, _ = toy_loss(max_len=8)
    assert loss8 == pytest.approx(loss4 / 2, abs=1e-15)
    new, old, ref, mask, _ = toy()
    grpo_loss, _ = grpo.policy_loss(new, old, ref, torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=F64), mask, 0.2, 0.0)
    assert abs(loss4 - grpo_loss.item()) > 1e-3


def test_kl_term_is_summed_over_tokens_and_divided_by_the_constant():
    beta = 0.04
    loss0, g0, mask, _ = toy_loss(beta=0.0)
    loss1, g1, _, st1 = toy_loss(beta=beta)
    k3 = [[math.exp(r - n) - (r - n) - 1 for n, r in zip(ni, ri)] for ni, ri in zip(NEW, REF)]
    assert loss1 == pytest.approx(loss0 + beta * sum(map(sum, k3)) / (4 * L_TOY), abs=1e-12)
    for i, (ni, ri) in enumerate(zip(NEW, REF)):
        want = [-beta * (1 - math.exp(r - n)) / (4 * L_TOY) for n, r in zip(ni, ri)]
        assert (g1 - g0)[i, :len(ni)].tolist() == pytest.approx(want, abs=1e-12)
    assert frac(st1, "kl") == pytest.approx(sum(map(sum, k3)) / 8, abs=1e-12)


# -----------------------------------------------------------------------------
# an independent computation


def independent_objective(new, old, ref, adv, eps, beta, max_len):
    """J_DrGRPO with python floats and loops: every token's clipped surrogate minus β k3, summed, / (G L_max)."""
    J = 0.0
    for n_i, o_i, r_i, a in zip(new, old, ref, adv):
        for n, o, r in zip(n_i, o_i, r_i):
            rho = math.exp(n - o)
            J += min(rho * a, max(min(rho, 1 + eps), 1 - eps) * a) - beta * (math.exp(r - n) - (r - n) - 1)
    return J / (len(new) * max_len)


def random_batch(seed, B=8):
    """Ragged (new, old, ref, advantages) whose ratios fall on both sides of both clip bounds."""
    g = torch.Generator().manual_seed(seed)
    lens = [int(x) for x in torch.randint(1, 7, (B,), generator=g)]
    new = [(torch.randn(n, generator=g, dtype=F64) * 0.3 - 1).tolist() for n in lens]
    old = [[x + 0.25 * float(torch.randn(1, generator=g, dtype=F64)) for x in row] for row in new]
    ref = [[x + 0.3 * float(torch.randn(1, generator=g, dtype=F64)) for x in row] for row in new]
    adv = (torch.randn(B, generator=g, dtype=F64) * 0.5).tolist()
    return new, old, ref, adv


def loss_and_grad(new, old, ref, adv, beta, max_len, fn=drgrpo.policy_loss):
    n_t, mask = padded(new, fill=-7.0)
    n_t.requires_grad_(True)
    args = (n_t, padded(old, fill=3.0)[0], padded(ref, fill=-5.0)[0], torch.tensor(adv, dtype=F64), mask, 0.2, beta)
    loss, stats = fn(*args, max_len) if fn is drgrpo.policy_loss else fn(*args)
    return (*value_and_dj(loss, n_t), mask, stats)


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_independent_computation_and_finite_differences(seed, beta):
    new, old, ref, adv = random_batch(seed)
    L = 7
    loss, g, _, stats = loss_and_grad(new, old, ref, adv, beta, L)
    assert 0 < frac(stats, "clip_frac") < 1, "the batch should mix clipped and unclipped tokens"
    assert loss == pytest.approx(-independent_objective(new, old, ref, adv, 0.2, beta, L), abs=1e-14)
    h = 1e-6  # central finite differences of the independent J
    for i in range(len(new)):
        assert g[i, len(new[i]):].abs().sum() == 0
        for t in range(len(new[i])):
            up = [row[:] for row in new]; up[i][t] += h
            dn = [row[:] for row in new]; dn[i][t] -= h
            fd = (independent_objective(up, old, ref, adv, 0.2, beta, L)
                  - independent_objective(dn, old, ref, adv, 0.2, beta, L)) / (2 * h)
            assert g[i, t].item() == pytest.approx(fd, abs=1e-8)


# -----------------------------------------------------------------------------
# the relation to GRPO, and the length bias


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_gradient_is_grpos_times_length_over_constant(beta):
    # Same advantages: GRPO weighs token t of o_i by 1/|o_i|, Dr. GRPO by 1/L_max, nothing else differs,
    # so dJ_Dr/dlogπ_it = dJ_GRPO/dlogπ_it · |o_i| / L_max, token by token (KL term included).
    new, old, ref, adv = random_batch(3)
    L = 9
    _, g_dr, mask, st_dr = loss_and_grad(new, old, ref, adv, beta, L)
    _, g_grpo, _, st_grpo = loss_and_grad(new, old, ref, adv, beta, L, fn=grpo.policy_loss)
    lengths = mask.sum(1, keepdim=True)
    assert g_dr.abs().max() > 0
    torch.testing.assert_close(g_dr, g_grpo * lengths / L, atol=1e-15, rtol=1e-12)
    assert frac(st_dr, "clip_frac") == frac(st_grpo, "clip_frac")
    # and when every completion is exactly L_max long, Dr. GRPO with R - mean is GRPO with std-scaled Â times std
    full = [row + [-1.0] * (L - len(row)) for row in new]
    full_old = [row + [-1.0] * (L - len(row)) for row in old]
    full_ref = [row + [-1.0] * (L - len(row)) for row in ref]
    loss_dr, g_dr, _, _ = loss_and_grad(full, full_old, full_ref, adv, beta, L)
    loss_grpo, g_grpo, _, _ = loss_and_grad(full, full_old, full_ref, adv, beta, L, fn=grpo.policy_loss)
    assert loss_dr == pytest.approx(loss_grpo, abs=1e-15)
    torch.testing.assert_close(g_dr, g_grpo, atol=1e-15, rtol=0)


def test_no_length_bias_on_policy():
    # Two wrong answers (Â = -1), 2 and 6 tokens, on-policy. GRPO pushes each token of the long one down
    # 3x less than the short one's (1/|o_i|); Dr. GRPO pushes every token down by the same Â / (G L_max).
    new = [[-1.0, -0.5], [-1.0, -0.5, -0.2, -0.7, -1.3, -0.4]]
    adv = [-1.0, -1.0]
    _, g_dr, _, _ = loss_and_grad(new, new, new, adv, 0.0, 8)
    _, g_grpo, _, _ = loss_and_grad(new, new, new, adv, 0.0, 8, fn=grpo.policy_loss)
    assert g_dr[0, :2].tolist() == g_dr[1, :2].tolist() == [-1.0 / 16] * 2
    assert g_dr[1, :6].tolist() == [-1.0 / 16] * 6
    assert g_grpo[0, 0].item() == pytest.approx(3 * g_grpo[1, 0].item())


def test_micro_batch_scaling_gives_the_mini_batch_objective():
    # The loop backpropagates loss(micro-batch) * len(ix) / len(mb); with Dr. GRPO's per-micro-batch mean of
    # (token sum / L_max) that sums to -1/(len(mb) L_max) Σ_i Σ_t, the mini-batch objective, exactly.
    new, old, ref, adv = random_batch(4, B=8)
    L = 7
    n_t, mask = padded(new, fill=-7.0)
    o_t, r_t, a_t = padded(old, fill=3.0)[0], padded(ref, fill=-5.0)[0], torch.tensor(adv, dtype=F64)
    n_t.requires_grad_(True)
    mb = torch.tensor([5, 0, 7, 2, 1, 6, 3, 4])
    total = 0.0
    for ix in mb.split(3):  # micro-batches of 3, 3, 2
        loss, _ = drgrpo.policy_loss(n_t[ix], o_t[ix], r_t[ix], a_t[ix], mask[ix], 0.2, 0.04, L)
        (loss * len(ix) / len(mb)).backward()
        total += loss.item() * len(ix) / len(mb)
    assert total == pytest.approx(-independent_objective(new, old, ref, adv, 0.2, 0.04, L), abs=1e-15)
    whole = n_t.detach().clone().requires_grad_(True)
    drgrpo.policy_loss(whole, o_t, r_t, a_t, mask, 0.2, 0.04, L)[0].backward()
    torch.testing.assert_close(n_t.grad, whole.grad, atol=1e-16, rtol=0)


# -----------------------------------------------------------------------------
# the trainer


def test_config_defaults():
    cfg = drgrpo.Config()
    assert cfg.beta == 0.0 and cfg.clip_eps == 0.2  # the authors' --beta 0; GRPO's ε
    assert cfg.max_new_tokens == 300  # L_max of the loss

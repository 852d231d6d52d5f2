"""CISPO (cispo.py) against the spec's hand-checked vectors (ALGORITHMS.md section 10), an independent
per-token computation with finite differences of the stop-gradient surrogate, the stop-gradient itself,
the relation to DAPO's clipped token-level loss, the token-level normalisation across micro-batches, and
short runs (1 process, 2 gloo processes, and a DDP update == single-process update check)."""
import math

import pytest
import torch

import cispo
import dapo
from helpers import F64, NEW, OLD, REF, padded, toy, value_and_dj

NO_LOW = 1.0  # ε_low = 1: the lower bound 1 - ε_low = 0 never binds (the paper sets no lower bound)


def toy_loss(cap, eps_low=NO_LOW, beta=0.0):
    """CISPO loss on the conftest toy (junk in the padding) with the weight capped at `cap` (= 1 + ε_high),
    normalised by the toy's 8 tokens: (loss, dJ/dlogπ, mask, stats)."""
    new, old, ref, mask, rewards = toy()
    adv = cispo.group_advantages(rewards, 4)
    loss, stats = cispo.policy_loss(new, old, ref, adv, mask, eps_low, cap - 1, beta, mask.sum())
    return (*value_and_dj(loss, new), mask, stats)


def frac(stats, key):
    s, n = stats[key]
    return float(s) / float(n)


def rows_equal(g, want, abs_tol=1e-6):
    for i, row in enumerate(want):
        assert g[i, :len(row)].tolist() == pytest.approx(row, abs=abs_tol)
        assert g[i, len(row):].abs().sum() == 0  # padding gets no gradient


# -----------------------------------------------------------------------------
# the spec's vectors


def test_shared_toy_cap_1_28_matches_spec():
    loss, g, _, stats = toy_loss(cap=1.28)
    assert loss == pytest.approx(-0.035504, abs=1e-6)  # J = 0.035504
    rows_equal(g, [[0.138146, 0.160000], [-0.092602, -0.125000, -0.152675], [-0.152675], [0.102341, 0.160000]])
    assert frac(stats, "clip_frac") == pytest.approx(2 / 8)  # o1 t2 and o4 t2: ρ = 1.35 > 1.28


def test_shared_toy_cap_5_matches_spec():
    loss, g, _, stats = toy_loss(cap=5.0)
    assert loss == pytest.approx(-0.027645, abs=1e-6)
    rows_equal(g, [[0.138146, 0.168732], [-0.092602, -0.125000, -0.152675], [-0.152675], [0.102341, 0.168732]])
    assert frac(stats, "clip_frac") == 0


def test_every_token_keeps_its_gradient_where_grpo_drops_three():
    # GRPO/DAPO zero o1 t2, o2 t1 and o4 t2 on this toy; CISPO moves all 8 tokens, each by r̂ Â / N
    _, g, mask, _ = toy_loss(cap=1.28)
    assert (g.abs() > 0.09)[mask.bool()].all()
    new, old, ref, mask, rewards = toy()
    loss, _ = dapo.policy_loss(new, old, ref, dapo.group_advantages(rewards, 4), mask, 0.2, 0.28, 0.0, mask.sum())
    _, g_dapo = value_and_dj(loss, new)
    assert int((g_dapo[mask.bool()] == 0).sum()) == 3


def test_lower_bound_when_asked_for():
    # ε_low = 0.2: o2 t1 (ρ = 0.74) gets the weight 0.8, so dJ/dlogπ = -0.8 / 8; it is counted as clipped
    _, g, _, stats = toy_loss(cap=1.28, eps_low=0.2)
    assert g[1, 0].item() == pytest.approx(-0.1, abs=1e-12)
    assert frac(stats, "clip_frac") == pytest.approx(3 / 8)


def test_trl_absolute_cap_is_our_cap_minus_one():
    # TRL: clamp(ρ, max=epsilon_high), an absolute cap; here the cap is 1 + clip_eps_high (the paper's, verl's)
    new, old, ref, mask, rewards = toy()
    adv = cispo.group_advantages(rewards, 4)
    trl_eps_high = 1.28
    trl = -(torch.clamp(torch.exp(new - old), max=trl_eps_high).detach() * adv[:, None] * new * mask).sum() / 8
    ours, _ = cispo.policy_loss(new, old, ref, adv, mask, NO_LOW, trl_eps_high - 1, 0.0, mask.sum())
    assert ours.item() == pytest.approx(trl.item(), abs=1e-15)


def test_value_depends_on_log_probs_not_only_on_ratios():
    # Shift new and old log-probs by the same constant: every ratio, weight and gradient is unchanged,
    # but J = Σ r̂ Â log π / N moves by c Σ r̂ Â / N (why the logged loss is not comparable with GRPO's).
    loss0, g0, mask, _ = toy_loss(cap=1.28)
    new, old, ref, mask, rewards = toy()
    adv = cispo.group_advantages(rewards, 4)
    shifted = (new.detach() - 0.5).requires_grad_(True)
    loss1, _ = cispo.policy_loss(shifted, old - 0.5, ref, adv, mask, NO_LOW, 0.28, 0.0, mask.sum())
    _, g1 = value_and_dj(loss1, shifted)
    torch.testing.assert_close(g1, g0, atol=1e-15, rtol=0)
    weights = [[min(math.exp(n - o), 1.28) for n, o in zip(ni, oi)] for ni, oi in zip(NEW, OLD)]
    shift = sum(w * a for row, a in zip(weights, [1, -1, -1, 1]) for w in row) * -0.5 / 8
    assert -loss1.item() == pytest.approx(-loss0 + shift, abs=1e-12)
    assert abs(shift) > 1e-3


def test_kl_term_is_token_level_too():
    beta = 0.04
    loss0, g0, _, _ = toy_loss(cap=1.28)
    loss1, g1, _, st1 = toy_loss(cap=1.28, beta=beta)
    k3 = [[math.exp(r - n) - (r - n) - 1 for n, r in zip(ni, ri)] for ni, ri in zip(NEW, REF)]
    assert loss1 == pytest.approx(loss0 + beta * sum(map(sum, k3)) / 8, abs=1e-12)
    rows_equal(g1 - g0, [[-beta * (1 - math.exp(r - n)) / 8 for n, r in zip(ni, ri)] for ni, ri in zip(NEW, REF)],
               abs_tol=1e-12)
    assert frac(st1, "kl") == pytest.approx(sum(map(sum, k3)) / 8, abs=1e-12)


# -----------------------------------------------------------------------------
# an independent computation


def independent_weights(new, old, eps_low, eps_high):
    """r̂_it = clip(ρ_it, 1 - ε_low, 1 + ε_high), with python floats."""
    return [[max(min(math.exp(n - o), 1 + eps_high), 1 - eps_low) for n, o in zip(ni, oi)]
            for ni, oi in zip(new, old)]


def independent_objective(new, old, ref, adv, eps_low, eps_high, beta, weights=None):
    """J_CISPO (eq. 4) with loops: Σ_i Σ_t (r̂_it Â_i log π_it - β k3_it) / Σ_i |o_i|. `weights` holds r̂
    fixed, which is what sg[.] means for the gradient; without it r̂ is recomputed from `new`."""
    w = independent_weights(new, old, eps_low, eps_high) if weights is None else weights
    J, N = 0.0, sum(len(row) for row in new)
    for i, (ni, ri, a) in enumerate(zip(new, ref, adv)):
        for t, (n, r) in enumerate(zip(ni, ri)):
            J += w[i][t] * a * n - beta * (math.exp(r - n) - (r - n) - 1)
    return J / N


def random_batch(seed, B=8):
    """Ragged (new, old, ref, advantages) with ratios below 0.8, inside, and above 1.28, never within 1e-6
    of a bound (finite differences of the full J cross no kink)."""
    g = torch.Generator().manual_seed(seed)
    new, old, ref = [], [], []
    for n in [int(x) for x in torch.randint(1, 7, (B,), generator=g)]:
        nw = (torch.randn(n, generator=g, dtype=F64) * 0.4 - 1.2).tolist()
        d = (torch.randn(n, generator=g, dtype=F64) * 0.3).tolist()
        d = [x + 1e-3 if min(abs(x - math.log(1.28)), abs(x - math.log(0.8))) < 1e-6 else x for x in d]
        new.append(nw)
        old.append([x - y for x, y in zip(nw, d)])
        ref.append([x + 0.3 * float(torch.randn(1, generator=g, dtype=F64)) for x in nw])
    return new, old, ref, (torch.randn(B, generator=g, dtype=F64)).tolist()


def loss_and_grad(new, old, ref, adv, eps_low, eps_high, beta):
    n_t, mask = padded(new, fill=-7.0)
    n_t.requires_grad_(True)
    loss, stats = cispo.policy_loss(n_t, padded(old, fill=3.0)[0], padded(ref, fill=-5.0)[0],
                                    torch.tensor(adv, dtype=F64), mask, eps_low, eps_high, beta, mask.sum())
    return (*value_and_dj(loss, n_t), mask, stats)


@pytest.mark.parametrize("eps_low", [NO_LOW, 0.2])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_independent_computation_and_finite_differences(seed, beta, eps_low):
    new, old, ref, adv = random_batch(seed)
    loss, g, _, stats = loss_and_grad(new, old, ref, adv, eps_low, 0.28, beta)
    w = independent_weights(new, old, eps_low, 0.28)
    rhos = [math.exp(n - o) for row, orow in zip(new, old) for n, o in zip(row, orow)]
    assert 0 < sum(x > 1.28 for x in rhos) < len(rhos), "the batch should mix capped and uncapped weights"
    assert frac(stats, "clip_frac") == pytest.approx(sum(x > 1.28 or x < 1 - eps_low for x in rhos) / len(rhos))
    assert loss == pytest.approx(-independent_objective(new, old, ref, adv, eps_low, 0.28, beta), abs=1e-14)
    h = 1e-6  # central finite differences with r̂ held at its value (the stop-gradient), and the closed form
    N = sum(map(len, new))
    for i in range(len(new)):
        for t in range(len(new[i])):
            up = [row[:] for row in new]; up[i][t] += h
            dn = [row[:] for row in new]; dn[i][t] -= h
            fd = (independent_objective(up, old, ref, adv, eps_low, 0.28, beta, weights=w)
                  - independent_objective(dn, old, ref, adv, eps_low, 0.28, beta, weights=w)) / (2 * h)
            closed = (w[i][t] * adv[i] - beta * (1 - math.exp(ref[i][t] - new[i][t]))) / N
            assert g[i, t].item() == pytest.approx(fd, abs=1e-8)
            assert g[i, t].item() == pytest.approx(closed, abs=1e-14)


def test_the_gradient_is_not_that_of_the_full_objective():
    # Without sg[.] the weight's own derivative would add ρ Â log π / N on uncapped tokens: the finite
    # difference of the un-stopped J shows it, and the trainer's gradient must not follow it.
    new, old, ref, adv = random_batch(5)
    _, g, _, _ = loss_and_grad(new, old, ref, adv, NO_LOW, 0.28, 0.0)
    h, worst = 1e-6, 0.0
    for i in range(len(new)):
        for t in range(len(new[i])):
            up = [row[:] for row in new]; up[i][t] += h
            dn = [row[:] for row in new]; dn[i][t] -= h
            fd = (independent_objective(up, old, ref, adv, NO_LOW, 0.28, 0.0)
                  - independent_objective(dn, old, ref, adv, NO_LOW, 0.28, 0.0)) / (2 * h)
            worst = max(worst, abs(fd - g[i, t].item()))
    assert worst > 1e-2


# -----------------------------------------------------------------------------
# the relation to DAPO, and the token-level normalisation


def test_inside_the_trust_region_the_gradient_is_dapos_outside_it_is_capped_not_dropped():
    # DAPO (same bounds 0.8 / 1.28, same token-level normaliser): dJ/dlogπ = ρ Â / N where the clip is
    # inactive, 0 where it removes the token. CISPO (no lower bound): min(ρ, 1.28) Â / N on every token.
    new, old, ref, adv = random_batch(6)
    _, g, mask, _ = loss_and_grad(new, old, ref, adv, NO_LOW, 0.28, 0.0)
    n_t, _ = padded(new, fill=-7.0)
    n_t.requires_grad_(True)
    o_t = padded(old, fill=3.0)[0]
    a_t = torch.tensor(adv, dtype=F64)
    loss, _ = dapo.policy_loss(n_t, o_t, None, a_t, mask, 0.2, 0.28, 0.0, mask.sum())
    _, g_dapo = value_and_dj(loss, n_t)
    rho, A, m = torch.exp(n_t.detach() - o_t), a_t[:, None].expand_as(mask), mask.bool()
    inside = (rho >= 0.8) & (rho <= 1.28) & m
    dropped = (((A > 0) & (rho > 1.28)) | ((A < 0) & (rho < 0.8))) & m
    assert inside.any() and dropped.any()
    torch.testing.assert_close(g[inside], g_dapo[inside], atol=1e-15, rtol=0)
    assert (g_dapo[dropped] == 0).all() and (g[dropped].abs() > 0).all()
    torch.testing.assert_close(g[m], (torch.clamp(rho, max=1.28) * A / mask.sum())[m], atol=1e-15, rtol=0)


def test_on_policy_gradient_is_dapos():
    new, _, ref, adv = random_batch(7)
    _, g, mask, stats = loss_and_grad(new, new, ref, adv, NO_LOW, 0.28, 0.0)
    assert frac(stats, "clip_frac") == 0 and frac(stats, "ratio") == 1.0
    n_t, _ = padded(new, fill=-7.0)
    n_t.requires_grad_(True)
    loss, _ = dapo.policy_loss(n_t, n_t.detach(), None, torch.tensor(adv, dtype=F64), mask, 0.2, 0.28, 0.0,
                               mask.sum())
    _, g_dapo = value_and_dj(loss, n_t)
    assert g.abs().max() > 0
    torch.testing.assert_close(g, g_dapo, atol=1e-15, rtol=0)


def test_micro_batches_with_the_mini_batch_token_count_give_the_mini_batch_objective():
    # The loop divides every micro-batch's token sum by the mini-batch's token count and backpropagates
    # the sum: that is exactly the whole-batch objective. A per-micro-batch token mean is not.
    new, old, ref, adv = random_batch(8)
    n_t, mask = padded(new, fill=-7.0)
    o_t, r_t, a_t = padded(old, fill=3.0)[0], padded(ref, fill=-5.0)[0], torch.tensor(adv, dtype=F64)
    n_t.requires_grad_(True)
    N = mask.sum()
    total, naive = 0.0, 0.0
    for ix in torch.tensor([5, 0, 7, 2, 1, 6, 3, 4]).split(3):
        loss, _ = cispo.policy_loss(n_t[ix], o_t[ix], r_t[ix], a_t[ix], mask[ix], NO_LOW, 0.28, 0.04, N)
        loss.backward()
        total += loss.item()
        naive += cispo.policy_loss(n_t[ix], o_t[ix], r_t[ix], a_t[ix], mask[ix], NO_LOW, 0.28, 0.04,
                                   mask[ix].sum())[0].item() / 3
    assert total == pytest.approx(-independent_objective(new, old, ref, adv, NO_LOW, 0.28, 0.04), abs=1e-14)
    whole = n_t.detach().clone().requires_grad_(True)
    cispo.policy_loss(whole, o_t, r_t, a_t, mask, NO_LOW, 0.28, 0.04, N)[0].backward()
    torch.testing.assert_close(n_t.grad, whole.grad, atol=1e-16, rtol=0)
    assert abs(naive - total) > 1e-3


# -----------------------------------------------------------------------------
# the trainer


def test_config_defaults():
    cfg = cispo.Config()
    assert (cfg.clip_eps_low, cfg.clip_eps_high, cfg.beta) == (1.0, 0.28, 0.0)

"""GSPO's pieces against the spec's hand-checked vectors (ALGORITHMS.md section 3), an independent
per-sequence computation (with and without the optional k3 KL term), GSPO-token's equivalence, length
invariance, the on-policy equivalence with GRPO, and short runs (1 process and 2 gloo processes)."""
import math

import pytest
import torch

import grpo
import gspo
from helpers import F64, NEW, REF, REWARDS, padded, toy, value_and_dj

# The small-deviation toy (section 3 (i) 2): per-token log-ratios new - old.
SMALL = [[1e-4, 5e-4], [-6e-4, -4e-4, -2e-4], [5e-4], [6e-4, 4e-4]]
EPS_LOW, EPS_HIGH = 3e-4, 4e-4
# the spec's per-token k3 KL of the shared toy (section 1 (i)), tokens in order o1 t1, t2, o2 t1..t3, o3, o4 t1, t2
TOY_K3 = [0.018731, 0.018731, 0.148721, 0.004837, 0.040818, 0.040818, 0.005171, 0.106531]


def loss_and_grad(new, old, adv, gspo_token=False, ref=None, beta=0.0):
    """GSPO loss, dJ/dlogπ per token, mask and stats for ragged rows; each input pads with its own junk
    value, so a loss that reads the padding shows it. ref=None checks that β = 0 never reads it."""
    n_t, mask = padded(new, fill=-7.0)
    o_t, _ = padded(old, fill=3.0)
    r_t = None if ref is None else padded(ref, fill=-5.0)[0]
    n_t.requires_grad_(True)
    loss, stats = gspo.policy_loss(n_t, o_t, r_t, adv, mask, EPS_LOW, EPS_HIGH, beta, gspo_token=gspo_token)
    return (*value_and_dj(loss, n_t), mask, stats)


def toy_loss(gspo_token, beta=0.0):
    """GSPO loss on the conftest toy (junk in the padding), dJ/dlogπ, mask and stats."""
    new, old, ref, mask, rewards = toy()
    adv = gspo.group_advantages(rewards, 4)
    loss, stats = gspo.policy_loss(new, old, ref, adv, mask, EPS_LOW, EPS_HIGH, beta, gspo_token=gspo_token)
    return (*value_and_dj(loss, new), mask, stats)


def frac(stats, key):
    s, n = stats[key]
    return float(s) / float(n)


def toy_advantages():
    return gspo.group_advantages(torch.tensor(REWARDS, dtype=F64), 4)


def k3(n, r):
    """The k3 KL estimate of one token, from python floats: π_ref/π_θ - log(π_ref/π_θ) - 1."""
    return math.exp(r - n) - (r - n) - 1


@pytest.mark.parametrize("gspo_token", [False, True])
def test_shared_toy_matches_spec(gspo_token):
    new, old, _, mask, rewards = toy()
    adv = gspo.group_advantages(rewards, 4)
    assert adv.tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0])
    s = gspo.sequence_log_ratio(new, old, mask).exp()  # padding holds junk: it must not count
    assert s.tolist() == pytest.approx([1.221403, 0.967216, 1.221403, 1.051271], abs=1e-6)
    loss, g, mask, stats = toy_loss(gspo_token)
    assert loss == pytest.approx(0.055076, abs=1e-6)  # J = -0.055076
    want = [[0, 0], [0, 0, 0], [-0.305351], [0, 0]]  # o1, o2, o4 clipped; o3 kept by pessimism
    for i, row in enumerate(want):
        assert g[i, :len(row)].tolist() == pytest.approx(row, abs=1e-6)
        assert g[i, len(row):].abs().sum() == 0  # padding gets no gradient
    assert frac(stats, "clip_frac_seq") == pytest.approx(3 / 4)
    assert frac(stats, "clip_frac") == pytest.approx(7 / 8)  # every token of o1, o2, o4
    # the logged ratio is the token-weighted mean of s_i (|y| = 2, 3, 1, 2)
    assert frac(stats, "ratio") == pytest.approx((2 * 1.221403 + 3 * 0.967216 + 1.221403 + 2 * 1.051271) / 8,
                                                 abs=1e-6)
    assert frac(stats, "kl") == 0  # β = 0: no KL term


@pytest.mark.parametrize("gspo_token", [False, True])
def test_small_deviation_toy_matches_spec(gspo_token):
    old = [[-1.0 - 0.1 * t for t in range(len(r))] for r in SMALL]
    new = [[o + d for o, d in zip(orow, drow)] for orow, drow in zip(old, SMALL)]
    n_t, mask = padded(new, fill=-7.0)
    s = gspo.sequence_log_ratio(n_t, padded(old, fill=3.0)[0], mask).exp()
    assert s.tolist() == pytest.approx([1.00030005, 0.99960008, 1.00050013, 1.00050013], abs=1e-8)
    loss, g, _, stats = loss_and_grad(new, old, toy_advantages(), gspo_token)
    assert loss == pytest.approx(-0.000124980, abs=1e-9)
    want = [[0.125038, 0.125038], [0, 0, 0], [-0.250125], [0, 0]]  # A s / (|y| G) where unclipped
    for i, row in enumerate(want):
        assert g[i, :len(row)].tolist() == pytest.approx(row, abs=1e-6)
        assert g[i, len(row):].abs().sum() == 0
    assert frac(stats, "clip_frac_seq") == pytest.approx(2 / 4)  # o2 below 1 - ε_low, o4 above 1 + ε_high
    assert frac(stats, "clip_frac") == pytest.approx(5 / 8)


def test_small_deviation_toy_is_not_length_weighted():
    # The spec's contrast: TRL loss_type="dapo" with sequence-level IS broadcasts each sequence's term
    # over its tokens and divides by the batch's token count, giving 0.000224996. GSPO must not.
    A = [1.0, -1.0, -1.0, 1.0]
    terms = []
    for a, d in zip(A, SMALL):
        s = math.exp(sum(d) / len(d))
        terms.append(min(s * a, min(max(s, 1 - EPS_LOW), 1 + EPS_HIGH) * a))
    length_weighted = sum(t * len(d) for t, d in zip(terms, SMALL)) / sum(len(d) for d in SMALL)
    assert length_weighted == pytest.approx(0.000224996, abs=1e-9)
    loss, _, _, _ = loss_and_grad([list(d) for d in SMALL], [[0.0] * len(d) for d in SMALL],
                                  torch.tensor(A, dtype=F64))
    assert -loss == pytest.approx(sum(terms) / 4, abs=1e-12)
    assert abs(-loss - length_weighted) > 1e-4


@pytest.mark.parametrize("gspo_token", [False, True])
def test_kl_term_is_the_token_mean_k3_per_sequence(gspo_token):
    # β > 0 adds grpo.py's k3 KL per token, averaged over each sequence's tokens like the rest of the
    # sequence's term: J(β) = J(0) - β · 1/G Σ_i 1/|y_i| Σ_t k3_it, i.e. loss(β) = loss(0) + β · that mean.
    beta = 0.04
    loss0, g0, mask, st0 = toy_loss(gspo_token, beta=0.0)
    loss1, g1, _, st1 = toy_loss(gspo_token, beta=beta)
    kl = [[k3(n, r) for n, r in zip(n_i, r_i)] for n_i, r_i in zip(NEW, REF)]  # independent, in python floats
    assert [x for row in kl for x in row] == pytest.approx(TOY_K3, abs=1e-6)
    seq_mean_kl = sum(sum(row) / len(row) for row in kl) / len(kl)
    assert seq_mean_kl > 0.01  # large enough for a missing or misweighted term to show
    assert loss1 == pytest.approx(loss0 + beta * seq_mean_kl, abs=1e-12)
    # the logged kl is the token mean over the batch, as in grpo.py
    assert frac(st1, "kl") == pytest.approx(sum(TOY_K3) / 8, abs=1e-6)
    # the clip is unchanged by the KL term
    assert frac(st1, "clip_frac") == frac(st0, "clip_frac") and frac(st1, "clip_frac_seq") == frac(st0, "clip_frac_seq")
    # gradient: d(-β k3)/dlogπ = -β (1 - π_ref/π_θ), spread by 1/(|y_i| G), on every token, clipped or not
    for i, (n_i, r_i) in enumerate(zip(NEW, REF)):
        want = [-beta * (1 - math.exp(r - n)) / (len(n_i) * 4) for n, r in zip(n_i, r_i)]
        assert (g1 - g0)[i, :len(n_i)].tolist() == pytest.approx(want, abs=1e-12)
        assert g1[i, len(n_i):].abs().sum() == 0


def independent_objective(new, old, ref, adv, eps_low, eps_high, beta=0.0):
    """J_GSPO with python floats and loops, straight from eqs. (5) and (7), minus β times the token-mean k3."""
    J = 0.0
    for i, (n_i, o_i, a) in enumerate(zip(new, old, adv)):
        log_s = 0.0
        for n, o in zip(n_i, o_i):
            log_s += n - o
        s = math.exp(log_s / len(n_i))
        clipped_s = max(min(s, 1 + eps_high), 1 - eps_low)
        J += min(s * a, clipped_s * a)
        if beta:
            J -= beta * sum(k3(n, r) for n, r in zip(n_i, ref[i])) / len(n_i)
    return J / len(new)


def independent_gradient(new, old, ref, adv, eps_low, eps_high, beta=0.0):
    """dJ/dlogπ_it = ([unclipped] s_i Â_i - β (1 - π_ref/π_θ)) / (|y_i| G), with loops (the paper's eq. 11)."""
    G, grads = len(new), []
    for i, (n_i, o_i, a) in enumerate(zip(new, old, adv)):
        s = math.exp(sum(n - o for n, o in zip(n_i, o_i)) / len(n_i))
        kept = (a > 0 and s < 1 + eps_high) or (a < 0 and s > 1 - eps_low)
        row = []
        for t, n in enumerate(n_i):
            g = s * a if kept else 0.0
            if beta:
                g -= beta * (1 - math.exp(ref[i][t] - n))
            row.append(g / (len(n_i) * G))
        grads.append(row)
    return grads


def random_batch(seed, B=8):
    """Ragged log-probs whose sequence ratios sit on both sides of both clip bounds, never within 1e-6;
    (new, old, ref, per-sequence advantages)."""
    g = torch.Generator().manual_seed(seed)
    g_ref = torch.Generator().manual_seed(seed + 1000)  # a stream of its own: new, old, adv do not depend on it
    new, old, ref, adv = [], [], [], []
    while len(new) < B:
        n = int(torch.randint(1, 7, (1,), generator=g))
        o = (torch.randn(n, generator=g, dtype=F64) * 0.5 - 1).tolist()
        mean_d = (float(torch.rand(1, generator=g, dtype=F64)) * 2 - 1) * 1e-3  # log s_i in ±1e-3
        noise = torch.randn(n, generator=g, dtype=F64) * 5e-4
        d = (noise - noise.mean() + mean_d).tolist()  # per-token log-ratios with that mean
        if min(abs(mean_d - math.log1p(EPS_HIGH)), abs(mean_d - math.log1p(-EPS_LOW))) < 1e-6:
            continue  # too close to a clip bound for finite differences
        old.append(o)
        new.append([x + y for x, y in zip(o, d)])
        adv.append(float(torch.randn(1, generator=g, dtype=F64)))
        ref.append([x + 0.3 * float(y) for x, y in zip(new[-1], torch.randn(n, generator=g_ref, dtype=F64))])
    return new, old, ref, adv


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("gspo_token", [False, True])
def test_against_independent_computation(seed, gspo_token, beta):
    new, old, ref, adv = random_batch(seed)
    loss, g, _, stats = loss_and_grad(new, old, torch.tensor(adv, dtype=F64), gspo_token,
                                      ref=ref if beta else None, beta=beta)
    assert 0 < frac(stats, "clip_frac_seq") < 1, "the batch should mix clipped and unclipped sequences"
    assert loss == pytest.approx(-independent_objective(new, old, ref, adv, EPS_LOW, EPS_HIGH, beta), abs=1e-14)
    want = independent_gradient(new, old, ref, adv, EPS_LOW, EPS_HIGH, beta)
    h = 1e-7  # and central finite differences of the independent J
    for i in range(len(new)):
        assert g[i, :len(new[i])].tolist() == pytest.approx(want[i], abs=1e-12)
        assert g[i, len(new[i]):].abs().sum() == 0
        for t in range(len(new[i])):
            up = [row[:] for row in new]; up[i][t] += h
            dn = [row[:] for row in new]; dn[i][t] -= h
            fd = (independent_objective(up, old, ref, adv, EPS_LOW, EPS_HIGH, beta)
                  - independent_objective(dn, old, ref, adv, EPS_LOW, EPS_HIGH, beta)) / (2 * h)
            assert g[i, t].item() == pytest.approx(fd, abs=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("seed", [5, 6, 7])
def test_gspo_token_equals_gspo_for_sequence_advantages(seed, beta):
    new, old, ref, adv = random_batch(seed)
    adv = torch.tensor(adv, dtype=F64)
    ref = ref if beta else None
    loss_seq, g_seq, mask, st_seq = loss_and_grad(new, old, adv, gspo_token=False, ref=ref, beta=beta)
    loss_tok, g_tok, _, st_tok = loss_and_grad(new, old, adv, gspo_token=True, ref=ref, beta=beta)
    assert g_seq.abs().max() > 0
    assert loss_tok == pytest.approx(loss_seq, abs=1e-15)
    assert torch.allclose(g_tok, g_seq, atol=1e-15, rtol=0)
    assert st_tok.keys() == st_seq.keys()
    for key in st_seq:
        assert frac(st_tok, key) == pytest.approx(frac(st_seq, key))


def test_doubling_length_with_same_log_ratio_keeps_s():
    old = [[-1.0, -2.0, -0.5], [-1.0, -2.0, -0.5, -1.0, -2.0, -0.5]]
    d = [2e-4, -1e-4, 5e-4]
    new = [[o + x for o, x in zip(old[0], d)], [o + x for o, x in zip(old[1], d + d)]]
    n_t, mask = padded(new, fill=-7.0)
    log_s = gspo.sequence_log_ratio(n_t, padded(old, fill=3.0)[0], mask)
    assert log_s[0].item() == pytest.approx(sum(d) / 3, abs=1e-15)
    assert log_s[1].item() == pytest.approx(log_s[0].item(), abs=1e-15)
    # the same sequence term, so the same loss contribution, whatever the length (A = 1, unclipped here)
    loss, g, _, _ = loss_and_grad(new, old, torch.tensor([1.0, 1.0], dtype=F64))
    assert g[0, :3].sum().item() == pytest.approx(g[1, :6].sum().item(), abs=1e-15)
    assert g[0, 0].item() == pytest.approx(2 * g[1, 0].item(), abs=1e-15)  # weight spread over twice the tokens


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_on_policy_gradient_equals_grpo(beta):
    # With logp == old_logp (the first mini-batch), s_i = 1 and GSPO's gradient is GRPO's at the same β
    # (β = 0: no KL; β > 0: both add the same token-mean k3 per sequence).
    new, _, ref, adv = random_batch(8)
    adv = torch.tensor(adv, dtype=F64)
    _, g, mask, stats = loss_and_grad(new, new, adv, ref=ref if beta else None, beta=beta)
    assert frac(stats, "clip_frac") == 0 and frac(stats, "ratio") == pytest.approx(1.0, abs=1e-15)
    n_t, _ = padded(new, fill=-7.0)
    n_t.requires_grad_(True)
    r_t = padded(ref, fill=-5.0)[0] if beta else None
    loss, _ = grpo.policy_loss(n_t, n_t.detach(), r_t, adv, mask, clip_eps=0.2, beta=beta)
    loss.backward()
    assert g.abs().max() > 0
    assert torch.allclose(g, -n_t.grad, atol=1e-15, rtol=0)

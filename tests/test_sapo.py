"""SAPO (sapo.py): the spec's gate/weight table and shared-toy vectors (ALGORITHMS.md §4), an independent
loop-based computation, τ chosen by the advantage's sign, the logged gradient shares of the tokens outside
GRPO's clip band, the optional k3 KL term, the on-policy equivalence with GRPO, the config's range check,
and smoke runs (1 process and 2-process gloo)."""
import math

import pytest
import torch

import grpo
import sapo
from helpers import F64, NEW, REF, padded, toy, value_and_dj

TAU_POS, TAU_NEG = 1.0, 1.05


def toy_loss(beta=0.0, adv=None, tau=(TAU_POS, TAU_NEG)):
    """SAPO loss on the conftest toy (junk in the padding), dJ/dlogπ, mask, stats and advantages."""
    new, old, ref, mask, rewards = toy()
    adv = sapo.group_advantages(rewards, 4) if adv is None else adv
    loss, stats = sapo.policy_loss(new, old, ref, adv, mask, *tau, beta)
    return (*value_and_dj(loss, new), mask, stats, adv)


def mean(stats, key):
    s, n = stats[key]
    return float(s) / float(n)


def test_gate_and_weight_table():
    # ALGORITHMS.md §4 (i), gate/weight table
    rho = torch.tensor([0.5, 0.8, 1.0, 1.2, 1.5, 2.0, 3.0], dtype=F64)
    table = {
        1.0: ([0.940015, 0.990066, 1.000000, 0.990066, 0.940015, 0.786448, 0.419974],
              [1.510163, 1.800664, 2.000000, 2.199336, 2.489837, 2.924234, 3.523188]),
        1.05: ([0.934140, 0.989056, 1.000000, 0.989056, 0.934140, 0.768110, 0.388779],
               [1.415938, 1.705494, 1.904762, 2.104030, 2.393585, 2.822000, 3.393917]),
    }
    for tau, (w, f) in table.items():
        t = torch.tensor(tau, dtype=F64)
        torch.testing.assert_close(sapo.gate_weight(rho, t), torch.tensor(w, dtype=F64), atol=1e-6, rtol=0)
        torch.testing.assert_close(sapo.soft_gate(rho, t), torch.tensor(f, dtype=F64), atol=1e-6, rtol=0)
    # τ_neg > τ_pos: the negative gate closes faster on both sides of ρ = 1
    off = rho[rho != 1.0]
    assert (sapo.gate_weight(off, torch.tensor(TAU_NEG, dtype=F64))
            < sapo.gate_weight(off, torch.tensor(TAU_POS, dtype=F64))).all()


@pytest.mark.parametrize("tau", [TAU_POS, TAU_NEG, 0.3, 4.0])
def test_weight_is_exactly_one_on_policy(tau):
    t = torch.tensor(tau, dtype=F64)
    assert sapo.gate_weight(torch.tensor(1.0, dtype=F64), t).item() == 1.0
    # and autograd agrees: d f(e^x) / dx at x = 0 is w·ρ = 1, whatever τ (the point of the 4/τ factor)
    x = torch.zeros((), requires_grad=True, dtype=F64)
    sapo.soft_gate(torch.exp(x), t).backward()
    assert abs(x.grad.item() - 1.0) < 1e-14
    # the weight is the derivative of the gate: dJ/dlogπ = w·ρ·Â at any ρ
    x = torch.tensor([-1.0, -0.3, 0.2, 0.9], requires_grad=True, dtype=F64)
    sapo.soft_gate(torch.exp(x), t).sum().backward()
    torch.testing.assert_close(x.grad, sapo.gate_weight(torch.exp(x.detach()), t) * torch.exp(x.detach()))


def test_gate_temperature_by_advantage_sign():
    # τ_it = τ_pos where Â_i > 0, τ_neg otherwise (eq. 6), seen through policy_loss's gradient and stats.
    # Â = 0 takes τ_neg, but its term is multiplied by Â = 0, so no output shows the choice: its row must be 0.
    tau_pos, tau_neg = 0.5, 3.0  # far apart, so a swap or a single τ would show
    x = torch.tensor([[0.4, -0.3], [0.4, -0.3], [0.4, -0.3], [0.4, -0.3]], dtype=F64)  # log ρ, the same per row
    old = torch.full_like(x, -1.0)
    logp = (old + x).requires_grad_(True)
    mask = torch.ones_like(x)
    adv = torch.tensor([1.0, -0.5, 0.0, 2.0], dtype=F64)
    loss, stats = sapo.policy_loss(logp, old, None, adv, mask, tau_pos, tau_neg, 0.0)
    _, dj = value_and_dj(loss, logp)
    rho = x.exp()
    for i, tau in enumerate([tau_pos, tau_neg, tau_neg, tau_pos]):
        want = sapo.gate_weight(rho[i], torch.tensor(tau, dtype=F64)) * rho[i] * adv[i] / (2 * 4)
        torch.testing.assert_close(dj[i], want, atol=1e-15, rtol=0)
    assert (dj[2] == 0).all()
    # independently: w = sech²(τ(ρ - 1)/2), and the two τ give clearly different weights here
    w = lambda r, t: 1 / math.cosh(t * (r - 1) / 2) ** 2  # noqa: E731
    r = rho[0].tolist()
    assert dj[0].tolist() == pytest.approx([w(q, tau_pos) * q * 1.0 / 8 for q in r], abs=1e-15)
    assert dj[1].tolist() == pytest.approx([w(q, tau_neg) * q * -0.5 / 8 for q in r], abs=1e-15)
    assert min(abs(w(q, tau_pos) - w(q, tau_neg)) for q in r) > 0.1
    # logged gate weights: Â > 0 rows (0, 3) with τ_pos, the Â < 0 row (1) with τ_neg; the Â = 0 row in neither
    assert stats["gate_weight_pos"][1].item() == 4 and stats["gate_weight_neg"][1].item() == 2
    assert mean(stats, "gate_weight_pos") == pytest.approx(sum(w(q, tau_pos) for q in r) / 2, abs=1e-15)
    assert mean(stats, "gate_weight_neg") == pytest.approx(sum(w(q, tau_neg) for q in r) / 2, abs=1e-15)


def test_shared_toy_loss_and_gradient():
    # ALGORITHMS.md §4 (i): Â = [1, -1, -1, 1], J = 0.072736 (loss -0.072736), dJ/dlogπ = w·ρ·Â/(|o_i| G)
    loss, dJ, mask, stats, advantages = toy_loss()
    assert advantages.tolist() == [1.0, -1.0, -1.0, 1.0]
    assert abs(loss - (-0.072736)) < 1e-6
    expected, _ = padded([[0.137765, 0.163673], [-0.060606, -0.083333, -0.100421], [-0.301262], [0.101505, 0.163673]])
    torch.testing.assert_close(dJ, expected, atol=1e-6, rtol=0)
    assert (dJ[mask == 0] == 0).all()  # padding (holding junk) gets no gradient
    # GRPO's clip zeroes o1 t2, o2 t1 and o4 t2; SAPO keeps a (slightly damped) gradient on all three
    assert all(abs(dJ[i, t].item()) > 0.05 for i, t in [(0, 1), (1, 0), (3, 1)])
    # logged gate weights: the table's w averaged over Â > 0 tokens (o1, o4) and Â < 0 tokens (o2, o3)
    w_pos = [0.997240, 0.970013, 0.991830, 0.970013]
    w_neg = [0.981711, 1.000000, 0.986610, 0.986610]
    s, n = stats["gate_weight_pos"]
    assert n.item() == 4 and abs(s.item() / n.item() - sum(w_pos) / 4) < 2e-6
    s, n = stats["gate_weight_neg"]
    assert n.item() == 4 and abs(s.item() / n.item() - sum(w_neg) / 4) < 2e-6
    assert mean(stats, "kl") == 0  # β = 0: no KL term


def test_gradient_share_outside_grpo_clip():
    # grad_share_outside_clip: the share of Σ|dJ/dlogπ| on the tokens where GRPO's (ε = 0.2) gradient is 0;
    # frac_outside_clip: their share of the tokens. Independently: zero entries of grpo.policy_loss's gradient.
    new, old, ref, mask, rewards = toy()
    grpo.policy_loss(new, old, ref, grpo.group_advantages(rewards, 4), mask, 0.2, 0.0)[0].backward()
    zeroed = (new.grad == 0) & (mask > 0)
    assert zeroed.nonzero().tolist() == [[0, 1], [1, 0], [3, 1]]  # o1 t2, o2 t1, o4 t2 (ALGORITHMS.md §4 (i))
    _, dJ, _, stats, _ = toy_loss()
    share = (dJ.abs()[zeroed].sum() / dJ.abs()[mask > 0].sum()).item()
    assert mean(stats, "grad_share_outside_clip") == pytest.approx(share, abs=1e-12)
    # by hand from the spec's dJ/dlogπ (1/|o_i| included): 0.387952 / 1.112238
    spec = [0.137765, 0.163673, 0.060606, 0.083333, 0.100421, 0.301262, 0.101505, 0.163673]
    assert mean(stats, "grad_share_outside_clip") == pytest.approx((spec[1] + spec[2] + spec[7]) / sum(spec), abs=2e-6)
    assert mean(stats, "frac_outside_clip") == 3 / 8
    # on-policy (ρ ≡ 1) no token is outside the band. At ρ ≡ e^0.5 every Â > 0 token is (o1, o4: 4 of 8), and
    # each completion's |dJ/dlogπ| sums to w·ρ·|Â|/G whatever its length, so the share is w_pos / (w_pos + w_neg)
    w = lambda r, t: 1 / math.cosh(t * (r - 1) / 2) ** 2  # noqa: E731
    r = math.exp(0.5)
    for shift, share, frac in [(0.0, 0.0, 0.0), (0.5, w(r, TAU_POS) / (w(r, TAU_POS) + w(r, TAU_NEG)), 0.5)]:
        _, old, ref, mask, rewards = toy()
        _, st = sapo.policy_loss(old + shift, old, ref, sapo.group_advantages(rewards, 4), mask, TAU_POS, TAU_NEG, 0.0)
        assert mean(st, "grad_share_outside_clip") == pytest.approx(share, abs=1e-12)
        assert mean(st, "frac_outside_clip") == frac


def test_logit_gradient_share_outside_grpo_clip():
    # logit_grad_share_outside_clip: the same share for the gradient on each token's logits, whose L1 norm is
    # 2 (1 - π) |dJ/dlogπ|. Toy, by hand from the spec's dJ/dlogπ and π = exp(new):
    _, dJ, _, stats, _ = toy_loss()
    spec = [0.137765, 0.163673, 0.060606, 0.083333, 0.100421, 0.301262, 0.101505, 0.163673]
    z = [d * (1 - math.exp(n)) for d, n in zip(spec, [x for row in NEW for x in row])]
    assert mean(stats, "logit_grad_share_outside_clip") == pytest.approx((z[1] + z[2] + z[7]) / sum(z), abs=2e-6)
    # and through autograd on real logits: per-token L1 norms of dJ/dlogits, outside the band over all
    g = torch.Generator().manual_seed(5)
    B, T, V = 8, 6, 5
    logits = (torch.randn(B, T, V, generator=g, dtype=F64) * 2).requires_grad_(True)
    y = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.arange(T)[None, :] < torch.randint(1, T + 1, (B,), generator=g)[:, None]).double()
    logp = torch.log_softmax(logits, -1).gather(-1, y[..., None])[..., 0]
    old = logp.detach() + torch.randn(B, T, generator=g, dtype=F64) * 0.4
    adv = sapo.group_advantages(torch.randint(0, 2, (B,), generator=g).double(), 4)
    loss, st = sapo.policy_loss(logp, old, None, adv, mask, TAU_POS, TAU_NEG, 0.0)
    loss.backward()
    l1 = logits.grad.abs().sum(-1) * mask
    rho = (logp.detach() - old).exp()
    out = ((adv[:, None] > 0) & (rho > 1.2)) | ((adv[:, None] < 0) & (rho < 0.8))
    assert 0 < out[mask > 0].sum() < (mask > 0).sum()
    assert mean(st, "logit_grad_share_outside_clip") == pytest.approx((l1[out].sum() / l1.sum()).item(), abs=1e-12)


def test_shared_toy_gate_values_and_trl_advantages():
    # ALGORITHMS.md §4 (i): the gate f(ρ) per token, and the loss with TRL's advantages (sample std): -0.062980
    new, old, _, mask, _ = toy()
    ratio = (new.detach() - old).exp()
    tau = torch.tensor([TAU_POS, TAU_NEG, TAU_NEG, TAU_POS], dtype=F64)[:, None]
    f, _ = padded([[2.105074, 2.346333], [1.647168, 1.904762, 2.125173], [2.125173], [1.819225, 2.346333]])
    torch.testing.assert_close(sapo.soft_gate(ratio, tau) * mask, f, atol=1e-6, rtol=0)
    trl_adv = torch.tensor([0.865875, -0.865875, -0.865875, 0.865875], dtype=F64)
    assert toy_loss(adv=trl_adv)[0] == pytest.approx(-0.062980, abs=1e-6)


def test_kl_term_is_the_token_mean_k3_per_sequence():
    # β > 0 adds grpo.py's k3 KL per token, in the same per-sequence token mean: loss(β) = loss(0) + β · KL̄
    beta = 0.04
    loss0, g0, _, st0, _ = toy_loss(beta=0.0)
    loss1, g1, _, st1, _ = toy_loss(beta=beta)
    kl = [[math.exp(r - n) - (r - n) - 1 for n, r in zip(n_i, r_i)] for n_i, r_i in zip(NEW, REF)]
    # the spec's per-token k3 of the shared toy (ALGORITHMS.md §1 (i))
    assert [x for row in kl for x in row] == pytest.approx(
        [0.018731, 0.018731, 0.148721, 0.004837, 0.040818, 0.040818, 0.005171, 0.106531], abs=1e-6)
    seq_mean_kl = sum(sum(row) / len(row) for row in kl) / len(kl)
    assert loss1 == pytest.approx(loss0 + beta * seq_mean_kl, abs=1e-12)
    assert mean(st1, "kl") == pytest.approx(sum(x for row in kl for x in row) / 8, abs=1e-12)  # token mean
    for key in ("gate_weight_pos", "gate_weight_neg", "ratio"):
        assert mean(st1, key) == mean(st0, key)
    for i, (n_i, r_i) in enumerate(zip(NEW, REF)):  # d(-β k3)/dlogπ = -β (1 - π_ref/π_θ), over |o_i| G
        want = [-beta * (1 - math.exp(r - n)) / (len(n_i) * 4) for n, r in zip(n_i, r_i)]
        assert (g1 - g0)[i, :len(n_i)].tolist() == pytest.approx(want, abs=1e-12)
        assert g1[i, len(n_i):].abs().sum() == 0


def reference_loss_and_grad(logp, old, advantages, lengths, tau_pos, tau_neg):
    """Plain-python SAPO: J = 1/G Σ_i 1/|o_i| Σ_t f(ρ)Â and its analytic gradient w·ρ·Â/(|o_i| G)."""
    G = len(lengths)
    J, grad = 0.0, [[0.0] * len(row) for row in logp]
    for i in range(G):
        a = advantages[i]
        tau = tau_pos if a > 0 else tau_neg
        for t in range(lengths[i]):
            rho = math.exp(logp[i][t] - old[i][t])
            p = 1.0 / (1.0 + math.exp(-tau * (rho - 1.0)))
            J += p * 4.0 / tau * a / lengths[i] / G
            grad[i][t] = 4.0 * p * (1.0 - p) * rho * a / lengths[i] / G
    return -J, grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_independent_computation(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 12, 7
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3
    logp = (old + torch.randn(B, T, generator=g, dtype=F64) * 0.8).requires_grad_(True)  # ρ from ~0.1 to ~10
    advantages = torch.randn(B, generator=g, dtype=F64)
    advantages[::4] = 0.0  # zero-advantage completions contribute nothing
    tau_pos, tau_neg = 0.7, 1.6  # far apart, so mixing them up would show
    loss, _ = sapo.policy_loss(logp, old, None, advantages, mask, tau_pos, tau_neg, 0.0)
    loss.backward()
    ref_loss, ref_grad = reference_loss_and_grad(logp.detach().tolist(), old.tolist(), advantages.tolist(),
                                                 lengths.tolist(), tau_pos, tau_neg)
    assert abs(loss.item() - ref_loss) < 1e-12
    torch.testing.assert_close(-logp.grad, torch.tensor(ref_grad, dtype=F64), atol=1e-12, rtol=0)


def test_on_policy_gradient_equals_grpo():
    # ρ ≡ 1 (first mini-batch of a rollout): SAPO's gradient is GRPO's (β = 0) exactly, the values are not
    g = torch.Generator().manual_seed(3)
    B, T = 8, 5
    mask = torch.arange(T)[None, :] < torch.randint(1, T + 1, (B,), generator=g)[:, None]
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3
    advantages = sapo.group_advantages(torch.randint(0, 2, (B,), generator=g).double(), 4)
    grads = []
    for loss_fn in [lambda lp: sapo.policy_loss(lp, old, None, advantages, mask, TAU_POS, TAU_NEG, 0.0)[0],
                    lambda lp: grpo.policy_loss(lp, old, None, advantages, mask, 0.2, 0.0)[0]]:
        logp = old.clone().requires_grad_(True)
        loss_fn(logp).backward()
        grads.append(logp.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-15, rtol=0)
    # off-policy (ρ = e^0.5 ≈ 1.65, past GRPO's clip) SAPO keeps the ρ-weighted gradient, damped by w < 1
    logp = (old + 0.5).requires_grad_(True)
    sapo.policy_loss(logp, old, None, advantages, mask, TAU_POS, TAU_NEG, 0.0)[0].backward()
    ratio = torch.full_like(old, math.exp(0.5))
    tau = torch.where(advantages[:, None] > 0, torch.tensor(TAU_POS, dtype=F64), torch.tensor(TAU_NEG, dtype=F64))
    w = sapo.gate_weight(ratio, tau)
    assert ((w > 0.85) & (w < 0.95)).all()  # sech²(τ(ρ-1)/2): 0.902 (τ_pos), 0.892 (τ_neg)
    torch.testing.assert_close(logp.grad, grads[1] * ratio * w, atol=1e-15, rtol=0)

"""PPO's pieces against the spec's hand-checked GAE vector (ALGORITHMS.md section 10), independent
per-token loops, the critic, and end-to-end runs of ppo.py on the tiny default (smoke, exact resume with
the critic, 2-process gloo, and the DDP update check)."""
import math
import os
import re

import pytest
import torch

from grpo_family import config, loading
import ppo
from helpers import F64, NEW, OLD, ddp_batch, padded, single_process, toy, value_and_dj

# ALGORITHMS.md §10: one completion of 3 tokens
SPEC_V, SPEC_LOGP, SPEC_REF = [0.5, 0.6, 0.7], [-1.0, -0.5, -0.2], [-1.1, -0.4, -0.3]
ONE = single_process()


def spec_batch():
    """The spec's row between a 1-token and a 5-token row, each padded with junk that must not leak."""
    logp = [[-0.3], SPEC_LOGP, [-0.7, -1.3, -0.2, -2.0, -0.9]]
    ref = [[-0.5], SPEC_REF, [-0.6, -1.0, -0.4, -2.2, -0.8]]
    values = [[0.3], SPEC_V, [0.1, 0.2, 0.25, 0.4, 0.8]]
    lp, mask = padded(logp, fill=-9.0)
    return (lp, padded(ref, fill=4.0)[0], padded(values, fill=7.5)[0], mask,
            torch.tensor([0.0, 1.0, 1.1], dtype=F64), (logp, ref, values))


def loop_gae(r, v, gamma, lam):
    """Â_t = Σ_l (γλ)^l δ_t+l with δ_t = r_t + γ V_t+1 - V_t and V after the last token 0, by explicit sums."""
    n = len(r)
    delta = [r[t] + gamma * (v[t + 1] if t + 1 < n else 0.0) - v[t] for t in range(n)]
    return [sum((gamma * lam) ** l * delta[t + l] for l in range(n - t)) for t in range(n)]


# -----------------------------------------------------------------------------
# per-token rewards and GAE: the spec's vector, inside a padded batch of ragged rows


def test_token_rewards_match_spec_and_put_R_on_the_last_token():
    logp, ref, _, mask, R, (lp_rows, ref_rows, _) = spec_batch()
    r, kl = ppo.token_rewards(R, logp, ref, mask, beta=0.04)
    assert r[1, :3].tolist() == pytest.approx([-0.004, 0.004, 0.996], abs=1e-12)
    for i, (lp, rf) in enumerate(zip(lp_rows, ref_rows)):
        want = [-0.04 * (a - b) for a, b in zip(lp, rf)]
        want[-1] += R[i].item()
        assert r[i, :len(lp)].tolist() == pytest.approx(want, abs=1e-12)
        assert kl[i, :len(lp)].tolist() == pytest.approx([a - b for a, b in zip(lp, rf)], abs=1e-12)
        assert r[i, len(lp):].abs().sum() == 0 and kl[i, len(lp):].abs().sum() == 0  # padding stays 0
    r0, kl0 = ppo.token_rewards(R, logp, None, mask, beta=0.0)  # no KL: only R, on the last token
    assert r0[2].tolist() == [0, 0, 0, 0, pytest.approx(1.1)] and kl0.abs().sum() == 0


@pytest.mark.parametrize("lam, adv, ret", [
    (0.95, [0.461940, 0.385200, 0.296000], [0.961940, 0.985200, 0.996000]),
    (1.0, [0.496, 0.400, 0.296], [0.996, 1.000, 0.996]),
    (0.0, [0.096, 0.104, 0.296], [0.596, 0.704, 0.996]),  # λ = 0: Â = δ, the spec's δ
])
def test_gae_matches_spec_in_a_padded_ragged_batch(lam, adv, ret):
    logp, ref, values, mask, R, (_, _, v_rows) = spec_batch()
    r, _ = ppo.token_rewards(R, logp, ref, mask, beta=0.04)
    A, returns = ppo.gae(r, values, mask, gamma=1.0, lam=lam)
    assert A[1, :3].tolist() == pytest.approx(adv, abs=1e-6)
    assert returns[1, :3].tolist() == pytest.approx(ret, abs=1e-6)
    for i, v in enumerate(v_rows):  # every row against the explicit sums, and 0 beyond its end
        n = len(v)
        want = loop_gae(r[i, :n].tolist(), v, 1.0, lam)
        assert A[i, :n].tolist() == pytest.approx(want, abs=1e-12)
        assert returns[i, :n].tolist() == pytest.approx([a + b for a, b in zip(want, v)], abs=1e-12)
        assert A[i, n:].abs().sum() == 0 and returns[i, n:].abs().sum() == 0
    # the spec's row alone gives the same numbers: no row leaks into another
    alone, _ = ppo.gae(r[1:2, :3], values[1:2, :3], mask[1:2, :3], 1.0, lam)
    assert torch.equal(alone[0], A[1, :3])


def test_gae_with_discount_against_loop():
    logp, ref, values, mask, R, (_, _, v_rows) = spec_batch()
    r, _ = ppo.token_rewards(R, logp, ref, mask, beta=0.04)
    A, _ = ppo.gae(r, values, mask, gamma=0.9, lam=0.8)
    for i, v in enumerate(v_rows):
        assert A[i, :len(v)].tolist() == pytest.approx(loop_gae(r[i, :len(v)].tolist(), v, 0.9, 0.8), abs=1e-12)


def test_whiten_and_explained_variance():
    _, _, values, mask, _, _ = spec_batch()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(mask.shape, generator=g, dtype=F64) * 3 + 2
    w = ppo.whiten(x, mask, ONE)
    real = w[mask.bool()]
    assert real.mean().item() == pytest.approx(0, abs=1e-9)
    assert real.var(unbiased=False).item() == pytest.approx(1, abs=1e-6)  # population std, as group_advantages
    assert w[~mask.bool()].abs().sum() == 0
    ret = values + torch.randn(mask.shape, generator=g, dtype=F64)
    assert ppo.explained_variance(ret, ret, mask, ONE) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.full_like(ret, 0.3), ret, mask, ONE) == pytest.approx(0.0, abs=1e-9)
    m = mask.bool()
    want = 1 - (ret[m] - values[m]).var(unbiased=False) / ret[m].var(unbiased=False)
    assert ppo.explained_variance(values, ret, mask, ONE) == pytest.approx(want.item(), abs=1e-9)


# -----------------------------------------------------------------------------
# the losses, against independent loops


def loop_value_loss(v, v_old, ret, eps):
    """½ max((V - ret)², (clip(V, V_old ± ε) - ret)²): token mean per row, then mean over rows."""
    total = 0.0
    for vi, oi, ri in zip(v, v_old, ret):
        s = 0.0
        for a, o, t in zip(vi, oi, ri):
            c = min(max(a, o - eps), o + eps)
            s += 0.5 * max((a - t) ** 2, (c - t) ** 2)
        total += s / len(vi)
    return total / len(v)


def test_value_loss_hand_case_clips_only_the_pessimistic_side():
    # V_old = 0.5, ret = 1.0, ε_v = 0.2: V = 0.9 jumped past the clip toward ret -> the clipped error 0.09 wins,
    # no gradient; V = 0.2 moved away -> its own error 0.64 wins, gradient V - ret = -0.8 (x 1/2 tokens)
    v = torch.tensor([[0.9, 0.2]], dtype=F64, requires_grad=True)
    loss, stats = ppo.value_loss(v, torch.full((1, 2), 0.5, dtype=F64), torch.ones(1, 2, dtype=F64),
                                 torch.ones(1, 2, dtype=F64), 0.2)
    assert loss.item() == pytest.approx(0.5 * (0.09 + 0.64) / 2, abs=1e-12)
    loss.backward()
    assert v.grad.tolist() == [[0.0, pytest.approx(-0.4, abs=1e-12)]]
    s, n = stats["value_clip_frac"]
    assert (s / n).item() == 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_value_loss_against_loop_and_finite_differences(seed):
    g = torch.Generator().manual_seed(seed)
    lens = [int(x) for x in torch.randint(1, 6, (5,), generator=g)]
    v_old = [(torch.rand(n, generator=g, dtype=F64)).tolist() for n in lens]
    v = [[o + 0.5 * float(torch.randn(1, generator=g)) for o in row] for row in v_old]
    ret = [[o + 0.5 * float(torch.randn(1, generator=g)) for o in row] for row in v_old]
    vt, mask = padded(v, fill=5.0)
    vt.requires_grad_(True)
    loss, stats = ppo.value_loss(vt, padded(v_old, fill=-3.0)[0], padded(ret, fill=2.0)[0], mask, 0.2)
    assert loss.item() == pytest.approx(loop_value_loss(v, v_old, ret, 0.2), abs=1e-12)
    loss.backward()
    h = 1e-6
    for i in range(len(v)):
        for t in range(len(v[i])):
            up = [row[:] for row in v]; up[i][t] += h
            dn = [row[:] for row in v]; dn[i][t] -= h
            fd = (loop_value_loss(up, v_old, ret, 0.2) - loop_value_loss(dn, v_old, ret, 0.2)) / (2 * h)
            assert vt.grad[i, t].item() == pytest.approx(fd, abs=1e-6)
    assert vt.grad[mask == 0].abs().sum() == 0
    clipped = sum(abs(a - o) > 0.2 and (min(max(a, o - 0.2), o + 0.2) - t) ** 2 > (a - t) ** 2
                  for vi, oi, ri in zip(v, v_old, ret) for a, o, t in zip(vi, oi, ri))
    assert stats["value_clip_frac"][0].item() == clipped and stats["value_clip_frac"][1].item() == sum(lens)


ADV = [[0.5, -0.3], [1.0, -1.2, 0.4], [-0.7], [0.2, 1.5]]  # per-token advantages for the toy


def loop_objective(new, old, adv, eps):
    """J of eq. 1 with python floats: per-sequence token mean of the clipped surrogate, then mean over rows."""
    J = 0.0
    for n_i, o_i, a_i in zip(new, old, adv):
        J += sum(min(math.exp(n - o) * a, min(max(math.exp(n - o), 1 - eps), 1 + eps) * a)
                 for n, o, a in zip(n_i, o_i, a_i)) / len(n_i)
    return J / len(new)


def test_policy_loss_on_the_toy_against_loop_and_finite_differences():
    new, old, _, mask, _ = toy()
    A, _ = padded(ADV, fill=11.0)
    loss, stats = ppo.policy_loss(new, old, A, mask, 0.2)
    value, g = value_and_dj(loss, new)
    assert value == pytest.approx(-loop_objective(NEW, OLD, ADV, 0.2), abs=1e-12)
    h = 1e-6
    for i in range(4):
        for t in range(len(NEW[i])):
            up = [row[:] for row in NEW]; up[i][t] += h
            dn = [row[:] for row in NEW]; dn[i][t] -= h
            fd = (loop_objective(up, OLD, ADV, 0.2) - loop_objective(dn, OLD, ADV, 0.2)) / (2 * h)
            assert g[i, t].item() == pytest.approx(fd, abs=1e-6)
        assert g[i, len(NEW[i]):].abs().sum() == 0
    # token-mean over the batch (TRL's aggregation) would give another value: the seq-mean is what is tested
    token_mean = -sum(loop_objective([n], [o], [a], 0.2) * len(n) for n, o, a in zip(NEW, OLD, ADV)) / 8
    assert abs(value - token_mean) > 1e-3


def test_policy_loss_with_grpo_advantages_on_every_token_is_the_grpo_spec():
    # Â_it = Â_i = [1, -1, -1, 1] and no KL: eq. 1 is then GRPO's eq. 3 at β = 0 (ALGORITHMS.md §1(i))
    new, old, _, mask, _ = toy()
    A = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=F64)[:, None].expand_as(mask)
    loss, stats = ppo.policy_loss(new, old, A, mask, 0.2)
    value, g = value_and_dj(loss, new)
    assert value == pytest.approx(0.016647, abs=1e-6)
    want = [[0.138146, 0], [0, -0.083333, -0.101784], [-0.305351], [0.102341, 0]]
    for i, row in enumerate(want):
        assert g[i, :len(row)].tolist() == pytest.approx(row, abs=1e-6)
    s, n = stats["clip_frac"]
    assert (s / n).item() == pytest.approx(3 / 8) and "kl" not in stats  # the KL is in the reward now


# -----------------------------------------------------------------------------
# the critic


def test_critic_starts_at_zero_and_ignores_padding(tiny_dir):
    tok = loading.tokenizer(tiny_dir)
    critic = ppo.Critic(loading.model(tiny_dir, torch.device("cpu")))
    lm = loading.model(tiny_dir, torch.device("cpu"))
    assert not set(map(id, critic.parameters())) & set(map(id, lm.parameters()))  # its own network
    assert sum(p.numel() for p in critic.parameters()) == sum(p.numel() for p in lm.base_model.parameters()) + 97
    ids, mask, cids, cmask = ddp_batch(tok, 4)
    with torch.no_grad():
        assert critic(ids, mask, cids, cmask).abs().sum() == 0  # zero head: V = 0 before any update
        torch.nn.init.normal_(critic.head.weight, std=0.5)
        v = critic(ids, mask, cids, cmask)                         # (B, T), prompts left-padded
        assert v.shape == cids.shape
        for i in range(4):  # each row alone, without the batch's padding, gives the same values
            p = mask[i].bool()
            n = int(cmask[i].sum())
            alone = critic(ids[i:i + 1, p], mask[i:i + 1, p], cids[i:i + 1, :n], cmask[i:i + 1, :n])
            assert torch.allclose(alone[0], v[i, :n], atol=1e-5)
        # V_t is the value of the state before o_t: changing o_3 leaves V_0..V_3 alone and changes V_4
        other = cids.clone()
        other[:, 3] = (cids[:, 3] + 1) % len(tok)
        v2 = critic(ids, mask, other, cmask)
        assert torch.equal(v2[:, :4], v[:, :4]) and (v2[:, 4] - v[:, 4]).abs().min() > 1e-6


def test_config_ranges_are_enforced():
    for flag, shown in [("--lam=1.5", "[0, 1]"), ("--gamma=-0.1", "[0, 1]"), ("--clip_eps_value=0", "(0, inf)"),
                        ("--vf_coef=0", "(0, inf)"), ("--critic_lr=0", "(0, inf)")]:
        with pytest.raises(config.UserError, match=re.escape(shown)):
            config.parse(ppo.Config, ["--tiny", flag], tiny=ppo.TINY)
    cfg = config.parse(ppo.Config, ["--tiny"], tiny=ppo.TINY)
    assert cfg.run_dir == os.path.join("runs", "ppo-tiny") and (cfg.gamma, cfg.lam) == (1.0, 0.95)


# -----------------------------------------------------------------------------
# end to end on the tiny default

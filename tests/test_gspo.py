"""GSPO's pieces against the spec's hand-checked vectors (ALGORITHMS.md section 3), an independent
per-sequence computation, GSPO-token's equivalence, length invariance, and short runs."""
import json
import math
import os

import pytest
import torch

import grpo
import gspo
from conftest import run, torchrun

# The spec's shared toy batch (section 0.3): G = 4, rewards [1, 0, 0, 1] -> Â = [1, -1, -1, 1].
OLD = [[-1.0, -0.5], [-1.2, -0.8, -2.0], [-0.3], [-2.0, -1.0]]
NEW = [[-0.9, -0.2], [-1.5, -0.8, -1.8], [-0.1], [-2.2, -0.7]]
REWARDS = [1.0, 0.0, 0.0, 1.0]
# The small-deviation toy (section 3 (i) 2): per-token log-ratios new - old.
SMALL = [[1e-4, 5e-4], [-6e-4, -4e-4, -2e-4], [5e-4], [6e-4, 4e-4]]
EPS_LOW, EPS_HIGH = 3e-4, 4e-4


def padded(rows, fill=0.0):
    """Right-pad ragged rows into a (B, T) float64 tensor and its mask."""
    T = max(len(r) for r in rows)
    t = torch.full((len(rows), T), fill, dtype=torch.float64)
    m = torch.zeros(len(rows), T, dtype=torch.float64)
    for i, r in enumerate(rows):
        t[i, :len(r)] = torch.tensor(r, dtype=torch.float64)
        m[i, :len(r)] = 1
    return t, m


def loss_and_grad(new, old, adv, gspo_token=False, eps=(EPS_LOW, EPS_HIGH)):
    """GSPO loss, dJ/dlogπ per token (the negated gradient of the loss), mask and stats."""
    n_t, mask = padded(new, fill=-7.0)  # pad values must not leak into the loss
    o_t, _ = padded(old, fill=3.0)
    n_t.requires_grad_(True)
    loss, stats = gspo.policy_loss(n_t, o_t, adv, mask, *eps, gspo_token=gspo_token)
    loss.backward()
    return loss.item(), -n_t.grad, mask, stats


def frac(stats, key):
    s, n = stats[key]
    return float(s) / float(n)


def toy_advantages():
    return gspo.group_advantages(torch.tensor(REWARDS, dtype=torch.float64), 4)


@pytest.mark.parametrize("gspo_token", [False, True])
def test_shared_toy_matches_spec(gspo_token):
    adv = toy_advantages()
    assert adv.tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0])
    n_t, mask = padded(NEW)
    s = gspo.sequence_log_ratio(n_t, padded(OLD)[0], mask).exp()
    assert s.tolist() == pytest.approx([1.221403, 0.967216, 1.221403, 1.051271], abs=1e-6)
    loss, g, mask, stats = loss_and_grad(NEW, OLD, adv, gspo_token)
    assert loss == pytest.approx(0.055076, abs=1e-6)  # J = -0.055076
    want = [[0, 0], [0, 0, 0], [-0.305351], [0, 0]]  # o1, o2, o4 clipped; o3 kept by pessimism
    for i, row in enumerate(want):
        assert g[i, :len(row)].tolist() == pytest.approx(row, abs=1e-6)
        assert g[i, len(row):].abs().sum() == 0  # padding gets no gradient
    assert frac(stats, "clip_frac_seq") == pytest.approx(3 / 4)
    assert frac(stats, "clip_frac") == pytest.approx(7 / 8)  # every token of o1, o2, o4
    assert frac(stats, "ratio") == pytest.approx((1.221403 + 0.967216 + 1.221403 + 1.051271) / 4, abs=1e-6)


@pytest.mark.parametrize("gspo_token", [False, True])
def test_small_deviation_toy_matches_spec(gspo_token):
    old = [[-1.0 - 0.1 * t for t in range(len(r))] for r in SMALL]
    new = [[o + d for o, d in zip(orow, drow)] for orow, drow in zip(old, SMALL)]
    n_t, mask = padded(new)
    s = gspo.sequence_log_ratio(n_t, padded(old)[0], mask).exp()
    assert s.tolist() == pytest.approx([1.00030005, 0.99960008, 1.00050013, 1.00050013], abs=1e-8)
    loss, g, _, stats = loss_and_grad(new, old, toy_advantages(), gspo_token)
    assert loss == pytest.approx(-0.000124980, abs=1e-9)
    want = [[0.125038, 0.125038], [0, 0, 0], [-0.250125], [0, 0]]  # A s / (|y| G) where unclipped
    for i, row in enumerate(want):
        assert g[i, :len(row)].tolist() == pytest.approx(row, abs=1e-6)
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
    loss, _, _, _ = loss_and_grad([list(d) for d in SMALL], [[0.0] * len(d) for d in SMALL], torch.tensor(A, dtype=torch.float64))
    assert -loss == pytest.approx(sum(terms) / 4, abs=1e-12)
    assert abs(-loss - length_weighted) > 1e-4


def independent_objective(new, old, adv, eps_low, eps_high):
    """J_GSPO with python floats and loops, straight from eqs. (5) and (7); adv[i] may be a list (per token)."""
    J = 0.0
    for n_i, o_i, a_i in zip(new, old, adv):
        log_s = 0.0
        for n, o in zip(n_i, o_i):
            log_s += n - o
        s = math.exp(log_s / len(n_i))
        clipped_s = max(min(s, 1 + eps_high), 1 - eps_low)
        a_t = a_i if isinstance(a_i, list) else [a_i] * len(n_i)
        J += sum(min(s * a, clipped_s * a) for a in a_t) / len(n_i)
    return J / len(new)


def independent_gradient(new, old, adv, eps_low, eps_high):
    """dJ/dlogπ_it = [unclipped] s_i Â_it / (|y_i| G), with loops (the paper's eqs. 11 and 18)."""
    G, grads = len(new), []
    for n_i, o_i, a_i in zip(new, old, adv):
        s = math.exp(sum(n - o for n, o in zip(n_i, o_i)) / len(n_i))
        a_t = a_i if isinstance(a_i, list) else [a_i] * len(n_i)
        row = []
        for a in a_t:
            kept = (a > 0 and s < 1 + eps_high) or (a < 0 and s > 1 - eps_low)
            row.append(s * a / (len(n_i) * G) if kept else 0.0)
        grads.append(row)
    return grads


def random_batch(seed, per_token_adv=False, B=8):
    """Ragged log-probs whose sequence ratios sit on both sides of both clip bounds, never within 1e-6."""
    g = torch.Generator().manual_seed(seed)
    new, old, adv = [], [], []
    while len(new) < B:
        n = int(torch.randint(1, 7, (1,), generator=g))
        o = (torch.randn(n, generator=g, dtype=torch.float64) * 0.5 - 1).tolist()
        mean_d = (float(torch.rand(1, generator=g, dtype=torch.float64)) * 2 - 1) * 1e-3  # log s_i in ±1e-3
        noise = torch.randn(n, generator=g, dtype=torch.float64) * 5e-4
        d = (noise - noise.mean() + mean_d).tolist()  # per-token log-ratios with that mean
        if min(abs(mean_d - math.log1p(EPS_HIGH)), abs(mean_d - math.log1p(-EPS_LOW))) < 1e-6:
            continue  # too close to a clip bound for finite differences
        old.append(o)
        new.append([x + y for x, y in zip(o, d)])
        a = torch.randn(n if per_token_adv else 1, generator=g, dtype=torch.float64).tolist()
        adv.append(a if per_token_adv else a[0])
    return new, old, adv


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("gspo_token", [False, True])
def test_against_independent_computation(seed, gspo_token):
    new, old, adv = random_batch(seed)
    loss, g, _, stats = loss_and_grad(new, old, torch.tensor(adv, dtype=torch.float64), gspo_token)
    assert 0 < frac(stats, "clip_frac_seq") < 1, "the batch should mix clipped and unclipped sequences"
    assert loss == pytest.approx(-independent_objective(new, old, adv, EPS_LOW, EPS_HIGH), abs=1e-14)
    want = independent_gradient(new, old, adv, EPS_LOW, EPS_HIGH)
    h = 1e-7  # and central finite differences of the independent J
    for i in range(len(new)):
        assert g[i, :len(new[i])].tolist() == pytest.approx(want[i], abs=1e-12)
        for t in range(len(new[i])):
            up = [row[:] for row in new]; up[i][t] += h
            dn = [row[:] for row in new]; dn[i][t] -= h
            fd = (independent_objective(up, old, adv, EPS_LOW, EPS_HIGH)
                  - independent_objective(dn, old, adv, EPS_LOW, EPS_HIGH)) / (2 * h)
            assert g[i, t].item() == pytest.approx(fd, abs=1e-7)


@pytest.mark.parametrize("seed", [3, 4])
def test_gspo_token_with_per_token_advantages(seed):
    new, old, adv = random_batch(seed, per_token_adv=True)
    A, _ = padded(adv)
    loss, g, _, _ = loss_and_grad(new, old, A, gspo_token=True)
    assert loss == pytest.approx(-independent_objective(new, old, adv, EPS_LOW, EPS_HIGH), abs=1e-14)
    want = independent_gradient(new, old, adv, EPS_LOW, EPS_HIGH)
    for i in range(len(new)):
        assert g[i, :len(new[i])].tolist() == pytest.approx(want[i], abs=1e-12)
    with pytest.raises(ValueError, match="one advantage per sequence"):
        loss_and_grad(new, old, A, gspo_token=False)


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_gspo_token_equals_gspo_for_sequence_advantages(seed):
    new, old, adv = random_batch(seed)
    adv = torch.tensor(adv, dtype=torch.float64)
    loss_seq, g_seq, mask, st_seq = loss_and_grad(new, old, adv, gspo_token=False)
    loss_tok, g_tok, _, st_tok = loss_and_grad(new, old, adv, gspo_token=True)
    # the same advantages written per token, (B, T), constant along each sequence
    loss_tok2, g_tok2, _, _ = loss_and_grad(new, old, adv[:, None].expand_as(mask).clone(), gspo_token=True)
    assert g_seq.abs().max() > 0
    for loss, g in [(loss_tok, g_tok), (loss_tok2, g_tok2)]:
        assert loss == pytest.approx(loss_seq, abs=1e-15)
        assert torch.allclose(g, g_seq, atol=1e-15, rtol=0)
    for key in st_seq:
        assert frac(st_tok, key) == pytest.approx(frac(st_seq, key))


def test_doubling_length_with_same_log_ratio_keeps_s():
    old = [[-1.0, -2.0, -0.5], [-1.0, -2.0, -0.5, -1.0, -2.0, -0.5]]
    d = [2e-4, -1e-4, 5e-4]
    new = [[o + x for o, x in zip(old[0], d)], [o + x for o, x in zip(old[1], d + d)]]
    n_t, mask = padded(new)
    log_s = gspo.sequence_log_ratio(n_t, padded(old)[0], mask)
    assert log_s[0].item() == pytest.approx(sum(d) / 3, abs=1e-15)
    assert log_s[1].item() == pytest.approx(log_s[0].item(), abs=1e-15)
    # the same sequence term, so the same loss contribution, whatever the length (A = 1, unclipped here)
    loss, g, _, _ = loss_and_grad(new, old, torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert g[0, :3].sum().item() == pytest.approx(g[1, :6].sum().item(), abs=1e-15)
    assert g[0, 0].item() == pytest.approx(2 * g[1, 0].item(), abs=1e-15)  # weight spread over twice the tokens


def test_on_policy_gradient_equals_grpo_without_kl():
    # With logp == old_logp (the first mini-batch), s_i = 1 and GSPO's gradient is GRPO's at β = 0.
    new, _, adv = random_batch(8)
    adv = torch.tensor(adv, dtype=torch.float64)
    _, g, mask, stats = loss_and_grad(new, new, adv)
    assert frac(stats, "clip_frac") == 0 and frac(stats, "ratio") == pytest.approx(1.0, abs=1e-15)
    n_t, _ = padded(new)
    n_t.requires_grad_(True)
    loss, _ = grpo.policy_loss(n_t, n_t.detach(), None, adv, mask, clip_eps=0.2, beta=0.0)
    loss.backward()
    assert torch.allclose(g, -n_t.grad, atol=1e-15, rtol=0)


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def check_run(p, run_dir, steps):
    out = p.stdout + p.stderr
    assert "held-out greedy accuracy before RL" in out and "held-out greedy accuracy after RL" in out
    rows = metrics(run_dir)
    train = [r for r in rows if "clip_frac" in r]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    for r in train:
        assert 0 <= r["clip_frac"] <= 1 and 0 <= r["clip_frac_seq"] <= 1
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["ratio"] > 0
        assert "kl" not in r  # no KL term, no reference model
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["clip_eps_low"] == EPS_LOW and cfg["clip_eps_high"] == EPS_HIGH and "beta" not in cfg


def test_smoke_tiny(tmp_path):
    run_dir = str(tmp_path / "run")
    p = run(["nice", "-n", "5", "python", "gspo.py", "--tiny", "--num_steps=2", "--eval_problems=8",
             f"--run_dir={run_dir}"])
    check_run(p, run_dir, 2)


def test_torchrun_two_ranks_gloo(tmp_path):
    run_dir = str(tmp_path / "run")
    p = run(["nice", "-n", "5", *torchrun(2, "gspo.py", "--tiny", "--num_steps=2", "--eval_problems=8",
                                         "--gspo_token", f"--run_dir={run_dir}")])
    check_run(p, run_dir, 2)

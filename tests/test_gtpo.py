"""GTPO (Simoni et al., arXiv 2508.03772): conflict masks and λ, entropy filter and shaping, the loss.

Numbers come from ALGORITHMS.md §6(i); the independent versions below are written with python loops
over groups, positions and tokens (sets of token ids per position, like the official build_conflict_mask).
"""
import json
import math
import os
import random
import sys

import pytest
import torch

from conftest import run, torchrun
import grpo
import gtpo

LN2 = math.log(2)
PAD = 0

# ALGORITHMS.md §6(i): G = 4, R = [1, 0, 0, 1], right-padded with PAD
SPEC_IDS = torch.tensor([[5, 7, 9, 2, PAD], [5, 7, 3, 2, PAD], [5, 8, 2, PAD, PAD], [6, 7, 9, 4, 2]])
SPEC_MASK = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
SPEC_H = torch.tensor([0.3, 0.5, 0.9, 0.6], dtype=torch.float64)


def rows(t, mask):
    """A (B, T) tensor as lists cut at each row's length."""
    return [t[i, :int(mask[i].sum())].tolist() for i in range(t.shape[0])]


def spec_advantages():
    return gtpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64), 4, scale=False)


# -----------------------------------------------------------------------------
# the spec vector


def test_spec_advantages():
    assert spec_advantages().tolist() == [0.5, -0.5, -0.5, 0.5]  # official code: A = R - mean
    assert gtpo.group_advantages(torch.tensor([1.0, 0, 0, 1]), 4).tolist() == [1, -1, -1, 1]  # paper: /std
    # all-equal groups give exactly 0 either way (no spurious sign from float rounding of the mean)
    eq = torch.full((8,), 0.1)
    assert gtpo.group_advantages(eq, 8, scale=False).tolist() == [0.0] * 8


def test_spec_conflict_masks_and_lambda():
    lam, fwd, bwd = gtpo.conflict_weights(SPEC_IDS, SPEC_MASK, spec_advantages(), 4, 2.0)
    assert rows(fwd.int(), SPEC_MASK) == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0], [0, 0, 0, 0, 0]]
    assert rows(bwd.int(), SPEC_MASK) == [[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 1], [0, 0, 0, 0, 1]]
    assert rows(lam, SPEC_MASK) == [[2, 2, 1, 2], [0, 0, 1, 0], [0, 1, 0], [1, 1, 1, 1, 2]]
    n_conflict = ((fwd | bwd) & SPEC_MASK.bool()).sum(1)
    assert n_conflict.tolist() == [3, 3, 2, 1]


def test_spec_entropy_filter_and_shaping():
    A = spec_advantages()
    # paper rule: the initial model is below ln 2, so completions above ln 2 are filtered
    th = gtpo.entropy_threshold("paper", LN2, h_ini=0.5)
    assert th == LN2
    shaped, kept = gtpo.shaped_advantages(A, SPEC_H, th, 0.1)
    assert kept.tolist() == [True, True, False, True]
    torch.testing.assert_close(shaped, torch.tensor([0.47, -0.55, 0.0, 0.44], dtype=torch.float64))
    # official code: threshold 0.7 always applied, same δ here
    assert gtpo.shaped_advantages(A, SPEC_H, gtpo.entropy_threshold("always", 0.7), 0.1)[1].tolist() == kept.tolist()
    # paper rule with an initial model above ln 2: nothing is filtered, only shaped
    th_hi = gtpo.entropy_threshold("paper", LN2, h_ini=0.8)
    assert th_hi == math.inf
    shaped_hi, kept_hi = gtpo.shaped_advantages(A, SPEC_H, th_hi, 0.1)
    assert kept_hi.all()
    torch.testing.assert_close(shaped_hi, torch.tensor([0.47, -0.55, -0.59, 0.44], dtype=torch.float64))
    assert not gtpo.shaped_advantages(A, SPEC_H, gtpo.entropy_threshold("off", LN2), 0.1)[1].logical_not().any()


def test_percentile_threshold():
    hist = torch.arange(1, 101, dtype=torch.float64)  # 1..100
    assert gtpo.entropy_threshold("percentile", LN2, history=hist, percentile=95.0) == pytest.approx(95.05)
    assert gtpo.entropy_threshold("percentile", LN2, history=hist, percentile=50.0) == pytest.approx(50.5)
    # the 95th percentile of the seen entropies filters the top 5%
    shaped, kept = gtpo.shaped_advantages(torch.ones(100, dtype=torch.float64), hist,
                                          gtpo.entropy_threshold("percentile", LN2, history=hist), 0.0)
    assert (~kept).sum().item() == 5 and (~kept[-5:]).all()
    with pytest.raises(ValueError, match="ent_rule"):
        gtpo.entropy_threshold("relu", LN2)
    with pytest.raises(ValueError, match="⟨H⟩_ini"):
        gtpo.entropy_threshold("paper", LN2, h_ini=None)


def test_spec_loss_value_and_gradient():
    """Paper objective with r ≡ 1: J = 1/4 [0.47·7/4 - 0.55·1/4 + 0 + 0.44·6/5] = 0.303250."""
    A = spec_advantages()
    lam, _, _ = gtpo.conflict_weights(SPEC_IDS, SPEC_MASK, A, 4, 2.0)
    shaped, _ = gtpo.shaped_advantages(A, SPEC_H, LN2, 0.1)
    old = torch.tensor([[-1.0, -0.5, -2.0, -0.3, 0.0]] * 4, dtype=torch.float64)
    logp = old.clone().requires_grad_(True)  # on-policy: ρ ≡ 1
    loss, stats = gtpo.policy_loss(logp, old, None, shaped, SPEC_MASK, 0.2, 0.0, lam)
    assert -loss.item() == pytest.approx(0.303250, abs=1e-6)
    loss.backward()
    dJ = -logp.grad
    # dJ/dlogπ_it = A'_i λ_it / (G |o_i|), hand-derived from the objective
    expected = torch.tensor([[0.05875, 0.05875, 0.029375, 0.05875, 0],
                             [0, 0, -0.034375, 0, 0],
                             [0, 0, 0, 0, 0],
                             [0.022, 0.022, 0.022, 0.022, 0.044]], dtype=torch.float64)
    torch.testing.assert_close(dJ, expected, atol=1e-12, rtol=0)
    assert stats["kl"][0].item() == 0.0


def test_spec_official_code_loss_differs():
    """The official gtpo_compute_loss on the same λ: /n_conflict per completion, summed: -0.756333."""
    A = spec_advantages()
    lam, fwd, bwd = gtpo.conflict_weights(SPEC_IDS, SPEC_MASK, A, 4, 2.0)
    shaped, _ = gtpo.shaped_advantages(A, SPEC_H, 0.7, 0.1)
    n_conflict = ((fwd | bwd) & SPEC_MASK.bool()).sum(1).clamp_min(1).double()
    logp = torch.zeros(4, 5, dtype=torch.float64, requires_grad=True)
    r = torch.exp(logp - logp.detach())
    m = SPEC_MASK.double()
    per_seq = -(r * shaped[:, None] * lam * m).sum(1) / m.sum(1) / n_conflict
    torch.testing.assert_close(per_seq.detach(), torch.tensor([-0.274167, 0.045833, 0.0, -0.528], dtype=torch.float64),
                               atol=1e-6, rtol=0)
    loss = per_seq.sum()
    assert loss.item() == pytest.approx(-0.756333, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(-logp.grad[0, :4], torch.tensor([0.078333, 0.078333, 0.039167, 0.078333], dtype=torch.float64),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(-logp.grad[3], torch.tensor([0.088, 0.088, 0.088, 0.088, 0.176], dtype=torch.float64),
                               atol=1e-12, rtol=0)


# -----------------------------------------------------------------------------
# edge cases


def test_no_conflicts_reduces_to_grpo():
    """Different first and last tokens: λ ≡ 1; with γ = 0 and no filter the loss is GRPO's (β = 0)."""
    ids = torch.tensor([[1, 2, 3, 4], [5, 2, 3, 6], [7, 7, 8, 9], [3, 2, 3, 1]])
    mask = torch.ones_like(ids)
    A = gtpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64), 4)
    lam, fwd, bwd = gtpo.conflict_weights(ids, mask, A, 4, 2.0)
    assert not fwd.any() and not bwd.any() and (lam == 1).all()
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 4, generator=g, dtype=torch.float64) * 2
    new = (old + 0.3 * torch.randn(4, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    shaped, _ = gtpo.shaped_advantages(A, torch.rand(4, dtype=torch.float64), math.inf, 0.0)
    l1, _ = gtpo.policy_loss(new, old, None, shaped, mask, 0.2, 0.0, lam)
    g1, = torch.autograd.grad(l1, new)
    l2, _ = grpo.policy_loss(new, old, None, A, mask, 0.2, 0.0)
    g2, = torch.autograd.grad(l2, new)
    assert l1.item() == pytest.approx(l2.item(), abs=1e-12)
    torch.testing.assert_close(g1, g2, atol=1e-12, rtol=0)


def test_all_positive_and_all_zero_groups_have_no_conflicts():
    ids = torch.tensor([[4, 5, 6, 1], [4, 5, 6, 1], [4, 5, 1, PAD]])  # identical prefixes and suffixes
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]])
    for A in (torch.tensor([0.5, 0.2, 0.1]), torch.tensor([-0.5, -0.2, -0.1]), torch.zeros(3)):
        lam, fwd, bwd = gtpo.conflict_weights(ids, mask, A, 3, 2.0)
        assert not (fwd | bwd).any() and (lam == 1).all(), A
    # an all-equal group: A = 0, yet the kept completions are shaped by -γ⟨H⟩ (the objective's A - γ⟨H⟩)
    shaped, kept = gtpo.shaped_advantages(torch.zeros(3), torch.tensor([0.2, 0.4, 0.9]), LN2, 0.1)
    torch.testing.assert_close(shaped, torch.tensor([-0.02, -0.04, 0.0]))
    assert kept.tolist() == [True, True, False]


def test_suffix_alignment_with_right_padding():
    """Completions of different lengths share their end: the suffix run is aligned at the last real token."""
    E = 9  # EOS
    ids = torch.tensor([[1, 2, 3, 4, 7, E],      # + len 6
                        [5, 4, 7, E, PAD, PAD],  # - len 4: shares "4 7 E" at the end, nothing at the start
                        [1, 2, 8, 7, E, PAD]])   # - len 5: shares "1 2" at the start and "7 E" at the end
    mask = (torch.arange(6)[None] < torch.tensor([6, 4, 5])[:, None]).long()
    A = torch.tensor([1.0, -0.5, -0.5])
    lam, fwd, bwd = gtpo.conflict_weights(ids, mask, A, 3, 2.0)
    assert rows(fwd.int(), mask) == [[1, 1, 0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0, 0]]
    assert rows(bwd.int(), mask) == [[0, 0, 0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert rows(lam, mask) == [[2, 2, 1, 2, 2, 2], [1, 0, 0, 0], [0, 0, 1, 0, 0]]


def test_padding_never_conflicts():
    """A real token equal to the pad id must not match another completion's padding (mask decides)."""
    ids = torch.tensor([[3, PAD, PAD], [3, PAD, 4]])  # row 0: [3], row 1: [3, <pad-id token>, 4]
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    lam, fwd, bwd = gtpo.conflict_weights(ids, mask, torch.tensor([1.0, -1.0]), 2, 2.0)
    assert rows(fwd.int(), mask) == [[1], [1, 0, 0]]
    assert rows(lam, mask) == [[2], [0, 1, 1]]


def test_overlapping_runs_multiply():
    """A short positive completion fully inside the shared prefix and suffix gets W² = 4."""
    ids = torch.tensor([[6, 6, PAD], [6, 6, 6]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    lam, fwd, bwd = gtpo.conflict_weights(ids, mask, torch.tensor([1.0, -1.0]), 2, 2.0)
    assert rows(lam, mask) == [[4, 4], [0, 0, 0]]


# -----------------------------------------------------------------------------
# an independent computation: python loops, like the official build_conflict_mask / gtpo objective


def loop_lambda(ids, lengths, A, G, W):
    """λ per completion (lists), by sets of (position, token) over positive and negative completions."""
    out = []
    for g0 in range(0, len(ids), G):
        grp = range(g0, g0 + G)
        factors = {}
        for direction in ("fwd", "bwd"):
            seqs = {i: (ids[i][:lengths[i]] if direction == "fwd" else ids[i][:lengths[i]][::-1]) for i in grp}
            pos_keys = {(t, tok) for i in grp if A[i] > 0 for t, tok in enumerate(seqs[i])}
            neg_keys = {(t, tok) for i in grp if A[i] < 0 for t, tok in enumerate(seqs[i])}
            for i in grp:
                f = [1.0] * lengths[i]
                if A[i] != 0:
                    for t, tok in enumerate(seqs[i]):
                        if (t, tok) in pos_keys and (t, tok) in neg_keys:
                            f[t] = W if A[i] > 0 else 0.0
                        else:
                            break
                factors[i, direction] = f if direction == "fwd" else f[::-1]
        for i in grp:
            out.append([a * b for a, b in zip(factors[i, "fwd"], factors[i, "bwd"])])
    return out


def loop_objective(logp, old, A_shaped, lam, lengths, eps):
    """J = mean_i 1/|o_i| Σ_t λ min(ρA, clip(ρ)A), with explicit loops (float64 scalars)."""
    total = 0.0
    for i in range(len(lengths)):
        s = 0.0
        for t in range(lengths[i]):
            rho = math.exp(logp[i][t] - old[i][t])
            a = A_shaped[i]
            s += lam[i][t] * min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a)
        total += s / lengths[i]
    return total / len(lengths)


@pytest.mark.parametrize("seed", range(6))
def test_matches_loop_implementation(seed):
    rng = random.Random(seed)
    P, G, T, V = 3, 5, 7, 3  # a tiny vocabulary, so prefixes and suffixes are often shared
    B = P * G
    lengths = [rng.randint(1, T) for _ in range(B)]
    ids = torch.full((B, T), PAD)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.tensor([rng.randint(0, V - 1) for _ in range(n)])  # token 0 = the pad id, on purpose
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    rewards = torch.tensor([float(rng.randint(0, 2)) for _ in range(B)], dtype=torch.float64)
    A = gtpo.group_advantages(rewards, G, scale=bool(seed % 2))
    lam, fwd, bwd = gtpo.conflict_weights(ids, mask, A, G, 2.0)
    want = loop_lambda(ids.tolist(), lengths, A.tolist(), G, 2.0)
    assert rows(lam, mask) == want

    H = torch.tensor([rng.uniform(0.0, 1.2) for _ in range(B)], dtype=torch.float64)
    shaped, kept = gtpo.shaped_advantages(A, H, LN2, 0.1)
    shaped_loop = [(a - 0.1 * h) if h <= LN2 else 0.0 for a, h in zip(A.tolist(), H.tolist())]
    torch.testing.assert_close(shaped, torch.tensor(shaped_loop, dtype=torch.float64), atol=1e-15, rtol=0)

    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    new = (old + 0.25 * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_(True)
    loss, _ = gtpo.policy_loss(new, old, None, shaped, mask, 0.2, 0.0, lam)
    J = loop_objective(new.tolist(), old.tolist(), shaped_loop, want, lengths, 0.2)
    assert -loss.item() == pytest.approx(J, abs=1e-12)
    loss.backward()
    # gradient by central finite differences of the loop objective, on a few tokens
    for _ in range(8):
        i = rng.randrange(B)
        t = rng.randrange(lengths[i])
        h = 1e-6
        lp = new.detach().tolist()
        lp[i][t] += h
        jp = loop_objective(lp, old.tolist(), shaped_loop, want, lengths, 0.2)
        lp[i][t] -= 2 * h
        jm = loop_objective(lp, old.tolist(), shaped_loop, want, lengths, 0.2)
        assert -new.grad[i, t].item() == pytest.approx((jp - jm) / (2 * h), abs=1e-7)


# -----------------------------------------------------------------------------
# runs


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


def test_smoke_tiny(tmp_path, tiny_dir):
    p = run([sys.executable, "gtpo.py", "--tiny", "--num_steps=2", "--eval_problems=8", f"--run_dir={tmp_path}"])
    out = p.stdout + p.stderr
    assert "held-out greedy accuracy before RL" in out and "held-out greedy accuracy after RL" in out
    assert "initial mean entropy ⟨H⟩_ini" in out
    steps = [m for m in read_metrics(tmp_path) if m["step"] > 0]
    assert len(steps) == 2
    for m in steps:
        assert 0.0 <= m["conflict_frac"] <= 1.0 and 0.0 <= m["filtered_frac"] <= 1.0
        assert m["entropy_seq"] > 0 and m["kl"] == 0.0
        assert m["ent_initial"] == steps[0]["ent_initial"] > 0
    assert max(m["conflict_frac"] for m in steps) > 0  # the tiny task's groups share prefixes and EOS
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["beta"] == 0.0 and cfg["ent_rule"] == "paper"


def test_torchrun_two_ranks_percentile(tmp_path, tiny_dir):
    """2 gloo ranks with the percentile rule: one shared cut-off, so filtering happens and replicas agree."""
    run(torchrun(2, "gtpo.py", "--tiny", "--num_steps=2", "--eval_problems=8", "--ent_rule=percentile",
                 "--ent_percentile=75", f"--run_dir={tmp_path}"))
    steps = [m for m in read_metrics(tmp_path) if m["step"] > 0]
    assert len(steps) == 2
    # the 75th percentile of the entropies seen so far filters about a quarter of the first batch
    assert 0.2 <= steps[0]["filtered_frac"] <= 0.3
    assert steps[0]["ent_threshold"] < 1e9

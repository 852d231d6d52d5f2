"""GTPO (Simoni et al., arXiv 2508.03772): conflict masks and λ, entropy filter and shaping, the loss.

Numbers come from ALGORITHMS.md §6(i) (and §1(i) for the shared toy batch); the independent versions below
are written with python loops over groups, positions and tokens (sets of (position, token id) pairs, like
the official build_conflict_mask).
"""
import math
import random

import pytest
import torch

import grpo
import gspo
import gtpo
from helpers import F64, padded, toy, value_and_dj

LN2 = math.log(2)
PAD = 0

# ALGORITHMS.md §6(i): G = 4, R = [1, 0, 0, 1], right-padded with PAD
SPEC_IDS = torch.tensor([[5, 7, 9, 2, PAD], [5, 7, 3, 2, PAD], [5, 8, 2, PAD, PAD], [6, 7, 9, 4, 2]])
SPEC_MASK = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
SPEC_LENGTHS = [4, 4, 3, 5]
SPEC_H = torch.tensor([0.3, 0.5, 0.9, 0.6], dtype=F64)
SPEC_SHAPED = [0.47, -0.55, 0.0, 0.44]  # A' = δ(A - 0.1⟨H⟩), o3 filtered (by ln 2 and by the code's 0.7)
SPEC_LAMBDA = [[2, 2, 1, 2], [0, 0, 1, 0], [0, 1, 0], [1, 1, 1, 1, 2]]


def rows(t, mask):
    """A (B, T) tensor as lists cut at each row's length."""
    return [t[i, :int(mask[i].sum())].tolist() for i in range(t.shape[0])]


def spec_advantages():
    return gtpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=F64), 4, scale=False)


def gtpo_spec_loss():
    """gtpo.policy_loss on the spec vector, on-policy (ρ ≡ 1): (loss, dJ/dlogπ, stats)."""
    A = spec_advantages()
    lam, _, _ = gtpo.conflict_weights(SPEC_IDS, SPEC_MASK, A, 4, 2.0)
    shaped, _ = gtpo.shaped_advantages(A, SPEC_H, LN2, 0.1)
    old = torch.tensor([[-1.0, -0.5, -2.0, -0.3, 0.0]] * 4, dtype=F64)
    logp = old.clone().requires_grad_(True)
    loss, stats = gtpo.policy_loss(logp, old, None, shaped, SPEC_MASK, 0.2, 0.0, lam)
    return (*value_and_dj(loss, logp), stats)


# -----------------------------------------------------------------------------
# independent python-loop versions: the conflict runs, λ, counts and objectives


def run_flags(seqs, A):
    """Conflict-run flags (0/1 lists) of one group's sequences, indexed as given: position t conflicts when
    (t, token) occurs in a positive and in a negative completion, counted along the run from t = 0; only
    completions with A != 0 take part."""
    pos_keys = {(t, tok) for s, a in zip(seqs, A) if a > 0 for t, tok in enumerate(s)}
    neg_keys = {(t, tok) for s, a in zip(seqs, A) if a < 0 for t, tok in enumerate(s)}
    out = []
    for s, a in zip(seqs, A):
        f = [0] * len(s)
        if a != 0:
            for t, tok in enumerate(s):
                if (t, tok) not in pos_keys or (t, tok) not in neg_keys:
                    break
                f[t] = 1
        out.append(f)
    return out


def loop_flags(ids, lengths, A, G):
    """(forward flags, backward flags) per completion; the backward flags are indexed from the END of each
    sequence (b[k] is about position len - 1 - k), as the official build_conflict_mask computes them."""
    fwd, bwd_from_end = [], []
    for g0 in range(0, len(ids), G):
        seqs = [ids[i][:lengths[i]] for i in range(g0, g0 + G)]
        fwd += run_flags(seqs, A[g0:g0 + G])
        bwd_from_end += run_flags([s[::-1] for s in seqs], A[g0:g0 + G])
    return fwd, bwd_from_end


def loop_lambda(ids, lengths, A, G, W):
    """λ per completion: forward factor × re-aligned backward factor, each W (A > 0) or 0 (A < 0) on its run."""
    out = []
    for i, (f, b) in enumerate(zip(*loop_flags(ids, lengths, A, G))):
        w = W if A[i] > 0 else 0.0
        b = b[::-1]  # back to forward positions
        out.append([(w if f[t] else 1.0) * (w if b[t] else 1.0) for t in range(lengths[i])])
    return out


def loop_conflict_counts(ids, lengths, A, G, realign_backward):
    """Conflict tokens per completion: forward OR backward flags, with the backward flags re-aligned to
    forward positions (the intended count) or left indexed from the end (what the official code does)."""
    counts = []
    for f, b in zip(*loop_flags(ids, lengths, A, G)):
        b = b[::-1] if realign_backward else b
        counts.append(sum(1 for t in range(len(f)) if f[t] or b[t]))
    return counts


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


def divided_and_summed(A_shaped, lam, counts):
    """The official gtpo_compute_loss's aggregation at ρ ≡ 1, as (per-completion losses, dJ/dlogπ (B, T)):
    loss_i = -(Σ_t r A'_i λ_it) / |o_i| / max(n_conflict_i, 1), summed over completions, with
    r = exp(logπ - sg(logπ)) (≡ 1 in value, carries the gradient)."""
    logp = torch.zeros(SPEC_MASK.shape, dtype=F64, requires_grad=True)
    r = torch.exp(logp - logp.detach())
    lam_t, m = padded(lam)
    n = torch.tensor(counts, dtype=F64).clamp_min(1)
    per_seq = -(r * torch.tensor(A_shaped, dtype=F64)[:, None] * lam_t * m).sum(1) / m.sum(1) / n
    per_seq.sum().backward()
    return per_seq.detach(), -logp.grad


# -----------------------------------------------------------------------------
# the spec vector


def test_spec_advantages():
    assert spec_advantages().tolist() == [0.5, -0.5, -0.5, 0.5]  # official code: A = R - mean
    assert gtpo.group_advantages(torch.tensor([1.0, 0, 0, 1]), 4).tolist() == [1, -1, -1, 1]  # paper: /std
    # all-equal groups give exactly 0 either way (no spurious sign from float rounding of the mean)
    eq = torch.full((8,), 0.1)
    assert gtpo.group_advantages(eq, 8, scale=False).tolist() == [0.0] * 8
    assert gtpo.group_advantages(eq, 8).tolist() == [0.0] * 8


def test_spec_conflict_masks_and_lambda():
    lam, fwd, bwd = gtpo.conflict_weights(SPEC_IDS, SPEC_MASK, spec_advantages(), 4, 2.0)
    assert rows(fwd.int(), SPEC_MASK) == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0], [0, 0, 0, 0, 0]]
    assert rows(bwd.int(), SPEC_MASK) == [[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 1], [0, 0, 0, 0, 1]]
    assert rows(lam, SPEC_MASK) == SPEC_LAMBDA
    # the spec table's n_conflict column: the intended count, forward OR aligned backward
    n_conflict = ((fwd | bwd) & SPEC_MASK.bool()).sum(1)
    assert n_conflict.tolist() == [3, 3, 2, 1]
    assert not ((fwd | bwd) & ~SPEC_MASK.bool()).any()  # padding is never a conflict token


def test_spec_loop_flags_match_the_table():
    """The independent loops give the spec table's flags and λ (backward flags shown re-aligned here)."""
    A = spec_advantages().tolist()
    fwd, bwd_from_end = loop_flags(SPEC_IDS.tolist(), SPEC_LENGTHS, A, 4)
    assert fwd == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0], [0, 0, 0, 0, 0]]
    assert [b[::-1] for b in bwd_from_end] == [[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 1], [0, 0, 0, 0, 1]]
    assert loop_lambda(SPEC_IDS.tolist(), SPEC_LENGTHS, A, 4, 2.0) == SPEC_LAMBDA


def test_spec_entropy_filter_and_shaping():
    A = spec_advantages()
    # paper rule: the initial model is below ln 2, so completions above ln 2 are filtered
    th = gtpo.entropy_threshold("paper", LN2, 0.5, [], 95.0)
    assert th == LN2
    shaped, kept = gtpo.shaped_advantages(A, SPEC_H, th, 0.1)
    assert kept.tolist() == [True, True, False, True]
    torch.testing.assert_close(shaped, torch.tensor(SPEC_SHAPED, dtype=F64))
    # official code: threshold 0.7 always applied (whatever ⟨H⟩_ini), same δ here
    th_code = gtpo.entropy_threshold("always", 0.7, 0.8, [], 95.0)
    assert th_code == 0.7
    assert gtpo.shaped_advantages(A, SPEC_H, th_code, 0.1)[1].tolist() == kept.tolist()
    # paper rule with an initial model above ln 2: nothing is filtered, only shaped
    th_hi = gtpo.entropy_threshold("paper", LN2, 0.8, [], 95.0)
    assert th_hi == math.inf
    shaped_hi, kept_hi = gtpo.shaped_advantages(A, SPEC_H, th_hi, 0.1)
    assert kept_hi.all()
    torch.testing.assert_close(shaped_hi, torch.tensor([0.47, -0.55, -0.59, 0.44], dtype=F64))
    # off: never filters, even with a low ⟨H⟩_ini
    th_off = gtpo.entropy_threshold("off", LN2, 0.1, [], 95.0)
    assert th_off == math.inf and gtpo.shaped_advantages(A, SPEC_H, th_off, 0.1)[1].all()


def test_percentile_threshold():
    hist = [float(x) for x in range(1, 101)]  # 1..100, a python list as the trainer keeps it
    assert gtpo.entropy_threshold("percentile", LN2, 0.1, hist, 95.0) == pytest.approx(95.05)
    assert gtpo.entropy_threshold("percentile", LN2, 0.1, hist, 50.0) == pytest.approx(50.5)
    assert gtpo.entropy_threshold("percentile", LN2, 0.1, hist, 100.0) == 100.0
    # the 95th percentile of the seen entropies filters the top 5%
    th = gtpo.entropy_threshold("percentile", LN2, 0.1, hist, 95.0)
    shaped, kept = gtpo.shaped_advantages(torch.ones(100, dtype=F64), torch.tensor(hist, dtype=F64), th, 0.0)
    assert (~kept).sum().item() == 5 and (~kept[-5:]).all()


def test_spec_loss_value_and_gradient():
    """README formula with r ≡ 1, what gtpo.py follows: J = 1/4 [0.47·7/4 - 0.55·1/4 + 0 + 0.44·6/5] = 0.303250."""
    loss, dJ, stats = gtpo_spec_loss()
    assert loss == pytest.approx(-0.303250, abs=1e-6)
    # dJ/dlogπ_it = A'_i λ_it / (G |o_i|), hand-derived from the objective
    expected = torch.tensor([[0.05875, 0.05875, 0.029375, 0.05875, 0],
                             [0, 0, -0.034375, 0, 0],
                             [0, 0, 0, 0, 0],
                             [0.022, 0.022, 0.022, 0.022, 0.044]], dtype=F64)
    torch.testing.assert_close(dJ, expected, atol=1e-12, rtol=0)
    assert stats["kl"][0].item() == 0.0 and stats["clip_frac"][0].item() == 0.0
    # the python-loop objective gives the same value
    J = loop_objective([[0.0] * 5] * 4, [[0.0] * 5] * 4, SPEC_SHAPED, SPEC_LAMBDA, SPEC_LENGTHS, 0.2)
    assert -loss == pytest.approx(J, abs=1e-12)


def test_spec_official_code_loss_with_unaligned_conflict_count():
    """The official code's loss on the spec vector: -0.870500, re-implemented independently.

    This re-implements the official gtpo_compute_loss / build_conflict_mask as ALGORITHMS.md §6 describes
    them (its "Correction (turn 2)" was checked by running the official functions): λ from the forward and
    the re-aligned backward runs (the same λ as gtpo.py), but n_conflict ORs the forward flags with the
    backward flags while those are still indexed from the end of each sequence, so the divisor is
    [2, 2, 1, 1]; then loss_i = -(Σ_t r A'_i λ_it) / |o_i| / n_conflict_i, summed over completions.

    Where this departs from the paper: the division by n_conflict and the sum over completions are not in
    the paper's (README) objective, which takes the per-sequence token mean and the mean over G; and the
    unaligned reverse index in the count looks like a bug (the intended count is [3, 3, 2, 1], see the next
    test). gtpo.py follows the paper: its loss on the same vector is -0.303250.
    """
    A = spec_advantages().tolist()
    lam = loop_lambda(SPEC_IDS.tolist(), SPEC_LENGTHS, A, 4, 2.0)
    counts = loop_conflict_counts(SPEC_IDS.tolist(), SPEC_LENGTHS, A, 4, realign_backward=False)
    assert lam == SPEC_LAMBDA
    assert counts == [2, 2, 1, 1]
    per_seq, dJ = divided_and_summed(SPEC_SHAPED, lam, counts)
    torch.testing.assert_close(per_seq, torch.tensor([-0.411250, 0.068750, 0.0, -0.528000], dtype=F64),
                               atol=1e-12, rtol=0)
    assert per_seq.sum().item() == pytest.approx(-0.870500, abs=1e-12)
    # dJ/dlogπ_it = A'_i λ_it / |o_i| / n_conflict_i (no 1/G)
    want = [[0.1175, 0.1175, 0.05875, 0.1175], [0, 0, -0.06875, 0], [0, 0, 0], [0.088, 0.088, 0.088, 0.088, 0.176]]
    torch.testing.assert_close(dJ, padded(want)[0], atol=1e-12, rtol=0)
    # gtpo.py's loss on the same vector is the README formula's, not the code's
    loss, _, _ = gtpo_spec_loss()
    assert loss == pytest.approx(-0.303250, abs=1e-6) and abs(loss - per_seq.sum().item()) > 0.5


def test_spec_intended_conflict_count_loss():
    """The official aggregation (/n_conflict, summed) with the intended count [3, 3, 2, 1] (forward OR aligned
    backward, the spec table's column): -0.756333. Not what the official code computes (previous test) and
    not the paper's objective (gtpo.py: -0.303250)."""
    A = spec_advantages().tolist()
    counts = loop_conflict_counts(SPEC_IDS.tolist(), SPEC_LENGTHS, A, 4, realign_backward=True)
    assert counts == [3, 3, 2, 1]
    # the same count as gtpo.conflict_weights' masks give
    _, fwd, bwd = gtpo.conflict_weights(SPEC_IDS, SPEC_MASK, spec_advantages(), 4, 2.0)
    assert counts == ((fwd | bwd) & SPEC_MASK.bool()).sum(1).tolist()
    per_seq, dJ = divided_and_summed(SPEC_SHAPED, SPEC_LAMBDA, counts)
    torch.testing.assert_close(per_seq, torch.tensor([-0.274167, 0.045833, 0.0, -0.528], dtype=F64),
                               atol=1e-6, rtol=0)
    assert per_seq.sum().item() == pytest.approx(-0.756333, abs=1e-6)
    want = [[0.078333, 0.078333, 0.039167, 0.078333], [0, 0, -0.045833, 0], [0, 0, 0], [0.088, 0.088, 0.088, 0.088, 0.176]]
    torch.testing.assert_close(dJ, padded(want)[0], atol=1e-6, rtol=0)
    loss, _, _ = gtpo_spec_loss()
    assert loss == pytest.approx(-0.303250, abs=1e-6) and abs(loss - per_seq.sum().item()) > 0.4


# -----------------------------------------------------------------------------
# the shared toy batch, off-policy (ALGORITHMS.md §1(i)): λ scales the advantage inside the PPO min/clip


@pytest.mark.parametrize("beta,want_loss,want_dj", [
    (0.0, 0.016647, [[0.138146, 0], [0, -0.083333, -0.101784], [-0.305351], [0.102341, 0]]),
    (0.04, 0.018448, [[0.137240, -0.000906], [0.002162, -0.083651, -0.102648], [-0.307943], [0.102867, -0.001967]]),
])
def test_toy_with_unit_lambda_is_grpo_spec(beta, want_loss, want_dj):
    """λ ≡ 1, γ = 0, no filter: GTPO's loss is GRPO's, with the spec's values (the KL knob included)."""
    new, old, ref, mask, rewards = toy()
    A = gtpo.group_advantages(rewards, 4)
    shaped, kept = gtpo.shaped_advantages(A, torch.full((4,), 0.5, dtype=F64), math.inf, 0.0)
    assert kept.all()
    loss, stats = gtpo.policy_loss(new, old, ref, shaped, mask, 0.2, beta, torch.ones_like(mask))
    value, dj = value_and_dj(loss, new)
    assert value == pytest.approx(want_loss, abs=1e-6)
    torch.testing.assert_close(dj, padded(want_dj)[0], atol=1e-6, rtol=0)
    assert (stats["clip_frac"][0] / stats["clip_frac"][1]).item() == pytest.approx(3 / 8)  # o1 t2, o2 t1, o4 t2


def test_toy_lambda_scales_advantage_inside_the_clip():
    """λ = [[2, 2], [0, 0, 1], [1], [1, 2]] on the toy: the loss is the loop objective Σ λ·min(ρA, clip(ρ)A);
    o2 t1 (ρ = 0.74 < 0.8, A < 0) has λ = 0, so it is counted as unclipped with zero advantage: 2 of 8 clip."""
    new, old, ref, mask, rewards = toy()
    A = gtpo.group_advantages(rewards, 4)
    lam_rows = [[2.0, 2.0], [0.0, 0.0, 1.0], [1.0], [1.0, 2.0]]
    lam = padded(lam_rows, fill=5.0)[0]  # junk in the padding: must not matter
    loss, stats = gtpo.policy_loss(new, old, ref, A, mask, 0.2, 0.0, lam)
    value, dj = value_and_dj(loss, new)
    lengths = [len(r) for r in lam_rows]
    J = loop_objective(new.detach().tolist(), old.tolist(), A.tolist(), lam_rows, lengths, 0.2)
    assert value == pytest.approx(-J, abs=1e-12)
    # the GRPO spec gradient scaled by λ where unclipped; clipped tokens stay at 0
    want = [[2 * 0.138146, 0], [0, 0, -0.101784], [-0.305351], [0.102341, 0]]
    torch.testing.assert_close(dj, padded(want)[0], atol=2e-6, rtol=0)
    assert stats["clip_frac"][0].item() == 2 and stats["clip_frac"][1].item() == 8


# -----------------------------------------------------------------------------
# edge cases


def test_no_conflicts_reduces_to_grpo():
    """Different first and last tokens: λ ≡ 1; with γ = 0 and no filter the loss is GRPO's (β = 0)."""
    ids = torch.tensor([[1, 2, 3, 4], [5, 2, 3, 6], [7, 7, 8, 9], [3, 2, 3, 1]])
    mask = torch.ones_like(ids)
    A = gtpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=F64), 4)
    lam, fwd, bwd = gtpo.conflict_weights(ids, mask, A, 4, 2.0)
    assert not fwd.any() and not bwd.any() and (lam == 1).all()
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 4, generator=g, dtype=F64) * 2
    new = (old + 0.3 * torch.randn(4, 4, generator=g, dtype=F64)).requires_grad_(True)
    shaped, _ = gtpo.shaped_advantages(A, torch.rand(4, dtype=F64), math.inf, 0.0)
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
# random batches against the independent loops


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
    rewards = torch.tensor([float(rng.randint(0, 2)) for _ in range(B)], dtype=F64)
    A = gtpo.group_advantages(rewards, G, scale=bool(seed % 2))
    lam, fwd, bwd = gtpo.conflict_weights(ids, mask, A, G, 2.0)
    want = loop_lambda(ids.tolist(), lengths, A.tolist(), G, 2.0)
    assert rows(lam, mask) == want
    assert ((fwd | bwd) & mask.bool()).sum(1).tolist() == loop_conflict_counts(ids.tolist(), lengths, A.tolist(), G, True)

    H = torch.tensor([rng.uniform(0.0, 1.2) for _ in range(B)], dtype=F64)
    shaped, kept = gtpo.shaped_advantages(A, H, LN2, 0.1)
    shaped_loop = [(a - 0.1 * h) if h <= LN2 else 0.0 for a, h in zip(A.tolist(), H.tolist())]
    torch.testing.assert_close(shaped, torch.tensor(shaped_loop, dtype=F64), atol=1e-15, rtol=0)

    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3
    new = (old + 0.25 * torch.randn(B, T, generator=g, dtype=F64)).requires_grad_(True)
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
# GSPO + GTPO (--gspo_token): GSPO-token's sequence ratio carrying GTPO's per-token advantages


def random_batch(seed, B=6, T=7):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lens[:, None]).to(F64)
    old = -torch.rand(B, T, generator=g, dtype=F64) * 2
    new = (old + 5e-4 * torch.randn(B, T, generator=g, dtype=F64)).requires_grad_(True)  # around GSPO's band
    lam = torch.tensor([0.0, 1.0, 2.0, 4.0], dtype=F64)[torch.randint(0, 4, (B, T), generator=g)]
    return new, old, mask, torch.randn(B, generator=g, dtype=F64), lam


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gspo_token_with_lambda_one_is_gspo(seed):
    new, old, mask, adv, _ = random_batch(seed)
    loss, stats = gtpo.policy_loss(new, old, None, adv, mask, 0.2, 0.0, torch.ones_like(mask), (3e-4, 4e-4))
    g1 = torch.autograd.grad(loss, new)[0]
    want, want_stats = gspo.policy_loss(new, old, None, adv, mask, 3e-4, 4e-4, 0.0, gspo_token=True)
    g2 = torch.autograd.grad(want, new)[0]
    assert loss.item() == pytest.approx(want.item(), abs=1e-12) and torch.allclose(g1, g2, atol=1e-12)
    assert stats["clip_frac"][0] == want_stats["clip_frac"][0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gspo_token_carries_per_token_advantages(seed):
    """Against python loops: s_i = exp(mean_t log ρ_it); J = 1/B Σ_i 1/|o_i| Σ_t min(s_i Â_it, clip(s_i) Â_it) with
    Â_it = λ_it A_i; dJ/dlogπ_it = [unclipped] s_i Â_it / (|o_i| B), every token its own advantage."""
    new, old, mask, adv, lam = random_batch(seed)
    loss, _ = gtpo.policy_loss(new, old, None, adv, mask, 0.2, 0.0, lam, (3e-4, 4e-4))
    loss.backward()
    B, J = len(adv), 0.0
    for i in range(B):
        n = int(mask[i].sum())
        s = math.exp(sum(new[i, t].item() - old[i, t].item() for t in range(n)) / n)
        for t in range(n):
            a = lam[i, t].item() * adv[i].item()
            J += min(s * a, min(max(s, 1 - 3e-4), 1 + 4e-4) * a) / n / B
            unclipped = not ((a > 0 and s > 1 + 4e-4) or (a < 0 and s < 1 - 3e-4))
            assert -new.grad[i, t].item() == pytest.approx(s * a / n / B if unclipped else 0.0, abs=1e-12)
        assert new.grad[i, n:].abs().sum() == 0
    assert loss.item() == pytest.approx(-J, abs=1e-12)

"""GFPO's pieces against the spec's hand-checked vectors (ALGORITHMS.md section 5), independent
per-token computations, the DDP normaliser, and end-to-end runs of gfpo.py on the tiny default."""
import math
import statistics

import pytest
import torch

import gfpo
import grpo
from helpers import NEW, OLD, REF, padded, toy, value_and_dj

# ALGORITHMS.md §5(i): G = 8, k = 4
R8 = [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]
L8 = [120, 300, 80, 200, 500, 90, 150, 60]
GRADED = [0.9, 0.6, -0.5, 0.8, -1.0, 0.95, 0.7, -0.2]


def filt(rewards, lengths, keep, G, metric):
    r = torch.tensor(rewards, dtype=torch.float64)
    m = gfpo.retain_mask(r, torch.tensor(lengths), keep, G, metric)
    return m, gfpo.filtered_advantages(r, m, G)


# -----------------------------------------------------------------------------
# the spec's filtering vectors


def test_shortest_4_of_8_matches_spec():
    m, adv = filt(R8, L8, 4, 8, "length")
    assert m.nonzero()[:, 0].tolist() == [0, 2, 5, 7]
    assert adv.tolist() == pytest.approx([1, 0, -1, 0, 0, 1, 0, -1], abs=1e-12)
    # contrast from the spec: plain GRPO over all 8
    plain = grpo.group_advantages(torch.tensor(R8, dtype=torch.float64), 8)
    assert plain.tolist() == pytest.approx([0.774597, 0.774597, -1.290994, 0.774597, -1.290994, 0.774597,
                                            0.774597, -1.290994], abs=1e-6)


def test_efficiency_with_binary_rewards_is_degenerate():
    m, adv = filt(R8, L8, 4, 8, "efficiency")
    assert m.nonzero()[:, 0].tolist() == [0, 3, 5, 6]  # all four correct ones
    assert torch.equal(adv, torch.zeros(8, dtype=torch.float64))  # σ_S = 0: no signal at all
    assert torch.isfinite(adv).all()


def test_efficiency_with_graded_rewards_matches_spec():
    m, adv = filt(GRADED, L8, 4, 8, "efficiency")
    assert m.nonzero()[:, 0].tolist() == [0, 3, 5, 6]
    assert adv.tolist() == pytest.approx([0.650945, 0, 0, -0.390567, 0, 1.171700, -1.432078, 0], abs=1e-6)


def test_keep_equal_to_group_size_is_plain_grpo_advantages():
    m, adv = filt(R8, L8, 8, 8, "length")
    assert m.all()
    assert torch.allclose(adv, grpo.group_advantages(torch.tensor(R8, dtype=torch.float64), 8))


def test_ties_go_to_the_lower_index():
    m, _ = filt([1.0] * 4, [5, 3, 5, 5], 2, 4, "length")
    assert m.tolist() == [True, True, False, False]
    m, _ = filt([1.0, 1.0, 0.0, 1.0], [4, 4, 4, 4], 2, 4, "efficiency")
    assert m.tolist() == [True, True, False, False]


def independent_filter(rewards, lengths, keeps, G, metric):
    """Filter + advantages with python loops, sorted() and statistics.pstdev."""
    retained, adv = [], []
    for g, k in enumerate(keeps):
        R, L = rewards[g * G:(g + 1) * G], lengths[g * G:(g + 1) * G]
        key = (lambda i: (L[i], i)) if metric == "length" else (lambda i: (-R[i] / L[i], i))
        S = set(sorted(range(G), key=key)[:k])
        mu = sum(R[i] for i in S) / len(S)
        sd = statistics.pstdev([R[i] for i in S])
        retained += [i in S for i in range(G)]
        adv += [((R[i] - mu) / sd if sd > 1e-6 else 0.0) if i in S else 0.0 for i in range(G)]
    return retained, adv


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("metric", ["length", "efficiency"])
def test_filter_against_independent_computation(seed, metric):
    g = torch.Generator().manual_seed(seed)
    G, P = 16, 5
    rewards = (torch.randint(0, 3, (P * G,), generator=g).double() / 2 - 0.25).tolist()  # graded, with ties
    lengths = torch.randint(1, 12, (P * G,), generator=g).tolist()  # many tied lengths
    keeps = [4, 6, 8, 8, 16]  # one k per prompt, as adaptive difficulty gives
    want_m, want_adv = independent_filter(rewards, lengths, keeps, G, metric)
    m = gfpo.retain_mask(torch.tensor(rewards), torch.tensor(lengths), torch.tensor(keeps), G, metric)
    adv = gfpo.filtered_advantages(torch.tensor(rewards, dtype=torch.float64), m, G)
    assert m.tolist() == want_m
    assert adv.tolist() == pytest.approx(want_adv, abs=1e-12)
    assert m.view(P, G).sum(1).tolist() == keeps


# -----------------------------------------------------------------------------
# the token-level loss over the retained set


def loss_and_grad(adv, retained, num_tokens=None, beta=0.0, part=slice(None), batch=None):
    """GFPO loss on the toy (or `batch`) as gfpo.main computes it: only the retained rows are forwarded
    (`retained.nonzero()`), `part` of them in this micro-batch; num_tokens defaults to their token count.
    Returns the loss, dJ/dlogπ per token of every row (the rows not forwarded get zero) and the stats."""
    new, old, ref, mask, _ = batch or toy()
    kept = torch.tensor(retained).nonzero()[:, 0]  # gfpo.main's selection: S only
    ix = kept[part]
    if num_tokens is None:
        num_tokens = mask[kept].sum()  # Σ_{i∈S}|o_i|, as gfpo.main's mask[mb].sum()
    loss, stats = gfpo.policy_loss(new[ix], old[ix], ref[ix], torch.as_tensor(adv, dtype=torch.float64)[ix],
                                   mask[ix], 0.2, beta, num_tokens)
    return (*value_and_dj(loss, new), stats)


def test_all_retained_is_the_token_level_loss_of_the_spec():
    # ALGORITHMS.md §2(i): the token-level loss with a symmetric ε = 0.2 on the shared toy, J = 0.010137,
    # and the DAPO gradients with the 8-token denominator (o2/o3 values are ρA/8 at ρ = 1, 1.221403)
    loss, g, _ = loss_and_grad([1.0, -1.0, -1.0, 1.0], [True] * 4)
    assert loss == pytest.approx(-0.010137, abs=1e-6)
    want = [[0.138146, 0], [0, -0.125, -0.152675], [-0.152675], [0.102341, 0]]
    for i, row in enumerate(want):
        assert g[i, :len(row)].tolist() == pytest.approx(row, abs=1e-6)
        assert g[i, len(row):].abs().sum() == 0  # padding gets no gradient


def test_rejected_sequence_gets_exactly_zero_gradient_and_no_normaliser_share():
    # keep o1, o2, o4 of the toy (reject o3): rewards [1, 0, 1] -> Â = [1/√2, -√2, 0, 1/√2]; 7 tokens.
    # By hand: J = (0.707107 (1.105171 + 1.2 + 0.818731 + 1.2) - 1.414214 (0.8 + 1 + 1.221403)) / 7
    retained = [True, True, False, True]
    r = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    adv = gfpo.filtered_advantages(r, torch.tensor(retained), 4)
    assert adv.tolist() == pytest.approx([0.707107, -1.414214, 0, 0.707107], abs=1e-6)
    assert adv[2].item() == 0.0  # the rejected row's advantage is exactly 0
    assert torch.tensor(retained).nonzero()[:, 0].tolist() == [0, 1, 3]  # the trainer never forwards o3
    loss, g, stats = loss_and_grad(adv, retained, beta=0.04)
    assert torch.equal(g[2], torch.zeros_like(g[2]))  # exactly zero, KL term included
    assert (g[[0, 1, 3]] != 0).any(dim=1).all()  # while every retained row gets some
    loss0, g0, _ = loss_and_grad(adv, retained)
    assert loss0 == pytest.approx(-(0.707107 * 4.323902 - 1.414214 * 3.021403) / 7, abs=1e-5)
    assert g0[0, 0].item() == pytest.approx(0.707107 * 1.105171 / 7, abs=1e-6)
    assert stats["clip_frac"][1].item() == 7  # statistics over retained tokens only
    # even a non-zero advantage on the rejected row reaches neither the loss nor the gradient
    loss2, g2, _ = loss_and_grad([0.707107, -1.414214, 5.0, 0.707107], retained, beta=0.04)
    assert torch.equal(g2[2], torch.zeros_like(g2[2]))
    assert loss2 == pytest.approx(loss, abs=1e-6)
    # the selection is what keeps o3 out: forwarded with Â = 0, its KL term would still pull on it
    new, old, ref, mask, _ = toy()
    all_rows, _ = gfpo.policy_loss(new, old, ref, adv, mask, 0.2, 0.04, torch.tensor(7.0, dtype=torch.float64))
    _, g_all = value_and_dj(all_rows, new)
    assert g_all[2, 0].item() == pytest.approx(-0.04 * (1 - math.exp(-0.3)) / 7, abs=1e-9)  # -β dKL/dlogπ / 7


def test_normaliser_counts_retained_tokens_only():
    retained = [True, False, True, True]  # rejected o2 has 3 tokens: the normaliser is 2 + 1 + 2 = 5
    adv = [0.3, -0.7, -1.1, 0.9]
    loss, g, _ = loss_and_grad(adv, retained)
    J = 0.0
    for i in (0, 2, 3):  # independent: explicit loops over retained tokens
        for n, o in zip(NEW[i], OLD[i]):
            rho = math.exp(n - o)
            J += min(rho * adv[i], max(min(rho, 1.2), 0.8) * adv[i])
    assert loss == pytest.approx(-J / 5, abs=1e-12)
    # a longer rejected completion changes nothing
    longer = [[x + [-1.0] * 4 if i == 1 else x for i, x in enumerate(rows)] for rows in (NEW, OLD, REF)]
    new, mask = padded(longer[0], fill=-7.0)
    batch = (new.requires_grad_(True), padded(longer[1], fill=3.0)[0], padded(longer[2], fill=-5.0)[0], mask, None)
    assert mask.sum().item() == 12
    assert loss_and_grad(adv, retained, batch=batch)[0] == pytest.approx(loss, abs=1e-12)


def test_micro_batches_and_ranks_add_up_to_the_mini_batch_loss():
    # the normaliser is the mini-batch's retained-token count, so micro-batch (or per-rank) losses
    # and gradients sum to the full-batch ones; per-micro-batch normalisation would not
    retained, adv = [True, True, False, True], [0.707107, -1.414214, 0.0, 0.707107]
    full, g_full, _ = loss_and_grad(adv, retained, beta=0.04)
    a, g_a, _ = loss_and_grad(adv, retained, num_tokens=torch.tensor(7.0), beta=0.04, part=slice(0, 1))  # o1
    b, g_b, _ = loss_and_grad(adv, retained, num_tokens=torch.tensor(7.0), beta=0.04, part=slice(1, 3))  # o2, o4
    assert a + b == pytest.approx(full, abs=1e-12)
    assert torch.allclose(g_a + g_b, g_full, atol=1e-12)
    # DDP: each rank backpropagates loss * world_size and DDP averages, which gives the same gradient
    assert torch.allclose((2 * g_a + 2 * g_b) / 2, g_full, atol=1e-12)
    local, _, _ = loss_and_grad(adv, retained, num_tokens=torch.tensor(2.0), beta=0.04, part=slice(0, 1))
    assert local + b != pytest.approx(full, abs=1e-3)


# -----------------------------------------------------------------------------
# adaptive difficulty


def test_difficulty_buckets_as_documented():
    history = [i / 10 for i in range(11)]  # 0.0 .. 1.0
    means = torch.tensor([1.0, 0.8, 0.7, 0.5, 0.4, 0.3, 0.0])
    # mid-rank percentiles 10.5/11, 8.5/11, 7.5/11, 5.5/11, 4.5/11, 3.5/11, 0.5/11
    buckets = gfpo.difficulty_buckets(means, history)
    assert buckets.tolist() == [0, 0, 1, 1, 2, 2, 3]  # 0 easy, 1 medium, 2 hard, 3 very hard
    # the documented table for G = 16: easy 4, medium 6, hard 8, very hard 8, as gfpo.main picks k
    keeps = [int(k) for k in gfpo.Config.difficulty_keep.split(",")]
    assert keeps == [4, 6, 8, 8]
    assert torch.tensor(keeps)[buckets].tolist() == [4, 4, 6, 6, 8, 8, 8]


def test_difficulty_ties_share_a_bucket():
    history = [0.0] * 40 + [0.5] * 30 + [1.0] * 30  # 0/1-style rewards: many tied means
    b = gfpo.difficulty_buckets(torch.tensor([0.0, 0.5, 1.0]), history).tolist()
    assert b == [3, 1, 0]  # all-wrong prompts: very hard; all-correct ones: easy


def test_difficulty_buckets_against_quartile_loop():
    g = torch.Generator().manual_seed(0)
    history = (torch.randint(0, 9, (200,), generator=g).double() / 8).tolist()
    means = torch.randint(0, 9, (50,), generator=g).double() / 8
    got = gfpo.difficulty_buckets(means, history).tolist()
    for m, b in zip(means.tolist(), got):
        p = (sum(h < m for h in history) + 0.5 * sum(h == m for h in history)) / len(history)
        assert b == (0 if p >= 0.75 else 1 if p >= 0.5 else 2 if p >= 0.25 else 3)


def test_adaptive_keep_feeds_the_filter():
    G = 16
    history = [0.0, 0.25, 0.5, 0.75, 1.0] * 4
    means = torch.tensor([1.0, 0.0])  # easy, very hard
    keep = torch.tensor([4, 6, 8, 8])[gfpo.difficulty_buckets(means, history)]  # gfpo.main's expression
    rewards = torch.cat([torch.ones(G), torch.zeros(G)])
    m = gfpo.retain_mask(rewards, torch.arange(1, 2 * G + 1), keep, G, "length")
    assert m.view(2, G).sum(1).tolist() == [4, 8]
    assert m.view(2, G)[0].tolist() == [True] * 4 + [False] * 12  # the 4 shortest


# -----------------------------------------------------------------------------
# end to end

"""Online DPO's pieces against the spec's hand-checked vector (ALGORITHMS.md section 10), an independent
computation with python loops and finite differences, the pair selection, the normaliser over ranks, and
end-to-end runs of dpo.py on the tiny default (one process, and two gloo ranks)."""
import math

import pytest
import torch

from grpo_family import config
import dpo
from helpers import padded, toy, value_and_dj


def toy_pair_loss(beta=0.1, num_pairs=1):
    """The DPO loss on the spec's toy group as dpo.main computes it: the pair's rows picked out of the batch.
    Returns the loss, dJ/dlogπ for every row of the toy (rows in no pair get zero), the pairs and the stats."""
    new, _, ref, mask, rewards = toy()
    pairs = dpo.preference_pairs(rewards, 4)
    rows = pairs.flatten()
    loss, stats = dpo.dpo_loss(new[rows], ref[rows], mask[rows], beta, num_pairs)
    return (*value_and_dj(loss, new), pairs, stats)


# -----------------------------------------------------------------------------
# the spec's vector


def test_spec_vector():
    # R = [1, 0, 0, 1] -> chosen o1, rejected o2 (first index among ties on both sides); β = 0.1;
    # Σ new - Σ ref = +0.4 (o1), -0.1 (o2), margin 0.5: loss = -log σ(0.05) = 0.668460
    loss, g, pairs, stats = toy_pair_loss()
    assert pairs.tolist() == [[0, 1]]
    assert loss == pytest.approx(0.668460, abs=1e-6)
    want = [[0.048750] * 2, [-0.048750] * 3, [0.0], [0.0] * 2]  # β σ(-0.05) on every token of o1, minus on o2
    for i, row in enumerate(want):
        assert g[i, :len(row)].tolist() == pytest.approx(row, abs=1e-6)
        assert g[i, len(row):].abs().sum() == 0  # padding gets no gradient
    assert torch.equal(g[2:], torch.zeros_like(g[2:]))  # o3, o4: no pair, exactly no gradient
    s = {k: (v[0] / v[1]).item() for k, v in stats.items()}
    assert s["implicit_margin"] == pytest.approx(0.05, abs=1e-12)  # β (0.4 - (-0.1))
    assert s["implicit_accuracy"] == 1.0
    assert s["implicit_reward_chosen"] == pytest.approx(0.04, abs=1e-12)
    assert s["implicit_reward_rejected"] == pytest.approx(-0.01, abs=1e-12)


def test_normaliser_is_the_number_of_pairs_given():
    # the same pair counted as one of 4 pairs of the mini-batch (other ranks hold the rest): a quarter of it all
    loss, g, _, _ = toy_pair_loss(num_pairs=4)
    assert loss == pytest.approx(0.668460 / 4, abs=1e-6)
    assert g[0, 0].item() == pytest.approx(0.048750 / 4, abs=1e-6)


# -----------------------------------------------------------------------------
# pair selection


def test_pairs_ties_go_to_the_first_index_and_equal_groups_give_none():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0,      # toy: chosen 0 (not 3), rejected 1 (not 2)
                            1.1, 1.1, 1.1, 1.1,      # all equal: no pair
                            0.0, 1.1, 1.1, 0.1,      # chosen 9 (not 10), rejected 8
                            0.1, 0.1, 0.0, 0.0,      # chosen 12 (not 13), rejected 14 (not 15)
                            0.0, 0.0, 0.0, 0.0])     # all equal: no pair
    assert dpo.preference_pairs(rewards, 4).tolist() == [[0, 1], [9, 8], [12, 14]]
    assert dpo.preference_pairs(torch.ones(8), 4).shape == (0, 2)  # no spread anywhere: an empty (0, 2)
    assert dpo.preference_pairs(torch.tensor([0.0, 1.0, 1.0, 1.0]), 2).tolist() == [[1, 0]]  # G = 2


def independent_pairs(rewards, G):
    """Pairs with python lists: list.index finds the first maximum and the first minimum."""
    out = []
    for g in range(len(rewards) // G):
        R = rewards[g * G:(g + 1) * G]
        if max(R) - min(R) > 1e-6:
            out.append([g * G + R.index(max(R)), g * G + R.index(min(R))])
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pairs_against_independent_selection(seed):
    g = torch.Generator().manual_seed(seed)
    G = 8
    rewards = (torch.randint(0, 2, (12 * G,), generator=g) + 0.1 * torch.randint(0, 2, (12 * G,), generator=g))
    rewards[:G] = 1.1  # one all-equal group at least
    want = independent_pairs(rewards.tolist(), G)
    assert dpo.preference_pairs(rewards, G).tolist() == want
    assert 0 < len(want) < 12


# -----------------------------------------------------------------------------
# the loss against an independent computation


def independent_loss(new, ref, pairs, beta, num_pairs):
    """L with python floats, straight from eq. 7: sequence log-probs are sums over each completion's tokens."""
    L = 0.0
    for w, l in pairs:
        d_w = sum(n - r for n, r in zip(new[w], ref[w]))
        d_l = sum(n - r for n, r in zip(new[l], ref[l]))
        L += math.log1p(math.exp(-beta * (d_w - d_l)))  # -log σ(x) = log(1 + e^-x)
    return L / num_pairs


def random_batch(seed, groups=5, G=4):
    g = torch.Generator().manual_seed(seed)
    lens = [int(x) for x in torch.randint(1, 7, (groups * G,), generator=g)]
    new = [(torch.randn(n, generator=g, dtype=torch.float64) * 0.5 - 1).tolist() for n in lens]
    ref = [[x + 0.4 * float(torch.randn(1, generator=g)) for x in row] for row in new]
    rewards = torch.randint(0, 3, (groups * G,), generator=g).double() / 2
    return new, ref, rewards


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_independent_computation_and_finite_differences(seed):
    new, ref, rewards = random_batch(seed)
    pairs = dpo.preference_pairs(rewards, 4)
    assert len(pairs) >= 2
    n_t, mask = padded(new, fill=-7.0)
    n_t.requires_grad_(True)
    r_t = padded(ref, fill=-5.0)[0]
    N, beta = len(pairs) + 3, 0.5  # as if other ranks held 3 more pairs of the mini-batch
    rows = pairs.flatten()
    loss, _ = dpo.dpo_loss(n_t[rows], r_t[rows], mask[rows], beta, N)
    P = pairs.tolist()
    assert loss.item() == pytest.approx(independent_loss(new, ref, P, beta, N), abs=1e-12)
    loss.backward()
    h = 1e-6  # central finite differences of the independent L, every token of every row
    for i in range(len(new)):
        for t in range(len(new[i])):
            up = [row[:] for row in new]; up[i][t] += h
            dn = [row[:] for row in new]; dn[i][t] -= h
            fd = (independent_loss(up, ref, P, beta, N) - independent_loss(dn, ref, P, beta, N)) / (2 * h)
            assert n_t.grad[i, t].item() == pytest.approx(fd, abs=1e-7)
        # no per-token credit: every token of a completion gets the same coefficient
        assert torch.allclose(n_t.grad[i, :len(new[i])], n_t.grad[i, :1].expand(len(new[i])), atol=1e-15)
        assert n_t.grad[i, len(new[i]):].abs().sum() == 0


def test_micro_batches_and_ranks_add_up_to_the_mini_batch_loss():
    # num_pairs is the mini-batch's pair count over all ranks, so per-micro-batch (or per-rank) losses and
    # gradients sum to the whole mini-batch's; dividing each by its own pair count would not
    new, ref, rewards = random_batch(0)
    n_t, mask = padded(new)
    r_t = padded(ref)[0]
    pairs = dpo.preference_pairs(rewards, 4)
    N = len(pairs)

    def part(p, num_pairs):
        x = n_t.clone().requires_grad_(True)
        rows = p.flatten()
        loss, _ = dpo.dpo_loss(x[rows], r_t[rows], mask[rows], 0.1, num_pairs)
        loss.backward()
        return loss.item(), x.grad

    full, g_full = part(pairs, N)
    a, g_a = part(pairs[:1], N)
    b, g_b = part(pairs[1:], N)
    assert a + b == pytest.approx(full, abs=1e-12)
    assert torch.allclose(g_a + g_b, g_full, atol=1e-12)
    assert torch.allclose((2 * g_a + 2 * g_b) / 2, g_full, atol=1e-12)  # loss * world_size, then DDP's mean
    local, _ = part(pairs[:1], 1)
    assert local + b != pytest.approx(full, abs=1e-3)


def test_beta_must_be_positive_and_there_is_no_clip():
    with pytest.raises(config.UserError, match=r"--beta=0.0 is out of range: it must be in \(0, inf\)"):
        config.parse(dpo.Config, ["--beta=0"], tiny=dpo.TINY)
    with pytest.raises(config.UserError, match="unknown config key --clip_eps"):
        config.parse(dpo.Config, ["--clip_eps=0.2"], tiny=dpo.TINY)
    assert config.parse(dpo.Config, ["--tiny"], tiny=dpo.TINY).beta == 0.1


# -----------------------------------------------------------------------------
# end to end

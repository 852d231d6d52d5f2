"""GDPO (gdpo.py) against the spec's vectors (ALGORITHMS.md section 11.5: TRL's normalize_then_sum = the authors'
code, run as they are), an independent computation, the reason for decoupling (GRPO's summed reward maps
different reward mixes to one advantage), the global batch over ranks, and short runs."""
import statistics

import pytest
import torch

import gdpo
import grpo
from helpers import ADV11, F64

CORRECT = ADV11["R"][:8]                         # the spec's q1, q2
FORMAT = [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0]


def test_spec_vector_matches_trl_and_the_authors():
    adv = gdpo.group_advantages(torch.tensor([CORRECT, FORMAT], dtype=F64), [1.0, 1.0], 4)
    want = [1.52741, 0, -1.52741, 0, -0.763704, 0.763704, -0.763704, 0.763704]
    assert adv.tolist() == pytest.approx(want, abs=1e-5)


def independent(parts, weights, G, eps=1e-4):
    """The authors' normalize_then_sum with python floats: statistics.stdev is the sample std."""
    B = len(parts[0])
    total = [0.0] * B
    for w, r in zip(weights, parts):
        for g in range(0, B, G):
            grp = r[g:g + G]
            m, s = statistics.mean(grp), statistics.stdev(grp)
            for i in range(G):
                total[g + i] += w * (grp[i] - m) / (s + eps)
    m, s = statistics.mean(total), statistics.stdev(total)
    return [(a - m) / (s + eps) for a in total]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_an_independent_computation(seed):
    g = torch.Generator().manual_seed(seed)
    parts = torch.randint(0, 2, (2, 24), generator=g).to(F64)
    weights = [1.0, float(torch.rand(1, generator=g))]
    adv = gdpo.group_advantages(parts, weights, 6)
    assert adv.tolist() == pytest.approx(independent(parts.tolist(), weights, 6), abs=1e-12)


def test_decoupling_keeps_reward_mixes_apart_where_the_sum_does_not():
    # one group of (correct, formatted): (1, 0), (0, 1), (1, 0), (0, 0). GRPO on the summed reward gives the first
    # three the same advantage: right-but-unformatted and wrong-but-formatted look alike. GDPO keeps them apart, and
    # the rarer success earns more: format is earned 1 time in 4, correctness 2 times
    parts = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]], dtype=F64)  # sums: 1, 1, 1, 0
    summed = grpo.group_advantages(parts.sum(0), 4)
    assert summed[0] == summed[1] == summed[2] > 0 > summed[3]
    adv = gdpo.group_advantages(parts, [1.0, 1.0], 4)
    assert adv[1] > adv[0] == adv[2] > 0 > adv[3]
    assert adv.tolist() == pytest.approx(independent(parts.tolist(), [1.0, 1.0], 4), abs=1e-12)


def test_weights_scale_a_rewards_share_and_zero_weight_drops_it():
    parts = torch.tensor([CORRECT, FORMAT], dtype=F64)
    only_correct = gdpo.group_advantages(parts, [1.0, 0.0], 4)
    alone = gdpo.group_advantages(parts[:1], [1.0], 4)
    torch.testing.assert_close(only_correct, alone, atol=1e-15, rtol=0)
    assert abs(only_correct.mean()) < 1e-12 and only_correct.std().item() == pytest.approx(1.0, abs=1e-3)


def test_config_defaults():
    cfg = gdpo.Config()
    assert (cfg.format_weight, cfg.beta, cfg.group_size, cfg.clip_eps) == (1.0, 0.04, 8, 0.2)

"""DAPO (dapo.py): the spec's test vectors (ALGORITHMS.md §2(i)), independent re-computations,
dynamic sampling across ranks, and smoke runs of the trainer (1 process and 2 gloo processes)."""
import math

import pytest
import torch

from grpo_family import gsm8k, loading, logprobs, rollout, tiny
import dapo
from helpers import F64, NEW, REF, REWARDS, padded, single_process, toy, value_and_dj

SPEC_ADV = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=F64)  # population std of R = [1, 0, 0, 1]
# the k3 KL per token of the shared toy (ALGORITHMS.md §1(i)); DAPO has no KL by default (β = 0)
SPEC_KL = [[0.018731, 0.018731], [0.148721, 0.004837, 0.040818], [0.040818], [0.005171, 0.106531]]
# dJ/dlogπ of DAPO on the toy (ALGORITHMS.md §2(i)): every token over the batch's 8 tokens
SPEC_DJ = [[0.138146, 0.0], [0.0, -0.125, -0.152675], [-0.152675], [0.102341, 0.0]]


def toy_loss(advantages, clip_eps_high=0.28, beta=0.0):
    """DAPO loss on the spec's toy (the batch's own 8 tokens), dJ/dlogπ per token, the mask and the stats."""
    new, old, ref, mask, _ = toy()
    loss, stats = dapo.policy_loss(new, old, ref, advantages, mask, 0.2, clip_eps_high, beta, mask.sum())
    return (*value_and_dj(loss, new), mask, stats)


# -----------------------------------------------------------------------------
# the spec's vectors


def test_toy_advantages_are_plus_minus_one():
    adv = dapo.group_advantages(torch.tensor(REWARDS, dtype=F64), 4)
    assert torch.allclose(adv, SPEC_ADV)


def test_toy_loss_and_gradient():
    loss, dj, mask, stats = toy_loss(SPEC_ADV)
    assert loss == pytest.approx(-0.030137, abs=1e-6)  # J = 0.241096 / 8 tokens
    expected, _ = padded(SPEC_DJ)
    assert torch.allclose(dj, expected, atol=1e-6)
    assert torch.all(dj[mask == 0] == 0)
    # the clipped tokens: o1 t2 and o4 t2 (ρ = 1.35 > 1.28, Â > 0), o2 t1 (ρ = 0.74 < 0.8, Â < 0)
    assert stats["clip_frac"][0].item() == 3 and stats["clip_frac"][1].item() == 8
    assert stats["clip_frac_high"][0].item() == 2
    assert stats["kl"][0].item() == 0  # β = 0: no KL term


def test_toy_loss_with_trl_and_verl_advantages():
    s = math.sqrt(1 / 3)  # sample std of [1, 0, 0, 1]
    for eps, expected in [(1e-4, -0.026095), (1e-6, -0.026099)]:
        a = 0.5 / (s + eps)
        loss, *_ = toy_loss(torch.tensor([a, -a, -a, a], dtype=F64))
        assert loss == pytest.approx(expected, abs=1e-6)


def test_symmetric_clip_gives_the_spec_value():
    # ε_high = 0.2: the two tokens at ρ = 1.35 now clip at 1.2 instead of 1.28, J drops by 2 * 0.08 / 8
    loss, *_ = toy_loss(SPEC_ADV, clip_eps_high=0.2)
    assert loss == pytest.approx(-0.010137, abs=1e-6)


def test_toy_with_kl_adds_beta_k3_over_the_same_tokens():
    # β > 0 (not the paper's setting): the spec's k3 values (§1(i)) are summed over the 8 tokens and
    # divided by the same 8, and each token's gradient gains β (π_ref/π_θ - 1) / 8
    beta = 0.04
    loss, dj, mask, stats = toy_loss(SPEC_ADV, beta=beta)
    kl_sum = sum(sum(row) for row in SPEC_KL)
    assert loss == pytest.approx(-0.030137 + beta * kl_sum / 8, abs=1e-6)
    assert stats["kl"][0].item() == pytest.approx(kl_sum, abs=1e-5) and stats["kl"][1].item() == 8
    for i, (n_i, r_i) in enumerate(zip(NEW, REF)):
        for t, (n, r) in enumerate(zip(n_i, r_i)):
            assert dj[i, t].item() == pytest.approx(SPEC_DJ[i][t] + beta * (math.exp(r - n) - 1) / 8, abs=1e-6)
    assert torch.all(dj[mask == 0] == 0)


def test_soft_overlong_punishment_table():
    lengths = torch.tensor([16000, 16384, 16385, 18432, 20480, 20481, 30000])
    got = dapo.overlong_penalty(lengths, 20480, 4096)
    expected = torch.tensor([0.0, 0.0, -0.000244, -0.5, -1.0, -1.0, -1.0])
    assert torch.allclose(got, expected, atol=1e-6)


def test_dynamic_sampling_case():
    rewards = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 1, -1, 1, -1, -1], dtype=torch.float)
    assert dapo.keep_groups(rewards, 4).tolist() == [False, False, True, True]
    # singleton groups always have Â = 0, so they are dropped (verl keeps them)
    assert not dapo.keep_groups(torch.tensor([1.0, 0.0, 1.0]), 1).any()


def test_signed_correctness_is_eq7():
    assert dapo.signed_correctness("3+4=7\n#### 7", "#### 7") == 1.0
    assert dapo.signed_correctness("3+4=7\n#### 8", "#### 7") == -1.0
    assert dapo.signed_correctness("no answer", "#### 7") == -1.0


# -----------------------------------------------------------------------------
# independent computations (explicit loops) on random inputs


def loop_loss_and_coeffs(new, old, ref, adv, lengths, lo, hi, beta):
    """-J and dJ/dlogπ per token, token by token in python floats (ref is read only when beta > 0)."""
    N = sum(lengths)
    J, coeff = 0.0, {}
    for i, L in enumerate(lengths):
        for t in range(L):
            rho = math.exp(new[i][t] - old[i][t])
            a = adv[i]
            unclipped, clipped = rho * a, min(max(rho, 1 - lo), 1 + hi) * a
            J += min(unclipped, clipped)
            active = (a > 0 and rho < 1 + hi) or (a < 0 and rho > 1 - lo)
            coeff[i, t] = rho * a / N if active else 0.0
            if beta > 0:  # - β k3, k3 = π_ref/π_θ - log(π_ref/π_θ) - 1; d(-β k3)/dlogπ = β (π_ref/π_θ - 1)
                log_r = ref[i][t] - new[i][t]
                J -= beta * (math.exp(log_r) - log_r - 1)
                coeff[i, t] += beta * (math.exp(log_r) - 1) / N
    return -J / N, coeff


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradient_match_explicit_loops(beta):
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        B, T = 6, 9
        lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()
        old = -torch.rand(B, T, generator=g, dtype=F64) * 3
        new = old + 0.5 * torch.randn(B, T, generator=g, dtype=F64)
        ref = new + 0.4 * torch.randn(B, T, generator=g, dtype=F64)
        adv = torch.randn(B, generator=g, dtype=F64)
        mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
        lo, hi = 0.2, 0.28
        x = new.clone().requires_grad_(True)
        # β = 0 is the trainer's call: no reference model, so no reference log-probs
        loss, _ = dapo.policy_loss(x, old, ref if beta > 0 else None, adv, mask, lo, hi, beta, mask.sum())
        loss.backward()
        ref_loss, coeff = loop_loss_and_coeffs(new.tolist(), old.tolist(), ref.tolist(), adv.tolist(), lengths,
                                               lo, hi, beta)
        assert loss.item() == pytest.approx(ref_loss, rel=1e-10, abs=1e-12)
        for (i, t), c in coeff.items():
            assert -x.grad[i, t].item() == pytest.approx(c, rel=1e-9, abs=1e-12)
        assert torch.all(x.grad[mask == 0] == 0)


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_micro_batches_with_the_global_token_count_add_up_to_the_batch_loss(beta):
    # the trainer's gradient accumulation: each micro-batch divides by the mini-batch's token count
    g = torch.Generator().manual_seed(1)
    B, T = 8, 7
    lengths = torch.tensor([1, 7, 2, 7, 3, 5, 1, 6])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    old = -torch.rand(B, T, generator=g, dtype=F64)
    new = old + 0.4 * torch.randn(B, T, generator=g, dtype=F64)
    ref = new + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, generator=g, dtype=F64)
    x = new.clone().requires_grad_(True)
    full, _ = dapo.policy_loss(x, old, ref, adv, mask, 0.2, 0.28, beta, mask.sum())
    full.backward()
    y = new.clone().requires_grad_(True)
    total = 0.0
    for ix in torch.arange(B).split(3):
        part, _ = dapo.policy_loss(y[ix], old[ix], ref[ix], adv[ix], mask[ix], 0.2, 0.28, beta, mask.sum())
        part.backward()
        total += part.item()
    assert total == pytest.approx(full.item(), rel=1e-12)
    assert torch.allclose(x.grad, y.grad, rtol=1e-12, atol=1e-15)
    # and this is not what the per-sequence GRPO mean gives on unequal lengths
    ratio, log_r = torch.exp(new - old), ref - new
    per_token = (torch.min(ratio * adv[:, None], torch.clamp(ratio, 0.8, 1.28) * adv[:, None])
                 - beta * (torch.exp(log_r) - log_r - 1))
    per_seq = -(per_token * mask).sum(1) / lengths
    assert abs(per_seq.mean().item() - full.item()) > 1e-3


def test_overlong_penalty_matches_piecewise_definition():
    L_max, L_cache = 300, 60
    lengths = torch.arange(0, 320)
    got = dapo.overlong_penalty(lengths, L_max, L_cache).tolist()
    for y, r in zip(lengths.tolist(), got):
        if y <= L_max - L_cache:
            want = 0.0
        elif y <= L_max:
            want = ((L_max - L_cache) - y) / L_cache
        else:
            want = -1.0
        assert r == pytest.approx(want, abs=1e-6)


def test_overlong_penalty_is_float32_for_integer_and_float32_lengths():
    # the trainer passes Rollout.lengths (int64) and adds the result to float32 rewards
    for dtype in (torch.int64, torch.float32):
        got = dapo.overlong_penalty(torch.tensor([10, 25, 31], dtype=dtype), 30, 8)
        assert got.dtype == torch.float32 and got.tolist() == [0.0, -0.375, -1.0]


def test_overlong_penalty_keeps_float64():
    got = dapo.overlong_penalty(torch.tensor([10.0, 25.0, 31.0], dtype=F64), 30, 8)
    assert got.dtype == F64 and got.tolist() == [0.0, -0.375, -1.0]


def test_keep_groups_matches_a_loop():
    g = torch.Generator().manual_seed(2)
    values = torch.randint(0, 2, (40 * 4,), generator=g).float()
    keep = dapo.keep_groups(values, 4).tolist()
    groups = values.view(-1, 4).tolist()
    assert keep == [len(set(v)) > 1 for v in groups]
    assert any(keep) and not all(keep)


# -----------------------------------------------------------------------------
# dynamic sampling plumbing: pooling rounds, padding, sharing over ranks


def round_rollout(tok, questions, completions, answers):
    """A Rollout of one prompt per entry of `completions` (strings), as rollout.sample packages it."""
    ids, mask = rollout.tokenize_prompts(tok, [gsm8k.build_prompt(tok, q, "") for q in questions], torch.device("cpu"))
    enc = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in completions]
    T = max(len(e) for e in enc)
    cids = torch.full((len(enc), T), tok.pad_token_id)
    for i, e in enumerate(enc):
        cids[i, :len(e)] = torch.tensor(e)
    r = rollout.make_rollout(tok, ids, mask, cids, [tok.eos_token_id])
    r.answers = answers
    return r


def two_rounds(tok):
    """Round 0: two prompts with G = 2 short completions each; round 1: one longer prompt, longer completions."""
    qs = [p["question"] for p in tiny.dataset("test")[:6]]
    r0 = round_rollout(tok, [qs[0], qs[0], qs[1], qs[1]], ["1", "22", "333", "4"], ["a0", "a0", "a1", "a1"])
    r1 = round_rollout(tok, [qs[5] + " and more words here"] * 2, ["5+5=10\n10+1=11\n#### 11", "6"], ["a5", "a5"])
    return r0, r1


def test_gather_kept_groups_orders_and_truncates(tiny_dir):
    tok = loading.tokenizer(tiny_dir)
    r0, r1 = two_rounds(tok)
    G = 2
    pool = [(torch.tensor([3, 0]), r0, torch.tensor([1.0, 2.0, 3.0, 4.0])),  # keys out of order on purpose
            (torch.tensor([16]), r1, torch.tensor([5.0, 6.0]))]
    r, rewards = dapo.gather_kept_groups(pool, 2, G, single_process())
    assert r.texts == ["333", "4", "1", "22"]  # key 0 first, then key 3; key 16 is beyond batch_prompts=2
    assert r.answers == ["a1", "a1", "a0", "a0"]  # the answers travel with their rows
    assert rewards.tolist() == [3.0, 4.0, 1.0, 2.0]
    assert r.pad_id == tok.pad_token_id
    r, rewards = dapo.gather_kept_groups(pool, 3, G, single_process())
    assert r.texts[-2:] == ["5+5=10\n10+1=11\n#### 11", "6"] and r.completion_ids.shape[1] == r1.completion_ids.shape[1]
    assert r.prompt_ids.shape[1] == r1.prompt_ids.shape[1] > r0.prompt_ids.shape[1]
    assert r.answers == ["a1", "a1", "a0", "a0", "a5", "a5"] and rewards.tolist()[-2:] == [5.0, 6.0]


def test_rollout_cat_of_different_widths_keeps_the_real_tokens_logprobs(tiny_dir):
    tok = loading.tokenizer(tiny_dir)
    r0, r1 = two_rounds(tok)
    r = rollout.Rollout.cat([r0, r1], torch.device("cpu"))
    P0, T0 = r0.prompt_ids.shape[1], r0.completion_ids.shape[1]
    P, T = r1.prompt_ids.shape[1], r1.completion_ids.shape[1]
    assert P > P0 and T > T0 and r.prompt_ids.shape == (6, P) and r.completion_ids.shape == (6, T)
    # r0's rows: prompts padded on the left, completions on the right, with pad tokens the masks leave out
    assert torch.equal(r.prompt_ids[:4, P - P0:], r0.prompt_ids) and torch.equal(r.prompt_mask[:4, P - P0:], r0.prompt_mask)
    assert (r.prompt_ids[:4, :P - P0] == tok.pad_token_id).all() and (r.prompt_mask[:4, :P - P0] == 0).all()
    assert torch.equal(r.completion_ids[:4, :T0], r0.completion_ids) and (r.completion_ids[:4, T0:] == tok.pad_token_id).all()
    assert (r.completion_mask[:4, T0:] == 0).all() and torch.equal(r.completion_mask[4:], r1.completion_mask)
    assert r.texts == r0.texts + r1.texts and r.answers == r0.answers + r1.answers
    assert torch.equal(r.lengths, torch.cat([r0.lengths, r1.lengths]))
    # extra left padding of prompts and right padding of completions leaves the log-probs unchanged
    policy = logprobs.Policy(loading.model(tiny_dir, torch.device("cpu"), F64)).eval()
    with torch.no_grad():
        lp_cat, _ = policy(r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
        lp0, _ = policy(r0.prompt_ids, r0.prompt_mask, r0.completion_ids, r0.completion_mask)
    for row in range(4):
        n = int(r0.completion_mask[row].sum())
        assert torch.allclose(lp_cat[row, :n], lp0[row, :n], atol=1e-9)


# -----------------------------------------------------------------------------
# the trainer


def test_config_keeps_the_paper_defaults():
    cfg = dapo.Config()
    assert (cfg.group_size, cfg.lr, cfg.warmup_steps) == (16, 1e-6, 20)
    assert (cfg.clip_eps_low, cfg.clip_eps_high) == (0.2, 0.28)
    assert cfg.dynamic_sampling and not cfg.overlong_filter and cfg.filter_metric == "accuracy"
    assert cfg.beta == 0.0  # no KL term, so no reference model is loaded

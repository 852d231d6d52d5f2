"""DAPO (dapo.py): the spec's test vectors (ALGORITHMS.md §2(i)), independent re-computations,
dynamic sampling across ranks, and smoke runs of the trainer (1 process and 2 gloo processes)."""
import json
import math
import subprocess
import sys

import pytest
import torch

import common
import tiny
import gsm8k
import dapo
from conftest import ROOT, run, torchrun

# the shared toy batch of ALGORITHMS.md §0.3 (G = 4, R = [1, 0, 0, 1])
OLD = [[-1.0, -0.5], [-1.2, -0.8, -2.0], [-0.3], [-2.0, -1.0]]
NEW = [[-0.9, -0.2], [-1.5, -0.8, -1.8], [-0.1], [-2.2, -0.7]]
REWARDS = [1.0, 0.0, 0.0, 1.0]


def padded(rows):
    """(B, T) float64 tensor and mask from ragged rows."""
    T = max(len(x) for x in rows)
    t = torch.zeros(len(rows), T, dtype=torch.float64)
    m = torch.zeros(len(rows), T, dtype=torch.long)
    for i, x in enumerate(rows):
        t[i, :len(x)] = torch.tensor(x, dtype=torch.float64)
        m[i, :len(x)] = 1
    return t, m


def toy_loss(advantages, clip_eps_high=0.28):
    new, mask = padded(NEW)
    old, _ = padded(OLD)
    new.requires_grad_(True)
    loss, stats = dapo.policy_loss(new, old, advantages, mask, 0.2, clip_eps_high)
    loss.backward()
    return loss.item(), new.grad, mask, stats


# -----------------------------------------------------------------------------
# the spec's vectors


def test_toy_advantages_are_plus_minus_one():
    adv = dapo.group_advantages(torch.tensor(REWARDS, dtype=torch.float64), 4)
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))


def test_toy_loss_and_gradient():
    loss, grad, mask, stats = toy_loss(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))
    assert loss == pytest.approx(-0.030137, abs=1e-6)  # J = 0.241096 / 8 tokens
    dJ = [[0.138146, 0.0], [0.0, -0.125, -0.152675], [-0.152675], [0.102341, 0.0]]
    expected, _ = padded(dJ)
    assert torch.allclose(-grad, expected, atol=1e-6)
    assert torch.all(grad[mask == 0] == 0)
    # the clipped tokens: o1 t2 and o4 t2 (ρ = 1.35 > 1.28, Â > 0), o2 t1 (ρ = 0.74 < 0.8, Â < 0)
    assert stats["clip_frac"][0].item() == 3 and stats["clip_frac"][1].item() == 8
    assert stats["clip_frac_high"][0].item() == 2


def test_toy_loss_with_trl_and_verl_advantages():
    s = math.sqrt(1 / 3)  # sample std of [1, 0, 0, 1]
    for eps, expected in [(1e-4, -0.026095), (1e-6, -0.026099)]:
        a = 0.5 / (s + eps)
        loss, *_ = toy_loss(torch.tensor([a, -a, -a, a], dtype=torch.float64))
        assert loss == pytest.approx(expected, abs=1e-6)


def test_symmetric_clip_gives_the_spec_value():
    # ε_high = 0.2: the two tokens at ρ = 1.35 now clip at 1.2 instead of 1.28, J drops by 2 * 0.08 / 8
    loss, *_ = toy_loss(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64), clip_eps_high=0.2)
    assert loss == pytest.approx(-0.010137, abs=1e-6)


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


def loop_loss_and_coeffs(new, old, adv, lengths, lo, hi):
    """-J and dJ/dlogπ per token, token by token in python floats."""
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
    return -J / N, coeff


def test_loss_and_gradient_match_explicit_loops():
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        B, T = 6, 9
        lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()
        old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
        new = old + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
        adv = torch.randn(B, generator=g, dtype=torch.float64)
        mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
        lo, hi = 0.2, 0.28
        x = new.clone().requires_grad_(True)
        loss, _ = dapo.policy_loss(x, old, adv, mask, lo, hi)
        loss.backward()
        ref_loss, coeff = loop_loss_and_coeffs(new.tolist(), old.tolist(), adv.tolist(), lengths, lo, hi)
        assert loss.item() == pytest.approx(ref_loss, rel=1e-10, abs=1e-12)
        for (i, t), c in coeff.items():
            assert -x.grad[i, t].item() == pytest.approx(c, rel=1e-9, abs=1e-12)
        assert torch.all(x.grad[mask == 0] == 0)


def test_micro_batches_with_the_global_token_count_add_up_to_the_batch_loss():
    # the trainer's gradient accumulation: each micro-batch divides by the mini-batch's token count
    g = torch.Generator().manual_seed(1)
    B, T = 8, 7
    lengths = torch.tensor([1, 7, 2, 7, 3, 5, 1, 6])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    old = -torch.rand(B, T, generator=g, dtype=torch.float64)
    new = old + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    x = new.clone().requires_grad_(True)
    full, _ = dapo.policy_loss(x, old, adv, mask, 0.2, 0.28)
    full.backward()
    y = new.clone().requires_grad_(True)
    total = 0.0
    for ix in torch.arange(B).split(3):
        part, _ = dapo.policy_loss(y[ix], old[ix], adv[ix], mask[ix], 0.2, 0.28, mask.sum())
        part.backward()
        total += part.item()
    assert total == pytest.approx(full.item(), rel=1e-12)
    assert torch.allclose(x.grad, y.grad, rtol=1e-12, atol=1e-15)
    # and this is not what the per-sequence GRPO mean gives on unequal lengths
    per_seq = -(torch.min(torch.exp(new - old) * adv[:, None],
                          torch.clamp(torch.exp(new - old), 0.8, 1.28) * adv[:, None]) * mask).sum(1) / lengths
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


def test_keep_groups_matches_a_loop():
    g = torch.Generator().manual_seed(2)
    values = torch.randint(0, 2, (40 * 4,), generator=g).float()
    keep = dapo.keep_groups(values, 4).tolist()
    groups = values.view(-1, 4).tolist()
    assert keep == [len(set(v)) > 1 for v in groups]
    assert any(keep) and not all(keep)


# -----------------------------------------------------------------------------
# dynamic sampling plumbing: pooling rounds, padding, sharing over ranks


def round_rollout(tok, questions, completions):
    """A Rollout of one prompt per entry of `completions` (strings), as common.generate packages it."""
    ids, mask = common.tokenize_prompts(tok, [gsm8k.build_prompt(tok, q, "") for q in questions], torch.device("cpu"))
    enc = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in completions]
    T = max(len(e) for e in enc)
    cids = torch.full((len(enc), T), tok.pad_token_id)
    for i, e in enumerate(enc):
        cids[i, :len(e)] = torch.tensor(e)
    return common.make_rollout(tok, ids, mask, cids, [tok.eos_token_id])


def test_gather_kept_groups_orders_truncates_and_keeps_logprobs(tiny_dir):
    tok = common.load_tokenizer(tiny_dir)
    qs = [p["question"] for p in tiny.dataset("test")[:6]]
    G = 2
    # round 0: two prompts (short completions), round 1: one prompt with long completions, long question
    r0 = round_rollout(tok, [qs[0], qs[0], qs[1], qs[1]], ["1", "22", "333", "4"])
    r1 = round_rollout(tok, [qs[5] + " and more words here", qs[5] + " and more words here"],
                       ["5+5=10\n10+1=11\n#### 11", "6"])
    pool = [(torch.tensor([3, 0]), r0, torch.tensor([1.0, 2.0, 3.0, 4.0])),  # keys out of order on purpose
            (torch.tensor([16]), r1, torch.tensor([5.0, 6.0]))]
    single = common.Dist(False, 0, 0, 1, torch.device("cpu"), True)
    r, rewards = dapo.gather_kept_groups(pool, 2, G, tok.pad_token_id, single)
    assert r.texts == ["333", "4", "1", "22"]  # key 0 first, then key 3; key 16 is beyond batch_prompts=2
    assert rewards.tolist() == [3.0, 4.0, 1.0, 2.0]
    r, rewards = dapo.gather_kept_groups(pool, 3, G, tok.pad_token_id, single)
    assert r.texts[-2:] == ["5+5=10\n10+1=11\n#### 11", "6"] and r.completion_ids.shape[1] == r1.completion_ids.shape[1]
    assert r.prompt_ids.shape[1] == r1.prompt_ids.shape[1] > r0.prompt_ids.shape[1]
    # extra left padding of prompts and right padding of completions leaves the log-probs unchanged
    policy = common.Policy(common.load_model(tiny_dir, torch.device("cpu"), torch.float64)).eval()
    with torch.no_grad():
        lp_pooled, _ = policy(r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
        lp0, _ = policy(r0.prompt_ids, r0.prompt_mask, r0.completion_ids, r0.completion_mask)
    for row_pooled, row0 in [(0, 2), (1, 3), (2, 0), (3, 1)]:
        n = int(r0.completion_mask[row0].sum())
        assert torch.allclose(lp_pooled[row_pooled, :n], lp0[row0, :n], atol=1e-9)
    with pytest.raises(RuntimeError, match="cannot fill batch_prompts=4"):
        dapo.gather_kept_groups(pool, 4, G, tok.pad_token_id, single)


def test_two_ranks_equal_one_process_and_survive_a_fully_filtered_rank(tiny_dir, tmp_path):
    out = tmp_path / "ddp.json"
    run(torchrun(2, "tests/ddp_dapo_check.py", str(out)), timeout=600)
    res = json.load(open(out))
    # rank 1's own groups were all filtered, yet both ranks train on 2 groups (8 completions)
    assert res["kept_own_rank0"] == 4 and res["kept_own_rank1"] == 0
    assert res["rows_rank0"] == res["rows_rank1"] == 8
    assert res["share_matches_rank0"] and res["share_matches_rank1"]
    # very unequal token counts per rank, and the clip acts on the stale old log-probs
    assert res["tokens_rank1"] > 3 * res["tokens_rank0"]
    assert res["clip_frac_first_minibatch"] > 0.05
    # the DDP update equals the single-process update; a per-rank token mean would not
    assert res["max_change"] > 1e-3
    assert res["ddp_vs_single"] < 1e-6
    assert res["naive_vs_single"] > 1e-4
    # too few kept groups over both ranks: the same clear error on both, no hang
    for rank in (0, 1):
        assert "cannot fill batch_prompts=8" in res[f"error_rank{rank}"]


# -----------------------------------------------------------------------------
# the trainer


def test_config_keeps_the_paper_defaults():
    cfg = dapo.Config()
    assert (cfg.group_size, cfg.lr, cfg.warmup_steps) == (16, 1e-6, 20)
    assert (cfg.clip_eps_low, cfg.clip_eps_high) == (0.2, 0.28)
    assert cfg.dynamic_sampling and not cfg.overlong_filter and cfg.filter_metric == "accuracy"
    assert not hasattr(cfg, "beta")  # no KL term, no reference model


def test_smoke_tiny(tiny_dir, tmp_path):
    p = run([sys.executable, "dapo.py", "--tiny", "--num_steps=2", "--eval_problems=8", f"--run_dir={tmp_path}"])
    assert "held-out greedy accuracy after RL" in p.stdout + p.stderr
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert 1 <= r["sampling_rounds"] <= 10 and r["prompts_sampled"] >= 16
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0 and "kl" not in r
        assert -1.0 <= r["overlong_penalty"] <= 0.0


def test_trains_under_torchrun_with_overlong_filter(tiny_dir, tmp_path):
    # dapo.py ends with common.check_replicas: it raises unless both ranks hold identical weights
    # and took the same number of optimizer steps
    run(torchrun(2, "dapo.py", "--tiny", "--num_steps=2", "--batch_prompts=4", "--group_size=4",
                 "--eval_problems=8", "--overlong_filter", f"--run_dir={tmp_path}"))
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["sampling_rounds"] >= 1 for r in rows[1:])


def test_all_groups_filtered_stops_both_ranks_with_a_clear_error(tiny_dir, tmp_path):
    # G = 1: every group has a single reward, so every group is filtered on every rank
    cmd = torchrun(2, "dapo.py", "--tiny", "--num_steps=1", "--batch_prompts=4", "--group_size=1",
                   "--max_sampling_rounds=2", "--eval_problems=2", f"--run_dir={tmp_path}")
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    msg = "dynamic sampling: only 0 of batch_prompts=4 groups kept after max_sampling_rounds=2 rounds (8 prompts)"
    # (torchrun stops the other rank once one fails, so this cannot show that both raised; the
    # gather in tests/ddp_dapo_check.py shows that: both ranks raise and then still exchange results)
    assert msg in p.stdout + p.stderr, (p.stdout + p.stderr)[-3000:]

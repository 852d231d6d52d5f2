"""Launched by test_dapo.py under `torchrun --nproc_per_node=2` (gloo). Checks, on fixed rollouts:

1. dynamic sampling when every group of rank 1 is filtered: gather_kept_groups still hands each
   rank batch_prompts / 2 groups (no hang), the first kept groups in global prompt order;
2. one DAPO update (2 mini-batches = 2 optimizer steps, uneven micro-batches, stale old log-probs so
   the clip acts) under DDP, with very unequal token counts on the two ranks, equals the
   single-process update on the whole batch; a per-rank token mean (the naive normaliser) does not.
Rank 0 writes the measurements to the JSON file named by argv[1]; test_dapo.py asserts on them.
(Not conftest.ddp_setup: the ranks need rollouts of their own, and the model runs in float64.)
"""
import json
import os
import sys
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import ddp_copies, ddp_finish, single_process  # noqa: E402
from grpo_family import config, distributed, gsm8k, loading, logprobs, rollout, tiny
import dapo  # noqa: E402

G, BATCH_PROMPTS, MICRO, L_MAX, L_CACHE = 4, 4, 3, 24, 6
# per rank, per group: correctness of the G completions, and the completion length range
CORRECT = {0: [[1, 0, 0, 1], [0, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 1]],
           1: [[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]}   # rank 1: every group filtered
LENGTHS = {0: (2, 4), 1: (16, 24)}  # rank-0 groups 0 and 2 short, 1 and 3 long (see group_len)


def group_len(rank, j):
    """Rank 0's even groups are short and odd ones long, so after the gather rank 0 trains on short
    completions and rank 1 on long ones: very unequal token counts."""
    return LENGTHS[0] if (rank == 0 and j % 2 == 0) else LENGTHS[1]


def fake_round(tok, rank):
    """One sampling round of rank `rank`: (keys, Rollout, rewards) of its kept groups, as dapo.main builds."""
    gen = torch.Generator().manual_seed(1000 + rank)
    problems = tiny.dataset("train")[rank * BATCH_PROMPTS:(rank + 1) * BATCH_PROMPTS]
    ids, mask = rollout.tokenize_prompts(tok, [gsm8k.build_prompt(tok, p["question"], "") for p in problems],
                                        torch.device("cpu"))
    ids, mask = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
    rows = []
    for j in range(BATCH_PROMPTS):
        lo, hi = group_len(rank, j)
        for _ in range(G):
            n = int(torch.randint(lo, hi + 1, (1,), generator=gen))
            rows.append(torch.randint(3, 99, (n,), generator=gen).tolist() + [tok.eos_token_id])
    T = max(len(x) for x in rows)
    cids = torch.full((len(rows), T), tok.pad_token_id)
    for i, x in enumerate(rows):
        cids[i, :len(x)] = torch.tensor(x)
    r = rollout.make_rollout(tok, ids, mask, cids, [tok.eos_token_id])
    r.answers = [p["answer"] for p in problems for _ in range(G)]
    correct = torch.tensor(CORRECT[rank], dtype=torch.float).view(-1)
    rewards = 2 * correct - 1 + dapo.overlong_penalty(r.lengths, L_MAX, L_CACHE)
    kept = dapo.keep_groups(correct, G).nonzero().view(-1)
    keys = kept * 2 + rank                     # round 0: position j * world_size + rank of the stream
    sel = (kept[:, None] * G + torch.arange(G)).view(-1)
    return keys, r.select(sel), rewards[sel]


def stale_old_logp(model, r):
    """Old log-probs that differ from the current ones by a deterministic function of the tokens,
    so ratios leave [1 - ε_low, 1 + ε_high] on some tokens and the clip acts."""
    with torch.no_grad():
        logp, _ = model(r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    return logp + 0.4 * torch.sin(1.7 * r.completion_ids.double())


def update(policy, r, old_logp, advantages, minibatches, d, naive=False):
    """Step 6 of dapo.main (β = 0) on fixed mini-batches (naive: per-rank token mean, DDP-averaged)."""
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0)
    mask = r.completion_mask
    for mb in minibatches:
        num_tokens = distributed.all_reduce_sum(mask[mb].sum().float(), d).clamp_min(1)
        micro = mb.split(MICRO)
        for k, ix in enumerate(micro):
            sync = nullcontext() if (not d.ddp or k == len(micro) - 1) else policy.no_sync()
            with sync:
                logp, _ = policy(r.prompt_ids[ix], r.prompt_mask[ix], r.completion_ids[ix], mask[ix])
                if naive:
                    loss, _ = dapo.policy_loss(logp, old_logp[ix], None, advantages[ix], mask[ix], 0.2, 0.28, 0.0,
                                               mask[mb].sum())
                    loss.backward()
                else:
                    loss, _ = dapo.policy_loss(logp, old_logp[ix], None, advantages[ix], mask[ix], 0.2, 0.28, 0.0,
                                               num_tokens)
                    (loss * d.world_size).backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def main():
    out_path = sys.argv[1]
    d = distributed.setup()
    assert d.ddp and d.world_size == 2, "run me with torchrun --nproc_per_node=2"
    path = tiny.ensure_model(d, log=lambda *a: None)
    tok = loading.tokenizer(path)
    res = {}

    # 1. dynamic sampling: rank 1 kept nothing, yet gets its share
    mine = fake_round(tok, d.rank)
    res[f"kept_own_rank{d.rank}"] = len(mine[0])
    r, rewards = dapo.gather_kept_groups([mine], BATCH_PROMPTS, G, d)
    full, full_rewards = dapo.gather_kept_groups([fake_round(tok, 0), fake_round(tok, 1)], BATCH_PROMPTS, G,
                                                 single_process())  # what one process holds after the same rounds
    mine_rows = torch.cat([torch.arange(g * G, (g + 1) * G) for g in range(d.rank, BATCH_PROMPTS, 2)])
    res[f"rows_rank{d.rank}"] = len(r.texts)
    res[f"tokens_rank{d.rank}"] = int(r.completion_mask.sum())
    res[f"share_matches_rank{d.rank}"] = (r.texts == [full.texts[i] for i in mine_rows.tolist()]
                                          and r.answers == [full.answers[i] for i in mine_rows.tolist()]
                                          and torch.equal(rewards, full_rewards[mine_rows]))

    # 2. one DAPO update: DDP on the shares == one process on the whole batch
    # float64: Adam divides by sqrt(v) + 1e-8, which amplifies float32 rounding of near-zero gradients
    # (summed in a different order on 2 ranks) to ~1e-6 after a step; in float64 the match is ~1e-12
    base = logprobs.Policy(loading.model(path, d.device, torch.float64))
    old_logp, full_old_logp = stale_old_logp(base, r), stale_old_logp(base, full)
    adv, full_adv = dapo.group_advantages(rewards, G), dapo.group_advantages(full_rewards, G)
    half = len(r.texts) // 2
    local_mbs = [torch.arange(0, half), torch.arange(half, len(r.texts))]
    # mini-batch k of one process = the union of mini-batch k of both ranks
    single_mbs = [torch.cat([torch.cat([torch.arange(g * G, (g + 1) * G) for g in range(rk, BATCH_PROMPTS, 2)])[mb]
                             for rk in range(2)]) for mb in local_mbs]
    single, model = ddp_copies(base)
    update(single, full, full_old_logp, full_adv, single_mbs, single_process())
    update(model, r, old_logp, adv, local_mbs, d)
    _, naive = ddp_copies(base)
    update(naive, r, old_logp, adv, local_mbs, d, naive=True)

    def max_diff(a, b):
        return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))
    res.update(max_change=max_diff(single, base), ddp_vs_single=max_diff(model.module, single),
               naive_vs_single=max_diff(naive.module, single))
    with torch.no_grad():
        logp0, _ = base(full.prompt_ids, full.prompt_mask, full.completion_ids, full.completion_mask)
        _, stats = dapo.policy_loss(logp0, full_old_logp, None, full_adv, full.completion_mask, 0.2, 0.28, 0.0,
                                    full.completion_mask.sum())
    res["clip_frac_first_minibatch"] = (stats["clip_frac"][0] / stats["clip_frac"][1]).item()

    parts = distributed.all_gather_objects(res, d)
    if d.master_process:
        with open(out_path, "w") as f:
            json.dump({**parts[1], **parts[0]}, f, indent=1)
    ddp_finish(d, base, single, model)  # also checks the replicas agree, and tears down


if __name__ == "__main__":
    config.run(main)  # leaves through os._exit: no interpreter finalization under gloo

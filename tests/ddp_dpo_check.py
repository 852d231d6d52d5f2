"""Launched by test_dpo.py under `torchrun --nproc_per_node=2` (gloo): DPO's DDP update loop, as dpo.py
runs it, with the ranks holding different numbers of pairs, must equal the single-process update on all
the pairs. Each rank pairs its own half of a fixed batch (G = 2, two groups per rank); three rounds:

    A. rank 0 holds 2 pairs, rank 1 none: rank 1 forwards the stand-in at weight 0 in every mini-batch,
       and the third mini-batch, empty on both ranks, is skipped by both (3 mini-batches);
    B. 2 pairs against 1 in one mini-batch: 2 micro-batches on rank 0, 1 on rank 1;
    C. the same pairs in 2 mini-batches: rank 1 has none in the second one.
"""
import os
import sys
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import ddp_copies, ddp_finish, ddp_setup  # noqa: E402
from grpo_family import config, distributed
import dpo  # noqa: E402

ROUNDS = [([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0], 3),  # (rewards of the 8 rows, num_minibatches)
          ([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0], 1),
          ([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0], 2)]
G, BETA, LR = 2, 0.1, 0.1


def main():
    d, (ids, mask, cids, cmask), base, _, ref_logp = ddp_setup()
    B = ids.shape[0]
    single, model = ddp_copies(base)
    opt_single = torch.optim.SGD(single.parameters(), lr=LR)
    opt_ddp = torch.optim.SGD(model.parameters(), lr=LR)
    mine = slice(d.rank * B // 2, (d.rank + 1) * B // 2)  # this rank's rollout
    r_ids, r_mask, r_cids, r_cmask, r_ref = ids[mine], mask[mine], cids[mine], cmask[mine], ref_logp[mine]
    steps_single = steps_ddp = 0
    for rewards, num_minibatches in ROUNDS:
        rewards = torch.tensor(rewards)
        # single process: every pair of the whole batch; mini-batch m = the ranks' mini-batches m together
        halves = [dpo.preference_pairs(rewards[:B // 2], G), dpo.preference_pairs(rewards[B // 2:], G) + B // 2]
        for m in range(num_minibatches):
            mb = torch.cat([h.tensor_split(num_minibatches)[m] for h in halves])
            if len(mb) == 0:
                continue
            rows = mb.flatten()
            logp, _ = single(ids[rows], mask[rows], cids[rows], cmask[rows])
            dpo.dpo_loss(logp, ref_logp[rows], cmask[rows], BETA, len(mb))[0].backward()
            opt_single.step()
            opt_single.zero_grad(set_to_none=True)
            steps_single += 1

        # DDP, each rank its own pairs, as dpo.main's update loop (shuffling left out)
        pairs = dpo.preference_pairs(rewards[mine], G)
        counts = [torch.zeros(1) for _ in range(2)]
        torch.distributed.all_gather(counts, torch.tensor([float(len(pairs))]))
        assert counts[0].item() != counts[1].item(), "the check needs unequal pair counts per rank"
        for mb in pairs.tensor_split(num_minibatches):
            num_pairs = int(distributed.all_reduce_sum(torch.tensor(len(mb), device=d.device), d))
            if num_pairs == 0:
                continue
            w = float(len(mb) > 0)
            micro = (mb if w else pairs.new_zeros(1, 2)).split(1)  # one pair per micro-batch
            for k, ix in enumerate(micro):
                rows = ix.flatten()
                sync = nullcontext() if k == len(micro) - 1 else model.no_sync()  # the last one all-reduces
                with sync:
                    logp, _ = model(r_ids[rows], r_mask[rows], r_cids[rows], r_cmask[rows])
                    loss, _ = dpo.dpo_loss(logp, r_ref[rows], r_cmask[rows], BETA, num_pairs)
                    (loss * d.world_size * w).backward()  # DDP averages over ranks; the loss is a sum over them
            opt_ddp.step()
            opt_ddp.zero_grad(set_to_none=True)
            steps_ddp += 1
    assert steps_ddp == steps_single == 5, (steps_ddp, steps_single)  # A: 2 (one skipped), B: 1, C: 2
    ddp_finish(d, base, single, model)


if __name__ == "__main__":
    config.run(main)  # leaves through os._exit: no interpreter finalization under gloo

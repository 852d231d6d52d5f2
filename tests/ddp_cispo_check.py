"""Launched by test_cispo.py under `torchrun --nproc_per_node=2` (gloo): one CISPO update, with the token-level
normaliser counted over both ranks, on two shares of a fixed batch whose token counts differ a lot, must equal
the single-process update on the whole batch (cispo.main's step 6: all_reduce_sum of the token count, the
loss times the world size, two micro-batches with no_sync); a per-rank token mean must not.
Rank 0 writes the measurements to the JSON file named by argv[1]; test_cispo.py asserts on them."""
import json
import os
import sys
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import ddp_copies, ddp_finish, ddp_setup  # noqa: E402
from grpo_family import config, distributed
import cispo  # noqa: E402

EPS_LOW, EPS_HIGH, BETA = 1.0, 0.28, 0.04
# rows 0, 3 and 6 of conftest.ddp_batch are one-line answers: rank 0 gets them, rank 1 the long ones
SHARES = {0: [0, 3, 6, 1], 1: [2, 4, 5, 7]}


def update(policy, batch, old_logp, ref_logp, adv, rows, d, micro, naive=False):
    """Step 6 of cispo.main on `rows`, one optimizer step (SGD, lr 1) over micro-batches of `micro` rows."""
    ids, mask, cids, cmask = batch
    local = cmask[rows].sum().float()
    num_tokens = local if naive else distributed.all_reduce_sum(local.clone(), d).clamp_min(1)
    parts = torch.tensor(rows).split(micro)
    for k, ix in enumerate(parts):
        sync = nullcontext() if (not d.ddp or k == len(parts) - 1) else policy.no_sync()
        with sync:
            logp, _ = policy(ids[ix], mask[ix], cids[ix], cmask[ix])
            loss, _ = cispo.policy_loss(logp, old_logp[ix], ref_logp[ix], adv[ix], cmask[ix], EPS_LOW, EPS_HIGH,
                                        BETA, num_tokens)
            (loss if naive else loss * d.world_size).backward()
    torch.optim.SGD(policy.parameters(), lr=1.0).step()


def main():
    out_path = sys.argv[1]
    d, batch, base, old_logp, ref_logp = ddp_setup()
    adv = cispo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]), 4)
    single, model = ddp_copies(base)
    _, naive = ddp_copies(base)

    update(single, batch, old_logp, ref_logp, adv, list(range(8)), distributed.Dist(False, 0, 0, 1, d.device, True), 3)
    update(model, batch, old_logp, ref_logp, adv, SHARES[d.rank], d, 2)
    update(naive, batch, old_logp, ref_logp, adv, SHARES[d.rank], d, 2, naive=True)

    def max_diff(a, b):
        return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))
    with torch.no_grad():
        logp0, _ = base(*batch)
        _, stats = cispo.policy_loss(logp0, old_logp, ref_logp, adv, batch[3], EPS_LOW, EPS_HIGH, BETA, 1.0)
    res = {f"tokens_rank{d.rank}": int(batch[3][SHARES[d.rank]].sum()),
           "capped_frac": (stats["clip_frac"][0] / stats["clip_frac"][1]).item(),
           "max_change": max_diff(single, base), "ddp_vs_single": max_diff(model.module, single),
           "naive_vs_single": max_diff(naive.module, single)}
    parts = distributed.all_gather_objects(res, d)
    if d.master_process:
        with open(out_path, "w") as f:
            json.dump({**parts[1], **parts[0]}, f, indent=1)
    ddp_finish(d, base, single, model)  # asserts DDP == single process, checks the replicas, tears down


if __name__ == "__main__":
    config.run(main)  # leaves through os._exit: no interpreter finalization under gloo

"""Launched by test_gmpo.py under `torchrun --nproc_per_node=2` (gloo): one GMPO update (one geometric-mean term per
sequence, some tokens clipped) on two halves of a fixed batch must equal the single-process update on the
whole batch, with gmpo.main's step 6 micro-batch scaling (loss x len(ix) / len(mb))."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import ddp_copies, ddp_finish, ddp_setup  # noqa: E402
from grpo_family import config
import gmpo  # noqa: E402


def main():
    d, (ids, mask, cids, cmask), base, old_logp, ref_logp = ddp_setup()
    B = ids.shape[0]
    adv = gmpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]), 4)
    single, model = ddp_copies(base)

    # single process, whole batch, micro-batches of 3, 3, 2
    for ix in torch.arange(B).split(3):
        logp, _ = single(ids[ix], mask[ix], cids[ix], cmask[ix])
        (gmpo.policy_loss(logp, old_logp[ix], ref_logp[ix], adv[ix], cmask[ix], 0.4, 0.04)[0] * len(ix) / B).backward()
    torch.optim.SGD(single.parameters(), lr=1.0).step()

    # DDP, each rank half of the batch in one micro-batch
    half = slice(d.rank * B // 2, (d.rank + 1) * B // 2)
    logp, _ = model(ids[half], mask[half], cids[half], cmask[half])
    gmpo.policy_loss(logp, old_logp[half], ref_logp[half], adv[half], cmask[half], 0.4, 0.04)[0].backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    ddp_finish(d, base, single, model)


if __name__ == "__main__":
    config.run(main)  # leaves through os._exit: no interpreter finalization under gloo

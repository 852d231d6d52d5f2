"""Launched by test_ddp.py under `torchrun --nproc_per_node=2` (gloo): one DDP update of GRPO on two
halves of a fixed batch must equal the single-process update on the whole batch."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import ddp_copies, ddp_finish, ddp_setup  # noqa: E402
from grpo_family import config
import grpo  # noqa: E402


def main():
    d, (ids, mask, cids, cmask), base, old_logp, ref_logp = ddp_setup()
    B = ids.shape[0]
    adv = grpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]), 4)
    single, model = ddp_copies(base)

    # single process, whole batch
    logp, _ = single(ids, mask, cids, cmask)
    grpo.policy_loss(logp, old_logp, ref_logp, adv, cmask, 0.2, 0.04)[0].backward()
    torch.optim.SGD(single.parameters(), lr=1.0).step()

    # DDP, each rank half of the batch
    half = slice(d.rank * B // 2, (d.rank + 1) * B // 2)
    logp, _ = model(ids[half], mask[half], cids[half], cmask[half])
    grpo.policy_loss(logp, old_logp[half], ref_logp[half], adv[half], cmask[half], 0.2, 0.04)[0].backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    ddp_finish(d, base, single, model)


if __name__ == "__main__":
    config.run(main)  # leaves through os._exit: no interpreter finalization under gloo

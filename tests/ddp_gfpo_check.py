"""Launched by test_gfpo.py under `torchrun --nproc_per_node=2` (gloo): one DDP update of GFPO, each
rank forwarding only the retained rows of its half of a fixed batch (unequal retained-token counts),
must equal the single-process update on the retained rows of the whole batch."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import ddp_copies, ddp_finish, ddp_setup  # noqa: E402
from grpo_family import config, distributed
import gfpo  # noqa: E402


def main():
    d, (ids, mask, cids, cmask), base, old_logp, ref_logp = ddp_setup()
    B, G = ids.shape[0], 4
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    keep = torch.tensor([3, 2])  # prompt 0 on rank 0 keeps 3, prompt 1 on rank 1 keeps 2
    retained = gfpo.retain_mask(rewards, cmask.sum(1), keep, G, "length")
    adv = gfpo.filtered_advantages(rewards, retained, G)
    assert retained.view(2, G).sum(1).tolist() == [3, 2]
    single, model = ddp_copies(base)

    # single process, the retained rows of the whole batch, as gfpo.py trains
    kept = retained.nonzero()[:, 0]
    total = cmask[kept].sum().float()
    logp, _ = single(ids[kept], mask[kept], cids[kept], cmask[kept])
    gfpo.policy_loss(logp, old_logp[kept], ref_logp[kept], adv[kept], cmask[kept], 0.2, 0.04, total)[0].backward()
    torch.optim.SGD(single.parameters(), lr=1.0).step()

    # DDP, each rank the retained rows of its half, the normaliser all-reduced over ranks
    mine = torch.arange(d.rank * B // 2, (d.rank + 1) * B // 2)
    mine = mine[retained[mine]]
    num_tokens = distributed.all_reduce_sum(cmask[mine].sum().float(), d)
    counts = [torch.zeros(1) for _ in range(2)]
    torch.distributed.all_gather(counts, cmask[mine].sum().float().view(1))
    assert counts[0].item() != counts[1].item(), "the check needs unequal token counts per rank"
    assert num_tokens.item() == total.item()
    logp, _ = model(ids[mine], mask[mine], cids[mine], cmask[mine])
    loss, _ = gfpo.policy_loss(logp, old_logp[mine], ref_logp[mine], adv[mine], cmask[mine], 0.2, 0.04, num_tokens)
    (loss * d.world_size).backward()  # DDP averages over ranks; the loss is a sum over them
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    ddp_finish(d, base, single, model)


if __name__ == "__main__":
    config.run(main)  # leaves through os._exit: no interpreter finalization under gloo

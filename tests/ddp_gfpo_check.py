"""Launched by test_gfpo.py under `torchrun --nproc_per_node=2` (gloo): one DDP update of GFPO, each
rank forwarding only the retained rows of its half of a fixed batch (unequal retained-token counts),
must equal the single-process update on the whole batch with rejected rows masked."""
import copy
import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import tiny  # noqa: E402
import gfpo  # noqa: E402
from ddp_grpo_check import fixed_batch  # noqa: E402


def main():
    d = common.setup_distributed()
    assert d.ddp and d.world_size == 2, "run me with torchrun --nproc_per_node=2"
    tiny = tiny.ensure_model(d, log=lambda *a: None)
    tok = common.load_tokenizer(tiny)
    ids, mask, cids, cmask = fixed_batch(tok)
    B, G = ids.shape[0], 4
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    keep = torch.tensor([3, 2])  # prompt 0 on rank 0 keeps 3, prompt 1 on rank 1 keeps 2
    retained = gfpo.retain_mask(rewards, cmask.sum(1), keep, G, "length")
    adv = gfpo.filtered_advantages(rewards, retained, G)
    base = common.Policy(common.load_model(tiny, d.device))
    with torch.no_grad():
        old_logp, _ = base(ids, mask, cids, cmask)
        old_logp = old_logp + 0.15 * torch.randn(old_logp.shape, generator=torch.Generator().manual_seed(0))
        ref_logp = old_logp + 0.1

    # single process, whole batch, rejected rows masked
    single = copy.deepcopy(base).train()
    logp, _ = single(ids, mask, cids, cmask)
    total = (cmask * retained[:, None]).sum().float()
    loss, _ = gfpo.policy_loss(logp, old_logp, ref_logp, adv, cmask, 0.2, 0.04, retained, total)
    loss.backward()
    torch.optim.SGD(single.parameters(), lr=1.0).step()

    # DDP, each rank the retained rows of its half, as gfpo.py trains
    model = DDP(copy.deepcopy(base).train())
    mine = torch.arange(d.rank * B // 2, (d.rank + 1) * B // 2)
    mine = mine[retained[mine]]
    num_tokens = common.all_reduce_sum(cmask[mine].sum().float(), d)
    counts = [torch.zeros(1) for _ in range(2)]
    torch.distributed.all_gather(counts, cmask[mine].sum().float().view(1))
    assert counts[0].item() != counts[1].item(), "the check needs unequal token counts per rank"
    assert num_tokens.item() == total.item()
    logp, _ = model(ids[mine], mask[mine], cids[mine], cmask[mine])
    loss, _ = gfpo.policy_loss(logp, old_logp[mine], ref_logp[mine], adv[mine], cmask[mine], 0.2, 0.04,
                               retained[mine], num_tokens)
    (loss * d.world_size).backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()

    worst = max((a - b).abs().max().item() for a, b in zip(single.parameters(), model.module.parameters()))
    moved = max((a - b).abs().max().item() for a, b in zip(base.parameters(), model.module.parameters()))
    assert moved > 1e-3, f"the update did nothing (max change {moved})"
    assert worst < 1e-5, f"rank {d.rank}: DDP update differs from single-process update by {worst}"
    common.check_replicas(model.module, torch.optim.SGD(model.parameters(), lr=0), d)
    print(f"rank {d.rank}: DDP update == single-process update (max diff {worst:.2e}, max change {moved:.2e})")
    common.cleanup_distributed(d)


if __name__ == "__main__":
    main()

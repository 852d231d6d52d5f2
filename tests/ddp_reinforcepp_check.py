"""Launched by test_reinforcepp.py under `torchrun --nproc_per_node=2` (gloo): REINFORCE++'s token whitening on two
shares of a batch must give the advantages a single process computes on the whole batch, for both variants."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import conftest  # noqa: E402,F401  (puts the repository on the path)
from grpo_family import config, distributed
import reinforcepp  # noqa: E402


def main():
    d = distributed.setup()
    assert d.ddp and d.world_size == 2, "run me with torchrun --nproc_per_node=2"
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (16,), generator=g).float()
    mask = (torch.arange(6)[None] < torch.randint(1, 7, (16, 1), generator=g)).float()
    kl = torch.randn(16, 6, generator=g) * 0.3 * mask
    rewards[:8] += 0.5  # the ranks' shares differ: a per-rank whitening would differ
    half = slice(d.rank * 8, (d.rank + 1) * 8)
    for baseline in (False, True):
        whole = reinforcepp.reinforce_advantages(rewards, kl, mask, 4, 0.1, baseline)
        mine = reinforcepp.reinforce_advantages(rewards[half], kl[half], mask[half], 4, 0.1, baseline, d)
        alone = reinforcepp.reinforce_advantages(rewards[half], kl[half], mask[half], 4, 0.1, baseline)
        assert (mine - whole[half]).abs().max() < 1e-5, (baseline, mine, whole[half])
        assert (alone - whole[half]).abs().max() > 1e-2  # the check can fail
    print(f"rank {d.rank}: global token whitening == single process")
    distributed.cleanup(d)


if __name__ == "__main__":
    config.run(main)  # leaves through os._exit: no interpreter finalization under gloo

"""Launched by test_gdpo.py under `torchrun --nproc_per_node=2` (gloo): GDPO's batch whitening on two halves of a
batch (each rank its own groups) must give the advantages a single process computes on the whole batch."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import conftest  # noqa: E402,F401  (puts the repository on the path)
from grpo_family import config, distributed
import gdpo  # noqa: E402


def main():
    d = distributed.setup()
    assert d.ddp and d.world_size == 2, "run me with torchrun --nproc_per_node=2"
    g = torch.Generator().manual_seed(0)
    parts = torch.randint(0, 2, (2, 32), generator=g).float()
    parts[:, :16] *= 0.5  # the ranks' halves differ in scale: a per-rank whitening would differ
    whole = gdpo.group_advantages(parts, [1.0, 0.5], 4)
    half = slice(d.rank * 16, (d.rank + 1) * 16)
    mine = gdpo.group_advantages(parts[:, half], [1.0, 0.5], 4, d)
    alone = gdpo.group_advantages(parts[:, half], [1.0, 0.5], 4)
    assert (mine - whole[half]).abs().max() < 1e-5, (mine, whole[half])
    assert (alone - whole[half]).abs().max() > 1e-2  # the check can fail
    print(f"rank {d.rank}: global batch whitening == single process")
    distributed.cleanup(d)


if __name__ == "__main__":
    config.run(main)  # leaves through os._exit: no interpreter finalization under gloo

"""Launched by test_ddp.py under `torchrun --nproc_per_node=2` (gloo), several times under load: a finished run
(DDP steps, the collectives a trainer makes, the closing barrier) must exit 0, leaving through os._exit, so that
no interpreter finalization runs while gloo's worker threads may still hold the last collective's work."""
import atexit
import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from grpo_family import config, distributed, logs


def main():
    d = distributed.setup()
    assert d.ddp and d.world_size == 2, "run me with torchrun --nproc_per_node=2"
    atexit.register(print, f"rank {d.rank}: interpreter finalization ran", flush=True)
    torch.manual_seed(0)
    raw = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    model, opt = DDP(raw), torch.optim.AdamW(raw.parameters(), lr=1e-3)
    for step in range(3):
        model(torch.randn(16, 64, generator=torch.Generator().manual_seed(step))).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        logs.reduce({"loss": (torch.tensor(1.0), torch.tensor(1.0))}, d)
        distributed.all_gather_objects({"rank": d.rank, "step": step}, d)
    distributed.check_replicas(raw, opt, d)
    print(f"rank {d.rank}: finished", flush=True)
    distributed.cleanup(d)


if __name__ == "__main__":
    config.run(main)

"""
Launched under `torchrun --nproc_per_node=N` (gloo): several trainer runs one after the other in one process group,
each as its own command line would run (`grpo.py --tiny --fsdp ...`), without paying N process starts per run. The
trainers' own process-group setup and teardown reuse the launch's group.

    argv: "grpo.py --flag ..." ["grpo.py --flag ..." ...]
"""
import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from grpo_family import config, distributed  # noqa: E402
from tools import trainers  # noqa: E402


def main():
    commands = [c.split() for c in sys.argv[1:]]
    distributed.setup()
    dist.init_process_group = lambda *a, **k: None  # the trainers' setup and teardown reuse this process group
    dist.destroy_process_group = lambda *a, **k: None
    for command in commands:
        sys.argv = command
        trainers.load(command[0].removesuffix(".py")).main()
    dist.barrier()


if __name__ == "__main__":
    config.run(main)

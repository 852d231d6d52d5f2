"""Launched by test_dppo.py under `torchrun --nproc_per_node=2` (gloo): one DPPO update (TV, δ = 0.05: tokens are masked), the token-mean's
count taken over both ranks, on two shares of very different token counts, must equal the single-process update on
the whole batch, and a per-rank token mean must not (conftest.ddp_token_mean_check). Rank 0 writes the
measurements to the JSON file named by argv[1]; test_dppo.py asserts on them."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import ddp_token_mean_check  # noqa: E402
from grpo_family import config
import dppo  # noqa: E402


def advantages():
    return dppo.group_advantages(torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 1]), 4)


def loss(logp, old, ref, adv, mask, n):
    return dppo.policy_loss(logp, old, None, adv, mask, "tv", 0.05, 0.0, n)


if __name__ == "__main__":
    config.run(lambda: ddp_token_mean_check(sys.argv[1], advantages, loss))  # os._exit: no finalization under gloo

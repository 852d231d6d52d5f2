"""Launched by test_ppo.py under `torchrun --nproc_per_node=2` (gloo): one DDP update of PPO's policy and
critic, each rank on half of a fixed batch with the advantage whitening statistics all-reduced, must equal
the single-process update on the whole batch; whitening each rank's half on its own would not."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import ddp_copies, ddp_finish, ddp_setup, single_process  # noqa: E402
from grpo_family import config, distributed, loading, tiny
import ppo  # noqa: E402


def advantages(rewards, old_logp, ref_logp, old_values, cmask, d):
    """Whitened Â and the returns, as ppo.py computes them (β = 0.04, γ = 1, λ = 0.95)."""
    token_r, _ = ppo.token_rewards(rewards, old_logp, ref_logp, cmask, 0.04)
    adv, returns = ppo.gae(token_r, old_values, cmask, 1.0, 0.95)
    return adv, ppo.whiten(adv, cmask, d), returns


def main():
    d, (ids, mask, cids, cmask), base, old_logp, ref_logp = ddp_setup()
    B, one = ids.shape[0], single_process()
    rewards = torch.tensor([1.0, 1.1, 1.0, 1.0, 0.0, 0.1, 0.0, 1.0])  # rank 0's half mostly right, rank 1's wrong
    torch.manual_seed(0)  # the same critic on both ranks
    base_critic = ppo.Critic(loading.model(tiny.ensure_model(d, log=lambda *a: None), d.device))
    torch.nn.init.normal_(base_critic.head.weight, std=0.3)  # a non-zero head, so the trunk gets gradient too
    with torch.no_grad():
        old_values = base_critic(ids, mask, cids, cmask)
    single, model = ddp_copies(base)
    single_c, critic = ddp_copies(base_critic)

    # single process, whole batch
    _, A, returns = advantages(rewards, old_logp, ref_logp, old_values, cmask, one)
    logp, _ = single(ids, mask, cids, cmask)
    ppo.policy_loss(logp, old_logp, A, cmask, 0.2)[0].backward()
    (0.1 * ppo.value_loss(single_c(ids, mask, cids, cmask), old_values, returns, cmask, 0.2)[0]).backward()
    torch.optim.SGD(single.parameters(), lr=1.0).step()
    torch.optim.SGD(single_c.parameters(), lr=1.0).step()
    ev = ppo.explained_variance(old_values, returns, cmask, one)

    # DDP, each rank half of the batch: GAE is per row, the whitening statistics span both ranks
    h = slice(d.rank * B // 2, (d.rank + 1) * B // 2)
    adv, A_h, returns_h = advantages(rewards[h], old_logp[h], ref_logp[h], old_values[h], cmask[h], d)
    assert torch.allclose(A_h, A[h], atol=1e-6) and torch.allclose(returns_h, returns[h])
    local = ppo.whiten(adv, cmask[h], one)
    gap = (local - A[h]).abs().max().item()
    assert gap > 0.1, gap
    print(f"rank {d.rank}: per-rank whitening differs from the batch's by {gap:.3f}")
    assert abs(ppo.explained_variance(old_values[h], returns_h, cmask[h], d) - ev) < 1e-6
    logp, _ = model(ids[h], mask[h], cids[h], cmask[h])
    ppo.policy_loss(logp, old_logp[h], A_h, cmask[h], 0.2)[0].backward()
    (0.1 * ppo.value_loss(critic(ids[h], mask[h], cids[h], cmask[h]), old_values[h], returns_h, cmask[h],
                          0.2)[0]).backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    torch.optim.SGD(critic.parameters(), lr=1.0).step()

    # the critic (ddp_finish checks the policy, then tears the process group down)
    worst = max((a - b).abs().max().item() for a, b in zip(single_c.parameters(), critic.module.parameters()))
    trunk = max((a - b).abs().max().item() for a, b in zip(base_critic.body.parameters(),
                                                           critic.module.body.parameters()))
    assert trunk > 1e-5, f"the critic's trunk did not move ({trunk})"
    assert worst < 1e-5, f"rank {d.rank}: critic DDP update differs from single-process update by {worst}"
    distributed.check_replicas(critic.module, torch.optim.SGD(critic.parameters(), lr=0), d)
    print(f"rank {d.rank} critic: DDP update == single-process update (max diff {worst:.2e}, trunk change {trunk:.2e})")
    ddp_finish(d, base, single, model)


if __name__ == "__main__":
    config.run(main)  # leaves through os._exit: no interpreter finalization under gloo

"""Launched by test_fsdp.py under `torchrun --nproc_per_node=2` (gloo): the --fsdp plumbing (fsdp.py) on the tiny
policy with gradient checkpointing, against one process holding the whole model. Checked, each rank printing a line:
two AdamW updates of GRPO (two micro-batches each, gradient clipping) on two halves of a fixed batch equal the
single-process updates on the whole batch; the decode copy holds the whole weights and samples what the unsharded
model samples; AdamW's state gathered whole (optimizer_state) and given back to a fresh sharded copy continues
exactly. Rank 0 writes the measured differences to the JSON file argv[1]."""
import copy
import json
import os
import sys
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for helpers
from helpers import ddp_setup  # noqa: E402
from grpo_family import config, distributed, fsdp, loading, logprobs, rollout
import grpo  # noqa: E402

CLIP = 0.5  # low enough that clipping acts: the norm is computed over shards, then reduced


def update(policy, raw, optimizer, batch, rows, old_logp, ref_logp, adv, d):
    """One GRPO optimizer step on `rows` of the batch, in two micro-batches, as a trainer's step 6 takes it."""
    ids, mask, cids, cmask = batch
    micro = rows.split(len(rows) // 2)
    for k, ix in enumerate(micro):
        with distributed.micro_batch(policy, d, last=k == len(micro) - 1):
            logp, _ = policy(ids[ix], mask[ix], cids[ix], cmask[ix])
            loss = grpo.policy_loss(logp, old_logp[ix], ref_logp[ix], adv[ix], cmask[ix], 0.2, 0.04)[0]
            (loss * len(ix) / len(rows)).backward()
    norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(fsdp.full(norm))


def whole(module):
    return {n: fsdp.full(p).detach().clone() for n, p in module.named_parameters()}


def main():
    d, batch, base, old_logp, ref_logp = ddp_setup()
    adv = grpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]), 4)
    B, half = batch[0].shape[0], torch.arange(d.rank * 4, d.rank * 4 + 4)
    make = lambda: logprobs.Policy(copy.deepcopy(base.lm), gradient_checkpointing=True).train()  # noqa: E731
    single, raw = make(), make()
    policy = distributed.wrap(raw, grpo.Config(fsdp=True), d)
    assert policy is raw and fsdp.is_sharded(raw), "wrap did not shard the policy in place"
    cuda = torch.device("cuda")  # on CUDA, FSDP's mixed-precision policy computes in bf16: no autocast on top
    assert isinstance(distributed.autocast(cuda, raw), nullcontext) and isinstance(distributed.autocast(cuda, single),
                                                                              torch.autocast)
    opt_1 = torch.optim.AdamW(single.parameters(), lr=1e-3)
    opt_n = torch.optim.AdamW(raw.parameters(), lr=1e-3)
    report = {}

    # the decode copy: whole weights, the same greedy and sampled completions as the unsharded model
    copy_ = fsdp.decode_copy(raw.lm)
    assert not fsdp.is_sharded(copy_) and fsdp.decode_copy(raw.lm) is copy_, "the copy is gathered once, then reused"
    report["decode_copy_diff"] = max((p - single.state_dict()[f"lm.{n}"]).abs().max().item()
                                     for n, p in copy_.state_dict().items())
    tok = loading.tokenizer(loading.model_path("tiny", d))
    for greedy in (True, False):
        outs = []
        for m in (single.lm, raw.lm):
            torch.manual_seed(5)
            outs.append(rollout.generate(m, tok, batch[0][:2], batch[1][:2], 2, 12, greedy=greedy).completion_ids)
        assert torch.equal(*outs), f"rank {d.rank}: the decode copy samples otherwise (greedy={greedy})"

    # two updates: single process on the whole batch, each rank on its half (the forward frees the decode copy)
    norms = []
    for _ in range(2):
        n1 = update(single, single, opt_1, batch, torch.arange(B), old_logp, ref_logp, adv, d)
        nn_ = update(policy, raw, opt_n, batch, half, old_logp, ref_logp, adv, d)
        norms.append((n1, nn_))
    assert raw.lm not in fsdp._copies, "the policy's forward did not release the decode copy"
    w1, wn, w0 = dict(single.named_parameters()), whole(raw), dict(base.named_parameters())
    report["update_diff"] = max((w1[n] - wn[n]).abs().max().item() for n in w1)
    report["update_size"] = max((w0[n] - wn[n]).abs().max().item() for n in w1)
    report["grad_norms"] = norms
    assert report["update_size"] > 1e-3, f"the updates did nothing ({report['update_size']})"
    assert report["update_diff"] < 1e-5, f"rank {d.rank}: --fsdp update differs by {report['update_diff']}"

    # AdamW's state whole (rank 0), then into a fresh sharded copy of the same weights: the third update is the same
    state = distributed.all_gather_objects(fsdp.optimizer_state(opt_n, d), d)[0]  # rank 0's, to every rank
    assert all(not isinstance(v, torch.distributed.tensor.DTensor) for s in state["state"].values() for v in s.values())
    fresh = logprobs.Policy(copy.deepcopy(single.lm), gradient_checkpointing=True).train()
    with torch.no_grad():
        for n, p in fresh.named_parameters():
            p.copy_(wn[n])
    fsdp.shard(fresh)
    opt_f = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    fsdp.load_optimizer_state(opt_f, state)
    update(policy, raw, opt_n, batch, half, old_logp, ref_logp, adv, d)
    update(fresh, fresh, opt_f, batch, half, old_logp, ref_logp, adv, d)
    a, b = whole(raw), whole(fresh)
    report["resume_diff"] = max((a[n] - b[n]).abs().max().item() for n in a)
    assert report["resume_diff"] == 0.0, f"rank {d.rank}: the restored optimizer continues otherwise"
    distributed.check_replicas(raw, opt_n, d)
    print(f"rank {d.rank}: --fsdp update == single-process update (max diff {report['update_diff']:.2e}, max change "
          f"{report['update_size']:.2e}); decode copy == whole weights; restored AdamW state continues exactly",
          flush=True)
    if d.master_process:
        with open(sys.argv[1], "w") as f:
            json.dump(report, f)
    distributed.cleanup(d)


if __name__ == "__main__":
    config.run(main)

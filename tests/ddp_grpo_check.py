"""Launched by test_ddp.py under `torchrun --nproc_per_node=2` (gloo): one DDP update of GRPO on two
halves of a fixed batch must equal the single-process update on the whole batch."""
import copy
import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import grpo  # noqa: E402


def fixed_batch(tok, n=8):
    """Deterministic prompts + completions (different lengths), rewards, and stale old log-probs."""
    rows = common.tiny_dataset("test")[:n]
    prompts = [common.build_prompt(tok, r["question"], "") for r in rows]
    ids, mask = common.tokenize_prompts(tok, prompts, torch.device("cpu"))
    comps = [r["answer"] if i % 3 else r["answer"].split("\n")[0] for i, r in enumerate(rows)]
    enc = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in comps]
    T = max(len(e) for e in enc)
    cids = torch.full((n, T), tok.pad_token_id)
    cmask = torch.zeros(n, T, dtype=torch.long)
    for i, e in enumerate(enc):
        cids[i, :len(e)] = torch.tensor(e)
        cmask[i, :len(e)] = 1
    return ids, mask, cids, cmask


def main():
    d = common.setup_distributed()
    assert d.ddp and d.world_size == 2, "run me with torchrun --nproc_per_node=2"
    tiny = common.ensure_tiny_model(d, log=lambda *a: None)
    tok = common.load_tokenizer(tiny)
    ids, mask, cids, cmask = fixed_batch(tok)
    B = ids.shape[0]
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    adv = grpo.group_advantages(rewards, 4)
    base = common.Policy(common.load_model(tiny, d.device))
    with torch.no_grad():
        old_logp, _ = base(ids, mask, cids, cmask)
        old_logp = old_logp + 0.15 * torch.randn(old_logp.shape, generator=torch.Generator().manual_seed(0))
        ref_logp = old_logp + 0.1

    # single process, whole batch
    single = copy.deepcopy(base).train()
    logp, _ = single(ids, mask, cids, cmask)
    loss, _ = grpo.policy_loss(logp, old_logp, ref_logp, adv, cmask, 0.2, 0.04)
    loss.backward()
    torch.optim.SGD(single.parameters(), lr=1.0).step()

    # DDP, each rank half of the batch
    model = DDP(copy.deepcopy(base).train())
    half = slice(d.rank * B // 2, (d.rank + 1) * B // 2)
    logp, _ = model(ids[half], mask[half], cids[half], cmask[half])
    loss, _ = grpo.policy_loss(logp, old_logp[half], ref_logp[half], adv[half], cmask[half], 0.2, 0.04)
    loss.backward()
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

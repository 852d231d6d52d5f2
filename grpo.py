"""
GRPO: Group Relative Policy Optimization, as DeepSeekMath defines it (Shao et al., arXiv 2402.03300).

For each prompt, sample a group of G completions, score them, and use the group's own statistics
as the baseline (no critic):  Â_i = (R_i - mean(R)) / std(R)  for every token of completion i.
The policy maximises the PPO-clipped token-level surrogate minus a k3 KL penalty to a frozen
reference model, averaged over each completion's tokens and then over completions:

    J = 1/G Σ_i 1/|o_i| Σ_t { min(ρ_it Â_i, clip(ρ_it, 1-ε, 1+ε) Â_i) - β KL_it }       (eq. 3)
    ρ_it = π_θ(o_it) / π_old(o_it),   KL_it = π_ref/π_θ - log(π_ref/π_θ) - 1            (eq. 4)

Launch:
    python grpo.py --tiny                          # embedded default: CPU, no downloads, ~2 min
    torchrun --nproc_per_node=2 grpo.py            # Qwen2.5-1.5B-Instruct on GSM8K, 2 GPUs
    torchrun --nproc_per_node=2 grpo.py --tiny     # the tiny default under DDP (gloo on CPU)
    python grpo.py --help                          # every knob with its default

Departures from the paper, numbered:
 1. Several mini-batch optimizer steps per rollout batch (num_minibatches=4). DeepSeekMath takes one
    (μ=1), where ρ ≡ 1 and the clip never acts; with several, later mini-batches are off-policy and
    the ratio and the clip do their job.
 2. G=8 and 32 prompts per step (256 completions) instead of G=64 and 1024, to fit 2 GPUs.
 3. Outcome rewards are rule-based (GSM8K answer match plus a small format term), not a reward model.
Expected result on the tiny default: held-out greedy accuracy rises by 15+ points (see README).
"""
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import common


@dataclass
class Config:
    # run
    tiny: bool = False  # the embedded default: tiny Qwen2 model + synthetic GSM8K-style task (CPU, no downloads)
    model: str = "Qwen/Qwen2.5-1.5B-Instruct"  # hub name or local dir of the initial policy (and reference)
    data_path: str = ""  # local GSM8K: a jsonl file or a dir with train.jsonl/test.jsonl ("" = hub openai/gsm8k)
    run_dir: str = "runs/grpo"  # metrics.jsonl, config.json and checkpoints go here
    resume: str = ""  # checkpoint dir, or a run dir (uses its `latest`), to continue from exactly
    seed: int = 0  # seeds prompt order, sampling and mini-batch shuffling (rank r uses seed + r)
    # rollout
    num_steps: int = 200  # rollout batches; each is followed by num_minibatches optimizer steps
    batch_prompts: int = 32  # prompts per rollout batch, over all ranks (divisible by world size)
    group_size: int = 8  # G: completions sampled per prompt
    max_new_tokens: int = 300  # completion length cap; a completion without EOS by then is truncated
    temperature: float = 1.0  # sampling temperature; log-probs are computed under the same temperature
    top_p: float = 1.0  # nucleus sampling (1.0 = off, so π_old is exactly the sampling distribution)
    fast_rollout: bool = torch.cuda.is_available()  # static-KV-cache decode loop (+ CUDA graphs); same sampling as HF generate
    system_prompt: str = common.SYSTEM_PROMPT  # system message of the chat prompt ("" = none)
    format_weight: float = 0.1  # reward = correctness (0/1) + format_weight * format (0/1)
    # optimisation
    lr: float = 1e-6  # AdamW learning rate (DeepSeekMath: 1e-6)
    warmup_steps: int = 10  # linear learning-rate warm-up, in rollout steps
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    num_minibatches: int = 4  # optimizer steps per rollout batch (mini-batches of the rollout)
    micro_batch_size: int = 8  # sequences per forward/backward (gradient accumulation inside a mini-batch)
    gradient_checkpointing: bool = True  # recompute activations in backward to save memory
    logprob_chunk: int = 128  # completion tokens per lm_head chunk in the log-prob computation
    # algorithm
    clip_eps: float = 0.2  # ε: PPO clip range for the token ratio
    beta: float = 0.04  # β: k3 KL coefficient (0 = no KL and no reference model)
    # evaluation and logging
    eval_every: int = 25  # held-out greedy evaluation every this many steps (0 = only before and after)
    eval_problems: int = 250  # held-out test problems per evaluation
    save_every: int = 50  # checkpoint every this many steps (and at the end)
    wandb_project: str = ""  # log to this wandb project too (needs `pip install wandb`)


# --tiny sets these (explicit --key=value flags still win): a run of a few minutes on 2 CPU cores.
TINY = dict(num_steps=40, batch_prompts=16, group_size=8, max_new_tokens=32, system_prompt="",
            lr=2e-4, warmup_steps=0, num_minibatches=2, micro_batch_size=64, gradient_checkpointing=False,
            eval_every=20, eval_problems=200, save_every=20, run_dir="runs/grpo-tiny")


# -----------------------------------------------------------------------------
# the algorithm: pure functions that tests import without starting a run


def group_advantages(rewards, group_size):
    """Â_i = (R_i - mean) / std over each group of G consecutive rewards; (B,) -> (B,).

    Std convention (shared by every trainer here): the population std (divide by G), with
    all-equal groups (std < 1e-6) given Â = 0 exactly, never NaN. TRL and verl use the sample
    std plus an epsilon (1e-4 / 1e-6), which scales Â by sqrt((G-1)/G) and changes the clip-free
    loss value but not which tokens clip.
    """
    r = rewards.view(-1, group_size)                                          # (prompts, G)
    mean = r.mean(1, keepdim=True)
    std = r.std(1, keepdim=True, unbiased=False)
    adv = torch.where(std > 1e-6, (r - mean) / std.clamp_min(1e-6), torch.zeros_like(r))
    return adv.view(-1)


def policy_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps, beta):
    """-J_GRPO for a batch of sequences: per-sequence token mean, then mean over sequences.

    logp, old_logp, ref_logp, mask: (B, T); advantages: (B,). ref_logp is unused when beta == 0.
    """
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)                                        # ρ (B, T)
    A = advantages[:, None]
    surrogate = torch.min(ratio * A, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * A)
    per_token = surrogate
    if beta > 0:
        log_r = ref_logp - logp
        kl = torch.exp(log_r) - log_r - 1                                     # k3 estimator, ≥ 0
        per_token = per_token - beta * kl
    per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp_min(1)            # (B,)
    loss = -per_seq.mean()
    with torch.no_grad():  # tokens whose gradient the clip removes (the min picks the clipped branch)
        clipped = ((A > 0) & (ratio > 1 + clip_eps)) | ((A < 0) & (ratio < 1 - clip_eps))
        stats = {"clip_frac": ((clipped.float() * mask).sum(), mask.sum()),
                 "kl": (((kl if beta > 0 else torch.zeros_like(ratio)) * mask).sum(), mask.sum()),
                 "ratio": ((ratio * mask).sum(), mask.sum())}
    return loss, stats


# -----------------------------------------------------------------------------
# training


def main():
    cfg = common.parse_config(Config, tiny=TINY)
    d = common.setup_distributed()
    if cfg.batch_prompts % d.world_size:
        raise ValueError(f"batch_prompts={cfg.batch_prompts} must be divisible by the world size {d.world_size}")
    B = cfg.batch_prompts // d.world_size * cfg.group_size  # completions per rank per step
    if B % cfg.num_minibatches:
        raise ValueError(f"{B} completions per rank do not split into num_minibatches={cfg.num_minibatches}")
    log = tqdm.write if d.master_process else (lambda *a, **k: None)
    common.seed_everything(cfg.seed + d.rank)
    if cfg.tiny:
        cfg.model = common.ensure_tiny_model(d, log=log)

    # model, reference model, tokenizer, optimizer
    tok = common.load_tokenizer(cfg.model)
    ckpt = common.resolve_checkpoint(cfg.resume) if cfg.resume else ""
    master_dtype = torch.float32  # fp32 master weights: lr=1e-6 updates survive (bf16 would round them away)
    policy = common.Policy(common.load_model(ckpt or cfg.model, d.device, master_dtype),
                           cfg.logprob_chunk, cfg.gradient_checkpointing).train()
    raw = policy  # the unwrapped module: generation and saving use raw.lm
    if d.ddp:
        policy = DDP(policy, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    ref = None
    if cfg.beta > 0:  # frozen reference model for the KL term (bf16 on GPU: it is never updated)
        ref_dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32
        ref = common.Policy(common.load_model(cfg.model, d.device, ref_dtype), cfg.logprob_chunk).eval()
        ref.requires_grad_(False)
    optimizer = torch.optim.AdamW(raw.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    start_step = common.load_trainer_state(ckpt, optimizer, d) if ckpt else 0

    # data and rewards
    train, test = common.load_problems(cfg, "train"), common.load_problems(cfg, "test")[:cfg.eval_problems]
    reward_fns = [(1.0, common.correctness_reward), (cfg.format_weight, common.format_reward)]
    logger = common.Logger(cfg.run_dir, cfg, d.master_process, cfg.wandb_project)

    def evaluate():
        return common.evaluate(raw.lm, tok, test, d, cfg.max_new_tokens, system_prompt=cfg.system_prompt,
                               fast=cfg.fast_rollout)

    if start_step == 0:
        ev = evaluate()
        log(f"held-out greedy accuracy before RL: {ev['strict']:.3f} (lenient {ev['lenient']:.3f}, n={ev['n']})")
        logger.log(0, {f"eval/{k}": v for k, v in ev.items()})

    pbar = tqdm(range(start_step, cfg.num_steps), disable=not d.master_process, desc="grpo")
    for step in pbar:
        t0 = time.time()
        lr = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
        for g in optimizer.param_groups:
            g["lr"] = lr

        # 1. prompts: this rank's share of the step's global prompt batch
        idx = common.prompt_indices(len(train), step, cfg.batch_prompts, cfg.seed)[d.rank::d.world_size]
        problems = [train[i] for i in idx]
        prompts = [common.build_prompt(tok, p["question"], cfg.system_prompt) for p in problems]
        prompt_ids, prompt_mask = common.tokenize_prompts(tok, prompts, d.device)

        # 2. rollout: G completions per prompt from π_old (the current policy)
        raw.eval()
        r = common.generate(raw.lm, tok, prompt_ids, prompt_mask, cfg.group_size, cfg.max_new_tokens,
                            cfg.temperature, cfg.top_p, fast=cfg.fast_rollout)
        answers = [p["answer"] for p in problems for _ in range(cfg.group_size)]
        mask = r.completion_mask                                                  # (B, T)

        # 3. rewards and 4. group-relative advantages
        rewards = common.compute_rewards(r.texts, answers, reward_fns).to(d.device)  # (B,)
        advantages = group_advantages(rewards, cfg.group_size)                    # (B,)

        # 5. old and reference log-probs, fixed for all mini-batches of this step
        old_logp, entropy = common.batched_logprobs(raw, r, cfg.micro_batch_size, cfg.temperature)
        ref_logp = common.batched_logprobs(ref, r, cfg.micro_batch_size, cfg.temperature)[0] if ref else None
        t_rollout = time.time() - t0

        # 6. policy update: num_minibatches optimizer steps, each over a shuffled slice of the rollout
        raw.train()
        sums = {}
        perm = torch.randperm(B).to(d.device)
        for mb in perm.chunk(cfg.num_minibatches):
            micro = mb.split(cfg.micro_batch_size)
            for k, ix in enumerate(micro):
                # only the last micro-batch all-reduces gradients across ranks
                sync = nullcontext() if (not d.ddp or k == len(micro) - 1) else policy.no_sync()
                with sync, common.autocast(d.device):
                    logp, _ = policy(r.prompt_ids[ix], r.prompt_mask[ix], r.completion_ids[ix], mask[ix],
                                     cfg.temperature)
                    loss, stats = policy_loss(logp.float(), old_logp[ix], ref_logp[ix] if ref else None,
                                              advantages[ix], mask[ix], cfg.clip_eps, cfg.beta)
                    (loss * len(ix) / len(mb)).backward()
                for key, (s, n) in stats.items():
                    common.accumulate(sums, key, s, n)
                common.accumulate(sums, "loss", loss.item() * len(ix), len(ix))
            grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            common.accumulate(sums, "grad_norm", grad_norm, 1)

        # 7. metrics, averaged over ranks
        correct = torch.tensor([common.correctness_reward(t, a) for t, a in zip(r.texts, answers)])
        zero_std = rewards.view(-1, cfg.group_size).std(1) < 1e-6
        lengths = r.lengths.float()
        for key, s, n in [("reward", rewards.sum(), B), ("accuracy", correct.sum(), B),
                          ("response_length", lengths.sum(), B), ("truncated", r.truncated.sum(), B),
                          ("entropy", (entropy * mask).sum(), mask.sum()), ("zero_std_groups", zero_std.sum(), len(zero_std))]:
            common.accumulate(sums, key, s, n)
        metrics = common.reduce_metrics(sums, d)
        metrics.update(lr=lr, time_rollout=t_rollout, time_train=time.time() - t0 - t_rollout)
        pbar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.3f}",
                         len=f"{metrics['response_length']:.0f}", clip=f"{metrics['clip_frac']:.3f}")

        # 8. periodic held-out eval and checkpoint
        done = step + 1
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.num_steps:
            ev = evaluate()
            metrics.update({f"eval/{k}": v for k, v in ev.items()})
            log(f"step {done}: held-out greedy accuracy {ev['strict']:.3f}")
        logger.log(done, metrics)
        if done % cfg.save_every == 0 or done == cfg.num_steps:
            common.save_checkpoint(cfg.run_dir, done, raw.lm, tok, optimizer, cfg, d)

    if start_step < cfg.num_steps:
        log(f"held-out greedy accuracy after RL: {metrics['eval/strict']:.3f} (lenient {metrics['eval/lenient']:.3f})")
    common.check_replicas(raw, optimizer, d)  # DDP: every rank holds the same weights and took the same steps
    common.cleanup_distributed(d)


if __name__ == "__main__":
    main()

"""
GDPO: Group reward-Decoupled Normalization Policy Optimization (Liu et al., NVIDIA, arXiv 2601.05242).

With several rewards, GRPO sums them and normalises the sum in its group: completions that earned
different things, (right, badly formatted) and (wrong, well formatted), get the same advantage, and one
reward's spread can drown another's. GDPO normalises each reward in its group first, sums the weighted
advantages, then normalises that sum over the whole batch:

    A_ik = (r_ik - mean_g r_k) / (std_g r_k + ε)          for each reward k (correctness, format)
    Â_i = (Σ_k w_k A_ik - mean_batch) / (std_batch + ε)    ε = 1e-4, sample std (the authors' code)

The loss is GRPO's (eq. 3) with these Â_i: clipped token ratios, per-sequence token mean, k3 KL.

What changes versus GRPO, numbered:
 1. The rewards stay apart (reward_fns are scored one by one): a (K, B) table, not one summed reward.
 2. Each reward is normalised in its group, the weighted advantages summed, the sum whitened over the
    global batch (group_advantages); weights are equal (w_format = 1), as the authors' runs.
 3. Each reward's mean is logged (reward_correct, reward_format): what each behaviour earned.

Launch:
    python gdpo.py --tiny                    # the embedded tiny default: CPU, no downloads, about a minute
    torchrun --nproc_per_node=2 gdpo.py      # Qwen2.5-1.5B-Instruct on GSM8K, 2 GPUs

Departures from the paper, numbered:
 1. Two rule-based rewards (GSM8K answer, '#### <number>' format) where the paper's tasks carry more.
 2. grpo.py's batch, mini-batches and k3 KL (β = 0.04); the authors' TRL runs use TRL's GRPO defaults.

Details: docs/gdpo.md
"""
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from grpo_family import checkpoint, config, distributed, evaluation, gsm8k, loading, logprobs, logs, rollout


@dataclass
class Config:
    # run
    tiny: bool = False  # the embedded default: tiny Qwen2 model + synthetic GSM8K-style task (CPU, no downloads)
    model: str = "Qwen/Qwen2.5-1.5B-Instruct"  # initial policy (and reference): hub name, local dir, or "tiny"
    data_path: str = ""  # GSM8K: a dir with train.jsonl/test.jsonl, a train jsonl file, "tiny", or "" (the hub)
    test_path: str = ""  # held-out jsonl ("" = test.jsonl beside data_path; required when data_path is a file)
    run_dir: str = ""  # metrics.jsonl, config.json and checkpoints ("" = runs/<trainer>, runs/<trainer>-tiny)
    resume: str = ""  # checkpoint dir, or a run dir (uses its `latest`), to continue from exactly
    overwrite: bool = False  # start over in a run_dir that holds another run's checkpoints (deletes them)
    seed: int = 0  # seeds prompt order, sampling and mini-batch shuffling, in [0, 1e18] (rank r uses seed + r)
    dist_timeout: float = 600.0  # seconds a rank waits for the others in a collective before the run stops, in [1, 1e7]
    # rollout
    num_steps: int = 200  # rollout batches, in [1, inf); each is followed by num_minibatches optimizer steps
    batch_prompts: int = 32  # prompts per rollout batch over all ranks (divisible by the world size), in [1, inf)
    group_size: int = 8  # G: completions sampled per prompt, in [2, inf)
    max_new_tokens: int = 300  # completion length cap, in [1, inf); a completion without EOS by then is truncated
    temperature: float = 1.0  # sampling temperature, in (0, inf); log-probs are computed under the same one
    top_p: float = 1.0  # nucleus sampling, in (0, 1] (1.0 = off, so π_old is exactly the sampling distribution)
    fast_rollout: bool = torch.cuda.is_available()  # static-KV-cache decoder (+ CUDA graphs), generate()'s sampling
    system_prompt: str = gsm8k.SYSTEM_PROMPT  # system message of the chat prompt ("" = none)
    rollout_correction: str = "none"  # ρ = π_old/μ, in {none, token_tis, seq_tis, token_mask, seq_mask, seq_geo_mask}
    rc_min: float = 0.5  # the masks' lower bound on ρ (IcePop: 0.5), in [0, inf)
    rc_max: float = 2.0  # C: the TIS cap on ρ and the masks' upper bound (verl: 2, TRL: 3, IcePop: 5), in (0, inf)
    format_weight: float = 1.0  # [GDPO] w_format: the format advantage's weight, in [0, inf); equal, as the authors
    # optimisation
    lr: float = 1e-6  # AdamW learning rate, in (0, inf) (DeepSeekMath: 1e-6)
    warmup_steps: int = 10  # linear learning-rate warm-up in rollout steps, in [0, inf)
    weight_decay: float = 0.0  # AdamW weight decay, in [0, inf)
    max_grad_norm: float = 1.0  # gradient clipping, in (0, inf)
    num_minibatches: int = 4  # optimizer steps per rollout batch (mini-batches of the rollout), in [1, inf)
    micro_batch_size: int = 8  # sequences per forward/backward (accumulated within a mini-batch), in [1, inf)
    gradient_checkpointing: bool = True  # recompute activations in backward to save memory
    logprob_chunk: int = 128  # completion tokens per lm_head chunk in the log-prob computation, in [1, inf)
    lora_rank: int = 0  # LoRA adapters of this rank instead of full fine-tuning, in [0, inf) (0 = off; needs peft)
    fsdp: bool = False  # shard weights, gradients and AdamW state over torchrun's processes (FSDP2), not DDP
    # algorithm
    entropy_coef: float = 0.0  # c: the loss minus c x the mean token entropy (with its gradient), in [0, inf) (0 = off)
    clip_eps: float = 0.2  # ε: PPO clip range for the token ratio, in (0, 1)
    beta: float = 0.04  # β: k3 KL coefficient, in [0, inf) (0 = no KL and no reference model)
    # evaluation and logging
    eval_every: int = 25  # held-out greedy evaluation every this many steps, in [0, inf) (0 = before and after)
    eval_problems: int = 250  # held-out test problems per evaluation, in [1, inf)
    save_every: int = 50  # checkpoint every this many steps (and at the end), in [1, inf)
    wandb_project: str = ""  # log to this wandb project too (needs `pip install wandb`)


# --tiny sets these (explicit --key=value flags still win): a run of about a minute on 2 CPU cores.
TINY = dict(model="tiny", data_path="tiny", num_steps=40, batch_prompts=16, group_size=8, max_new_tokens=32,
            system_prompt="", lr=2e-4, warmup_steps=0, num_minibatches=2, micro_batch_size=64,
            gradient_checkpointing=False, eval_every=20, eval_problems=200, save_every=20)


# -----------------------------------------------------------------------------
# the algorithm: pure functions that tests import without starting a run


def group_advantages(parts, weights, group_size, d=None):  # [GDPO] one normalisation per reward, then the batch
    """Â from a (K, B) table of K rewards: each normalised over its groups of G consecutive completions,
    weighted and summed, then whitened over the batch (all ranks when d is given); (K, B) -> (B,).
    The authors' code and TRL's normalize_then_sum use the sample std plus 1e-4 in both places; all-equal
    groups get 0 for that reward. The batch step keeps the rewards' relative scale, not GRPO's std per group.
    """
    R = parts.view(len(weights), -1, group_size)                              # (K, prompts, G)
    per_reward = (R - R.mean(2, keepdim=True)) / (R.std(2, keepdim=True) + 1e-4)  # [GDPO] A_k, one per reward
    adv = (torch.tensor(weights, dtype=R.dtype, device=R.device)[:, None, None] * per_reward).sum(0).view(-1)
    stats = torch.stack([adv.sum(), (adv * adv).sum(), adv.new_tensor(float(adv.numel()))])
    stats = distributed.all_reduce_sum(stats, d) if d is not None else stats  # [GDPO] the global batch
    mean = stats[0] / stats[2]
    std = ((stats[1] - stats[2] * mean ** 2).clamp_min(0) / (stats[2] - 1).clamp_min(1)).sqrt()
    return (adv - mean) / (std + 1e-4)  # [GDPO] whitened over the batch


def kl_k3(logp, ref_logp):
    """The k3 estimate of KL(π_θ || π_ref) per token (eq. 4): π_ref/π_θ - log(π_ref/π_θ) - 1 >= 0."""
    log_r = ref_logp - logp
    return torch.exp(log_r) - log_r - 1


def policy_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps, beta):
    """-J_GRPO (eq. 3) for a batch of sequences: per-sequence token mean, then mean over sequences.

    logp, old_logp, ref_logp, mask: (B, T); advantages: (B,). ref_logp is unused when beta == 0.
    """
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)                                        # ρ (B, T)
    A = advantages[:, None]
    per_token = torch.min(ratio * A, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * A)
    kl = kl_k3(logp, ref_logp) if beta > 0 else torch.zeros_like(logp)       # (B, T)
    per_token = per_token - beta * kl
    per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp_min(1)            # (B,)
    loss = -per_seq.mean()
    with torch.no_grad():  # tokens whose gradient the clip removes
        clipped = ((A > 0) & (ratio > 1 + clip_eps)) | ((A < 0) & (ratio < 1 - clip_eps))
        stats = {"clip_frac": ((clipped.float() * mask).sum(), mask.sum()),
                 "kl": ((kl * mask).sum(), mask.sum()),
                 "ratio": ((ratio * mask).sum(), mask.sum())}
    return loss, stats


# -----------------------------------------------------------------------------
# training


def main():
    cfg = config.parse(Config, tiny=TINY)
    d = distributed.setup(cfg)
    B = cfg.batch_prompts // d.world_size * cfg.group_size  # completions per rank per step
    log = tqdm.write if d.master_process else (lambda *a, **k: None)
    distributed.seed_everything(cfg.seed + d.rank)

    # run dir, data, then policy (fp32 master weights), reference model, tokenizer, optimizer
    ckpt = checkpoint.start_run(cfg, d)  # "" for a fresh run; refuses a reused run_dir or changed settings
    train, test = loading.problems(cfg, "train"), loading.problems(cfg, "test")[:cfg.eval_problems]
    path = loading.model_path(cfg.model, d)
    tok = loading.tokenizer(path)
    raw = loading.policy(path, ckpt, cfg, d)  # fp32 master weights, or a frozen base + fp32 LoRA adapters
    raw.train()  # `raw` is the unwrapped module: generation and saving use raw.lm
    policy = distributed.wrap(raw, cfg, d)  # DDP around raw, or raw sharded in place (--fsdp); the loss goes through it
    ref = loading.reference(raw, path, cfg, d) if cfg.beta > 0 else None  # frozen, for the KL term
    optimizer = torch.optim.AdamW(raw.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    start_step = checkpoint.restore(ckpt, optimizer, d)["step"] if ckpt else 0

    # rewards and logging
    reward_fns = [(1.0, gsm8k.correctness_reward), (cfg.format_weight, gsm8k.format_reward)]
    logger = logs.Logger(cfg.run_dir, cfg, d.master_process, cfg.wandb_project)

    def evaluate():
        return evaluation.evaluate(raw.lm, tok, test, d, cfg.max_new_tokens, system_prompt=cfg.system_prompt,
                                   fast=cfg.fast_rollout)

    if start_step == 0:
        ev = evaluate()
        log(f"held-out greedy accuracy before RL: {ev['strict']:.3f} (lenient {ev['lenient']:.3f}, n={ev['n']})")
        logger.log(0, {f"eval/{k}": v for k, v in ev.items()})

    pbar = tqdm(range(start_step, cfg.num_steps), disable=not d.master_process, desc=config.run_name(Config))
    for step in pbar:
        t0, sums = time.time(), {}
        lr = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
        for g in optimizer.param_groups:
            g["lr"] = lr

        # 1. prompts: this rank's share of the step's global prompt batch
        idx = loading.prompt_indices(len(train), step, cfg.batch_prompts, cfg.seed)[d.rank::d.world_size]

        # 2. rollout: G completions per prompt from π_old (the current policy)
        r = rollout.sample(raw.lm, tok, [train[i] for i in idx], cfg, d.device)
        mask = r.completion_mask                                                  # (B, T)

        # 3. rewards: the outcome R_i of each completion
        parts = torch.stack([rollout.rewards(r.texts, r.answers, [(1.0, fn)])  # [GDPO] (K, B): apart
                             for _, fn in reward_fns]).to(d.device)
        weights = [w for w, _ in reward_fns]
        rewards = (torch.tensor(weights, device=d.device)[:, None] * parts).sum(0)  # [GDPO] the sum: metrics only

        # 4. old and reference log-probs, fixed for all mini-batches of this step
        old_logp, entropy = logprobs.batched(raw, r, cfg.micro_batch_size, cfg.temperature)
        ref_logp = logprobs.batched(ref, r, cfg.micro_batch_size, cfg.temperature)[0] if ref else None
        is_w = rollout.correction(r, old_logp, cfg, sums)  # sampler μ vs π_old: logged; weights or None
        t_rollout = time.time() - t0

        # 5. advantages: each reward against its group's
        advantages = group_advantages(parts, weights, cfg.group_size, d)  # [GDPO] (B,)

        # 6. policy update: num_minibatches optimizer steps, each over a shuffled slice of the rollout
        perm = torch.randperm(B).to(d.device)
        for mb in perm.chunk(cfg.num_minibatches):
            micro = mb.split(cfg.micro_batch_size)
            for k, ix in enumerate(micro):
                # DDP: only the last micro-batch all-reduces gradients across ranks
                with distributed.micro_batch(policy, d, last=k == len(micro) - 1):
                    logp, ent = policy(r.prompt_ids[ix], r.prompt_mask[ix], r.completion_ids[ix], mask[ix],
                                     cfg.temperature)
                    logp = rollout.reweight(logp, is_w, ix)  # --rollout_correction: token t's gradient x w_t
                    loss, stats = policy_loss(logp.float(), old_logp[ix], ref_logp[ix] if ref else None,
                                              advantages[ix], mask[ix], cfg.clip_eps, cfg.beta)
                    (logprobs.entropy_bonus(loss, ent, mask[ix], cfg) * len(ix) / len(mb)).backward()  # loss - c·H̄
                for key, (s, n) in stats.items():
                    logs.accumulate(sums, key, s, n)
                logs.accumulate(sums, "loss", loss.item() * len(ix), len(ix))
            grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            logs.accumulate(sums, "grad_norm", grad_norm, 1)

        # 7. metrics, averaged over ranks
        rollout.metrics(sums, r, rewards, cfg.group_size)
        logs.accumulate(sums, "entropy", (entropy * mask).sum(), mask.sum())
        for name, part in zip(("reward_correct", "reward_format"), parts):  # [GDPO] each reward on its own
            logs.accumulate(sums, name, part.sum(), len(part))
        metrics = logs.reduce(sums, d)
        metrics.update(lr=lr, time_rollout=t_rollout, time_train=time.time() - t0 - t_rollout)
        pbar.set_postfix(logs.progress(metrics))

        # 8. periodic held-out eval and checkpoint
        done = step + 1
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.num_steps:
            ev = evaluate()
            metrics.update({f"eval/{k}": v for k, v in ev.items()})
            log(f"step {done}: held-out greedy accuracy {ev['strict']:.3f}")
        logger.log(done, metrics)
        if done % cfg.save_every == 0 or done == cfg.num_steps:
            checkpoint.save(cfg.run_dir, done, raw.lm, tok, optimizer, cfg, d)

    if start_step < cfg.num_steps:
        log(f"held-out greedy accuracy after RL: {metrics['eval/strict']:.3f} (lenient {metrics['eval/lenient']:.3f})")
    distributed.check_replicas(raw, optimizer, d)  # DDP: every rank holds the same weights and took the same steps
    distributed.cleanup(d)


if __name__ == "__main__":
    config.run(main)

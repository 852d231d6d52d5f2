"""
REINFORCE++ (Hu et al., arXiv 2501.03262): PPO's clipped surrogate without a critic, global advantages.

GRPO normalises each prompt's rewards by that group's own statistics; with a few samples per prompt
those are noisy, and a prompt the model always solves still pulls on the std. REINFORCE++ takes
the advantage straight from the reward (and the KL penalty, per token, as PPO puts it in the reward)
and whitens it once over every token of the whole batch:

    A_it = r_i - β Σ_{s>=t} (log π_old(o_is) - log π_ref(o_is))       (KL-to-go, k1, γ = 1)
    Â_it = (A_it - mean) / std      over all valid tokens of the batch (token-weighted, population var)
    J = 1/N Σ_{i,t} min(ρ_it Â_it, clip(ρ_it, 1-ε, 1+ε) Â_it)          (N = the mini-batch's tokens)

--baseline (REINFORCE++-baseline): A_i = r_i - mean(group), the same whitening, and the KL moves into
the loss as β k2 = β (log π_θ - log π_ref)^2 / 2 per token (OpenRLHF's recipe for it).

What changes versus GRPO, numbered:
 1. No per-group normalisation: the reward minus the KL-to-go (or the group mean), whitened over the
    global batch's tokens (reinforce_advantages), so each token has its own Â_it.
 2. The KL is in the reward as k1 (or, with --baseline, in the loss as k2), β = 0.01 (OpenRLHF's default).
 3. Token-level loss: the mini-batch's token sum over its token count, all ranks (OpenRLHF's PolicyLoss).

Launch:
    python reinforcepp.py --tiny                   # the embedded tiny default: CPU, no downloads
    torchrun --nproc_per_node=2 reinforcepp.py     # Qwen2.5-1.5B-Instruct on GSM8K, 2 GPUs

Departures from the paper, numbered:
 1. G = 8 samples per prompt and grpo.py's batch and lr; the paper body was not read (formulas: OpenRLHF).

Details: docs/reinforcepp.md
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
    format_weight: float = 0.1  # reward = correctness (0/1) + format_weight * format (0/1), in [0, inf)
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
    beta: float = 0.01  # [R++] β: KL coefficient (k1 in the reward; k2 in the loss with --baseline), in [0, inf)
    baseline: bool = False  # [R++] REINFORCE++-baseline: Â from r - mean(group), the KL as k2 in the loss
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


def reinforce_advantages(rewards, kl, mask, group_size, beta, baseline, d=None):  # [R++] global, per token
    """Â_it (B, T): r_i - β Σ_{s>=t} kl_is (or, baseline, r_i - mean of its group of G), whitened over every
    valid token of the batch (all ranks when d is given): token-weighted mean, population variance floored at
    1e-8 (OpenRLHF; verl uses the sample variance). kl: (B, T) k1 of the sampled tokens; 0 on padding."""
    mask = mask.float()
    if baseline:
        R = rewards.view(-1, group_size)
        A = (R - R.mean(1, keepdim=True)).view(-1, 1) * mask
    else:
        A = (rewards[:, None] - beta * (kl * mask).flip(1).cumsum(1).flip(1)) * mask  # the KL-to-go, γ = 1
    A, m = A.double(), mask.double()  # [R++] two passes in float64: fp32's E[A²] - mean² loses a KL-to-go spread
    total = lambda x: distributed.all_reduce_sum(x, d) if d is not None else x  # [R++] the global batch  # noqa: E731
    n, s = total(torch.stack([m.sum(), A.sum()]))
    var = (total(((A - s / n) ** 2 * m).sum()) / n).clamp_min(1e-8)  # the second pass: around the mean
    return ((A - s / n) * var.rsqrt() * m).to(rewards.dtype)


def kl_k2(logp, ref_logp):  # [R++] the baseline variant's KL loss (OpenRLHF --kl_estimator k2)
    """The k2 estimate of KL(π_θ || π_ref) per token: (log π_θ - log π_ref)^2 / 2 >= 0."""
    return 0.5 * (logp - ref_logp) ** 2


def policy_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps, beta, num_tokens):  # [R++] num_tokens
    """-J_REINFORCE++: the clipped surrogate of token advantages, summed, over num_tokens (mini-batch, all ranks).
    logp, old_logp, ref_logp, mask, advantages: (B, T). beta weighs a k2 loss term (0 unless --baseline).
    """
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)                                        # ρ (B, T)
    A = advantages  # [R++] (B, T): one advantage per token
    per_token = torch.min(ratio * A, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * A)
    kl = kl_k2(logp, ref_logp) if beta > 0 else torch.zeros_like(logp)  # [R++] k2
    per_token = per_token - beta * kl
    loss = -(per_token * mask).sum() / num_tokens  # [R++] token-mean over the mini-batch, all ranks
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
        rewards = rollout.rewards(r.texts, r.answers, reward_fns).to(d.device)  # (B,)

        # 4. old and reference log-probs, fixed for all mini-batches of this step
        old_logp, entropy = logprobs.batched(raw, r, cfg.micro_batch_size, cfg.temperature)
        ref_logp = logprobs.batched(ref, r, cfg.micro_batch_size, cfg.temperature)[0] if ref else None
        is_w = rollout.correction(r, old_logp, cfg, sums)  # sampler μ vs π_old: logged; weights or None
        t_rollout = time.time() - t0

        # 5. advantages: each reward against its group's
        kl = (old_logp - ref_logp) * mask if ref else torch.zeros_like(old_logp)  # [R++] k1 per token (B, T)
        advantages = reinforce_advantages(rewards, kl, mask, cfg.group_size, cfg.beta, cfg.baseline, d)  # [R++]

        # 6. policy update: num_minibatches optimizer steps, each over a shuffled slice of the rollout
        perm = torch.randperm(B).to(d.device)
        for mb in perm.chunk(cfg.num_minibatches):
            num_tokens = distributed.all_reduce_sum(mask[mb].sum().float(), d).clamp_min(1)  # [R++] Σ|o_i|, all ranks
            micro = mb.split(cfg.micro_batch_size)
            for k, ix in enumerate(micro):
                # DDP: only the last micro-batch all-reduces gradients across ranks
                with distributed.micro_batch(policy, d, last=k == len(micro) - 1):
                    logp, ent = policy(r.prompt_ids[ix], r.prompt_mask[ix], r.completion_ids[ix], mask[ix],
                                     cfg.temperature)
                    logp = rollout.reweight(logp, is_w, ix)  # --rollout_correction: token t's gradient x w_t
                    loss, stats = policy_loss(logp.float(), old_logp[ix], ref_logp[ix] if ref else None,
                                              advantages[ix], mask[ix], cfg.clip_eps,
                                              cfg.beta if cfg.baseline else 0.0, num_tokens)  # [R++] k2 if baseline
                    (logprobs.entropy_bonus(loss, ent, mask[ix], cfg, num_tokens) * d.world_size).backward()  # [R++] sum over ranks
                for key, (s, n) in stats.items():
                    logs.accumulate(sums, key, s, n)
                logs.accumulate(sums, "loss", loss.item() * num_tokens.item(), mask[ix].sum())  # [R++] per token
            grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            logs.accumulate(sums, "grad_norm", grad_norm, 1)

        # 7. metrics, averaged over ranks
        rollout.metrics(sums, r, rewards, cfg.group_size)
        logs.accumulate(sums, "entropy", (entropy * mask).sum(), mask.sum())
        logs.accumulate(sums, "reward_kl", kl.sum(), mask.sum())  # [R++] the k1 the reward carries, per token
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

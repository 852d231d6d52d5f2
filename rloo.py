"""
RLOO: REINFORCE Leave-One-Out (Ahmadian et al., Back to Basics, Cohere, arXiv 2402.14740).

Each completion is one action, log π(o_i) = Σ_t log π(o_it), and REINFORCE's baseline for sample i is
the mean reward of the other k-1 samples of its prompt: unbiased, no critic, no std. The KL to the
reference is a penalty in the reward, as in RLHF's PPO, not a loss term:

    ∇J = 1/k Σ_i Â_i ∇ log π(o_i),   Â_i = R_i - 1/(k-1) Σ_{j≠i} R_j = k/(k-1) (R_i - mean(R))
    R_i = r_i - β Σ_t (log π_old(o_it) - log π_ref(o_it))     (k1, no gradient, in the baseline too)

Off-policy steps use TRL's form: one ratio per completion, ρ_i = exp(Σ_t log π_θ - log π_old), PPO-
clipped; with one on-policy update per batch (the paper's REINFORCE) ρ ≡ 1 and the clip is inert.

What changes versus GRPO, numbered:
 1. Leave-one-out baseline, no std division (group_advantages): Â_i = k/(k-1) (R_i - mean(R)).
 2. The KL moves into the reward: k1 summed over the completion, before the baseline (TRL, verl).
 3. A sequence-level loss: one ratio per completion over its token sum, not a token mean of token ratios.
 4. k = G = 4 (the paper runs k = 2 and 4), 64 prompts, β = 0.03, one on-policy update per batch (num_minibatches = 1).

Launch:
    python rloo.py --tiny                    # the embedded tiny default: CPU, no downloads, about a minute
    torchrun --nproc_per_node=2 rloo.py      # Qwen2.5-1.5B-Instruct on GSM8K, 2 GPUs

Departures from the paper, numbered:
 1. 256 completions per step (64 prompts x 4) instead of the paper's batch of 512; rule-based GSM8K rewards.
 2. The clipped sequence ratio (TRL's RLOOTrainer) guards num_minibatches > 1; the paper has no ratio.

Details: docs/rloo.md
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
    batch_prompts: int = 64  # [RLOO] prompts per rollout batch over all ranks (divisible by world size), in [1, inf)
    group_size: int = 4  # [RLOO] k = G: completions per prompt, in [2, inf); the paper runs k = 2 and 4
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
    num_minibatches: int = 1  # [RLOO] optimizer steps per rollout batch, in [1, inf); 1: on-policy REINFORCE
    micro_batch_size: int = 8  # sequences per forward/backward (accumulated within a mini-batch), in [1, inf)
    gradient_checkpointing: bool = True  # recompute activations in backward to save memory
    logprob_chunk: int = 128  # completion tokens per lm_head chunk in the log-prob computation, in [1, inf)
    lora_rank: int = 0  # LoRA adapters of this rank instead of full fine-tuning, in [0, inf) (0 = off; needs peft)
    fsdp: bool = False  # shard weights, gradients and AdamW state over torchrun's processes (FSDP2), not DDP
    # algorithm
    entropy_coef: float = 0.0  # c: the loss minus c x the mean token entropy (with its gradient), in [0, inf) (0 = off)
    clip_eps: float = 0.2  # [RLOO] ε: PPO clip range for the sequence ratio (TRL), in (0, 1)
    beta: float = 0.03  # [RLOO] β: KL penalty in the reward, in [0, inf) (0 = none, no reference model); paper
    # evaluation and logging
    eval_every: int = 25  # held-out greedy evaluation every this many steps, in [0, inf) (0 = before and after)
    eval_problems: int = 250  # held-out test problems per evaluation, in [1, inf)
    save_every: int = 50  # checkpoint every this many steps (and at the end), in [1, inf)
    wandb_project: str = ""  # log to this wandb project too (needs `pip install wandb`)


# --tiny sets these (explicit --key=value flags still win): a run of about a minute on 2 CPU cores.
TINY = dict(model="tiny", data_path="tiny", num_steps=40, batch_prompts=16, group_size=8, max_new_tokens=32,
            system_prompt="", lr=2e-4, warmup_steps=0, num_minibatches=2, micro_batch_size=64,
            gradient_checkpointing=False, eval_every=20, eval_problems=200, save_every=20)
TINY.update(num_minibatches=1)  # [RLOO] the paper's on-policy REINFORCE step


# -----------------------------------------------------------------------------
# the algorithm: pure functions that tests import without starting a run


def group_advantages(rewards, group_size):  # [RLOO] the leave-one-out baseline, no std
    """Â_i = R_i - the mean of the other G-1 rewards of its group of G consecutive rewards; (B,) -> (B,).
    All-equal groups get Â = 0 exactly (the std only finds them), never rounding noise.
    """
    R = rewards.view(-1, group_size)                                          # (prompts, G)
    loo = (R.sum(1, keepdim=True) - R) / (group_size - 1)  # [RLOO] b_i: the mean of the others
    std = R.std(1, keepdim=True, unbiased=False)
    adv = torch.where(std > 1e-6, R - loo, torch.zeros_like(R))  # [RLOO] = G/(G-1) (R_i - mean)
    return adv.view(-1)


def policy_loss(logp, old_logp, advantages, mask, clip_eps):  # [RLOO] the KL is in the reward, not here
    """-J_RLOO for a batch of sequences: each completion's clipped sequence-ratio surrogate, mean over completions.
    logp, old_logp, mask: (B, T); advantages: (B,). On-policy (ρ = 1) the gradient is Â_i Σ_t ∇log π / B.
    """
    mask = mask.float()
    ratio = torch.exp(((logp - old_logp) * mask).sum(1))  # [RLOO] ρ_i of the whole completion (B,)
    A = advantages
    per_seq = torch.min(ratio * A, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * A)  # [RLOO] (B,)
    loss = -per_seq.mean()
    with torch.no_grad():  # [RLOO] completions whose gradient the clip removes
        clipped = ((A > 0) & (ratio > 1 + clip_eps)) | ((A < 0) & (ratio < 1 - clip_eps))
        stats = {"clip_frac": (clipped.float().sum(), len(A)),  # [RLOO] per completion
                 "ratio": (ratio.sum(), len(A))}
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
        kl = ((old_logp - ref_logp) * mask).sum(1) if ref else torch.zeros_like(rewards)  # [RLOO] k1, summed (B,)
        advantages = group_advantages(rewards - cfg.beta * kl, cfg.group_size)  # [RLOO] the KL is in the reward

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
                    loss, stats = policy_loss(logp.float(), old_logp[ix], advantages[ix], mask[ix],
                                              cfg.clip_eps)  # [RLOO]
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
        logs.accumulate(sums, "kl", kl.sum(), mask.sum())  # [RLOO] the reward's KL, per token
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

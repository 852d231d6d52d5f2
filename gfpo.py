"""
GFPO: Group Filtered Policy Optimization (Shrivastava et al., Microsoft, arXiv 2508.09726).

Longer answers are more often wrong, and GRPO rewards length inflation. GFPO samples a larger group,
keeps the k best completions of each by a metric (the shortest, or the most reward per token), and
trains on that retained set S only, with advantages computed inside S. Sampling costs more; the
update still backpropagates at most k completions per prompt:

    Â_i = m_i (R_i - mean_S(R)) / std_S(R),   m_i = 1 if i ∈ S (top-k by the metric), else 0
    J = 1/Σ_{i∈S}|o_i| Σ_{i∈S} Σ_t { min(ρ_it Â_i, clip(ρ_it, 1-ε, 1+ε) Â_i) - β KL_it }

What changes versus GRPO, numbered:
 1. A larger group: G=16 sampled completions per prompt, k=8 retained ("Shortest 8/16").
 2. The filter: the k shortest (filter_metric=length) or highest R/|o| (efficiency) of each group.
 3. Advantages from the retained rewards only; rejected completions get Â = 0 and are not trained on.
 4. Token-level loss over the retained tokens of a mini-batch (DAPO's, which the paper's runs used).
 5. Adaptive Difficulty (--adaptive_difficulty): k per prompt from its reward quartile (4, 6, 8, 8).

Launch:
    python gfpo.py --tiny                    # the embedded tiny default: CPU, no downloads, about 2 minutes
    torchrun --nproc_per_node=2 gfpo.py      # Qwen2.5-1.5B-Instruct on GSM8K, 2 GPUs

Departures from the paper, numbered:
 1. grpo.py's recipe (β = 0.04, lr 1e-6, 32 prompts) on a 1.5B model; the paper trains Phi-4-reasoning.
 2. Quartiles by mid-rank over the last difficulty_window prompts, not a t-digest; not checkpointed.
 3. Rule-based outcome rewards (GSM8K answer match plus a small format term), not a reward model.

Details: docs/gfpo.md
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
    group_size: int = 16  # [GFPO] G: completions sampled per prompt, in [2, inf) (sample more: grpo.py samples 8)
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
    beta: float = 0.04  # β: k3 KL coefficient, in [0, inf) (0 = no KL and no reference model)
    keep: int = 8  # [GFPO] k: completions retained per prompt, in [2, inf) and at most G
    filter_metric: str = "length"  # [GFPO] in {length, efficiency}: keep the k shortest, or the k highest R/|o|
    adaptive_difficulty: bool = False  # [GFPO] k per prompt from its difficulty bucket instead of `keep`
    difficulty_keep: str = "4,6,8,8"  # [GFPO] k of the buckets easy, medium, hard, very hard (paper, G=16)
    difficulty_window: int = 1024  # [GFPO] past per-prompt mean rewards that define the quartiles, in [1, inf)
    # evaluation and logging
    eval_every: int = 25  # held-out greedy evaluation every this many steps, in [0, inf) (0 = before and after)
    eval_problems: int = 250  # held-out test problems per evaluation, in [1, inf)
    save_every: int = 50  # checkpoint every this many steps (and at the end), in [1, inf)
    wandb_project: str = ""  # log to this wandb project too (needs `pip install wandb`)


# --tiny sets these (explicit --key=value flags still win): a run of about a minute on 2 CPU cores.
TINY = dict(model="tiny", data_path="tiny", num_steps=40, batch_prompts=16, group_size=8, max_new_tokens=32,
            system_prompt="", lr=2e-4, warmup_steps=0, num_minibatches=2, micro_batch_size=64,
            gradient_checkpointing=False, eval_every=20, eval_problems=200, save_every=20)
TINY.update(group_size=16, keep=8)  # [GFPO] twice grpo.py's samples, as many trained completions


# -----------------------------------------------------------------------------
# the algorithm: pure functions that tests import without starting a run


def group_advantages(rewards, group_size):
    """Â_i = (R_i - mean) / std over each group of G consecutive rewards; (B,) -> (B,).

    Std convention (shared by every trainer here): the population std (divide by G), with
    all-equal groups (std < 1e-6) given Â = 0 exactly, never NaN. TRL and verl use the sample
    std plus an epsilon (1e-4 / 1e-6), which scales Â by sqrt((G-1)/G) and changes the clip-free
    loss value but not which tokens clip.
    """
    R = rewards.view(-1, group_size)                                          # (prompts, G)
    mean = R.mean(1, keepdim=True)
    std = R.std(1, keepdim=True, unbiased=False)
    adv = torch.where(std > 1e-6, (R - mean) / std.clamp_min(1e-6), torch.zeros_like(R))
    return adv.view(-1)


def kl_k3(logp, ref_logp):
    """The k3 estimate of KL(π_θ || π_ref) per token (eq. 4): π_ref/π_θ - log(π_ref/π_θ) - 1 >= 0."""
    log_r = ref_logp - logp
    return torch.exp(log_r) - log_r - 1


def retain_mask(rewards, lengths, keep, group_size, metric):  # [GFPO] the filter m
    """True for the k completions of each group that the metric ranks best; (B,) -> (B,) bool.

    keep: one k, or a (prompts,) tensor of k (adaptive difficulty). Ties go to the lower index.
    """
    lengths = lengths.float().clamp_min(1).view(-1, group_size)              # (prompts, G)
    cost = lengths if metric == "length" else -rewards.float().view(-1, group_size) / lengths
    rank = cost.argsort(dim=1, stable=True).argsort(dim=1)                   # (prompts, G), 0 = best
    return (rank < torch.as_tensor(keep, device=rank.device).view(-1, 1)).view(-1)


def filtered_advantages(rewards, retained, group_size):  # [GFPO] group_advantages inside each S, 0 outside
    """Â_i = m_i (R_i - mean_S) / std_S; (B,) -> (B,)."""
    adv = torch.zeros_like(rewards)
    for g, m in enumerate(retained.view(-1, group_size)):
        idx = g * group_size + m.nonzero()[:, 0]                              # this group's S
        adv[idx] = group_advantages(rewards[idx], len(idx))
    return adv


def difficulty_buckets(mean_rewards, history):  # [GFPO] adaptive difficulty: 0 easy .. 3 very hard
    """Each prompt's bucket by the mid-rank percentile p of its mean reward in `history` (p >= 0.75 easy)."""
    h = torch.as_tensor(list(history), dtype=torch.float64)[None, :]          # (1, n)
    m = mean_rewards.detach().double().cpu()[:, None]                        # (prompts, 1)
    p = ((h < m).sum(1) + 0.5 * (h == m).sum(1)) / h.shape[1]                # ties count half: one bucket
    return 3 - (p * 4).floor().long().clamp(0, 3)


def policy_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps, beta, num_tokens):  # [GFPO]
    """-J_GFPO for retained sequences: the token sum divided by num_tokens = Σ_{i∈S}|o_i| of the mini-batch.

    logp, old_logp, ref_logp, mask: (B, T); advantages: (B,). ref_logp is unused when beta == 0.
    """
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)                                        # ρ (B, T)
    A = advantages[:, None]
    per_token = torch.min(ratio * A, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * A)
    kl = kl_k3(logp, ref_logp) if beta > 0 else torch.zeros_like(logp)       # (B, T)
    per_token = per_token - beta * kl
    loss = -(per_token * mask).sum() / num_tokens  # [GFPO] token-level over S, all micro-batches and ranks
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
    given = cfg.difficulty_keep if cfg.adaptive_difficulty else str(cfg.keep)  # [GFPO] one k, or four per bucket
    keeps = [int(k) if k.strip().isdigit() else 0 for k in given.split(",")]
    if len(keeps) != (4 if cfg.adaptive_difficulty else 1) or not all(2 <= k <= cfg.group_size for k in keeps) \
            or B // cfg.group_size * min(keeps) < cfg.num_minibatches:
        raise config.UserError(f"--keep / --difficulty_keep={given}: one k, or 4 (easy, medium, hard, very hard), each "
                               f"in 2..group_size={cfg.group_size}, and >= num_minibatches retained per rank")  # [GFPO]
    history, warned = [], False  # [GFPO] adaptive difficulty: recent per-prompt mean rewards of all ranks
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
        keep = cfg.keep  # [GFPO] 5a. k, or one k per prompt from its difficulty against every rank's history
        if cfg.adaptive_difficulty:
            means = rewards.view(-1, cfg.group_size).mean(1)                     # (prompts,) mean reward
            history = (history + sum(distributed.all_gather_objects(means.tolist(), d), []))[-cfg.difficulty_window:]
            keep = torch.tensor(keeps)[difficulty_buckets(means, history)]
        retained = retain_mask(rewards, r.lengths, keep, cfg.group_size, cfg.filter_metric)  # [GFPO] 5b. (B,)
        advantages = filtered_advantages(rewards, retained, cfg.group_size)   # [GFPO] (B,), 0 when rejected

        # 6. policy update: num_minibatches optimizer steps, each over a shuffled slice of the rollout
        kept = retained.nonzero()[:, 0]  # [GFPO] train on S only: at most k completions per prompt
        perm = kept[torch.randperm(len(kept)).to(d.device)]
        for mb in perm.tensor_split(cfg.num_minibatches):  # [GFPO] as many steps on every rank, whatever its k
            num_tokens = distributed.all_reduce_sum(mask[mb].sum().float(), d)  # [GFPO] Σ_{i∈S}|o_i|, all ranks
            micro = mb.split(cfg.micro_batch_size)
            for k, ix in enumerate(micro):
                # DDP: only the last micro-batch all-reduces gradients across ranks
                with distributed.micro_batch(policy, d, last=k == len(micro) - 1):
                    logp, ent = policy(r.prompt_ids[ix], r.prompt_mask[ix], r.completion_ids[ix], mask[ix],
                                     cfg.temperature)
                    logp = rollout.reweight(logp, is_w, ix)  # --rollout_correction: token t's gradient x w_t
                    loss, stats = policy_loss(logp.float(), old_logp[ix], ref_logp[ix] if ref else None,
                                              advantages[ix], mask[ix], cfg.clip_eps, cfg.beta, num_tokens)
                    (logprobs.entropy_bonus(loss, ent, mask[ix], cfg, num_tokens) * d.world_size).backward()  # [GFPO] sum over ranks
                for key, (s, n) in stats.items():
                    logs.accumulate(sums, key, s, n)
                logs.accumulate(sums, "loss", loss.item(), len(ix) / len(mb) / d.world_size)  # [GFPO]
            grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            logs.accumulate(sums, "grad_norm", grad_norm, 1)

        # 7. metrics, averaged over ranks
        rollout.metrics(sums, r, rewards, cfg.group_size)
        logs.accumulate(sums, "entropy", (entropy * mask).sum(), mask.sum())
        dead = (advantages.view(-1, cfg.group_size) == 0).all(1)  # [GFPO] retained rewards all equal: no gradient
        zeroed = dead & (rewards.view(-1, cfg.group_size).std(1) > 1e-6)  # [GFPO] ... though the group's were not
        for key, s, n in [("response_length_retained", r.lengths[retained].sum(), retained.sum()),  # [GFPO]
                          ("keep", retained.sum(), len(dead)), ("zero_std_retained_groups", dead.sum(), len(dead)),
                          ("filter_zeroed_groups", zeroed.sum(), len(dead))]:
            logs.accumulate(sums, key, s, n)
        metrics = logs.reduce(sums, d)
        metrics.update(lr=lr, time_rollout=t_rollout, time_train=time.time() - t0 - t_rollout)
        pbar.set_postfix(logs.progress(metrics))
        if metrics["filter_zeroed_groups"] > 0 and not warned:  # [GFPO] said once, then only logged
            warned = True
            log(f"step {step + 1}: the filter left {metrics['filter_zeroed_groups']:.0%} of groups with equal retained "
                "rewards (no gradient); efficiency filtering with 0/1 rewards does this when >= k are correct")

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

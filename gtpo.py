"""
GTPO: Group-relative Trajectory-based Policy Optimization (Simoni et al., arXiv 2508.03772).

Tokens at the same position in a rewarded and a penalised completion of one group (conflict tokens:
the shared prefix and suffix) get contradictory GRPO updates; GTPO skips their negative update and
amplifies the positive one. High-entropy completions drive collapse; GTPO drops them and shapes the
rest by their mean entropy ⟨H⟩_i:

    J = 1/G Σ_i δ_i (A_i - γ⟨H⟩_i) 1/|o_i| Σ_t r_it λ_it                    (authors' README, arXiv v5)
    λ_it = W (A_i > 0) or 0 (A_i < 0) on the shared prefix and suffix runs, else 1          (W = 2)
    δ_i = 0 if ⟨H⟩_ini < ln 2 and ⟨H⟩_i > ln 2, else 1           (⟨H⟩_ini: the initial model's ⟨H⟩)

What changes versus GRPO, numbered:
 1. Conflict weights λ scale each token's advantage (conflict_weights, after the official code).
 2. The entropy filter δ and shaping A - γ⟨H⟩_i, γ = 0.1 (shaped_advantages); --ent_rule picks the
    paper's rule, the official code's (always 0.7), a percentile of past ⟨H⟩_i, or none.
 3. No KL term (β = 0), so no reference model.
 4. --gspo_token, GSPO + GTPO: GSPO-token's sequence ratio (clip 3e-4/4e-4) carries the per-token λ_it A_i.

Launch:
    python gtpo.py --tiny                    # the embedded tiny default: CPU, no downloads, about a minute
    torchrun --nproc_per_node=2 gtpo.py      # Qwen2.5-1.5B-Instruct on GSM8K, 2 GPUs

Departures from the paper, numbered:
 1. Several optimizer steps per rollout batch, so grpo.py's clip on r is kept (the paper takes one).
 2. Per-sequence token mean and mean over completions, as the objective; the code divides by the
    conflict count and sums. A = (R - mean)/std; --scale_adv=false gives the code's R - mean.
 3. Rule-based outcome rewards (GSM8K answer match plus a small format term), not a reward model.

Details: docs/gtpo.md
"""
import math  # [GTPO] inf: no entropy filter
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
    beta: float = 0.0  # [GTPO] β: k3 KL coefficient, in [0, inf); 0 as in the paper (no KL, no reference model)
    conflict_weight: float = 2.0  # [GTPO] W: λ of a conflict token in a positive completion, in [0, inf) (W_RAW)
    ent_gamma: float = 0.1  # [GTPO] γ: kept completions get A - γ⟨H⟩_i, in [0, inf) (official ENT_SCALE)
    ent_rule: str = "paper"  # [GTPO] entropy filter, in {paper, always, percentile, off}
    ent_threshold: float = 0.6931471805599453  # [GTPO] ⟨H⟩_i cut-off of the paper/always rules (ln 2), in (0, inf)
    ent_percentile: float = 95.0  # [GTPO] percentile rule: this percentile of every ⟨H⟩_i so far, in [0, 100]
    ent_initial: float = -1.0  # [GTPO] ⟨H⟩_ini of the paper rule, in [-inf, inf) (< 0: measured on batch one)
    gspo_token: bool = False  # [GTPO] GSPO + GTPO: GSPO-token's sequence ratio carrying GTPO's per-token Â_it
    gspo_eps_low: float = 3e-4  # [GTPO] with gspo_token: GSPO's ε_low on the sequence ratio (gspo.py), in (0, 1)
    gspo_eps_high: float = 4e-4  # [GTPO] with gspo_token: GSPO's ε_high, in (0, inf)
    scale_adv: bool = True  # [GTPO] A = (R - mean)/std as GRPO; false = the official code's A = R - mean
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


def group_advantages(rewards, group_size, scale=True):  # [GTPO] scale=False: the official code's R - mean
    """Â_i = (R_i - mean) / std over each group of G consecutive rewards; (B,) -> (B,).

    Std convention (shared by every trainer here): the population std (divide by G), with
    all-equal groups (std < 1e-6) given Â = 0 exactly, never NaN. TRL and verl use the sample
    std plus an epsilon (1e-4 / 1e-6), which scales Â by sqrt((G-1)/G) and changes the clip-free
    loss value but not which tokens clip.
    """
    R = rewards.view(-1, group_size)                                          # (prompts, G)
    mean = R.mean(1, keepdim=True)
    std = R.std(1, keepdim=True, unbiased=False)
    adv = torch.where(std > 1e-6, (R - mean) / (std.clamp_min(1e-6) if scale else 1), torch.zeros_like(R))  # [GTPO]
    return adv.view(-1)


def kl_k3(logp, ref_logp):
    """The k3 estimate of KL(π_θ || π_ref) per token (eq. 4): π_ref/π_θ - log(π_ref/π_θ) - 1 >= 0."""
    log_r = ref_logp - logp
    return torch.exp(log_r) - log_r - 1


def conflict_runs(ids, valid, pos, neg):  # [GTPO] a conflict token's run must start at t = 0 (a cumprod)
    """(P, G, T) bool: the same id at position t in a positive and a negative completion of the group.

    ids, valid: (P, G, T) token ids and real-token mask of P groups of G; pos, neg: (P, G) bool. Padding
    never matches: the mask decides, not a pad id (Qwen's <|endoftext|> is both a pad and an EOS).
    """
    same = (ids[:, :, None] == ids[:, None, :]) & valid[:, :, None] & valid[:, None, :]   # (P, G_i, G_j, T)
    in_pos = (same & pos[:, None, :, None]).any(2)                                      # (P, G, T)
    in_neg = (same & neg[:, None, :, None]).any(2)
    raw = in_pos & in_neg & (pos | neg)[..., None] & valid
    return raw.long().cumprod(-1).bool()


def conflict_weights(completion_ids, mask, advantages, group_size, weight):  # [GTPO] λ
    """λ (B, T) and the prefix and suffix conflict masks (B, T) of a right-padded rollout.

    λ_it = f_it · b_it, each factor W (A_i > 0) or 0 (A_i < 0) on its run and 1 elsewhere (4 = W² where the
    runs overlap). The suffix run aligns every completion at its last real token.
    """
    B, T = completion_ids.shape
    ids, valid = completion_ids.view(-1, group_size, T), mask.bool().view(-1, group_size, T)
    pos, neg = advantages.view(-1, group_size) > 0, advantages.view(-1, group_size) < 0
    fwd = conflict_runs(ids, valid, pos, neg)
    lengths = valid.sum(-1, keepdim=True)                                              # (P, G, 1)
    k = torch.arange(T, device=completion_ids.device)
    idx = (lengths - 1 - k).clamp_min(0)                  # reversed row: position len - 1 - k (an involution)
    bwd = conflict_runs(ids.gather(-1, idx), k < lengths, pos, neg).gather(-1, idx) & valid
    sign = torch.where(pos, weight, 0.0)[..., None]                                    # W or 0 per completion
    lam = torch.where(fwd, sign, 1.0) * torch.where(bwd, sign, 1.0)
    return lam.view(B, T), fwd.view(B, T), bwd.view(B, T)


def entropy_threshold(rule, threshold, h_ini, history, percentile):  # [GTPO] δ's cut-off; inf = no filter
    """paper: threshold if ⟨H⟩_ini < threshold else inf; always: threshold (the official code, 0.7);
    percentile: that percentile of `history`, every ⟨H⟩_i so far; off: inf."""
    if rule == "percentile":
        return torch.quantile(torch.tensor(history, dtype=torch.float64), percentile / 100.0).item()
    return threshold if rule == "always" or (rule == "paper" and h_ini < threshold) else math.inf


def shaped_advantages(advantages, seq_entropy, threshold, gamma):  # [GTPO] A'_i = δ_i (A_i - γ⟨H⟩_i)
    """(A', δ): δ_i = [⟨H⟩_i <= threshold]; ⟨H⟩_i enters as a constant, as in the official code."""
    keep = seq_entropy <= threshold
    return torch.where(keep, advantages - gamma * seq_entropy, torch.zeros_like(advantages)), keep


def policy_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps, beta, lam, gspo_eps=None):  # [GTPO] + λ
    """-J_GTPO for a batch of sequences: per-sequence token mean, then mean over sequences.

    logp, old_logp, ref_logp, mask: (B, T); advantages: (B,). ref_logp is unused when beta == 0.
    """
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)                                        # ρ (B, T)
    if gspo_eps:  # [GTPO] GSPO-token (gspo.py, eq. 14): s_it = sg[s_i] π_θ/sg[π_θ], s_i = exp(mean_t log ρ_it)
        log_s = ((logp - old_logp) * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp_min(1)
        ratio = torch.exp(log_s.detach() + logp - logp.detach())
    lo, hi = gspo_eps or (clip_eps, clip_eps)  # [GTPO] GSPO's (ε_low, ε_high) with the sequence ratio
    A = advantages[:, None] * lam  # [GTPO] Â_it = λ_it A'_i (λ >= 0: = λ·min(ρA, clip(ρ)A))
    per_token = torch.min(ratio * A, torch.clamp(ratio, 1 - lo, 1 + hi) * A)  # [GTPO]
    kl = kl_k3(logp, ref_logp) if beta > 0 else torch.zeros_like(logp)       # (B, T)
    per_token = per_token - beta * kl
    per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp_min(1)            # (B,)
    loss = -per_seq.mean()
    with torch.no_grad():  # tokens whose gradient the clip removes
        clipped = ((A > 0) & (ratio > 1 + hi)) | ((A < 0) & (ratio < 1 - lo))  # [GTPO]
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
    state = checkpoint.restore(ckpt, optimizer, d) if ckpt else {"step": 0, "extra": {}}  # [GTPO]
    start_step, extra = state["step"], state["extra"]  # [GTPO] ⟨H⟩_ini and the ⟨H⟩_i seen so far survive a resume
    h_ini, h_seen = extra.get("ent_initial", cfg.ent_initial), extra.get("ent_history", [])

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
        advantages = group_advantages(rewards, cfg.group_size, cfg.scale_adv)     # [GTPO] (B,)
        # [GTPO] 5b. λ from the signs of A (before filtering, as the official code), then δ and A' = δ(A - γ⟨H⟩)
        lam, fwd, bwd = conflict_weights(r.completion_ids, mask, advantages, cfg.group_size, cfg.conflict_weight)
        seq_ent = (entropy * mask).sum(1) / mask.sum(1)                          # ⟨H⟩_i of π_old (B,)
        if h_ini < 0:  # the first rollout batch of the run: the initial model's ⟨H⟩, over all ranks
            h_ini = logs.reduce({"h": (seq_ent.sum(), B)}, d)["h"]
            log(f"initial mean entropy ⟨H⟩_ini = {h_ini:.4f} (paper rule filters if < {cfg.ent_threshold:.4f})")
        h_seen += sum(distributed.all_gather_objects(seq_ent.tolist(), d), []) if cfg.ent_rule == "percentile" else []
        threshold = entropy_threshold(cfg.ent_rule, cfg.ent_threshold, h_ini, h_seen, cfg.ent_percentile)
        advantages, kept = shaped_advantages(advantages, seq_ent, threshold, cfg.ent_gamma)

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
                                              advantages[ix], mask[ix], cfg.clip_eps, cfg.beta, lam[ix],  # [GTPO]
                                              (cfg.gspo_eps_low, cfg.gspo_eps_high) if cfg.gspo_token else None)
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
        for key, s, n in [("conflict_frac", ((fwd | bwd) & mask.bool()).sum(), mask.sum()),  # [GTPO]
                          ("filtered_frac", (~kept).sum(), B), ("entropy_seq", seq_ent.sum(), B)]:
            logs.accumulate(sums, key, s, n)
        metrics = logs.reduce(sums, d)
        metrics.update(lr=lr, time_rollout=t_rollout, time_train=time.time() - t0 - t_rollout)
        metrics.update(ent_initial=h_ini, ent_threshold=min(threshold, 1e9))  # [GTPO] 1e9: no filtering
        pbar.set_postfix(logs.progress(metrics))

        # 8. periodic held-out eval and checkpoint
        done = step + 1
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.num_steps:
            ev = evaluate()
            metrics.update({f"eval/{k}": v for k, v in ev.items()})
            log(f"step {done}: held-out greedy accuracy {ev['strict']:.3f}")
        logger.log(done, metrics)
        if done % cfg.save_every == 0 or done == cfg.num_steps:
            checkpoint.save(cfg.run_dir, done, raw.lm, tok, optimizer, cfg, d,
                            extra={"ent_initial": h_ini, "ent_history": h_seen})  # [GTPO] for a resume

    if start_step < cfg.num_steps:
        log(f"held-out greedy accuracy after RL: {metrics['eval/strict']:.3f} (lenient {metrics['eval/lenient']:.3f})")
    distributed.check_replicas(raw, optimizer, d)  # DDP: every rank holds the same weights and took the same steps
    distributed.cleanup(d)


if __name__ == "__main__":
    config.run(main)

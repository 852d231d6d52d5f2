"""
GSPO: Group Sequence Policy Optimization (Zheng et al., Qwen team, arXiv 2507.18071).

GRPO weights every token by its own ratio ρ_it = π_θ(y_it)/π_old(y_it), though the reward (and
so the advantage) belongs to the whole sequence. GSPO uses one ratio per sequence, the geometric
mean of its token ratios, and clips whole sequences:

    J = 1/G Σ_i min(s_i Â_i, clip(s_i, 1-ε_low, 1+ε_high) Â_i)                            (eq. 5)
    s_i = (π_θ(y_i|x) / π_old(y_i|x))^(1/|y_i|) = exp(1/|y_i| Σ_t log ρ_it)                  (eq. 7)
    ∇J = 1/G Σ_i [unclipped_i] s_i Â_i · 1/|y_i| Σ_t ∇log π_θ(y_it)                           (eq. 11)

What changes versus grpo.py (every changed line carries the [GSPO] tag), numbered:
 1. The ratio: s_i, the length-normalised (1/|y_i|) sequence ratio, replaces the token ratio ρ_it.
    Without the 1/|y_i| the ratio of a long sequence is a product of hundreds of token ratios
    and leaves any clip range after one step.
 2. The clip: on s_i, with ε_low = 3e-4 and ε_high = 4e-4 (paper §5.1), so a whole sequence is in
    or out of the trust region. The loss is one term per sequence, averaged over sequences; no
    sequence is weighted by its length (TRL's default loss_type="dapo" does that: see docs/gspo.md).
 3. No KL term and no reference model (the paper trains without one; TRL sets beta=0).
 4. GSPO-token (§4.3, eqs. 13-14), --gspo_token: s_it = sg[s_i] · π_θ(y_it)/sg[π_θ(y_it)]. Same value
    as s_i; it exists to allow per-token advantages Â_it. With the per-sequence Â_i used here its
    value and gradient equal GSPO's (a test checks this).
 5. Logs the fraction of sequences (clip_frac_seq) and of tokens (clip_frac) that the clip removes
    from the gradient. The paper's headline: GSPO clips about two orders of magnitude more tokens
    than GRPO and still learns faster.
Several mini-batch updates per rollout batch matter here: num_minibatches=4, as in the paper (each
rollout batch split into 4 mini-batches). On the first mini-batch the data is exactly on-policy,
s_i = 1, and GSPO's gradient equals GRPO's (β=0): 1/G Σ_i Â_i 1/|y_i| Σ_t ∇log π. Only the later,
off-policy mini-batches see the sequence ratio and the sequence clip.

Launch:
    python gspo.py --tiny                          # embedded default: CPU, no downloads (see below)
    torchrun --nproc_per_node=2 gspo.py            # Qwen2.5-1.5B-Instruct on GSM8K, 2 GPUs
    torchrun --nproc_per_node=2 gspo.py --tiny     # the tiny default under DDP (gloo on CPU)
    python gspo.py --gspo_token                    # the GSPO-token objective instead
    python gspo.py --help                          # every knob with its default

Departures from the paper, numbered:
 1. Qwen2.5-1.5B-Instruct on GSM8K with G=8 and 32 prompts per step, to fit 2 GPUs; the paper trains
    a cold-start Qwen3-30B-A3B-Base (MoE) on math and code, where its stability claims were made.
 2. Outcome rewards are rule-based (GSM8K answer match plus a small format term).
 3. Old log-probs are recomputed by the trainer, as in grpo.py; the paper notes that GSPO could use
    the inference engine's sequence likelihoods instead. On GPU the recomputation runs under bf16
    autocast, so s_i on the on-policy mini-batch can differ from 1 by bf16 rounding; with
    ε = 3e-4 that noise is not negligible (watch clip_frac on the first steps).

Scaled-down defaults: --tiny (the TINY dict) keeps grpo.py's tiny settings (40 steps, 16 prompts x 8,
32 new tokens, lr 2e-4, 2 mini-batches) so the two trainers compare directly on 2 CPU cores. At that lr
one optimizer step moves many s_i well past 1 ± 4e-4, so the second mini-batch clips about half of its
sequences; the on-policy first mini-batch and the unclipped rest still carry the learning.
Expected result on the tiny default (seed 0): held-out greedy accuracy 0.285 before RL, 0.610 at step 20,
0.595 after 40 steps; clip_frac ≈ 0.28 against ≈ 0.004 for grpo.py on the same settings.
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
    # [GSPO] `model` is the initial policy only: there is no reference model
    model: str = "Qwen/Qwen2.5-1.5B-Instruct"  # hub name or local dir of the initial policy
    data_path: str = ""  # local GSM8K: a jsonl file or a dir with train.jsonl/test.jsonl ("" = hub openai/gsm8k)
    # [GSPO] its own run dir
    run_dir: str = "runs/gspo"  # metrics.jsonl, config.json and checkpoints go here
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
    # [GSPO] sequence-level clip bounds (paper §5.1; its GRPO baseline used 0.2/0.27 on token ratios)
    clip_eps_low: float = 3e-4  # ε_low: s_i below 1 - ε_low is clipped when Â_i < 0
    clip_eps_high: float = 4e-4  # ε_high: s_i above 1 + ε_high is clipped when Â_i > 0
    gspo_token: bool = False  # GSPO-token objective (§4.3): per-token s_it; same value and gradient as GSPO here
    # [GSPO] no β: GSPO has no KL term, so no reference model is loaded
    # evaluation and logging
    eval_every: int = 25  # held-out greedy evaluation every this many steps (0 = only before and after)
    eval_problems: int = 250  # held-out test problems per evaluation
    save_every: int = 50  # checkpoint every this many steps (and at the end)
    wandb_project: str = ""  # log to this wandb project too (needs `pip install wandb`)


# --tiny sets these (explicit --key=value flags still win): a run of a few minutes on 2 CPU cores.
# [GSPO] grpo.py's values, untuned: with ε = 3e-4/4e-4 and lr 2e-4 the second mini-batch clips about half
# its sequences (clip_frac_seq ≈ 0.28 over both), yet held-out accuracy rose 0.285 -> 0.595 (seed 0).
TINY = dict(num_steps=40, batch_prompts=16, group_size=8, max_new_tokens=32, system_prompt="",
            lr=2e-4, warmup_steps=0, num_minibatches=2, micro_batch_size=64, gradient_checkpointing=False,
            eval_every=20, eval_problems=200, save_every=20, run_dir="runs/gspo-tiny")  # [GSPO]


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


def sequence_log_ratio(logp, old_logp, mask):  # [GSPO] the sequence ratio s_i (eq. 7), in log space
    """log s_i = 1/|y_i| Σ_t (log π_θ(y_it) - log π_old(y_it)), the length-normalised log-ratio; (B,)."""
    # [GSPO] The 1/|y_i| makes s_i the geometric mean of the token ratios: a sequence twice as long with
    # the same per-token log-ratio has the same s_i. Without it s_i = Π_t ρ_it, a product of hundreds
    # of token ratios, which leaves a ±4e-4 clip range after the first update.
    mask = mask.float()
    return ((logp - old_logp) * mask).sum(1) / mask.sum(1).clamp_min(1)


def policy_loss(logp, old_logp, advantages, mask, clip_eps_low, clip_eps_high, gspo_token=False):  # [GSPO]
    """-J_GSPO (eq. 5) for a batch of sequences: one clipped term per sequence, mean over sequences.

    logp, old_logp, mask: (B, T); advantages: (B,), or (B, T) per-token advantages with gspo_token.
    gspo_token=True gives -J_GSPO-token (eq. 13): the same clipped term per token with s_it (eq. 14),
    token mean per sequence, mean over sequences. With (B,) advantages both have the same value and
    gradient: 1/G Σ_i [unclipped_i] s_i Â_i 1/|y_i| Σ_t ∇log π_θ(y_it) (eqs. 11 and 18).
    """
    mask = mask.float()
    log_s = sequence_log_ratio(logp, old_logp, mask)                          # [GSPO] log s_i (B,)
    if gspo_token:  # [GSPO] GSPO-token, eq. 14: s_it = sg[s_i] · π_θ(y_it) / sg[π_θ(y_it)]
        ratio = torch.exp(log_s.detach()[:, None] + logp - logp.detach())     # s_it (B, T)
        A = advantages if advantages.dim() == 2 else advantages[:, None]      # Â_it (B, T) or (B, 1)
    else:
        if advantages.dim() != 1:
            raise ValueError(f"GSPO takes one advantage per sequence, shape (B,), got {tuple(advantages.shape)}; "
                             "per-token advantages need gspo_token=True")
        ratio = torch.exp(log_s)[:, None]                                     # s_i (B, 1)
        A = advantages[:, None]
    surrogate = torch.min(ratio * A, torch.clamp(ratio, 1 - clip_eps_low, 1 + clip_eps_high) * A)  # [GSPO] eq. 5
    if gspo_token:
        per_seq = (surrogate * mask).sum(1) / mask.sum(1).clamp_min(1)        # token mean (B,)
    else:
        per_seq = surrogate[:, 0]  # one term per sequence, never weighted by its length (B,)
    loss = -per_seq.mean()
    with torch.no_grad():  # [GSPO] what the clip removes from the gradient, per token and per sequence
        clipped = ((A > 0) & (ratio > 1 + clip_eps_high)) | ((A < 0) & (ratio < 1 - clip_eps_low))
        clipped = clipped.expand_as(mask) & mask.bool()                       # clipped tokens (B, T)
        n = mask.sum(1)
        seq_clipped = (clipped.sum(1) == n) & (n > 0)  # every token clipped: no gradient from y_i
        stats = {"clip_frac": (clipped.sum(), mask.sum()),                    # fraction of tokens
                 "clip_frac_seq": (seq_clipped.sum(), len(n)),                # fraction of sequences
                 "ratio": (log_s.exp().sum(), len(n))}                        # mean s_i
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

    # model, tokenizer, optimizer  # [GSPO] no reference model
    tok = common.load_tokenizer(cfg.model)
    ckpt = common.resolve_checkpoint(cfg.resume) if cfg.resume else ""
    master_dtype = torch.float32  # fp32 master weights: lr=1e-6 updates survive (bf16 would round them away)
    policy = common.Policy(common.load_model(ckpt or cfg.model, d.device, master_dtype),
                           cfg.logprob_chunk, cfg.gradient_checkpointing).train()
    raw = policy  # the unwrapped module: generation and saving use raw.lm
    if d.ddp:
        policy = DDP(policy, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    # [GSPO] no frozen reference model: GSPO has no KL term (TRL beta=0.0, verl use_kl_loss=False)
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

    pbar = tqdm(range(start_step, cfg.num_steps), disable=not d.master_process, desc="gspo")  # [GSPO]
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

        # 5. old log-probs, fixed for all mini-batches of this step  # [GSPO] no reference log-probs
        old_logp, entropy = common.batched_logprobs(raw, r, cfg.micro_batch_size, cfg.temperature)
        # [GSPO] (grpo.py computes ref_logp here; GSPO has no KL term)
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
                    loss, stats = policy_loss(logp.float(), old_logp[ix], advantages[ix], mask[ix],  # [GSPO]
                                              cfg.clip_eps_low, cfg.clip_eps_high, cfg.gspo_token)
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

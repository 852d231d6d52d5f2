"""
GFPO: Group Filtered Policy Optimization, "Sample More to Think Less: Group Filtered Policy
Optimization for Concise Reasoning" (Shrivastava, Awadallah, Balachandran, Garg, Behl,
Papailiopoulos; Microsoft Research + UW-Madison, arXiv 2508.09726).

GRPO with a larger group and a filter: sample G completions per prompt, keep the k best by a
metric (the k shortest, or the k with the highest token efficiency R/|o|), and train on the
retained set S only, with advantages computed inside S. Since longer answers are more often
wrong, learning only from short (or reward-dense) samples curbs GRPO's length inflation; the
extra cost is at sampling time only, the update still backpropagates at most k per prompt:

    Â_i = m_i (R_i - mean_S(R)) / std_S(R),   m_i = 1 if i ∈ S (top-k by the metric), else 0
    J = 1/Σ_{i∈S}|o_i| Σ_i Σ_t { min(ρ_it Â_i, clip(ρ_it, 1-ε, 1+ε) Â_i) - β KL_it }

What changes versus grpo.py, numbered (each marked `[GFPO]` in the code):
 1. Larger group: G=16 sampled completions per prompt (grpo.py: 8).
 2. Group filtering: keep k=8 of G per prompt, the shortest (--filter_metric=length) or the most
    token-efficient (--filter_metric=efficiency, highest R/|o|); ties go to the lower index.
 3. Advantages from the mean and std of the retained rewards only (population std, all-equal -> 0,
    the convention of group_advantages); rejected completions get Â = 0 and are not trained on.
 4. Token-level loss (DAPO-style, which the paper's runs used): the token sum over the retained
    completions of a mini-batch, divided by their token count Σ_{i∈S}|o_i| over all ranks.
 5. Optional Adaptive Difficulty (--adaptive_difficulty): each prompt's k comes from the bucket of
    its mean reward against streaming quartiles of past prompts' mean rewards (easy 4, medium 6,
    hard 8, very hard 8 of G=16).
 6. Logs: response_length (all G samples, as in grpo.py) next to response_length_retained, the
    retained k, and filter_zeroed_groups: groups that had reward variance before filtering and none
    after (efficiency filtering with 0/1 rewards keeps only correct answers: no gradient from them).

Launch:
    python gfpo.py --tiny                          # embedded default: CPU, no downloads, ~2x grpo.py's time
    torchrun --nproc_per_node=2 gfpo.py            # Qwen2.5-1.5B-Instruct on GSM8K, 2 GPUs
    torchrun --nproc_per_node=2 gfpo.py --tiny     # the tiny default under DDP (gloo on CPU)
    python gfpo.py --filter_metric=efficiency      # "Token Efficiency" GFPO
    python gfpo.py --adaptive_difficulty           # "Adaptive Difficulty" GFPO
    python gfpo.py --help                          # every knob with its default

Departures from the paper and scaled-down defaults, numbered:
 1. The paper trains Phi-4-reasoning (14B) with the Phi-4-reasoning-plus GRPO recipe and compares
    G in {8, 16, 24}, k in {4, 6, 8}; we keep grpo.py's recipe (32 prompts, lr 1e-6, β=0.04, 4
    mini-batches per rollout, 2 GPUs) and use "Shortest 8/16". The k/G grid and the adaptive
    bucket values are recalled from the paper [R], not checked against the PDF.
 2. The paper keeps streaming quartiles with a t-digest over the whole run; we keep the last
    difficulty_window per-prompt mean rewards (identical on every rank) and rank a prompt by
    mid-rank against them, so tied means (common with 0/1 rewards) land in one bucket. This
    history is not checkpointed: a resumed run rebuilds it from the steps after the resume.
 3. Std convention: population std, as every trainer here; TRL's GFPOTrainer used the sample std
    + 1e-4 and dropped rejected rows from the batch (the same loss as Â=0 with the normaliser over
    S, which is what we train: only retained rows are forwarded in the update).
Expected result on the tiny default (seed 0): held-out greedy accuracy 0.285 -> 0.615 (grpo.py: 0.655),
retained completions 20.3 tokens on average against grpo.py's 21.2. The tiny task has no filler to
cut (its correct answers are the longer two-step ones), so all samples and greedy answers end up as
long as grpo.py's; see docs/gfpo.md.
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
    run_dir: str = "runs/gfpo"  # [GFPO] metrics.jsonl, config.json and checkpoints go here
    resume: str = ""  # checkpoint dir, or a run dir (uses its `latest`), to continue from exactly
    seed: int = 0  # seeds prompt order, sampling and mini-batch shuffling (rank r uses seed + r)
    # rollout
    num_steps: int = 200  # rollout batches; each is followed by num_minibatches optimizer steps
    batch_prompts: int = 32  # prompts per rollout batch, over all ranks (divisible by world size)
    group_size: int = 16  # [GFPO] G: completions sampled per prompt (sample more: GRPO baseline 8)
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
    # [GFPO] group filtering
    keep: int = 8  # [GFPO] k: completions retained per prompt, 2 <= k <= G (k = G: GRPO with a token-level loss)
    filter_metric: str = "length"  # [GFPO] "length": keep the k shortest; "efficiency": the k highest reward / length
    adaptive_difficulty: bool = False  # [GFPO] k per prompt from its difficulty bucket instead of `keep`
    difficulty_keep: str = "4,6,8,8"  # [GFPO] k for the buckets easy, medium, hard, very hard (paper, G=16 [R])
    difficulty_window: int = 1024  # [GFPO] per-prompt mean rewards kept for the streaming quartiles
    # evaluation and logging
    eval_every: int = 25  # held-out greedy evaluation every this many steps (0 = only before and after)
    eval_problems: int = 250  # held-out test problems per evaluation
    save_every: int = 50  # checkpoint every this many steps (and at the end)
    wandb_project: str = ""  # log to this wandb project too (needs `pip install wandb`)


# --tiny sets these (explicit --key=value flags still win): a run of a few minutes on 2 CPU cores.
# [GFPO] G=16, k=8: twice grpo.py's samples, the same number of trained completions per step.
TINY = dict(num_steps=40, batch_prompts=16, group_size=16, keep=8, max_new_tokens=32, system_prompt="",  # [GFPO]
            lr=2e-4, warmup_steps=0, num_minibatches=2, micro_batch_size=64, gradient_checkpointing=False,
            eval_every=20, eval_problems=200, save_every=20, run_dir="runs/gfpo-tiny")  # [GFPO]


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


# [GFPO] group filtering (paper §3; the PDF was not reachable here, so equation numbers are not cited)
def retain_mask(rewards, lengths, keep, group_size, metric):
    """[GFPO] m_i: True for the k completions of each group that the metric ranks best; (B,) -> (B,) bool.

    metric "length": the k shortest |o_i|; "efficiency": the k highest token efficiency R_i / |o_i|.
    keep: an int k, or a (prompts,) tensor with one k per prompt (adaptive difficulty). Ties go to
    the lower index (a stable sort), so reruns retain the same set. TRL's GFPOTrainer takes the top-k
    of a user score function with torch.topk (the largest scores: "shortest" needs -length).
    """
    lengths = lengths.float().clamp_min(1).view(-1, group_size)              # (prompts, G)
    if metric == "length":
        cost = lengths                                                       # shortest first
    elif metric == "efficiency":
        cost = -rewards.float().view(-1, group_size) / lengths               # most reward per token first
    else:
        raise ValueError(f"filter_metric must be 'length' or 'efficiency', got {metric!r}")
    rank = cost.argsort(dim=1, stable=True).argsort(dim=1)                   # (prompts, G), 0 = best
    keep = torch.as_tensor(keep, device=rank.device).view(-1, 1)             # k, or one k per prompt
    return (rank < keep).view(-1)


def filtered_advantages(rewards, retained, group_size):
    """[GFPO] Â_i = m_i (R_i - mean_S) / std_S: group_advantages within each group's retained set S; (B,) -> (B,).

    Rejected completions get exactly 0. With 0/1 rewards and the efficiency metric, S is all correct
    whenever at least k are, so std_S = 0 and the whole group gets 0 (logged as filter_zeroed_groups).
    """
    adv = torch.zeros_like(rewards)
    for g, m in enumerate(retained.view(-1, group_size)):
        idx = g * group_size + m.nonzero()[:, 0]                              # this group's S
        if len(idx):
            adv[idx] = group_advantages(rewards[idx], len(idx))
    return adv


DIFFICULTY_BUCKETS = ("easy", "medium", "hard", "very hard")  # [GFPO] index 0..3 into difficulty_keep


def difficulty_buckets(mean_rewards, history):
    """[GFPO] Bucket of each prompt's mean reward against the quartiles of `history`: 0 easy .. 3 very hard.

    The prompt's mid-rank percentile in the history, p = (#{h < m} + #{h = m} / 2) / n, replaces the
    paper's t-digest quartiles: p >= 0.75 (top reward quartile) is easy, [0.5, 0.75) medium,
    [0.25, 0.5) hard, < 0.25 very hard. Ties count half, so tied means share one bucket.
    """
    h = torch.as_tensor(list(history), dtype=torch.float64)[None, :]          # (1, n)
    if h.numel() == 0:
        raise ValueError("difficulty history is empty: add this step's mean rewards before bucketing")
    m = mean_rewards.detach().double().cpu()[:, None]                        # (prompts, 1)
    p = ((h < m).sum(1) + 0.5 * (h == m).sum(1)) / h.numel()                 # (prompts,)
    return 3 - (p * 4).floor().long().clamp(0, 3)


def adaptive_keep(mean_rewards, history, keep_per_bucket):
    """[GFPO] Adaptive Difficulty: k per prompt from its bucket; keep_per_bucket = (easy, medium, hard, very hard)."""
    return torch.tensor(keep_per_bucket)[difficulty_buckets(mean_rewards, history)]


def policy_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps, beta, retained, num_tokens):  # [GFPO]
    """-J_GFPO for a batch of sequences: token sum over the retained completions / num_tokens.  [GFPO]

    logp, old_logp, ref_logp, mask: (B, T); advantages: (B,). ref_logp is unused when beta == 0.
    [GFPO] retained: (B,) bool, the filter's mask m. num_tokens = Σ_{i∈S}|o_i| of the whole mini-batch (every micro-batch, every rank), so the
    micro-batch losses add up to the mini-batch's token-level loss (DAPO eq. 12, which the paper's
    runs used); rejected completions (retained = False) have no tokens in it and get no gradient.
    """
    mask = mask.float() * retained[:, None]  # [GFPO] rejected completions drop out of the sum
    ratio = torch.exp(logp - old_logp)                                        # ρ (B, T)
    A = advantages[:, None]
    surrogate = torch.min(ratio * A, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * A)
    per_token = surrogate
    if beta > 0:
        log_r = ref_logp - logp
        kl = torch.exp(log_r) - log_r - 1                                     # k3 estimator, ≥ 0
        per_token = per_token - beta * kl
    loss = -(per_token * mask).sum() / num_tokens  # [GFPO] token-level: 1/Σ_{i∈S}|o_i| Σ_{i∈S} Σ_t
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
    # [GFPO] k per bucket (adaptive) or one k; at least num_minibatches retained rows per rank, so
    # every rank takes the same number of optimizer steps
    keeps = [int(k) for k in cfg.difficulty_keep.split(",")] if cfg.adaptive_difficulty else [cfg.keep]
    if len(keeps) != (4 if cfg.adaptive_difficulty else 1) or not all(2 <= k <= cfg.group_size for k in keeps):
        raise ValueError(f"keep / difficulty_keep must be one k, or 4 (easy, medium, hard, very hard), each in "
                         f"2..group_size={cfg.group_size} (one retained completion has no group baseline); got {keeps}")
    if cfg.filter_metric not in ("length", "efficiency"):
        raise ValueError(f"filter_metric must be 'length' or 'efficiency', got {cfg.filter_metric!r}")
    if B // cfg.group_size * min(keeps) < cfg.num_minibatches:
        raise ValueError(f"{B // cfg.group_size * min(keeps)} retained completions per rank do not fill "
                         f"num_minibatches={cfg.num_minibatches}")
    history = []  # [GFPO] adaptive difficulty: recent per-prompt mean rewards, the same on every rank
    warned_zeroed = False  # [GFPO] filter_zeroed_groups is announced once, then only logged
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

    pbar = tqdm(range(start_step, cfg.num_steps), disable=not d.master_process, desc="gfpo")  # [GFPO]
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
        # [GFPO] 4a. k per prompt: fixed, or from its difficulty bucket against the history of every rank's prompts
        keep = torch.full((B // cfg.group_size,), cfg.keep)
        if cfg.adaptive_difficulty:
            mean_rewards = rewards.view(-1, cfg.group_size).mean(1)              # (prompts,) difficulty
            gathered = torch.zeros(d.world_size, len(mean_rewards), device=d.device)
            gathered[d.rank] = mean_rewards
            history = (history + common.all_reduce_sum(gathered, d).view(-1).tolist())[-cfg.difficulty_window:]
            keep = adaptive_keep(mean_rewards, history, keeps)
        # [GFPO] 4b. filter: retain the k best of each group by the metric, advantages within the retained set
        retained = retain_mask(rewards, r.lengths, keep, cfg.group_size, cfg.filter_metric)  # (B,) bool
        advantages = filtered_advantages(rewards, retained, cfg.group_size)   # (B,), 0 for rejected

        # 5. old and reference log-probs, fixed for all mini-batches of this step
        old_logp, entropy = common.batched_logprobs(raw, r, cfg.micro_batch_size, cfg.temperature)
        ref_logp = common.batched_logprobs(ref, r, cfg.micro_batch_size, cfg.temperature)[0] if ref else None
        t_rollout = time.time() - t0

        # 6. policy update: num_minibatches optimizer steps, each over a shuffled slice of the rollout
        raw.train()
        sums = {}
        kept = retained.nonzero()[:, 0]  # [GFPO] train on the retained rows only (≤ k per prompt backpropagated)
        perm = kept[torch.randperm(len(kept)).to(d.device)]  # [GFPO]
        for mb in perm.tensor_split(cfg.num_minibatches):  # [GFPO] exactly num_minibatches, even if k varies by rank
            num_tokens = common.all_reduce_sum(mask[mb].sum().float(), d)  # [GFPO] Σ_{i∈S}|o_i|, mini-batch, all ranks
            micro = mb.split(cfg.micro_batch_size)
            for k, ix in enumerate(micro):
                # only the last micro-batch all-reduces gradients across ranks
                sync = nullcontext() if (not d.ddp or k == len(micro) - 1) else policy.no_sync()
                with sync, common.autocast(d.device):
                    logp, _ = policy(r.prompt_ids[ix], r.prompt_mask[ix], r.completion_ids[ix], mask[ix],
                                     cfg.temperature)
                    loss, stats = policy_loss(logp.float(), old_logp[ix], ref_logp[ix] if ref else None,
                                              advantages[ix], mask[ix], cfg.clip_eps, cfg.beta,
                                              retained[ix], num_tokens)  # [GFPO]
                    # [GFPO] DDP averages gradients over ranks; × world_size makes the result
                    # Σ_{all ranks} Σ_{i∈S} Σ_t / num_tokens, the token-level loss of the global mini-batch
                    (loss * d.world_size).backward()
                for key, (s, n) in stats.items():
                    common.accumulate(sums, key, s, n)
                common.accumulate(sums, "loss", loss.item(), len(ix) / len(mb) / d.world_size)  # [GFPO] sums to 1 per mini-batch
            grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            common.accumulate(sums, "grad_norm", grad_norm, 1)

        # 7. metrics, averaged over ranks
        correct = torch.tensor([common.correctness_reward(t, a) for t, a in zip(r.texts, answers)])
        zero_std = rewards.view(-1, cfg.group_size).std(1) < 1e-6
        lengths = r.lengths.float()
        # [GFPO] groups whose retained set has no reward variance (no gradient), and among them those where
        # the full group had some: the filter removed the signal (efficiency + 0/1 rewards, ALGORITHMS.md §5(i))
        zero_std_kept = (advantages.view(-1, cfg.group_size) == 0).all(1)
        filter_zeroed = zero_std_kept & ~zero_std
        for key, s, n in [("reward", rewards.sum(), B), ("accuracy", correct.sum(), B),
                          ("response_length", lengths.sum(), B), ("truncated", r.truncated.sum(), B),
                          ("entropy", (entropy * mask).sum(), mask.sum()), ("zero_std_groups", zero_std.sum(), len(zero_std)),
                          ("response_length_retained", lengths[retained].sum(), retained.sum()),  # [GFPO]
                          ("reward_retained", rewards[retained].sum(), retained.sum()),  # [GFPO]
                          ("keep", retained.sum(), len(zero_std)),  # [GFPO] mean k per prompt
                          ("zero_std_retained_groups", zero_std_kept.sum(), len(zero_std)),  # [GFPO]
                          ("filter_zeroed_groups", filter_zeroed.sum(), len(zero_std))]:  # [GFPO]
            common.accumulate(sums, key, s, n)
        metrics = common.reduce_metrics(sums, d)
        metrics.update(lr=lr, time_rollout=t_rollout, time_train=time.time() - t0 - t_rollout)
        pbar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.3f}",
                         len=f"{metrics['response_length']:.0f}", clip=f"{metrics['clip_frac']:.3f}",
                         len_kept=f"{metrics['response_length_retained']:.0f}")  # [GFPO]
        if metrics["filter_zeroed_groups"] > 0 and not warned_zeroed:  # [GFPO] the degenerate case, said out loud once
            warned_zeroed = True
            log(f"step {step + 1}: the filter left {metrics['filter_zeroed_groups']:.0%} of groups with equal retained "
                f"rewards (no gradient) although the whole group had reward variance; logged every step as "
                f"filter_zeroed_groups (with 0/1 rewards, efficiency filtering keeps only correct answers when >= k are)")

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

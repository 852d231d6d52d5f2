"""
GTPO: Group-relative Trajectory-based Policy Optimization (Simoni, Fontana, Rossolini, Saracino [+ Mori in
v5], arXiv 2508.03772; v1 title "GTPO: Trajectory-Based Policy Optimization in Large Language Models", v5
"GTPO: Stabilizing Group Relative Policy Optimization via Gradient and Entropy Control"; official code
github.com/winstonsmith1897/GTPO). Not arXiv 2508.04349 (Tan et al., "Group Token Policy Optimization",
entropy-weighted token rewards) and not arXiv 2511.14846 (Ding et al., "Group Turn Policy Optimization",
multi-turn tool use): three different papers share the acronym.

GTPO is GRPO with two fixes. Tokens that sit at the same position in a rewarded and a penalised completion
of one group ("conflict tokens", e.g. the shared format prefix and the closing tokens) get contradictory
updates under GRPO; GTPO skips their negative update and amplifies the positive one. High-entropy
completions push the policy toward collapse; GTPO drops them and shapes the rest by their entropy:

    J = 1/G Σ_i δ_i (A_i - γ⟨H⟩_i) 1/|o_i| Σ_t r_it λ_it            (authors' README / arXiv v5 objective)
    λ_it = f_it b_it,  f_it (b_it) = W if t is in the shared-prefix (suffix) conflict run and A_i > 0,
                                     0 if it is and A_i < 0, 1 otherwise                   (W = 2)
    δ_i = 0 if ⟨H⟩_ini < ln 2 and ⟨H⟩_i > ln 2, else 1                       (⟨H⟩: mean token entropy)

What changes versus grpo.py, numbered (every changed line is marked [GTPO]):
 1. Conflict weights λ (conflict_weights): a token is a conflict token when the same token id occurs at the
    same position in a positive- and a negative-advantage completion of its group, counted only along the
    contiguous run from the first token (shared prefix) and, aligned at each completion's last real token,
    the shared suffix, as the official code and the authors (TRL issue #5226) define it. λ multiplies each
    token's surrogate: 0 in negative completions, W (2.0, 4.0 in both runs) in positive ones, 1 elsewhere.
 2. Entropy filter and shaping (entropy_threshold, shaped_advantages): a completion whose mean token
    entropy ⟨H⟩_i (of the current policy, from common.batched_logprobs) exceeds the threshold gets A = 0;
    the kept ones get A - γ⟨H⟩_i (γ = 0.1). Threshold: the paper's ln 2 rule (filter only if the initial
    model's ⟨H⟩_ini, measured on the first rollout batch, is below ln 2); "always" (the official code, with
    --ent_threshold=0.7); or a percentile of the ⟨H⟩_i seen so far (the 95th is the value popular
    write-ups recommend).
 3. No KL and no reference model: beta defaults to 0 (kept only as an ablation knob).
 4. Aggregation is the paper's: per-sequence token mean, then mean over completions. The official code
    instead divides each completion's loss by its conflict-token count and sums over completions (see
    policy_loss); we follow the paper.
 5. Advantages are GRPO's group-normalised (R - mean)/std, as the objective's group-relative A_i; the
    official code drops the std (A = R - mean): --scale_adv=false reproduces it.
 6. Logs: conflict_frac (conflict tokens / tokens), filtered_frac (filtered completions), entropy_seq
    (mean ⟨H⟩_i), ent_initial (⟨H⟩_ini) and the threshold in use.

Not GTPO: a popular write-up describes a token "importance" = 0.4·attention + 0.4·gradient norm + 0.2·token
rarity with a relu on gradients. None of that is in the paper, its README or its code; the only per-token
weight is the constant λ above (docs/gtpo.md maps that description onto the real method).

Departures from the paper, numbered:
 1. Several mini-batch optimizer steps per rollout batch (num_minibatches=4, as grpo.py). The paper and its
    code take one on-policy step (r ≡ 1, no clip); later mini-batches are off-policy, so grpo.py's PPO clip
    on r is kept. Since λ ≥ 0, λ·min(rA, clip(r)A) = min(rλA, clip(r)λA); at r = 1 this is exactly the
    objective above (--num_minibatches=1 gives the paper's single step).
 2. G=8 and 32 prompts per step instead of the paper's G=8/12 with one prompt per device step and LoRA on
    Llama-3.1-8B / Qwen2.5-3B; lr 1e-6 is kept (the official Adam betas 0.999999 are not).
 3. Outcome rewards are rule-based (GSM8K answer match plus a small format term), as in grpo.py.

Launch:
    python gtpo.py --tiny                          # embedded default: CPU, no downloads, ~2 min
    torchrun --nproc_per_node=2 gtpo.py            # Qwen2.5-1.5B-Instruct on GSM8K, 2 GPUs
    torchrun --nproc_per_node=2 gtpo.py --tiny     # the tiny default under DDP (gloo on CPU)
    python gtpo.py --tiny --ent_rule=percentile    # threshold = 95th percentile of the entropies seen so far
    python gtpo.py --help                          # every knob with its default
The paper's equation numbers could not be checked (its body was not reachable); the objective above is the
one in the authors' README. Defaults scaled down: only those of grpo.py (departure 2); no --tiny tuning.
Expected result on the tiny default (seed 0): held-out greedy accuracy 0.285 -> 0.640 after 40 steps, with
about half of all tokens conflict tokens and no completion filtered (⟨H⟩_ini = 0.11 < ln 2, but every
⟨H⟩_i stays below ln 2). See docs/gtpo.md.
"""
import math  # [GTPO] ln 2, inf
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
    run_dir: str = "runs/gtpo"  # [GTPO] metrics.jsonl, config.json and checkpoints go here
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
    beta: float = 0.0  # [GTPO] β: k3 KL coefficient; GTPO has no KL and no reference model (ablation knob only)
    conflict_weight: float = 2.0  # [GTPO] W: λ of a conflict token in a positive completion (official W_RAW)
    ent_gamma: float = 0.1  # [GTPO] γ: kept completions get A - γ⟨H⟩_i (official ENT_SCALE)
    ent_rule: str = "paper"  # [GTPO] entropy filter: paper (only if ⟨H⟩_ini < threshold) | always | percentile | off
    ent_threshold: float = 0.6931471805599453  # [GTPO] ⟨H⟩_i cut-off for paper/always: ln 2 (official code: 0.7)
    ent_percentile: float = 95.0  # [GTPO] percentile rule: cut-off = this percentile of all ⟨H⟩_i so far (not kept over a resume)
    ent_initial: float = -1.0  # [GTPO] ⟨H⟩_ini for the paper rule (< 0 = measure on the first rollout batch)
    scale_adv: bool = True  # [GTPO] A = (R - mean)/std as in GRPO; false = the official code's A = R - mean
    # evaluation and logging
    eval_every: int = 25  # held-out greedy evaluation every this many steps (0 = only before and after)
    eval_problems: int = 250  # held-out test problems per evaluation
    save_every: int = 50  # checkpoint every this many steps (and at the end)
    wandb_project: str = ""  # log to this wandb project too (needs `pip install wandb`)


# --tiny sets these (explicit --key=value flags still win): a run of a few minutes on 2 CPU cores.
TINY = dict(num_steps=40, batch_prompts=16, group_size=8, max_new_tokens=32, system_prompt="",
            lr=2e-4, warmup_steps=0, num_minibatches=2, micro_batch_size=64, gradient_checkpointing=False,
            eval_every=20, eval_problems=200, save_every=20, run_dir="runs/gtpo-tiny")  # [GTPO] run dir


# -----------------------------------------------------------------------------
# the algorithm: pure functions that tests import without starting a run


def group_advantages(rewards, group_size, scale=True):  # [GTPO] scale=False: official code's A = R - mean
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
    if not scale:  # [GTPO] official code (_prepare_inputs): `(rewards - mean_grouped_rewards) #/ (std...)`
        adv = torch.where(std > 1e-6, r - mean, torch.zeros_like(r))
    return adv.view(-1)


# [GTPO] conflict tokens and their weight λ ------------------------------------------------------------


def conflict_runs(ids, valid, pos, neg):  # [GTPO]
    """(P, G, T) bool: token t of completion i is in its conflict run, counted from position 0.

    ids, valid: (P, G, T) token ids and real-token mask of P groups of G completions; pos, neg: (P, G) bool.
    Raw conflict: the same id occurs at position t in some positive and some negative completion of the
    group (i itself counts), and i has A ≠ 0. Only the contiguous run of raw conflicts starting at t = 0
    counts (the official build_conflict_mask takes a cumprod). Padding never matches: the real-token mask
    decides, not a pad id (a real token may share the pad id, e.g. Qwen's <|endoftext|> EOS).
    """
    same = (ids[:, :, None] == ids[:, None, :]) & valid[:, :, None] & valid[:, None, :]   # (P, G_i, G_j, T)
    in_pos = (same & pos[:, None, :, None]).any(2)                                      # (P, G, T)
    in_neg = (same & neg[:, None, :, None]).any(2)
    raw = in_pos & in_neg & (pos | neg)[..., None] & valid
    return raw.long().cumprod(-1).bool()


def conflict_weights(completion_ids, mask, advantages, group_size, weight):  # [GTPO]
    """λ (B, T), and the forward (prefix) and backward (suffix) conflict masks (B, T) of a rollout.

    λ_it = f_it · b_it, each factor W (A_i > 0) or 0 (A_i < 0) on its conflict run and 1 elsewhere: the
    negative update of a conflict token is skipped and the positive one amplified (4 = W² where the prefix
    and suffix runs overlap, e.g. a completion shorter than the shared part). The suffix run is counted with
    every completion aligned at its last real token; rows are right-padded (mask 1...1 0...0).
    """
    B, T = completion_ids.shape
    ids = completion_ids.view(-1, group_size, T)
    valid = mask.bool().view(-1, group_size, T)
    A = advantages.view(-1, group_size)
    pos, neg = A > 0, A < 0
    fwd = conflict_runs(ids, valid, pos, neg)
    # end-aligned view: position k of the reversed row is position len_i - 1 - k of row i (an involution)
    lengths = valid.sum(-1, keepdim=True)                                              # (P, G, 1)
    k = torch.arange(T, device=completion_ids.device)
    idx = (lengths - 1 - k).clamp_min(0)                                               # (P, G, T)
    bwd = conflict_runs(ids.gather(-1, idx), k < lengths, pos, neg).gather(-1, idx) & valid
    sign = torch.where(pos, weight, 0.0)[..., None]                                    # W or 0 per completion
    lam = torch.where(fwd, sign, 1.0) * torch.where(bwd, sign, 1.0)
    return lam.view(B, T), fwd.view(B, T), bwd.view(B, T)


# [GTPO] entropy filtering and shaping -----------------------------------------------------------------


def sequence_entropy(entropy, mask):  # [GTPO]
    """⟨H⟩_i: each completion's mean per-token entropy (full-vocabulary, of the current policy); (B, T) -> (B,)."""
    mask = mask.float()
    return (entropy * mask).sum(1) / mask.sum(1).clamp_min(1)


def entropy_threshold(rule, threshold, h_ini=None, history=None, percentile=95.0):  # [GTPO]
    """The ⟨H⟩_i cut-off for this step; inf means no completion is filtered.

    paper:      ln 2 (threshold) if the initial model's ⟨H⟩_ini < threshold, else no filtering (δ_i = 1).
    always:     threshold at every step, whatever ⟨H⟩_ini (the official code: ENT_THRESHOLD = 0.7).
    percentile: the `percentile`-th percentile of every ⟨H⟩_i seen so far (history, this batch included).
    off:        no filtering (the γ⟨H⟩ shaping still applies).
    """
    if rule == "paper":
        if h_ini is None:
            raise ValueError("the paper rule needs ⟨H⟩_ini, the initial model's mean entropy")
        return threshold if h_ini < threshold else math.inf
    if rule == "always":
        return threshold
    if rule == "percentile":
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"ent_percentile={percentile} must be in [0, 100]")
        return torch.quantile(history.double(), percentile / 100.0).item()
    if rule == "off":
        return math.inf
    raise ValueError(f"ent_rule={rule!r}: choose paper, always, percentile or off")


def shaped_advantages(advantages, seq_entropy, threshold, gamma):  # [GTPO]
    """A'_i = δ_i (A_i - γ⟨H⟩_i), δ_i = [⟨H⟩_i ≤ threshold]; returns (A', δ) as (B,), (B,) bool.

    ⟨H⟩_i enters as a constant (no gradient through the entropy), as in the official code. A kept
    completion with A_i = 0 (an all-equal group) still gets -γ⟨H⟩_i, as the objective says.
    """
    keep = seq_entropy <= threshold
    return torch.where(keep, advantages - gamma * seq_entropy, torch.zeros_like(advantages)), keep


def policy_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps, beta, lam):  # [GTPO] + λ
    """-J_GTPO for a batch of sequences: per-sequence token mean, then mean over sequences.  [GTPO]

    logp, old_logp, ref_logp, mask, lam: (B, T); advantages: (B,), already filtered and shaped (A').  [GTPO]
    ref_logp is unused when beta == 0.
    The official gtpo_compute_loss differs: it divides each completion's loss by its number of conflict  [GTPO]
    tokens (clamped to ≥ 1) and sums over completions instead of averaging; neither is in the paper's
    objective, so this follows the objective (the tests reproduce the code's value separately).
    """
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)                                        # ρ (B, T)
    A = advantages[:, None]
    surrogate = torch.min(ratio * A, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * A)
    per_token = surrogate * lam  # [GTPO] λ ≥ 0, so λ·min(ρA, clip(ρ)A) = min(ρλA, clip(ρ)λA)
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
    if cfg.ent_rule not in ("paper", "always", "percentile", "off"):  # [GTPO] fail before loading anything
        raise ValueError(f"ent_rule={cfg.ent_rule!r}: choose paper, always, percentile or off")
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
    # [GTPO] ⟨H⟩_ini: given, measured on the first rollout batch, or (on resume) the value the run measured,
    # which the checkpoint's config holds (mmap: reading the config does not load the optimizer state)
    if ckpt and cfg.ent_initial < 0:
        cfg.ent_initial = torch.load(os.path.join(ckpt, "trainer_state.pt"), map_location="cpu",
                                     weights_only=False, mmap=True)["config"].get("ent_initial", -1.0)
    ent_history = []  # [GTPO] every ⟨H⟩_i seen so far (all ranks), for the percentile rule

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

    pbar = tqdm(range(start_step, cfg.num_steps), disable=not d.master_process, desc="gtpo")  # [GTPO]
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
        advantages = group_advantages(rewards, cfg.group_size, cfg.scale_adv)     # (B,)  [GTPO] scale_adv

        # 5. old and reference log-probs, fixed for all mini-batches of this step
        old_logp, entropy = common.batched_logprobs(raw, r, cfg.micro_batch_size, cfg.temperature)
        ref_logp = common.batched_logprobs(ref, r, cfg.micro_batch_size, cfg.temperature)[0] if ref else None

        # [GTPO] 5b. conflict weights λ from the signs of A (before filtering, as the official code), then
        # the entropy filter δ and shaping A' = δ(A - γ⟨H⟩) with ⟨H⟩_i of the current policy (= π_old here)
        lam, fwd, bwd = conflict_weights(r.completion_ids, mask, advantages, cfg.group_size, cfg.conflict_weight)
        seq_ent = sequence_entropy(entropy, mask)                                 # ⟨H⟩_i (B,)
        if cfg.ent_initial < 0:  # first rollout batch of the run: the initial model's mean ⟨H⟩_i, over all ranks
            tot = common.all_reduce_sum(torch.stack([seq_ent.sum(), torch.tensor(float(B), device=d.device)]).double(), d)
            cfg.ent_initial = (tot[0] / tot[1]).item()  # saved with the config in every checkpoint
            log(f"[GTPO] initial mean entropy ⟨H⟩_ini = {cfg.ent_initial:.4f}: paper rule "
                f"{'filters' if cfg.ent_initial < cfg.ent_threshold else 'does not filter'} (threshold {cfg.ent_threshold:.4f})")
        if cfg.ent_rule == "percentile":  # the same history on every rank, so every rank uses one cut-off
            everyone = torch.zeros(d.world_size, B, device=d.device)
            everyone[d.rank] = seq_ent
            ent_history.append(common.all_reduce_sum(everyone, d).flatten().cpu())
        threshold = entropy_threshold(cfg.ent_rule, cfg.ent_threshold, cfg.ent_initial,
                                      torch.cat(ent_history) if ent_history else None, cfg.ent_percentile)
        advantages, kept = shaped_advantages(advantages, seq_ent, threshold, cfg.ent_gamma)
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
                                              advantages[ix], mask[ix], cfg.clip_eps, cfg.beta, lam[ix])  # [GTPO] λ
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
                          ("entropy", (entropy * mask).sum(), mask.sum()), ("zero_std_groups", zero_std.sum(), len(zero_std)),
                          ("conflict_frac", ((fwd | bwd) & mask.bool()).sum(), mask.sum()),  # [GTPO] conflict tokens
                          ("filtered_frac", (~kept).sum(), B), ("entropy_seq", seq_ent.sum(), B)]:  # [GTPO] δ=0, ⟨H⟩_i
            common.accumulate(sums, key, s, n)
        metrics = common.reduce_metrics(sums, d)
        metrics.update(lr=lr, time_rollout=t_rollout, time_train=time.time() - t0 - t_rollout)
        metrics.update(ent_initial=cfg.ent_initial, ent_threshold=min(threshold, 1e9))  # [GTPO] 1e9 = no filter
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

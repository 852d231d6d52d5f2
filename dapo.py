"""
DAPO: Decoupled Clip and Dynamic sAmpling Policy Optimization (Yu et al., ByteDance Seed and
Tsinghua AIR, arXiv 2503.14476).

GRPO with four changes that keep long-CoT RL from collapsing, and without the KL term. The policy
maximises the clip-higher surrogate summed over every completion token and divided by the number
of those tokens, on groups whose answers are neither all right nor all wrong:

    J = 1/Σ_i|o_i| Σ_i Σ_t min(ρ_it Â_i, clip(ρ_it, 1-ε_low, 1+ε_high) Â_i)              (eq. 8/12)
    s.t. 0 < |{o_i : is_equivalent(a, o_i)}| < G                                              (eq. 11)
    Â_i = (R_i - mean(R)) / std(R),   R_i = ±1 correctness (eq. 7) + R_length(|o_i|) (eq. 13)

What changes versus grpo.py (every changed line carries the [DAPO] tag), numbered:
 1. Clip-Higher (§3.1, eq. 10): decoupled ε_low = 0.2, ε_high = 0.28, so a low-probability
    "exploration" token can gain more before the clip stops it (entropy collapse counter).
 2. Token-level policy-gradient loss (§3.3, eq. 12): the surrogate is summed over every completion
    token of the mini-batch and divided by their number, across micro-batches and DDP ranks (the
    count is all-reduced), so long completions weigh in proportion to their length and 2 ranks take
    the same step as 1 process on the same rollouts.
 3. Dynamic sampling (§3.2, Algorithm 1): groups whose accuracy is 0 or 1 (Â ≡ 0) are dropped and
    fresh prompts are sampled, round after round, until batch_prompts groups survive (an error
    after max_sampling_rounds). Kept counts are summed over ranks, so all ranks stop together, and
    the first batch_prompts kept groups are then shared evenly over ranks (no DDP hang when one
    rank's groups are all filtered; every rank runs the same forward/backward/optimizer calls).
 4. Overlong reward shaping (§3.4): the soft overlong punishment R_length (eq. 13, L_max =
    max_new_tokens, L_cache = overlong_cache) is added to the reward; overlong filtering (mask the
    loss of truncated completions) is an option, off by default, as in the paper's final recipe.
 5. No KL term and no reference model (§2.3). Correctness is ±1 (eq. 7), not 0/1: the scale
    matters once R_length is added (a correct answer at L_max scores 0, still above a wrong one).

Launch:
    python dapo.py --tiny                          # embedded default: CPU, no downloads, ~10 CPU-min
    torchrun --nproc_per_node=2 dapo.py            # Qwen2.5-1.5B-Instruct on GSM8K, 2 GPUs
    torchrun --nproc_per_node=2 dapo.py --tiny     # the tiny default under DDP (gloo on CPU)
    python dapo.py --overlong_filter               # also mask truncated completions (§3.4 ablation)
    python dapo.py --help                          # every knob with its default

Paper defaults kept: G=16 completions per prompt, lr 1e-6 (AdamW, constant after a 20-step linear
warm-up), ε_low/ε_high = 0.2/0.28, no KL. Scaled down, to fit a 1.5B model on 2 GPUs and GSM8K:
 - batch_prompts 16 instead of 512 (16 x 16 = 256 completions per step, as grpo.py's 32 x 8);
 - num_minibatches 4 (64 completions each) instead of 16 mini-batches of 512 completions: with 256
   completions, 16 updates would be 1 prompt per optimizer step;
 - L_max = max_new_tokens = 300 and L_cache = 60 instead of 20,480 and 4,096 (GSM8K solutions run
   100-250 tokens, not 16K; L_cache keeps the paper's 20% of L_max);
 - each sampling round generates batch_prompts prompts (verl's recipe over-samples 3x,
   gen_prompt_bsz=1536 for 512), at most max_sampling_rounds = 10 rounds (verl max_num_gen_batches).
Departures from the paper, numbered:
 1. The token normaliser is the mini-batch's token count across prompts (as verl token-mean and
    TRL loss_type="dapo"), not per question as eq. 12 writes it inside the expectation.
 2. Outcome rewards are rule-based GSM8K answer match (±1) plus a small format term, on GSM8K, not
    DAPO-Math-17K. The dynamic-sampling filter uses accuracy (eq. 11); --filter_metric=reward
    drops only groups whose total rewards are all equal.
 3. Prompts of round k of step s come from slot s * max_sampling_rounds + k of the seeded prompt
    stream, so a resumed run draws the same prompts without saving a cursor; the slots of rounds
    not needed are skipped (each epoch reshuffles, so no prompt is favoured).
Expected result on the tiny default: held-out greedy accuracy 0.285 -> 0.585 (seed 0; docs/dapo.md).
"""
import math  # [DAPO] ceil for the size of the next sampling round
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist  # [DAPO] all_gather_object: share the kept groups over ranks
import torch.nn.functional as F  # [DAPO] pad rollouts of different widths before concatenating
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import common


@dataclass
class Config:
    # run
    tiny: bool = False  # the embedded default: tiny Qwen2 model + synthetic GSM8K-style task (CPU, no downloads)
    model: str = "Qwen/Qwen2.5-1.5B-Instruct"  # hub name or local dir of the initial policy  # [DAPO] no reference model
    data_path: str = ""  # local GSM8K: a jsonl file or a dir with train.jsonl/test.jsonl ("" = hub openai/gsm8k)
    run_dir: str = "runs/dapo"  # [DAPO] metrics.jsonl, config.json and checkpoints go here
    resume: str = ""  # checkpoint dir, or a run dir (uses its `latest`), to continue from exactly
    seed: int = 0  # seeds prompt order, sampling and mini-batch shuffling (rank r uses seed + r)
    # rollout
    num_steps: int = 200  # rollout batches; each is followed by num_minibatches optimizer steps
    batch_prompts: int = 16  # [DAPO] kept prompts per rollout batch, over all ranks (divisible by world size; paper 512)
    group_size: int = 16  # [DAPO] G: completions sampled per prompt (paper: 16)
    max_new_tokens: int = 300  # completion length cap; a completion without EOS by then is truncated  # [DAPO] = L_max of eq. 13
    temperature: float = 1.0  # sampling temperature; log-probs are computed under the same temperature
    top_p: float = 1.0  # nucleus sampling (1.0 = off, so π_old is exactly the sampling distribution)
    fast_rollout: bool = torch.cuda.is_available()  # static-KV-cache decode loop (+ CUDA graphs); same sampling as HF generate
    system_prompt: str = common.SYSTEM_PROMPT  # system message of the chat prompt ("" = none)
    format_weight: float = 0.1  # [DAPO] reward = correctness (±1, eq. 7) + format_weight * format (0/1) + R_length
    # optimisation
    lr: float = 1e-6  # AdamW learning rate (DeepSeekMath: 1e-6)  # [DAPO] DAPO §4.1: 1e-6 too
    warmup_steps: int = 20  # [DAPO] linear learning-rate warm-up, in rollout steps (DAPO §4.1: 20)
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    num_minibatches: int = 4  # optimizer steps per rollout batch (mini-batches of the rollout)
    micro_batch_size: int = 8  # sequences per forward/backward (gradient accumulation inside a mini-batch)
    gradient_checkpointing: bool = True  # recompute activations in backward to save memory
    logprob_chunk: int = 128  # completion tokens per lm_head chunk in the log-prob computation
    # algorithm
    # [DAPO] clip-higher (§3.1, eq. 10) replaces the symmetric ε; no KL, so no β (§2.3)
    clip_eps_low: float = 0.2  # ε_low: ρ below 1 - ε_low is clipped when Â < 0
    clip_eps_high: float = 0.28  # ε_high: ρ above 1 + ε_high is clipped when Â > 0 (clip-higher)
    overlong_cache: int = 60  # L_cache of eq. 13: the soft punishment ramps over the last L_cache tokens
    overlong_filter: bool = False  # mask the loss of truncated completions (§3.4; off in the paper's final recipe)
    dynamic_sampling: bool = True  # drop groups with all-equal filter_metric and resample (§3.2; false = ablation)
    filter_metric: str = "accuracy"  # dynamic-sampling filter: "accuracy" (eq. 11, verl metric=acc) or "reward"
    max_sampling_rounds: int = 10  # give up with an error after this many sampling rounds per step
    # evaluation and logging
    eval_every: int = 25  # held-out greedy evaluation every this many steps (0 = only before and after)
    eval_problems: int = 250  # held-out test problems per evaluation
    save_every: int = 50  # checkpoint every this many steps (and at the end)
    wandb_project: str = ""  # log to this wandb project too (needs `pip install wandb`)


# --tiny sets these (explicit --key=value flags still win): a run of a few minutes on 2 CPU cores.
TINY = dict(num_steps=40, batch_prompts=16, group_size=8, max_new_tokens=32, system_prompt="",
            lr=2e-4, warmup_steps=0, num_minibatches=2, micro_batch_size=64, gradient_checkpointing=False,
            eval_every=20, eval_problems=200, save_every=20, run_dir="runs/dapo-tiny",  # [DAPO] run_dir
            # [DAPO] G=8 as grpo.py's tiny run (CPU budget). L_cache=8: correct full solutions are at
            # most 24 tokens with EOS, so they go unpunished; rambling ones (25-32 tokens) are not.
            overlong_cache=8)


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


def policy_loss(logp, old_logp, advantages, mask, clip_eps_low, clip_eps_high, num_tokens=None):  # [DAPO]
    """-J_DAPO: the clip-higher surrogate summed over tokens, divided by num_tokens.  # [DAPO]

    logp, old_logp, mask: (B, T); advantages: (B,). num_tokens is Σ|o_i| of the whole mini-batch  # [DAPO]
    over all micro-batches and ranks (default: mask.sum(), this batch alone), so the micro-batch
    losses add up to the token-level loss of eq. 12. verl token-mean and TRL loss_type="dapo" also
    normalise by the batch's tokens; verl's DAPO recipe adds a dual-clip (c=10) that the paper lacks.
    """
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)                                        # ρ (B, T)
    A = advantages[:, None]
    surrogate = torch.min(ratio * A, torch.clamp(ratio, 1 - clip_eps_low, 1 + clip_eps_high) * A)  # [DAPO] eq. 10
    # [DAPO] token-level loss (eq. 12): no per-sequence 1/|o_i|, no KL term (§2.3)
    num_tokens = mask.sum().clamp_min(1) if num_tokens is None else num_tokens
    loss = -(surrogate * mask).sum() / num_tokens
    with torch.no_grad():  # tokens whose gradient the clip removes (the min picks the clipped branch)
        clip_high = (A > 0) & (ratio > 1 + clip_eps_high)  # [DAPO] the upper clip, which clip-higher loosens
        clipped = clip_high | ((A < 0) & (ratio < 1 - clip_eps_low))
        stats = {"clip_frac": ((clipped.float() * mask).sum(), mask.sum()),
                 "clip_frac_high": ((clip_high.float() * mask).sum(), mask.sum()),  # [DAPO]
                 "ratio": ((ratio * mask).sum(), mask.sum())}
    return loss, stats


# [DAPO] the rest of this section: reward shaping (§3.4) and dynamic sampling (§3.2)


def signed_correctness(completion, answer):
    """Eq. 7: +1 if the completion's '####' answer equals the reference, else -1."""
    return 2.0 * common.correctness_reward(completion, answer) - 1.0


def overlong_penalty(lengths, max_len, cache_len):
    """Soft overlong punishment R_length(|y|) of eq. 13, per completion; (B,) -> (B,) float.

    0 up to L_max - L_cache tokens, then a linear ramp to -1 at L_max, and -1 beyond. A truncated
    completion here has exactly L_max = max_new_tokens tokens, so it gets -1. verl computes the
    same (min(-(len - (L_max - L_cache)) / L_cache, 0)); TRL's get_soft_overlong_punishment too.
    """
    y = lengths.float()
    ramp = ((max_len - cache_len) - y) / cache_len
    return torch.where(y <= max_len - cache_len, torch.zeros_like(y), torch.where(y <= max_len, ramp, -torch.ones_like(y)))


def keep_groups(values, group_size):
    """Dynamic-sampling filter (eq. 11): True for each group whose G values are not all equal; (B,) -> (prompts,).

    With values = correctness this is 0 < |{correct}| < G; such a group has Â ≢ 0. verl also keeps
    singleton groups (G=1); here they are dropped, since their advantage is always 0.
    """
    v = values.view(-1, group_size)
    return v.max(1).values - v.min(1).values > 1e-6


def select_rows(r, rows):
    """The Rollout restricted to `rows` (1-D indices), on r's device."""
    idx = rows.to(r.prompt_ids.device)
    return common.Rollout(r.prompt_ids[idx], r.prompt_mask[idx], r.completion_ids[idx], r.completion_mask[idx],
                          r.lengths[idx], r.truncated[idx], [r.texts[i] for i in rows.tolist()])


def cat_rollouts(rs, pad_id, device):
    """Concatenate Rollouts of different widths: prompts left-padded, completions right-padded.

    Extra padding is masked out, and positions come from the attention mask, so the log-probs of
    the real tokens do not change (a test checks this).
    """
    P = max(r.prompt_ids.shape[1] for r in rs)
    T = max(r.completion_ids.shape[1] for r in rs)
    left = lambda x, v: F.pad(x.to(device), (P - x.shape[1], 0), value=v)   # noqa: E731
    right = lambda x, v: F.pad(x.to(device), (0, T - x.shape[1]), value=v)  # noqa: E731
    return common.Rollout(torch.cat([left(r.prompt_ids, pad_id) for r in rs]),
                          torch.cat([left(r.prompt_mask, 0) for r in rs]),
                          torch.cat([right(r.completion_ids, pad_id) for r in rs]),
                          torch.cat([right(r.completion_mask, 0) for r in rs]),
                          torch.cat([r.lengths.to(device) for r in rs]), torch.cat([r.truncated.to(device) for r in rs]),
                          [t for r in rs for t in r.texts])


def gather_kept_groups(pool, batch_prompts, group_size, pad_id, d):
    """This rank's share of the first batch_prompts kept groups of all ranks: (Rollout, rewards).

    pool: this rank's kept groups, a list of (keys (k,), Rollout (k*G rows), rewards (k*G,)), one
    entry per sampling round (k may be 0). A key is the group's position in the global prompt
    stream, so "first" means the same groups whatever the world size. Every rank gets exactly
    batch_prompts / world_size groups, also a rank whose own groups were all filtered.
    """
    keys = torch.cat([k.cpu() for k, _, _ in pool])
    r = cat_rollouts([x for _, x, _ in pool], pad_id, torch.device("cpu"))
    rewards = torch.cat([w.cpu() for _, _, w in pool])
    if d.ddp:  # every rank receives every rank's kept groups (token ids only: small)
        parts = [None] * d.world_size
        dist.all_gather_object(parts, (keys, r, rewards))
        keys = torch.cat([k for k, _, _ in parts])
        r = cat_rollouts([x for _, x, _ in parts], pad_id, torch.device("cpu"))
        rewards = torch.cat([w for _, _, w in parts])
    if len(keys) < batch_prompts:
        raise RuntimeError(f"dynamic sampling: {len(keys)} kept groups cannot fill batch_prompts={batch_prompts}")
    mine = keys.argsort()[:batch_prompts][d.rank::d.world_size]               # group indices, global order
    rows = (mine[:, None] * group_size + torch.arange(group_size)).view(-1)  # (batch_prompts / W * G,)
    return select_rows(cat_rollouts([r], pad_id, d.device), rows), rewards[rows].to(d.device)


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
    if cfg.filter_metric not in ("accuracy", "reward"):  # [DAPO]
        raise ValueError(f"filter_metric={cfg.filter_metric!r}: expected 'accuracy' or 'reward'")
    log = tqdm.write if d.master_process else (lambda *a, **k: None)
    common.seed_everything(cfg.seed + d.rank)
    if cfg.tiny:
        cfg.model = common.ensure_tiny_model(d, log=log)

    # model, tokenizer, optimizer  # [DAPO] no reference model: DAPO has no KL term (§2.3)
    tok = common.load_tokenizer(cfg.model)
    ckpt = common.resolve_checkpoint(cfg.resume) if cfg.resume else ""
    master_dtype = torch.float32  # fp32 master weights: lr=1e-6 updates survive (bf16 would round them away)
    policy = common.Policy(common.load_model(ckpt or cfg.model, d.device, master_dtype),
                           cfg.logprob_chunk, cfg.gradient_checkpointing).train()
    raw = policy  # the unwrapped module: generation and saving use raw.lm
    if d.ddp:
        policy = DDP(policy, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    # [DAPO] grpo.py loads a frozen reference model here for the KL term; DAPO drops both (§2.3)
    optimizer = torch.optim.AdamW(raw.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    start_step = common.load_trainer_state(ckpt, optimizer, d) if ckpt else 0

    # data and rewards
    train, test = common.load_problems(cfg, "train"), common.load_problems(cfg, "test")[:cfg.eval_problems]
    reward_fns = [(1.0, signed_correctness), (cfg.format_weight, common.format_reward)]  # [DAPO] ±1 (eq. 7)
    logger = common.Logger(cfg.run_dir, cfg, d.master_process, cfg.wandb_project)

    def evaluate():
        return common.evaluate(raw.lm, tok, test, d, cfg.max_new_tokens, system_prompt=cfg.system_prompt,
                               fast=cfg.fast_rollout)

    if start_step == 0:
        ev = evaluate()
        log(f"held-out greedy accuracy before RL: {ev['strict']:.3f} (lenient {ev['lenient']:.3f}, n={ev['n']})")
        logger.log(0, {f"eval/{k}": v for k, v in ev.items()})

    pbar = tqdm(range(start_step, cfg.num_steps), disable=not d.master_process, desc="dapo")  # [DAPO]
    for step in pbar:
        t0 = time.time()
        lr = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
        for g in optimizer.param_groups:
            g["lr"] = lr

        # [DAPO] dynamic sampling (§3.2, Algorithm 1): steps 1-3 repeat on fresh prompts until the kept
        # groups (0 < #correct < G, eq. 11) fill the prompt batch. The kept count is summed over ranks
        # every round, so all ranks leave the loop at the same round (or raise together).
        sums, pool, n_kept, n_sampled, n_round = {}, [], 0, 0, cfg.batch_prompts
        for rnd in range(cfg.max_sampling_rounds):
            # 1. prompts: this rank's share of the round's n_round global prompts
            slot = step * cfg.max_sampling_rounds + rnd  # departure 3 in the docstring
            idx = common.prompt_indices(len(train), slot, cfg.batch_prompts, cfg.seed)[:n_round][d.rank::d.world_size]
            problems = [train[i] for i in idx]
            prompts = [common.build_prompt(tok, p["question"], cfg.system_prompt) for p in problems]
            prompt_ids, prompt_mask = common.tokenize_prompts(tok, prompts, d.device)

            # 2. rollout: G completions per prompt from π_old (the current policy)
            raw.eval()
            r = common.generate(raw.lm, tok, prompt_ids, prompt_mask, cfg.group_size, cfg.max_new_tokens,
                                cfg.temperature, cfg.top_p, fast=cfg.fast_rollout)
            answers = [p["answer"] for p in problems for _ in range(cfg.group_size)]

            # 3. rewards: ±1 correctness (eq. 7) + format + soft overlong punishment (eq. 13)  # [DAPO]
            rewards = common.compute_rewards(r.texts, answers, reward_fns).to(d.device)  # (B_round,)
            length_penalty = overlong_penalty(r.lengths, cfg.max_new_tokens, cfg.overlong_cache)
            rewards = rewards + length_penalty
            correct = torch.tensor([common.correctness_reward(t, a) for t, a in zip(r.texts, answers)])
            if cfg.dynamic_sampling:
                keep = keep_groups(correct if cfg.filter_metric == "accuracy" else rewards.cpu(), cfg.group_size)
            else:
                keep = torch.ones(len(problems), dtype=torch.bool)
            kept = keep.nonzero().view(-1)                                        # local group indices
            keys = rnd * cfg.batch_prompts + kept * d.world_size + d.rank         # global stream positions
            rows = (kept[:, None] * cfg.group_size + torch.arange(cfg.group_size)).view(-1)
            pool.append((keys, select_rows(r, rows), rewards[rows.to(d.device)]))

            # metrics of everything sampled (the trained batch is biased by the filter)
            n = len(r.texts)
            zero_std = rewards.view(-1, cfg.group_size).std(1) < 1e-6
            for key, s, c in [("reward", rewards.sum(), n), ("accuracy", correct.sum(), n),
                              ("response_length", r.lengths.float().sum(), n), ("truncated", r.truncated.sum(), n),
                              ("overlong_penalty", length_penalty.sum(), n),
                              ("zero_std_groups", zero_std.sum(), len(zero_std)), ("filtered_groups", (~keep).sum(), len(keep))]:
                common.accumulate(sums, key, s, c)
            n_kept += int(common.all_reduce_sum(torch.tensor(len(kept), device=d.device), d).item())
            n_sampled += n_round
            if n_kept >= cfg.batch_prompts:
                break
            # the next round samples the missing groups over the pass rate so far (at most batch_prompts,
            # a multiple of the world size), not a whole batch: 2 missing groups cost 2-3 prompts
            need = math.ceil((cfg.batch_prompts - n_kept) * n_sampled / max(n_kept, 1))
            n_round = min(cfg.batch_prompts, math.ceil(need / d.world_size) * d.world_size)
        else:
            raise RuntimeError(
                f"dynamic sampling: only {n_kept} of batch_prompts={cfg.batch_prompts} groups kept after "
                f"max_sampling_rounds={cfg.max_sampling_rounds} rounds ({n_sampled} "
                f"prompts) at step {step}: nearly every group is all right or all wrong ({cfg.filter_metric}). "
                f"Raise --max_sampling_rounds, lower --batch_prompts, or check the task's difficulty and rewards.")
        rounds = rnd + 1
        r, rewards = gather_kept_groups(pool, cfg.batch_prompts, cfg.group_size, tok.pad_token_id, d)
        mask = r.completion_mask                                                  # (B, T)
        if cfg.overlong_filter:  # [DAPO] §3.4 overlong filtering: truncated completions get no loss
            mask = mask * ~r.truncated[:, None]

        # 4. group-relative advantages (of the kept groups)  # [DAPO] steps 1-3 are above
        advantages = group_advantages(rewards, cfg.group_size)                    # (B,)

        # 5. old log-probs, fixed for all mini-batches of this step  # [DAPO] no reference log-probs
        old_logp, entropy = common.batched_logprobs(raw, r, cfg.micro_batch_size, cfg.temperature)
        # [DAPO] (grpo.py computes the reference log-probs here)
        t_rollout = time.time() - t0

        # 6. policy update: num_minibatches optimizer steps, each over a shuffled slice of the rollout
        raw.train()
        # [DAPO] `sums` already holds the sampling metrics
        perm = torch.randperm(B).to(d.device)
        for mb in perm.chunk(cfg.num_minibatches):
            # [DAPO] token-level loss (eq. 12): divide by Σ|o_i| of this mini-batch over all ranks. DDP
            # averages gradients over ranks, so each rank scales its share by world_size: then the step
            # equals one process on the whole mini-batch, whatever each rank's token count.
            num_tokens = common.all_reduce_sum(mask[mb].sum().float(), d).clamp_min(1)
            micro = mb.split(cfg.micro_batch_size)
            for k, ix in enumerate(micro):
                # only the last micro-batch all-reduces gradients across ranks
                sync = nullcontext() if (not d.ddp or k == len(micro) - 1) else policy.no_sync()
                with sync, common.autocast(d.device):
                    logp, _ = policy(r.prompt_ids[ix], r.prompt_mask[ix], r.completion_ids[ix], mask[ix],
                                     cfg.temperature)
                    loss, stats = policy_loss(logp.float(), old_logp[ix], advantages[ix], mask[ix],  # [DAPO]
                                              cfg.clip_eps_low, cfg.clip_eps_high, num_tokens)
                    (loss * d.world_size).backward()  # [DAPO] micro losses sum to the mini-batch loss
                for key, (s, n) in stats.items():
                    common.accumulate(sums, key, s, n)
                common.accumulate(sums, "loss", loss.item() * num_tokens.item(), mask[ix].sum())  # [DAPO] per token
            grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            common.accumulate(sums, "grad_norm", grad_norm, 1)

        # 7. metrics, averaged over ranks
        # [DAPO] reward, accuracy, lengths and zero-std groups were accumulated per sampling round
        for key, s, n in [("entropy", (entropy * mask).sum(), mask.sum()), ("sampling_rounds", rounds, 1),
                          ("prompts_sampled", n_sampled, 1)]:
            common.accumulate(sums, key, s, n)
        metrics = common.reduce_metrics(sums, d)
        metrics.update(lr=lr, time_rollout=t_rollout, time_train=time.time() - t0 - t_rollout)
        pbar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.3f}",
                         len=f"{metrics['response_length']:.0f}", clip=f"{metrics['clip_frac']:.3f}",
                         rounds=rounds)  # [DAPO] dynamic-sampling rounds this step

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

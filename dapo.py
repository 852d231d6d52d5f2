"""
DAPO: Decoupled Clip and Dynamic sAmpling Policy Optimization (Yu et al., ByteDance Seed, arXiv 2503.14476).

GRPO with four changes that keep long chain-of-thought RL from collapsing, and without the KL term.
The policy maximises the clip-higher surrogate summed over every completion token and divided by
their number, on groups whose answers are neither all right nor all wrong:

    J = 1/Σ_i|o_i| Σ_i Σ_t min(ρ_it Â_i, clip(ρ_it, 1-ε_low, 1+ε_high) Â_i)               (eq. 8, 12)
    s.t. 0 < |{o_i : is_equivalent(a, o_i)}| < G                                               (eq. 11)
    R_i = ±1 correctness (eq. 7) + R_length(|o_i|), the soft overlong punishment               (eq. 13)

What changes versus GRPO, numbered:
 1. Clip-Higher (§3.1): ε_low = 0.2, ε_high = 0.28, so unlikely tokens can gain more before the clip.
 2. Token-level loss (§3.3): a sum over the mini-batch's tokens (all micro-batches and ranks) / their count.
 3. Dynamic sampling (§3.2): all-right and all-wrong groups are dropped and fresh prompts sampled until
    batch_prompts groups survive, counted over all ranks, which then share the kept groups evenly.
 4. Overlong reward shaping (§3.4, eq. 13); overlong filtering is an option, off as in the final recipe.
 5. No KL term (β = 0, §2.3), so no reference model; correctness is ±1 (eq. 7); G = 16.

Launch:
    python dapo.py --tiny                    # the embedded tiny default: CPU, no downloads, a few minutes
    torchrun --nproc_per_node=2 dapo.py      # Qwen2.5-1.5B-Instruct on GSM8K, 2 GPUs

Departures from the paper, numbered:
 1. The token count normalises each mini-batch across prompts, as verl and TRL do, not per question.
 2. 16 prompts x 16, L_max = 300 and L_cache = 60 instead of 512 x 16, 20,480 and 4,096 (docs/dapo.md).
 3. Rule-based outcome rewards (GSM8K answer match plus a small format term), not a reward model.

Details: docs/dapo.md
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
    batch_prompts: int = 16  # [DAPO] kept prompts per rollout batch over all ranks (÷ world size), in [1, inf)
    group_size: int = 16  # [DAPO] G: completions sampled per prompt (the paper's 16), in [2, inf)
    max_new_tokens: int = 300  # completion length cap, in [1, inf); a completion without EOS by then is truncated
    temperature: float = 1.0  # sampling temperature, in (0, inf); log-probs are computed under the same one
    top_p: float = 1.0  # nucleus sampling, in (0, 1] (1.0 = off, so π_old is exactly the sampling distribution)
    fast_rollout: bool = torch.cuda.is_available()  # static-KV-cache decoder (+ CUDA graphs), generate()'s sampling
    system_prompt: str = gsm8k.SYSTEM_PROMPT  # system message of the chat prompt ("" = none)
    rollout_correction: str = "none"  # ρ = π_old/μ, in {none, token_tis, seq_tis, token_mask, seq_mask, seq_geo_mask}
    rc_min: float = 0.5  # the masks' lower bound on ρ (IcePop: 0.5), in [0, inf)
    rc_max: float = 2.0  # C: the TIS cap on ρ and the masks' upper bound (verl: 2, TRL: 3, IcePop: 5), in (0, inf)
    format_weight: float = 0.1  # [DAPO] reward = correctness (±1, eq. 7) + this * format + R_length, in [0, inf)
    # optimisation
    lr: float = 1e-6  # AdamW learning rate, in (0, inf) (DeepSeekMath: 1e-6)
    warmup_steps: int = 20  # [DAPO] linear learning-rate warm-up in rollout steps (§4.1: 20), in [0, inf)
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
    clip_eps_low: float = 0.2  # [DAPO] ε_low, in (0, 1): ρ below 1 - ε_low is clipped when Â < 0
    clip_eps_high: float = 0.28  # [DAPO] ε_high, in (0, inf): ρ above 1 + ε_high is clipped when Â > 0
    beta: float = 0.0  # [DAPO] β: k3 KL coefficient, in [0, inf); 0 as in the paper (no KL, no reference model)
    overlong_cache: int = 60  # [DAPO] L_cache of eq. 13, in [1, inf): the punishment ramps over the last L_cache
    overlong_filter: bool = False  # [DAPO] mask the loss of truncated completions (§3.4; off in the final recipe)
    dynamic_sampling: bool = True  # [DAPO] drop groups with all-equal filter_metric and resample (§3.2)
    filter_metric: str = "accuracy"  # [DAPO] dynamic-sampling filter, in {accuracy, reward} (eq. 11: accuracy)
    max_sampling_rounds: int = 10  # [DAPO] give up with an error after this many sampling rounds, in [1, inf)
    # evaluation and logging
    eval_every: int = 25  # held-out greedy evaluation every this many steps, in [0, inf) (0 = before and after)
    eval_problems: int = 250  # held-out test problems per evaluation, in [1, inf)
    save_every: int = 50  # checkpoint every this many steps (and at the end), in [1, inf)
    wandb_project: str = ""  # log to this wandb project too (needs `pip install wandb`)


# --tiny sets these (explicit --key=value flags still win): a run of about a minute on 2 CPU cores.
TINY = dict(model="tiny", data_path="tiny", num_steps=40, batch_prompts=16, group_size=8, max_new_tokens=32,
            system_prompt="", lr=2e-4, warmup_steps=0, num_minibatches=2, micro_batch_size=64,
            gradient_checkpointing=False, eval_every=20, eval_problems=200, save_every=20)
TINY.update(group_size=8, overlong_cache=8)  # [DAPO] grpo.py's G; full solutions (<= 24 tokens) go unpunished


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


def policy_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps_low, clip_eps_high, beta,  # [DAPO]
                num_tokens):
    """-J_DAPO (eq. 12): the token sum over num_tokens = Σ|o_i| of the mini-batch (all micro-batches and ranks).

    logp, old_logp, ref_logp, mask: (B, T); advantages: (B,). ref_logp is unused when beta == 0.
    """
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)                                        # ρ (B, T)
    A = advantages[:, None]
    per_token = torch.min(ratio * A, torch.clamp(ratio, 1 - clip_eps_low, 1 + clip_eps_high) * A)  # [DAPO] eq. 10
    kl = kl_k3(logp, ref_logp) if beta > 0 else torch.zeros_like(logp)       # (B, T)
    per_token = per_token - beta * kl
    loss = -(per_token * mask).sum() / num_tokens  # [DAPO] token-level (eq. 12): no per-sequence 1/|o_i|
    with torch.no_grad():  # tokens whose gradient the clip removes
        clip_high = (A > 0) & (ratio > 1 + clip_eps_high)  # [DAPO] the upper clip, which clip-higher loosens
        clipped = clip_high | ((A < 0) & (ratio < 1 - clip_eps_low))
        stats = {"clip_frac": ((clipped.float() * mask).sum(), mask.sum()),
                 "clip_frac_high": ((clip_high.float() * mask).sum(), mask.sum()),  # [DAPO]
                 "kl": ((kl * mask).sum(), mask.sum()),
                 "ratio": ((ratio * mask).sum(), mask.sum())}
    return loss, stats


def signed_correctness(completion, answer):  # [DAPO] eq. 7
    """+1 if the completion's '####' answer equals the reference, else -1."""
    return 2.0 * gsm8k.correctness_reward(completion, answer) - 1.0


def overlong_penalty(lengths, max_len, cache_len):  # [DAPO] the soft overlong punishment, eq. 13
    """R_length(|y|): 0 up to L_max - L_cache tokens, a linear ramp to -1 at L_max, -1 beyond; (B,) -> (B,)."""
    y = lengths if lengths.is_floating_point() else lengths.float()
    ramp = ((max_len - cache_len) - y) / cache_len
    return torch.where(y <= max_len - cache_len, 0.0, torch.where(y <= max_len, ramp, -1.0))


def keep_groups(values, group_size):  # [DAPO] the dynamic-sampling filter, eq. 11
    """True for each group whose G values are not all equal (with correctness: 0 < #correct < G); (B,) -> (prompts,)."""
    v = values.view(-1, group_size)
    return v.max(1).values - v.min(1).values > 1e-6


def gather_kept_groups(pool, batch_prompts, group_size, d):  # [DAPO] every rank gets batch_prompts / W groups
    """This rank's share of the first batch_prompts kept groups of all ranks: (Rollout, rewards).

    pool: this rank's kept groups, one (keys (k,), Rollout (k*G rows), rewards (k*G,)) per sampling round.
    A key is the group's position in the global prompt stream, so "first" does not depend on the world size.
    """
    cpu = torch.device("cpu")
    mine = (torch.cat([k.cpu() for k, _, _ in pool]), rollout.Rollout.cat([x for _, x, _ in pool], cpu),
            torch.cat([w.cpu() for _, _, w in pool]))
    parts = distributed.all_gather_objects(mine, d)  # every rank's kept groups: token ids only, small
    keys, r, rewards = torch.cat([p[0] for p in parts]), rollout.Rollout.cat([p[1] for p in parts], d.device), \
        torch.cat([p[2] for p in parts])
    order = keys.argsort()[:batch_prompts][d.rank::d.world_size]             # group indices, global order
    rows = (order[:, None] * group_size + torch.arange(group_size)).view(-1)
    return r.select(rows), rewards[rows].to(d.device)


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
    reward_fns = [(1.0, signed_correctness), (cfg.format_weight, gsm8k.format_reward)]  # [DAPO] ±1 (eq. 7)
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

        # [DAPO] dynamic sampling (§3.2): steps 1-3 repeat on fresh prompts until the kept groups, counted
        # over all ranks every round (so every rank leaves at the same round), fill the prompt batch
        pool, n_kept, n_sampled, n_round = [], 0, 0, cfg.batch_prompts
        for rnd in range(cfg.max_sampling_rounds):
            # 1. prompts: this rank's share of the round's n_round global prompts (slot: a resume redraws them)
            slot = step * cfg.max_sampling_rounds + rnd
            idx = loading.prompt_indices(len(train), slot, cfg.batch_prompts, cfg.seed)[:n_round][d.rank::d.world_size]

            # 2. rollout: G completions per prompt from π_old (the current policy)
            r = rollout.sample(raw.lm, tok, [train[i] for i in idx], cfg, d.device)  # [DAPO] each round

            # 3. rewards: ±1 correctness + format + the soft overlong punishment (eq. 13), then the filter  # [DAPO]
            penalty = overlong_penalty(r.lengths, cfg.max_new_tokens, cfg.overlong_cache)
            rewards = rollout.rewards(r.texts, r.answers, reward_fns).to(d.device) + penalty  # (B_round,)
            correct = torch.tensor([gsm8k.correctness_reward(t, a) for t, a in zip(r.texts, r.answers)])
            metric = correct if cfg.filter_metric == "accuracy" else rewards.cpu()
            keep = keep_groups(metric, cfg.group_size) if cfg.dynamic_sampling else torch.ones(len(idx)).bool()
            kept = keep.nonzero().view(-1)                                        # local group indices
            rows = (kept[:, None] * cfg.group_size + torch.arange(cfg.group_size)).view(-1)
            keys = rnd * cfg.batch_prompts + kept * d.world_size + d.rank        # global stream positions
            pool.append((keys, r.select(rows), rewards[rows.to(d.device)]))
            rollout.metrics(sums, r, rewards, cfg.group_size)  # of all sampled groups, not only the kept
            logs.accumulate(sums, "overlong_penalty", penalty.sum(), len(penalty))
            logs.accumulate(sums, "filtered_groups", (~keep).sum(), len(keep))
            n_kept += int(distributed.all_reduce_sum(torch.tensor(len(kept), device=d.device), d))
            n_sampled += n_round
            if n_kept >= cfg.batch_prompts:
                break
            # the next round: the missing groups over the pass rate so far, a multiple of the world size
            need = -(-(cfg.batch_prompts - n_kept) * n_sampled // max(n_kept, 1))
            n_round = min(cfg.batch_prompts, -(-need // d.world_size) * d.world_size)
        else:
            raise config.UserError(f"dynamic sampling: {n_kept} of batch_prompts={cfg.batch_prompts} groups kept after "
                                   f"{n_sampled} prompts in max_sampling_rounds={cfg.max_sampling_rounds}: nearly all "
                                   "groups are all right or all wrong; raise --max_sampling_rounds or check the reward")
        r, rewards = gather_kept_groups(pool, cfg.batch_prompts, cfg.group_size, d)
        mask = r.completion_mask * ~r.truncated[:, None] if cfg.overlong_filter else r.completion_mask  # (B, T)

        # 4. old and reference log-probs, fixed for all mini-batches of this step
        old_logp, entropy = logprobs.batched(raw, r, cfg.micro_batch_size, cfg.temperature)
        ref_logp = logprobs.batched(ref, r, cfg.micro_batch_size, cfg.temperature)[0] if ref else None
        is_w = rollout.correction(r, old_logp, cfg, sums)  # sampler μ vs π_old: logged; weights or None
        t_rollout = time.time() - t0

        # 5. advantages: each reward against its group's
        advantages = group_advantages(rewards, cfg.group_size)                    # (B,)

        # 6. policy update: num_minibatches optimizer steps, each over a shuffled slice of the rollout
        perm = torch.randperm(B).to(d.device)
        for mb in perm.chunk(cfg.num_minibatches):
            num_tokens = distributed.all_reduce_sum(mask[mb].sum().float(), d).clamp_min(1)  # [DAPO] Σ|o_i|, all ranks
            micro = mb.split(cfg.micro_batch_size)
            for k, ix in enumerate(micro):
                # DDP: only the last micro-batch all-reduces gradients across ranks
                with distributed.micro_batch(policy, d, last=k == len(micro) - 1):
                    logp, ent = policy(r.prompt_ids[ix], r.prompt_mask[ix], r.completion_ids[ix], mask[ix],
                                     cfg.temperature)
                    logp = rollout.reweight(logp, is_w, ix)  # --rollout_correction: token t's gradient x w_t
                    loss, stats = policy_loss(logp.float(), old_logp[ix], ref_logp[ix] if ref else None,
                                              advantages[ix], mask[ix], cfg.clip_eps_low, cfg.clip_eps_high,
                                              cfg.beta, num_tokens)  # [DAPO]
                    (logprobs.entropy_bonus(loss, ent, mask[ix], cfg, num_tokens) * d.world_size).backward()  # [DAPO] sum over ranks
                for key, (s, n) in stats.items():
                    logs.accumulate(sums, key, s, n)
                logs.accumulate(sums, "loss", loss.item() * num_tokens.item(), mask[ix].sum())  # [DAPO] per token
            grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            logs.accumulate(sums, "grad_norm", grad_norm, 1)

        # 7. metrics, averaged over ranks
        logs.accumulate(sums, "entropy", (entropy * mask).sum(), mask.sum())
        logs.accumulate(sums, "sampling_rounds", rnd + 1, 1)  # [DAPO] and the prompts they took
        logs.accumulate(sums, "prompts_sampled", n_sampled, 1)
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

"""
SAPO: Soft Adaptive Policy Optimization (Gao, Zheng, Chen, Dang, Liu, Yu, Yang, Bai, Zhou, Lin; Qwen;
arXiv 2511.20347).

GRPO's hard token clip is replaced by a smooth, temperature-controlled gate on the token ratio. The
advantage, the rollout and the aggregation (token mean per completion, then mean over completions)
are GRPO's; there is no min, no clip and no KL:

    J = 1/G Σ_i 1/|o_i| Σ_t f_it(ρ_it) Â_i                                          (eq. 5)
    f_it(x) = σ(τ_it (x - 1)) · 4/τ_it,   τ_it = τ_pos if Â_i > 0 else τ_neg          (eq. 6)
    dJ/dlogπ_it = w_it ρ_it Â_i / (G |o_i|),   w_it = 4 p_it (1 - p_it),   p_it = σ(τ_it (ρ_it - 1))

(Equation numbers as a third-party port of verl's SAPO loss cites them; not checked against the PDF.)

What changes versus grpo.py, numbered (every changed line carries a `[SAPO]` marker):
 1. The clipped surrogate min(ρÂ, clip(ρ, 1-ε, 1+ε)Â) becomes f(ρ)Â. Every token keeps a gradient,
    scaled by the gate weight w ∈ (0, 1]: w = 1 exactly at ρ = 1 (the 4/τ factor is there for that:
    f'(1) = σ'(0)·4 = 1) and w decays smoothly as ρ leaves 1 on either side (w = sech²(τ(ρ-1)/2)).
    A soft trust region instead of GRPO's hard band, where a token's gradient drops to 0 past 1 + ε
    (Â > 0) or 1 - ε (Â < 0).
 2. Asymmetric temperatures, τ_pos = 1.0 < τ_neg = 1.05 (the paper's values; TRL and verl use the
    same defaults). A larger τ makes the gate decay faster. Why negative tokens get the faster decay:
    lowering a sampled token's logit (Â < 0) raises, through the softmax, the logits of all the
    unsampled tokens of the vocabulary, spreading probability over many irrelevant tokens; raising it
    (Â > 0) only takes mass from the rest. The paper finds the negative updates the less stable ones,
    so their gate closes sooner once they are off-policy. Â = 0 falls in the τ_neg branch, as in TRL
    and verl; it is multiplied by Â = 0 anyway.
 3. No KL term and no reference model (β, the k3 estimator and the reference forward pass are gone):
    the SAPO objective has none, and verl's SAPO example sets use_kl_loss=False.
 4. The logs report the mean gate weight w over positive- and negative-advantage tokens
    (gate_weight_pos, gate_weight_neg) in place of GRPO's clip fraction and KL: 1.000 on-policy,
    lower where the soft trust region is damping off-policy tokens.

Several mini-batch updates per rollout batch (num_minibatches=4; 2 on --tiny), as in grpo.py, and on
purpose: on-policy (ρ ≡ 1) every w is 1 and SAPO's gradient is exactly GRPO's without KL, so with one
update per rollout this file would be a slower GRPO with β = 0. Only the later mini-batches, taken
after the policy has moved, are off-policy; there the gate acts.

Launch:
    python sapo.py --tiny                          # embedded default: CPU, no downloads, a few minutes
    torchrun --nproc_per_node=2 sapo.py            # Qwen2.5-1.5B-Instruct on GSM8K, 2 GPUs
    torchrun --nproc_per_node=2 sapo.py --tiny     # the tiny default under DDP (gloo on CPU)
    python sapo.py --help                          # every knob with its default

Departures from the paper, numbered:
 1. G=8 and 32 prompts per step (256 completions) on a 1.5B dense model, to fit 2 GPUs; the paper
    trains Qwen3-30B-A3B-Base (an MoE, where token ratios vary most) and the Qwen3-VL series.
 2. Outcome rewards are rule-based (GSM8K answer match plus a small format term).
 3. lr, batch and mini-batch counts are grpo.py's (the paper's were not checked here), so that the two
    files differ only in the objective.
TRL (loss_type="sapo") and verl (loss_mode="sapo") match the paper. verl also clamps log ρ to ±20
before exp, a numerical guard we do not copy: there w·ρ is ~0 anyway.
Expected result on the tiny default: held-out greedy accuracy 0.285 -> 0.470 (seed 0; step 20: 0.510), with
mean gate weights >= 0.998 at every step: the tiny run is nearly on-policy (see docs/sapo.md).
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
    model: str = "Qwen/Qwen2.5-1.5B-Instruct"  # hub name or local dir of the initial policy ([SAPO]: no reference)
    data_path: str = ""  # local GSM8K: a jsonl file or a dir with train.jsonl/test.jsonl ("" = hub openai/gsm8k)
    run_dir: str = "runs/sapo"  # [SAPO] metrics.jsonl, config.json and checkpoints go here
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
    # [SAPO] no clip_eps (no clip) and no beta (no KL, so no reference model): two gate temperatures instead
    tau_pos: float = 1.0  # τ_pos: gate temperature for tokens with Â > 0 (larger = gate closes faster)
    tau_neg: float = 1.05  # τ_neg: gate temperature for tokens with Â <= 0 (paper: τ_neg > τ_pos)
    # evaluation and logging
    eval_every: int = 25  # held-out greedy evaluation every this many steps (0 = only before and after)
    eval_problems: int = 250  # held-out test problems per evaluation
    save_every: int = 50  # checkpoint every this many steps (and at the end)
    wandb_project: str = ""  # log to this wandb project too (needs `pip install wandb`)


# --tiny sets these (explicit --key=value flags still win): a run of a few minutes on 2 CPU cores.
TINY = dict(num_steps=40, batch_prompts=16, group_size=8, max_new_tokens=32, system_prompt="",
            lr=2e-4, warmup_steps=0, num_minibatches=2, micro_batch_size=64, gradient_checkpointing=False,
            eval_every=20, eval_problems=200, save_every=20, run_dir="runs/sapo-tiny")  # [SAPO] run_dir


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


def gate_temperature(advantages, tau_pos, tau_neg, like):
    """[SAPO] τ_it = τ_pos if Â_i > 0 else τ_neg (eq. 6), as a (B, 1) tensor of like's dtype and device.

    Â = 0 takes τ_neg, as in TRL and verl; its term is multiplied by Â = 0, so the choice is moot.
    """
    return torch.where(advantages[:, None] > 0, like.new_tensor(tau_pos), like.new_tensor(tau_neg))


def soft_gate(ratio, tau):
    """[SAPO] f(ρ) = σ(τ(ρ - 1)) · 4/τ (eq. 6): replaces the clipped ratio; f(1) = 2/τ and f'(1) = 1."""
    return torch.sigmoid(tau * (ratio - 1)) * 4 / tau


def gate_weight(ratio, tau):
    """[SAPO] w = 4p(1 - p), p = σ(τ(ρ - 1)): dJ/dlogπ = w·ρ·Â per token; w = 1 exactly at ρ = 1.

    w = sech²(τ(ρ - 1)/2) decays symmetrically in ρ - 1, faster for larger τ. GRPO's weight is 1 inside
    the clip band and 0 past it on the side the advantage pushes towards.
    """
    p = torch.sigmoid(tau * (ratio - 1))
    return 4 * p * (1 - p)


def policy_loss(logp, old_logp, advantages, mask, tau_pos, tau_neg):  # [SAPO] no ref_logp, clip_eps, beta
    """-J_SAPO for a batch of sequences: per-sequence token mean, then mean over sequences (eq. 5).

    logp, old_logp, mask: (B, T); advantages: (B,). No min, no clip, no KL.
    """
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)                                        # ρ (B, T)
    A = advantages[:, None]
    tau = gate_temperature(advantages, tau_pos, tau_neg, ratio)               # [SAPO] τ (B, 1)
    per_token = soft_gate(ratio, tau) * A                                     # [SAPO] f(ρ)Â: no min, no clip
    per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp_min(1)            # (B,)
    loss = -per_seq.mean()
    with torch.no_grad():  # [SAPO] the soft trust region at work: mean gate weight w on Â > 0 and Â < 0 tokens
        w = gate_weight(ratio, tau)
        pos, neg = (A > 0).float() * mask, (A < 0).float() * mask
        stats = {"gate_weight_pos": ((w * pos).sum(), pos.sum()),
                 "gate_weight_neg": ((w * neg).sum(), neg.sum()),
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
    if cfg.tau_pos <= 0 or cfg.tau_neg <= 0:  # [SAPO] the gate divides by τ
        raise ValueError(f"tau_pos={cfg.tau_pos} and tau_neg={cfg.tau_neg} must both be > 0")
    log = tqdm.write if d.master_process else (lambda *a, **k: None)
    common.seed_everything(cfg.seed + d.rank)
    if cfg.tiny:
        cfg.model = common.ensure_tiny_model(d, log=log)

    # model, tokenizer, optimizer  # [SAPO] no reference model: SAPO has no KL term
    tok = common.load_tokenizer(cfg.model)
    ckpt = common.resolve_checkpoint(cfg.resume) if cfg.resume else ""
    master_dtype = torch.float32  # fp32 master weights: lr=1e-6 updates survive (bf16 would round them away)
    policy = common.Policy(common.load_model(ckpt or cfg.model, d.device, master_dtype),
                           cfg.logprob_chunk, cfg.gradient_checkpointing).train()
    raw = policy  # the unwrapped module: generation and saving use raw.lm
    if d.ddp:
        policy = DDP(policy, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    # [SAPO] (grpo.py loads the frozen reference model for the KL term here)
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

    pbar = tqdm(range(start_step, cfg.num_steps), disable=not d.master_process, desc="sapo")  # [SAPO]
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

        # 5. old log-probs, fixed for all mini-batches of this step  # [SAPO] no reference log-probs
        old_logp, entropy = common.batched_logprobs(raw, r, cfg.micro_batch_size, cfg.temperature)
        # [SAPO] (grpo.py computes the reference log-probs for the KL term here)
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
                    loss, stats = policy_loss(logp.float(), old_logp[ix],  # [SAPO] soft gate, no KL
                                              advantages[ix], mask[ix], cfg.tau_pos, cfg.tau_neg)
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
                         len=f"{metrics['response_length']:.0f}", w_pos=f"{metrics['gate_weight_pos']:.3f}",
                         w_neg=f"{metrics['gate_weight_neg']:.3f}")  # [SAPO] mean gate weights, not clip_frac

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

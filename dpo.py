"""
Online DPO: Direct Preference Optimization on GRPO's rollouts (the loss: Rafailov et al., arXiv 2305.18290).

Sample and score G completions per prompt as GRPO does, then learn from one preference per group instead
of advantages: chosen y_w = the completion with the group's highest reward, rejected y_l = the lowest.
The policy raises its log-ratio to a frozen reference on y_w against that on y_l, a whole sequence at once:

    L = -1/P Σ_pairs log σ(β [Δ(y_w) - Δ(y_l)]),   Δ(y) = log π_θ(y|x) - log π_ref(y|x)       (eq. 7)
    log π(y|x) = Σ_t log π(y_t|x, y_<t),   implicit reward r(x, y) = β Δ(y) + β log Z(x)        (eq. 5)

What changes versus GRPO, numbered:
 1. Pairs replace advantages: each group's first best and first worst completion (preference_pairs);
    a group whose rewards are all equal gives no pair, and the other G - 2 completions are unused.
 2. The DPO loss on summed sequence log-probs replaces the clipped surrogate and the k3 KL: no π_old,
    no ratio, no clip. β = 0.1 is the DPO temperature, and the reference model is always loaded.
 3. Mini-batches of pairs, normalised by the pairs of all ranks; a rank with no pair in a mini-batch
    forwards a stand-in at weight 0, so every rank takes the same optimizer steps.
 4. Logs pairs per prompt, their reward margin, and the implicit reward margin and accuracy.

Launch:
    python dpo.py --tiny                     # the embedded tiny default: CPU, no downloads, about a minute
    torchrun --nproc_per_node=2 dpo.py       # Qwen2.5-1.5B-Instruct on GSM8K, 2 GPUs

Departures from the paper, numbered:
 1. Online: fresh pairs from the current policy every step; the paper trains on a fixed offline dataset.
 2. Preferences from rule-based rewards (GSM8K answer match plus a format term), not human labels.
 3. AdamW at grpo.py's lr 1e-6, 32 prompts per step; the paper uses RMSprop at 1e-6 and 64 pairs.

Details: docs/dpo.md
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
    beta: float = 0.1  # [DPO] β: DPO temperature, in (0, inf); the implicit reward is β Δ(y) (paper and TRL: 0.1)
    # evaluation and logging
    eval_every: int = 25  # held-out greedy evaluation every this many steps, in [0, inf) (0 = before and after)
    eval_problems: int = 250  # held-out test problems per evaluation, in [1, inf)
    save_every: int = 50  # checkpoint every this many steps (and at the end), in [1, inf)
    wandb_project: str = ""  # log to this wandb project too (needs `pip install wandb`)


# --tiny sets these (explicit --key=value flags still win): a run of about a minute on 2 CPU cores.
TINY = dict(model="tiny", data_path="tiny", num_steps=40, batch_prompts=16, group_size=8, max_new_tokens=32,
            system_prompt="", lr=2e-4, warmup_steps=0, num_minibatches=2, micro_batch_size=64,
            gradient_checkpointing=False, eval_every=20, eval_problems=200, save_every=20)
TINY.update(lr=1e-4)  # [DPO] at grpo.py's 2e-4, 2 steps on ~6 pairs each swing held-out accuracy (docs/dpo.md)


# -----------------------------------------------------------------------------
# the algorithm: pure functions that tests import without starting a run


def preference_pairs(rewards, group_size):  # [DPO] replaces group_advantages
    """(P, 2) rows (chosen, rejected): per group of G consecutive rewards, the highest and the lowest, the first
    index among ties; a group whose rewards are all equal (spread < 1e-6, as grpo.py's std) gives no pair."""
    R = rewards.view(-1, group_size)                                          # (prompts, G)
    first = torch.arange(len(R), device=R.device) * group_size                # each group's first row
    pairs = torch.stack([first + R.argmax(1), first + R.argmin(1)], 1)        # [DPO] argmax, argmin: first of ties
    return pairs[R.max(1).values - R.min(1).values > 1e-6]


def kl_k3(logp, ref_logp):
    """The k3 estimate of KL(π_θ || π_ref) per token (eq. 4): π_ref/π_θ - log(π_ref/π_θ) - 1 >= 0."""
    log_r = ref_logp - logp
    return torch.exp(log_r) - log_r - 1


def dpo_loss(logp, ref_logp, mask, beta, num_pairs):  # [DPO] replaces policy_loss
    """-log σ(β [Δ(y_w) - Δ(y_l)]) (eq. 7) summed over the pairs given, divided by num_pairs (those of the whole
    mini-batch on all ranks); Δ(y) = Σ_t (log π_θ - log π_ref)(y_t), the sequence log-ratio to the reference.
    logp, ref_logp, mask: (2P, T), each pair's chosen row followed by its rejected row (pairs.flatten())."""
    mask = mask.float()
    delta = ((logp - ref_logp) * mask).sum(1).view(-1, 2)                     # Δ (P, 2): chosen, rejected
    margin = beta * (delta[:, 0] - delta[:, 1])                               # implicit reward margin (P,)
    loss = -torch.nn.functional.logsigmoid(margin).sum() / num_pairs  # [DPO] every token of y_w, y_l: one weight
    with torch.no_grad():  # TRL's rewards/margins, /accuracies, /chosen, /rejected; KL only logged
        kl = kl_k3(logp, ref_logp)                                            # (2P, T)
        stats = {"implicit_margin": (margin.sum(), len(margin)), "implicit_accuracy": ((margin > 0).sum(), len(margin)),
                 "implicit_reward_chosen": (beta * delta[:, 0].sum(), len(margin)),
                 "implicit_reward_rejected": (beta * delta[:, 1].sum(), len(margin)),
                 "kl": ((kl * mask).sum(), mask.sum())}
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
    ref = loading.reference(raw, path, cfg, d)  # [DPO] frozen, and always: the loss is a log-ratio to it
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

        # 4. and 5. preference pairs instead of advantages, then their rows' reference log-probs (no π_old)  # [DPO]
        pairs = preference_pairs(rewards, cfg.group_size)  # [DPO] (P, 2) rows (chosen, rejected), P <= prompts
        ref_logp = torch.zeros(mask.shape, device=d.device)  # [DPO] rows in no pair: read by the stand-in only
        if len(pairs):
            ref_logp[pairs.flatten()] = logprobs.batched(ref, r.select(pairs.flatten()), cfg.micro_batch_size,
                                                         cfg.temperature)[0]
        t_rollout = time.time() - t0

        # 6. policy update: num_minibatches optimizer steps, each over a shuffled slice of the pairs
        perm = pairs[torch.randperm(len(pairs)).to(d.device)]  # [DPO] P may differ between ranks, or be 0
        for mb in perm.tensor_split(cfg.num_minibatches):  # [DPO] as many mini-batches on every rank, whatever its P
            num_pairs = int(distributed.all_reduce_sum(torch.tensor(len(mb), device=d.device), d))  # [DPO] of all ranks
            if num_pairs == 0:  # [DPO] no rank holds a pair here: every rank skips this optimizer step alike
                continue
            # [DPO] a rank with no pair here forwards the stand-in pair (row 0, row 0) at weight w = 0: DDP's
            # all-reduce needs every rank's backward. A micro-batch holds micro_batch_size // 2 pairs.
            w = float(len(mb) > 0)
            micro = (mb if w else pairs.new_zeros(1, 2)).split(max(1, cfg.micro_batch_size // 2))
            for k, ix in enumerate(micro):
                # DDP: only the last micro-batch all-reduces gradients across ranks
                rows = ix.flatten()  # [DPO] each pair's chosen row, then its rejected row
                with distributed.micro_batch(policy, d, last=k == len(micro) - 1):
                    logp, ent = policy(r.prompt_ids[rows], r.prompt_mask[rows], r.completion_ids[rows], mask[rows],
                                       cfg.temperature)
                    loss, stats = dpo_loss(logp.float(), ref_logp[rows], mask[rows], cfg.beta, num_pairs)
                    (loss * d.world_size * w).backward()  # [DPO] DDP averages over ranks; the loss is a sum over them
                for key, (s, n) in stats.items():
                    logs.accumulate(sums, key, s * w, n * w)  # [DPO] the stand-in adds nothing
                logs.accumulate(sums, "entropy", (ent * mask[rows]).sum() * w, mask[rows].sum() * w)
                logs.accumulate(sums, "loss", loss.item() * num_pairs * w, len(ix) * w)  # per pair
            grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            logs.accumulate(sums, "grad_norm", grad_norm, 1)

        # 7. metrics, averaged over ranks
        rollout.metrics(sums, r, rewards, cfg.group_size)
        logs.accumulate(sums, "pairs_per_prompt", len(pairs), B // cfg.group_size)  # [DPO] and their reward margin
        logs.accumulate(sums, "pair_reward_margin", (rewards[pairs[:, 0]] - rewards[pairs[:, 1]]).sum(), len(pairs))
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

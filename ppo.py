"""
PPO with a learned critic (Schulman et al., arXiv 1707.06347), the GRPO paper's own baseline (DeepSeekMath
§4.1, arXiv 2402.03300), with InstructGPT's KL penalty in a per-token reward (Ouyang et al., arXiv 2203.02155).

A value model V, a second copy of the policy's network with a scalar head, predicts the return at every
completion token; GAE turns per-token rewards into per-token advantages. The policy maximises PPO's clipped
surrogate, averaged over each completion's tokens and then over completions; V regresses on the returns:

    J = 1/B Σ_i 1/|o_i| Σ_t min(ρ_it Â_it, clip(ρ_it, 1-ε, 1+ε) Â_it)                      (eq. 1)
    r_it = -β log(π_old/π_ref)(o_it) + [t = |o_i|] R_i                                    (eq. 2)
    Â_it = Σ_l (γλ)^l δ_i,t+l,   δ_it = r_it + γ V_i,t+1 - V_it,   V after the last token = 0      (GAE)
    L_V = ½ max((V_it - ret_it)², (clip(V_it, V_old ± ε_v) - ret_it)²),   ret = Â + V_old

What changes versus GRPO, numbered:
 1. A critic (Critic): the policy's network, from the same checkpoint, plus a linear head; its own AdamW,
    DDP wrap and checkpoint state; trained on the same mini-batches by the clipped value loss (value_loss).
 2. The KL to the reference leaves the loss for the reward: k1 on π_old, per token (token_rewards).
 3. Per-token GAE advantages (γ = 1, λ = 0.95), whitened over every rank's tokens (gae, whiten).

Launch:
    python ppo.py --tiny                    # the embedded tiny default: CPU, no downloads, a few minutes
    torchrun --nproc_per_node=2 ppo.py      # Qwen2.5-1.5B-Instruct and a 1.5B critic on GSM8K, 2 GPUs

Departures from the paper, numbered:
 1. Rule-based outcome rewards (GSM8K answer match plus a small format term), not a reward model, so the
    critic starts from the policy's checkpoint (InstructGPT and TRL start it from the reward model).
 2. G = 8 completions per prompt and grpo.py's other settings, for a like-for-like comparison; the
    advantage does not use the group. The value loss is clipped (ppo2, TRL, OpenRLHF; not the paper's).

Details: docs/ppo.md
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
    beta: float = 0.04  # [PPO] β: k1 KL penalty in the per-token reward, in [0, inf) (0 = no KL, no reference model)
    gamma: float = 1.0  # [PPO] γ: GAE discount over completion tokens, in [0, 1] (TRL's default: none)
    lam: float = 0.95  # [PPO] λ: GAE trace decay, in [0, 1] (TRL's default; 1 = Monte Carlo return minus V)
    clip_eps_value: float = 0.2  # [PPO] ε_v: V moves at most this far from V_old before its loss clips, in (0, inf)
    vf_coef: float = 0.1  # [PPO] value-loss weight, in (0, inf) (TRL's 0.1; own AdamW: it acts through max_grad_norm)
    critic_lr: float = 1e-5  # [PPO] the critic's AdamW learning rate, in (0, inf) (10x lr: its head starts at zero)
    # evaluation and logging
    eval_every: int = 25  # held-out greedy evaluation every this many steps, in [0, inf) (0 = before and after)
    eval_problems: int = 250  # held-out test problems per evaluation, in [1, inf)
    save_every: int = 50  # checkpoint every this many steps (and at the end), in [1, inf)
    wandb_project: str = ""  # log to this wandb project too (needs `pip install wandb`)


# --tiny sets these (explicit --key=value flags still win): a run of about a minute on 2 CPU cores.
TINY = dict(model="tiny", data_path="tiny", num_steps=40, batch_prompts=16, group_size=8, max_new_tokens=32,
            system_prompt="", lr=2e-4, warmup_steps=0, num_minibatches=2, micro_batch_size=64,
            gradient_checkpointing=False, eval_every=20, eval_problems=200, save_every=20)
TINY.update(critic_lr=2e-3)  # [PPO] 10x the tiny lr, as the default is 10x lr (docs/ppo.md)


# -----------------------------------------------------------------------------
# the algorithm: pure functions that tests import without starting a run


def token_rewards(rewards, old_logp, ref_logp, mask, beta):  # [PPO] eq. 2: the KL penalty joins the reward
    """r_t = -β (log π_old - log π_ref)(o_t) on every token (k1), plus the outcome R on the last one.

    rewards: (B,); old_logp, ref_logp, mask: (B, T), mask 1 up to each row's last token. Returns r and the
    k1 KL, (B, T) each, 0 on padding. ref_logp is unused when beta == 0."""
    mask = mask.float()
    kl = (old_logp - ref_logp) * mask if beta > 0 else torch.zeros_like(mask)      # (B, T)
    last = (mask.sum(1).long() - 1).clamp_min(0)[:, None]  # [PPO] (B, 1): the last token of each row
    return (-beta * kl).scatter_add(1, last, rewards[:, None].to(kl.dtype)) * mask, kl


def gae(token_r, values, mask, gamma, lam):  # [PPO] generalised advantage estimation, right to left
    """Â_t = δ_t + γλ Â_t+1 with δ_t = r_t + γ V_t+1 - V_t, where V and Â after a row's last token are 0.

    token_r, values, mask: (B, T); rows end at different lengths. Returns (Â, returns = Â + V), 0 on padding.
    """
    mask = mask.to(values.dtype)
    adv = torch.zeros_like(values)
    next_v, next_a = torch.zeros_like(values[:, 0]), torch.zeros_like(values[:, 0])   # (B,)
    for t in reversed(range(values.shape[1])):
        delta = token_r[:, t] + gamma * next_v - values[:, t]
        adv[:, t] = next_a = (delta + gamma * lam * next_a) * mask[:, t]
        next_v = values[:, t] * mask[:, t]
    return adv, (adv + values) * mask


def masked_mean_var(x, mask, d):  # [PPO] batch statistics over the tokens of every rank: DDP equals one process
    """Mean and population variance of x over the tokens where mask is 1, summed over all ranks (float64)."""
    x, m = x.double(), mask.double()
    s = distributed.all_reduce_sum(torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()]), d)
    mean = s[0] / s[2].clamp_min(1)
    return mean, (s[1] / s[2].clamp_min(1) - mean ** 2).clamp_min(0)


def whiten(x, mask, d):  # [PPO] advantages whitened over the batch (TRL and OpenRLHF do the same)
    """(x - mean) / std over the masked tokens of all ranks, 0 on padding; (B, T) -> (B, T)."""
    mean, var = masked_mean_var(x, mask, d)
    return ((x - mean) * torch.rsqrt(var + 1e-8)).to(x.dtype) * mask


def explained_variance(values, returns, mask, d):  # [PPO] 1 = the critic predicts the returns, <= 0 = no better
    """1 - Var(returns - V) / Var(returns) over the masked tokens of all ranks: a float."""
    unexplained, total = masked_mean_var(returns - values, mask, d)[1], masked_mean_var(returns, mask, d)[1]
    return (1 - unexplained / total.clamp_min(1e-12)).item()


def policy_loss(logp, old_logp, advantages, mask, clip_eps):  # [PPO] per-token Â, and no KL term (it is in r_t)
    """-J_PPO (eq. 1) for a batch of sequences: per-sequence token mean, then mean over sequences.

    logp, old_logp, advantages, mask: (B, T)."""
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)                                        # ρ (B, T)
    A = advantages  # [PPO] (B, T): one advantage per token
    per_token = torch.min(ratio * A, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * A)
    per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp_min(1)            # (B,)
    loss = -per_seq.mean()
    with torch.no_grad():  # tokens whose gradient the clip removes
        clipped = ((A > 0) & (ratio > 1 + clip_eps)) | ((A < 0) & (ratio < 1 - clip_eps))
        stats = {"clip_frac": ((clipped.float() * mask).sum(), mask.sum()),
                 "ratio": ((ratio * mask).sum(), mask.sum())}
    return loss, stats


def value_loss(values, old_values, returns, mask, clip_eps_value):  # [PPO] the critic's loss, clipped like ρ
    """½ max((V - ret)², (clip(V, V_old ± ε_v) - ret)²): per-sequence token mean, then mean over sequences.

    values, old_values, returns, mask: (B, T).
    """
    mask = mask.float()
    clipped = old_values + (values - old_values).clamp(-clip_eps_value, clip_eps_value)
    per_token = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)     # (B, T)
    loss = ((per_token * mask).sum(1) / mask.sum(1).clamp_min(1)).mean()
    with torch.no_grad():  # tokens where the clipped branch is the larger loss (its gradient is 0)
        frac = (((clipped - returns) ** 2 > (values - returns) ** 2).float() * mask).sum()
    return loss, {"value_clip_frac": (frac, mask.sum())}


class Critic(torch.nn.Module):  # [PPO] the value model: a second network, not a head on the policy's trunk
    """V_t for every completion token: the decoder of its own causal-LM copy and a linear head on its last hidden
    state at the position that chooses token t (the one the policy's log-prob of o_t comes from)."""

    def __init__(self, lm, gradient_checkpointing=False):
        super().__init__()
        self.body = lm.base_model                                  # the decoder; the LM head is not needed
        self.head = torch.nn.Linear(lm.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)                     # V = 0 at the start: no baseline yet
        torch.nn.init.zeros_(self.head.bias)
        if gradient_checkpointing:
            self.body.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, prompt_ids, prompt_mask, completion_ids, completion_mask):
        """(B, T) values of the states before each completion token."""
        attn = torch.cat([prompt_mask, completion_mask], 1)
        h = self.body(input_ids=torch.cat([prompt_ids, completion_ids], 1), attention_mask=attn,
                      position_ids=(attn.cumsum(1) - 1).clamp_min(0), use_cache=False).last_hidden_state
        return self.head(h[:, -completion_ids.shape[1] - 1:-1]).squeeze(-1)


@torch.no_grad()
def rollout_values(critic, r, micro_batch_size):  # [PPO] V_old, as logprobs.batched gives π_old
    """(B, T) values of a rollout under `critic`, without grad, in micro-batches, in eval mode."""
    critic.eval()
    with distributed.autocast(r.prompt_ids.device, critic):
        v = [critic(r.prompt_ids[s:s + micro_batch_size], r.prompt_mask[s:s + micro_batch_size],
                    r.completion_ids[s:s + micro_batch_size], r.completion_mask[s:s + micro_batch_size]).float()
             for s in range(0, r.completion_ids.shape[0], micro_batch_size)]
    critic.train()
    return torch.cat(v)


# -----------------------------------------------------------------------------
# training


def main():
    cfg = config.parse(Config, tiny=TINY)
    d = distributed.setup(cfg)
    B = cfg.batch_prompts // d.world_size * cfg.group_size  # completions per rank per step
    log = tqdm.write if d.master_process else (lambda *a, **k: None)
    distributed.seed_everything(cfg.seed + d.rank)

    # run dir, data, then policy (fp32 master weights), reference model, tokenizer, optimizer, critic  # [PPO]
    ckpt = checkpoint.start_run(cfg, d)  # "" for a fresh run; refuses a reused run_dir or changed settings
    train, test = loading.problems(cfg, "train"), loading.problems(cfg, "test")[:cfg.eval_problems]
    path = loading.model_path(cfg.model, d)
    tok = loading.tokenizer(path)
    raw = loading.policy(path, ckpt, cfg, d)  # fp32 master weights, or a frozen base + fp32 LoRA adapters
    raw.train()  # `raw` is the unwrapped module: generation and saving use raw.lm
    policy = distributed.wrap(raw, cfg, d)  # DDP around raw, or raw sharded in place (--fsdp); the loss goes through it
    ref = loading.reference(raw, path, cfg, d) if cfg.beta > 0 else None  # frozen, for the KL term
    optimizer = torch.optim.AdamW(raw.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    critic_raw = Critic(loading.model(path, d.device), cfg.gradient_checkpointing).train()  # [PPO] V, fp32
    critic = distributed.wrap(critic_raw, cfg, d)  # [PPO] wrapped as the policy is: DDP, or sharded in place (--fsdp)
    critic_opt = torch.optim.AdamW(critic_raw.parameters(), lr=cfg.critic_lr, betas=(0.9, 0.99),
                                   weight_decay=cfg.weight_decay)
    saved_with = {"critic": (critic_raw, critic_opt)}  # [PPO] the critic and its AdamW: saved, restored with the policy
    start_step = checkpoint.restore(ckpt, optimizer, d, saved_with)["step"] if ckpt else 0  # [PPO]

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
        for g in critic_opt.param_groups:  # [PPO] the critic warms up with the policy
            g["lr"] = cfg.critic_lr * lr / cfg.lr

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
        values = rollout_values(critic_raw, r, cfg.micro_batch_size)  # [PPO] and the critic's V_old (B, T)
        is_w = rollout.correction(r, old_logp, cfg, sums)  # sampler μ vs π_old: logged; weights or None
        t_rollout = time.time() - t0

        # 5. advantages: per-token rewards (eq. 2), GAE and returns; Â whitened over every rank's tokens  # [PPO]
        token_r, kl = token_rewards(rewards, old_logp, ref_logp, mask, cfg.beta)  # (B, T) each
        adv_raw, returns = gae(token_r, values, mask, cfg.gamma, cfg.lam)         # (B, T) each
        advantages = whiten(adv_raw, mask, d)                                     # (B, T)

        # 6. policy and critic update: num_minibatches steps of each, every one over a shuffled slice  # [PPO]
        perm = torch.randperm(B).to(d.device)
        for mb in perm.chunk(cfg.num_minibatches):
            micro = mb.split(cfg.micro_batch_size)
            for k, ix in enumerate(micro):
                # DDP: only the last micro-batch all-reduces gradients across ranks
                with distributed.micro_batch(policy, d, last=k == len(micro) - 1), \
                        distributed.micro_batch(critic, d, last=k == len(micro) - 1):  # [PPO] and the critic's backward
                    logp, ent = policy(r.prompt_ids[ix], r.prompt_mask[ix], r.completion_ids[ix], mask[ix],
                                     cfg.temperature)
                    logp = rollout.reweight(logp, is_w, ix)  # --rollout_correction: token t's gradient x w_t
                    loss, stats = policy_loss(logp.float(), old_logp[ix], advantages[ix], mask[ix],
                                              cfg.clip_eps)  # [PPO] no ref_logp, no beta
                    (logprobs.entropy_bonus(loss, ent, mask[ix], cfg) * len(ix) / len(mb)).backward()  # loss - c·H̄
                    v = critic(r.prompt_ids[ix], r.prompt_mask[ix], r.completion_ids[ix], mask[ix])  # [PPO] (b, T)
                    v_loss, v_stats = value_loss(v.float(), values[ix], returns[ix], mask[ix], cfg.clip_eps_value)
                    (cfg.vf_coef * v_loss * len(ix) / len(mb)).backward()
                for key, (s, n) in {**stats, **v_stats}.items():  # [PPO]
                    logs.accumulate(sums, key, s, n)
                logs.accumulate(sums, "loss", loss.item() * len(ix), len(ix))
                logs.accumulate(sums, "value_loss", v_loss.item() * len(ix), len(ix))  # [PPO]
            grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            critic_grad_norm = torch.nn.utils.clip_grad_norm_(critic_raw.parameters(), cfg.max_grad_norm)  # [PPO]
            critic_opt.step()
            critic_opt.zero_grad(set_to_none=True)
            logs.accumulate(sums, "grad_norm", grad_norm, 1)
            logs.accumulate(sums, "critic_grad_norm", critic_grad_norm, 1)  # [PPO]

        # 7. metrics, averaged over ranks
        rollout.metrics(sums, r, rewards, cfg.group_size)
        logs.accumulate(sums, "entropy", (entropy * mask).sum(), mask.sum())
        for key, x in [("kl", kl), ("advantage_raw", adv_raw), ("value", values), ("return", returns)]:  # [PPO]
            logs.accumulate(sums, key, (x * mask).sum(), mask.sum())  # per token; advantage_raw: before whitening
        logs.accumulate(sums, "explained_variance", explained_variance(values, returns, mask, d), 1)
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
            checkpoint.save(cfg.run_dir, done, raw.lm, tok, optimizer, cfg, d, saved_with)  # [PPO] + the critic

    if start_step < cfg.num_steps:
        log(f"held-out greedy accuracy after RL: {metrics['eval/strict']:.3f} (lenient {metrics['eval/lenient']:.3f})")
    distributed.check_replicas(raw, optimizer, d)  # DDP: every rank holds the same weights and took the same steps
    distributed.check_replicas(critic_raw, critic_opt, d)  # [PPO] the critic too
    distributed.cleanup(d)


if __name__ == "__main__":
    config.run(main)

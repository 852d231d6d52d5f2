"""
rollout.py: G sampled completions per prompt, their rewards, and how far the sampler is from π_old.

    Rollout             one batch of completions (B = prompts x G rows): ids, masks, lengths, texts, answers, log μ
    sample              the trainers' rollout: the chat prompts of some problems, G completions each, with log μ
    generate            completions from Hugging Face generate() or the fast static-KV-cache decoder (decoder.py)
    make_rollout        generated ids (and their log μ) packaged as a Rollout: masks to the first EOS, texts
    tokenize_prompts, check_context, eos_token_ids, completion_mask   the pieces generate and sample.py use
    rewards, metrics    the reward of each completion; what a reader checks first about a rollout
    correction, correction_weights, reweight   --rollout_correction: μ (the sampler) vs π_old, logged every step,
                        and the weights a trainer's gradient takes (docs/rollout_correction.md)
"""
import dataclasses

import torch
import torch.nn as nn

from grpo_family import decoder, distributed, fsdp, gsm8k, logs
from grpo_family.config import UserError


@dataclasses.dataclass
class Rollout:
    """One batch of completions; B = prompts * G rows, prompts repeated G times in a row."""
    prompt_ids: torch.Tensor      # (B, P) left-padded
    prompt_mask: torch.Tensor     # (B, P)
    completion_ids: torch.Tensor  # (B, T) right-padded with pad tokens after EOS
    completion_mask: torch.Tensor  # (B, T) 1 up to and including the first EOS
    lengths: torch.Tensor         # (B,) number of completion tokens (EOS included)
    truncated: torch.Tensor       # (B,) True if no EOS within max_new_tokens
    texts: list                   # B decoded completions (special tokens removed)
    pad_id: int                   # the pad token of prompt_ids and completion_ids
    answers: list = None          # B reference answers, one per row (None outside training)
    sampler_logp: torch.Tensor = None  # (B, T) log μ: the sampler's log-probs of the drawn tokens, 0 after EOS

    def select(self, rows):
        """The rows `rows` (1-D indices), on this rollout's device."""
        idx = torch.as_tensor(rows).to(self.prompt_ids.device)
        pick = lambda v: v[idx] if torch.is_tensor(v) else [v[i] for i in idx.tolist()] if isinstance(v, list) else v
        return Rollout(**{f.name: pick(getattr(self, f.name)) for f in dataclasses.fields(self)})

    @staticmethod
    def cat(rs, device):
        """Rollouts of different widths as one, on `device`: prompts left-padded, completions right-padded
        (masked out, and positions come from the mask: the real tokens' log-probs do not change)."""
        P, T, pad = max(r.prompt_ids.shape[1] for r in rs), max(r.completion_ids.shape[1] for r in rs), rs[0].pad_id
        left = lambda x, v: nn.functional.pad(x.to(device), (P - x.shape[1], 0), value=v)   # noqa: E731
        right = lambda x, v: nn.functional.pad(x.to(device), (0, T - x.shape[1]), value=v)  # noqa: E731
        answers = None if any(r.answers is None for r in rs) else [a for r in rs for a in r.answers]
        mu = None if any(r.sampler_logp is None for r in rs) else torch.cat([right(r.sampler_logp, 0) for r in rs])
        return Rollout(torch.cat([left(r.prompt_ids, pad) for r in rs]),
                       torch.cat([left(r.prompt_mask, 0) for r in rs]),
                       torch.cat([right(r.completion_ids, pad) for r in rs]),
                       torch.cat([right(r.completion_mask, 0) for r in rs]),
                       torch.cat([r.lengths.to(device) for r in rs]), torch.cat([r.truncated.to(device) for r in rs]),
                       [t for r in rs for t in r.texts], pad, answers, mu)


# -----------------------------------------------------------------------------
# sampling


def sample(model, tok, problems, cfg, device):
    """G = cfg.group_size completions sampled from `model` for each problem's chat prompt, with the answers and
    the sampler's log-probs."""
    prompts = [gsm8k.build_prompt(tok, p["question"], cfg.system_prompt) for p in problems]
    ids, mask = tokenize_prompts(tok, prompts, device)
    r = generate(model, tok, ids, mask, cfg.group_size, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                 fast=cfg.fast_rollout, logprobs=True)
    r.answers = [p["answer"] for p in problems for _ in range(cfg.group_size)]
    return r


def tokenize_prompts(tok, prompts, device):
    """Left-padded (B, P) input ids and attention mask for a list of prompt strings."""
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def check_context(model, tok, prompts, max_new_tokens):
    """Raise a UserError naming the first prompt that, with max_new_tokens, does not fit the model's context."""
    limit = getattr(model.config, "max_position_embeddings", None) or float("inf")
    for i, text in enumerate(prompts):
        if len(text.encode()) + max_new_tokens <= limit:  # a token is at least one byte: no need to count
            continue
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        if n + max_new_tokens > limit:
            raise UserError(f"prompt {i + 1} is {n} tokens: with --max_new_tokens={max_new_tokens} it passes the "
                            f"model's context of {limit} tokens; shorten it or lower --max_new_tokens")


def eos_token_ids(model, tok):
    """Every token id that ends a completion: the tokenizer's EOS plus the generation config's."""
    ids = {tok.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    if gen_eos is not None:
        ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def completion_mask(completion_ids, eos_ids):
    """(B, T) mask that is 1 up to and including the first EOS, 0 after; truncated rows all 1."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    T = completion_ids.shape[1]
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], T, dtype=torch.long))
    arange = torch.arange(T, device=completion_ids.device)
    return (arange[None, :] <= first[:, None]).long(), ~is_eos.any(1)


@torch.no_grad()
def generate(model, tok, prompt_ids, prompt_mask, group_size, max_new_tokens, temperature=1.0,
             top_p=1.0, greedy=False, fast=False, logprobs=False):
    """`group_size` completions per prompt from Hugging Face generate (the readable path), or with fast=True
    decoder.fast_decode (the same sampling from a static-KV-cache loop); in eval mode. logprobs: also record
    log μ, the sampling distribution's log-probs of the drawn tokens (Rollout.sampler_logp)."""
    limit = getattr(model.config, "max_position_embeddings", None) or float("inf")
    if prompt_ids.shape[1] + max_new_tokens > limit:  # the longest prompt (the padded width) plus every new token
        raise UserError(f"the longest prompt is {prompt_ids.shape[1]} tokens: with --max_new_tokens={max_new_tokens} "
                        f"it passes the model's context of {limit} tokens; lower --max_new_tokens")
    bf16 = distributed.cuda_numerics(prompt_ids.device)  # the decoder's weight copies: bf16 as autocast computes
    model = fsdp.decode_copy(model, bf16)  # --fsdp: the whole network, gathered once per step
    was_training, eos = model.training, eos_token_ids(model, tok)
    model.eval()
    ids = prompt_ids.repeat_interleave(group_size, 0)
    mask = prompt_mask.repeat_interleave(group_size, 0)
    try:
        if fast:
            out, mu = decoder.fast_decode(model, prompt_ids, prompt_mask, max_new_tokens, eos, tok.pad_token_id,
                                          temperature, top_p, greedy, group_size, return_logprobs=logprobs,
                                          dtype=torch.bfloat16 if bf16 else None)
        else:
            with distributed.autocast(ids.device):
                out, mu = decoder.hf_generate(model, ids, mask, max_new_tokens, eos, tok.pad_token_id, temperature,
                                              top_p, greedy, return_logprobs=logprobs)
    except (RuntimeError, FloatingPointError) as e:  # multinomial's, or the fast decoder's own check
        if not isinstance(e, FloatingPointError) and "probability tensor contains" not in str(e):
            raise
        raise UserError(f"the policy's next-token probabilities are not finite after step {distributed.last_step()}:"
                        " its weights diverged (lower --lr, or --max_grad_norm); resume from an earlier checkpoint"
                        ) from None
    model.train(was_training)
    return make_rollout(tok, ids, mask, out, eos, mu)


def make_rollout(tok, prompt_ids, prompt_mask, completion_ids, eos, sampler_logp=None):
    """Package generated ids (and their sampler log-probs) into a Rollout (mask to first EOS, lengths, texts)."""
    cmask, truncated = completion_mask(completion_ids, eos)
    completion_ids = torch.where(cmask.bool(), completion_ids, tok.pad_token_id)
    texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
    mu = None if sampler_logp is None else torch.where(cmask.bool(), sampler_logp.float(), 0.0)  # pads may be -inf
    return Rollout(prompt_ids, prompt_mask, completion_ids, cmask, cmask.sum(1), truncated, texts, tok.pad_token_id,
                   sampler_logp=mu)


# -----------------------------------------------------------------------------
# rewards and what a reader checks first


def rewards(completions, answers, reward_fns):
    """Sum of weight * fn(completion, answer) over [(weight, fn)], per completion: (N,) float32."""
    return torch.tensor([sum(w * fn(c, a) for w, fn in reward_fns) for c, a in zip(completions, answers)],
                        dtype=torch.float32)


def metrics(sums, r, rewards, group_size):
    """Accumulate what a reader checks first about a rollout: reward, accuracy, length, truncation, dead groups."""
    correct = torch.tensor([gsm8k.correctness_reward(t, a) for t, a in zip(r.texts, r.answers)])
    zero_std = rewards.view(-1, group_size).std(1) < 1e-6  # all-equal groups: Â = 0, no gradient
    n = len(r.texts)
    for key, s, c in [("reward", rewards.sum(), n), ("accuracy", correct.sum(), n),
                      ("response_length", r.lengths.float().sum(), n), ("truncated", r.truncated.sum(), n),
                      ("zero_std_groups", zero_std.sum(), len(zero_std))]:
        logs.accumulate(sums, key, s, c)


# -----------------------------------------------------------------------------
# rollout correction: the sampler μ (decoder) is not exactly π_old (the trainer's forward): docs/rollout_correction.md


def correction_weights(log_ratio, mask, mode, rc_min, rc_max):
    """Detached (B, T) weights from log ρ_t = log π_old - log μ (B, T). token_tis: min(ρ_t, C); seq_tis: min(Π_t ρ_t,
    C) on every token; token_mask: ρ_t if C_min <= ρ_t <= C_max else 0 (IcePop); seq_mask: the same test on Π_t ρ_t;
    seq_geo_mask: the same test on the geometric mean g = exp(mean_t log ρ_t), g on every token (AReaL's)."""
    log_ratio = log_ratio.detach() * mask
    if mode == "seq_geo_mask":  # length-normalised: a long completion is not dropped for being long
        log_ratio = (log_ratio.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp_min(1)).expand_as(log_ratio)
    elif mode.startswith("seq"):
        log_ratio = log_ratio.sum(1, keepdim=True).expand_as(log_ratio)  # Π_t ρ_t: no length normalisation
    rho = torch.exp(log_ratio)
    if mode.endswith("tis"):
        return rho.clamp(max=rc_max)
    return torch.where((rho >= rc_min) & (rho <= rc_max), rho, torch.zeros_like(rho))  # inf -> 0, never NaN


def correction(r, old_logp, cfg, sums):
    """Log how far the sampler μ is from π_old on this rollout (mean |log μ - log π_old| per token, and KL(μ || π_old)
    per sequence: k3 summed over its tokens); return --rollout_correction's weights (B, T), or None when it is none."""
    mask = r.completion_mask.float()
    log_ratio = (old_logp - r.sampler_logp) * mask                        # log ρ = log π_old - log μ
    logs.accumulate(sums, "mismatch", log_ratio.abs().sum(), mask.sum())
    x = log_ratio.double()  # k3 = ρ - 1 - log ρ >= 0, as expm1 in fp64: no cancellation at ρ ≈ 1
    logs.accumulate(sums, "mismatch_kl", ((torch.expm1(x) - x) * mask).sum(), len(mask))
    if cfg.rollout_correction == "none":
        return None
    w = correction_weights(log_ratio, mask, cfg.rollout_correction, cfg.rc_min, cfg.rc_max)
    logs.accumulate(sums, "rc_weight", (w * mask).sum(), mask.sum())
    logs.accumulate(sums, "rc_masked", ((w == 0).float() * mask).sum(), mask.sum())
    return w


def reweight(logp, w, rows):
    """log π_θ of the micro-batch `rows` with its value unchanged and each token's gradient times w[rows] (w None:
    logp itself). Every loss term built on it then weighs token t by w_t, as a detached weight multiplied into a
    per-token loss would; the loss value logged stays the uncorrected one."""
    return logp if w is None else logp.detach() + w[rows] * (logp - logp.detach())

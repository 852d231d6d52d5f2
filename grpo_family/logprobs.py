"""
logprobs.py: per-token log-probs and entropies of completion tokens, memory-lean.

    Policy          the causal LM plus a forward that returns (B, T) log-probs of the completion tokens: the module
                    DDP wraps, so the loss goes through the wrapped forward
    token_logprobs  log p(target) and entropy of one chunk of hidden states, fp32 softmax over the vocabulary
    batched         a rollout's log-probs and entropies under a model, without grad, in micro-batches: π_old, π_ref
    entropy_bonus   --entropy_coef: the loss minus c times the completions' mean token entropy (with its gradient)
"""
import torch
import torch.nn as nn

from grpo_family import distributed, fsdp


def token_logprobs(lm_head, h, targets, temperature, entropy_grad=False):
    """log p(target) and entropy from hidden states h (B, t, D), fp32 softmax over the vocab; the entropy is detached
    unless entropy_grad (--entropy_coef > 0: its gradient then costs one more (B, t, V) block per chunk)."""
    logits = lm_head(h).float() / temperature                     # (B, t, V), one chunk only
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz
    if entropy_grad:  # H = log Z - Σ_v p_v z_v, of the temperature-scaled logits (verl, TRL, SkyRL, slime)
        return logp, logz - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    with torch.no_grad():
        p = torch.softmax(logits.detach(), dim=-1)
        entropy = logz.detach() - (p * logits.detach()).sum(-1)
    return logp, entropy


class Policy(nn.Module):
    """The causal LM plus a forward that returns per-token log-probs of completion tokens (the module DDP wraps,
    so the loss goes through the DDP forward)."""

    def __init__(self, lm, chunk_size=128, gradient_checkpointing=False, entropy_grad=False):
        super().__init__()
        self.lm, self.chunk_size, self.entropy_grad = lm, chunk_size, entropy_grad
        if gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            lm.config.use_cache = False

    def forward(self, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=1.0):
        """(B, T) log-probs and entropies of completion_ids under softmax(logits / temperature)."""
        fsdp.release(self.lm)  # --fsdp: the decode copy goes before an update can change the weights
        input_ids = torch.cat([prompt_ids, completion_ids], 1)                 # (B, P+T)
        attn = torch.cat([prompt_mask, completion_mask], 1)
        position_ids = (attn.cumsum(1) - 1).clamp_min(0)                       # left padding
        h = self.lm.base_model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        T = completion_ids.shape[1]
        h = h[:, -T - 1:-1]           # (B, T, D): the states that predict each completion token
        lm_head = self.lm.get_output_embeddings()
        logps, ents = [], []
        # Chunk over completion tokens only and recompute each chunk in backward, so at most one
        # (B, chunk, V) block of fp32 logits exists at a time, in the forward and the backward.
        for s in range(0, T, self.chunk_size):
            hc, tc = h[:, s:s + self.chunk_size], completion_ids[:, s:s + self.chunk_size]
            if torch.is_grad_enabled():
                lp, ent = torch.utils.checkpoint.checkpoint(token_logprobs, lm_head, hc, tc, temperature,
                                                            self.entropy_grad, use_reentrant=False)
            else:
                lp, ent = token_logprobs(lm_head, hc, tc, temperature)
            logps.append(lp)
            ents.append(ent)
        return torch.cat(logps, 1), torch.cat(ents, 1)


@torch.no_grad()
def batched(policy, r, micro_batch_size, temperature):
    """(B, T) log-probs and entropies of a rollout under `policy`, without grad, in micro-batches, in eval mode."""
    was_training = policy.training
    policy.eval()
    logps, ents = [], []
    for s in range(0, r.completion_ids.shape[0], micro_batch_size):
        sl = slice(s, s + micro_batch_size)
        with distributed.autocast(r.prompt_ids.device, policy):
            lp, ent = policy(r.prompt_ids[sl], r.prompt_mask[sl], r.completion_ids[sl], r.completion_mask[sl],
                             temperature)
        logps.append(lp.float())
        ents.append(ent.float())
    policy.train(was_training)
    return torch.cat(logps), torch.cat(ents)


def entropy_bonus(loss, entropy, mask, cfg, num_tokens=None):
    """--entropy_coef: loss - c·H̄, the completions' mean token entropy H̄ with its gradient (ALGORITHMS.md §12.3 (b)),
    taken where the loss goes into backward, so the loss logged stays the policy's. H̄ is over this micro-batch's
    tokens for a loss that is a micro-batch mean (the trainer then weighs micro-batches as it weighs its loss), or
    Σ_t H_t / num_tokens for a loss that is a sum over tokens divided by the mini-batch's token count on every rank
    (DAPO's): a token mean either way, as verl, TRL, OpenRLHF and SkyRL take it. c = 0: the loss itself, untouched."""
    if cfg.entropy_coef == 0:
        return loss
    mask = mask.float()
    per = (entropy.float() * mask).sum() / (num_tokens if num_tokens is not None else mask.sum().clamp_min(1))
    return loss - cfg.entropy_coef * per

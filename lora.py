"""
lora.py: LoRA adapters (--lora_rank), so that one consumer GPU trains the 1.5B model.

    add(lm, rank, ckpt)     freeze the base; put rank-r adapters (peft) on every linear layer of the decoder
    disabled(lm)            a context in which the network is its base model: the reference, with no copy
    AdaptersOff             that reference as the module common.batched_logprobs calls
    linear_weight(module)   a linear layer's weight with its active adapters merged in (the fast rollout)
    save(lm, out), load     a merged Hugging Face model dir plus the adapter in out/adapter; the adapter back

Defaults, from "LoRA Without Regret" (Schulman et al., Thinking Machines, 2025) as TRL's guide to it
reproduces for GRPO: adapters on every linear layer of the decoder (attention-only LoRA underperforms at
any rank), alpha = 32 whatever the rank (the alpha / r scaling keeps the best learning rate about the same
across ranks), rank 1 to 32 for RL, and a learning rate about 10x full fine-tuning's (TRL: 1e-5 vs 1e-6).
peft is an optional dependency, imported only when --lora_rank > 0.
"""
import contextlib
import os

import torch

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALPHA = 32


def add(lm, rank, ckpt=""):
    """Freeze lm and inject rank-`rank` LoRA adapters (B = 0), trained in fp32 on any base dtype; with `ckpt`, the
    adapter saved there."""
    from peft import LoraConfig  # the caller checked that peft is installed
    lm.requires_grad_(False)
    lm.add_adapter(LoraConfig(r=rank, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS)))
    for p in lm.parameters():
        if p.requires_grad:  # the adapters: fp32 master weights even on a bf16 base
            p.data = p.data.float()
    if ckpt:
        load(lm, ckpt)
    return lm


def has_adapters(lm):
    """True if LoRA adapters sit in lm."""
    return any(hasattr(m, "base_layer") for m in lm.modules())


@contextlib.contextmanager
def disabled(lm):
    """Inside, lm computes as its base model; the adapters come back on exit."""
    lm.disable_adapters()
    try:
        yield lm
    finally:
        lm.enable_adapters()


class AdaptersOff(torch.nn.Module):
    """The reference policy of a LoRA run: the policy's own network with its adapters off."""

    def __init__(self, policy):
        super().__init__()
        self._policy = [policy]  # a list, not a submodule: the policy's train/eval mode stays its own

    def forward(self, *args):
        policy = self._policy[0]
        with disabled(policy.lm):
            return policy(*args)


def linear_weight(module):
    """(weight, bias) of a linear layer; for a LoRA layer W + Σ scaling · B·A over its active adapters."""
    if not hasattr(module, "base_layer"):
        return module.weight, module.bias
    w = module.base_layer.weight
    if not module.disable_adapters:
        w = w.float() + sum(module.get_delta_weight(a).float() for a in module.active_adapters)
    return w, module.base_layer.bias


def merged_state_dict(lm):
    """lm's state dict with every adapter merged into its base weight, named as the plain model names it."""
    sd = {k: v for k, v in lm.state_dict().items() if ".base_layer." not in k and "lora_" not in k}
    for name, module in lm.named_modules():
        if hasattr(module, "base_layer"):
            w, b = linear_weight(module)
            sd[f"{name}.weight"] = w.detach().to(module.base_layer.weight.dtype)
            if b is not None:
                sd[f"{name}.bias"] = b.detach()
    if lm.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # the same tensor as the embedding; from_pretrained ties it back
    return {k: v.contiguous() for k, v in sd.items()}


def save(lm, out):
    """out/: a Hugging Face model dir of the merged weights (from_pretrained, eval_gsm8k.py and sample.py load
    it as any model); out/adapter/: the adapter alone, in peft's format."""
    from safetensors.torch import save_file
    save_file(merged_state_dict(lm), os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    lm.config.save_pretrained(out)
    lm.generation_config.save_pretrained(out)
    lm.save_pretrained(os.path.join(out, "adapter"))  # with adapters in it, save_pretrained writes only them


def load(lm, ckpt):
    """Copy the adapter saved in ckpt/adapter into lm's adapters (added by `add` with the same rank)."""
    from safetensors.torch import load_file
    saved = load_file(os.path.join(ckpt, "adapter", "adapter_model.safetensors"))
    for name, p in lm.named_parameters():
        if "lora_" in name:  # peft's file names drop the adapter name and prefix base_model.model.
            p.data.copy_(saved["base_model.model." + name.replace(".default.", ".")])

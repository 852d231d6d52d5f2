"""
lora.py: LoRA adapters (--lora_rank), so that one consumer GPU trains the 1.5B model.

    add(lm, rank, ckpt)     freeze the base; put rank-r adapters (peft) on every linear layer of the decoder
    config, has_adapters    the adapter's settings as peft stores them; whether adapters sit in a model
    disabled(lm)            a context in which the network is its base model: the reference, with no copy
    AdaptersOff             that reference as the module logprobs.batched calls
    linear_weight(module)   a linear layer's weight with its active adapters merged in (the fast rollout)
    save(lm, out), load     a merged Hugging Face model dir plus the adapter in out/adapter; the adapter back
    merged_state_dict       the weights with every adapter merged in, named as the plain model names them

Defaults, from "LoRA Without Regret" (Schulman et al., Thinking Machines, 2025) as TRL's guide to it
reproduces for GRPO: adapters on every linear layer of the decoder (attention-only LoRA underperforms at
any rank), alpha = 32 whatever the rank (the alpha / r scaling keeps the best learning rate about the same
across ranks), rank 1 to 32 for RL, and a learning rate about 10x full fine-tuning's (TRL: 1e-5 vs 1e-6).
peft is an optional dependency, imported only when --lora_rank > 0. This file calls peft's own functions
(inject_adapter_in_model, the tuner layers' enable_adapters, get/set_peft_model_state_dict), not transformers'
add_adapter, which refuses to run whenever a transformers release raises its minimum peft (5.25 asks for a peft
newer than PyPI's): the model stays a plain Qwen2ForCausalLM with peft's LoRA layers in place of its linears.
"""
import contextlib
import os

import torch

PREFIX = "base_model.model."  # peft's adapter files name weights as a PeftModel wrapping the model does
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALPHA = 32


def add(lm, rank, ckpt=""):
    """Freeze lm and inject rank-`rank` LoRA adapters (B = 0), trained in fp32 on any base dtype; with `ckpt`, the
    adapter saved there."""
    from peft import inject_adapter_in_model  # the caller checked that peft is installed
    lm.requires_grad_(False)
    inject_adapter_in_model(config(rank), lm)  # in place: lm keeps its class, names and forward
    for p in lm.parameters():
        if p.requires_grad:  # the adapters: fp32 master weights even on a bf16 base
            p.data = p.data.float()
    if ckpt:
        load(lm, ckpt)
    return lm


def config(rank):
    """The adapter's settings, as peft stores them in adapter/adapter_config.json."""
    from peft import LoraConfig
    return LoraConfig(r=rank, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS), task_type="CAUSAL_LM")


def _layers(lm):
    return [m for m in lm.modules() if hasattr(m, "base_layer")]


def has_adapters(lm):
    """True if LoRA adapters sit in lm."""
    return bool(_layers(lm))


@contextlib.contextmanager
def disabled(lm):
    """Inside, lm computes as its base model; the adapters come back on exit."""
    for m in _layers(lm):
        m.enable_adapters(False)
    try:
        yield lm
    finally:
        for m in _layers(lm):
            m.enable_adapters(True)


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
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    save_file(merged_state_dict(lm), os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    lm.config.save_pretrained(out)
    lm.generation_config.save_pretrained(out)
    rank = _layers(lm)[0].r["default"]
    adapter = os.path.join(out, "adapter")  # peft's layout: PeftModel.from_pretrained(base, adapter) loads it
    cfg = config(rank)
    cfg.base_model_name_or_path = lm.config.name_or_path
    cfg.save_pretrained(adapter)
    sd = {PREFIX + k: v.detach().contiguous() for k, v in get_peft_model_state_dict(lm).items()}
    save_file(sd, os.path.join(adapter, "adapter_model.safetensors"), metadata={"format": "pt"})


def load(lm, ckpt):
    """Copy the adapter saved in ckpt/adapter into lm's adapters (added by `add` with the same rank)."""
    from safetensors.torch import load_file
    saved = load_file(os.path.join(ckpt, "adapter", "adapter_model.safetensors"))
    for name, p in lm.named_parameters():
        if "lora_" in name:  # peft's file names drop the adapter name and add PREFIX
            p.data.copy_(saved[PREFIX + name.replace(".default.", ".")])

"""
fsdp.py: --fsdp, the model sharded over torchrun's processes with PyTorch's own FSDP2 (fully_shard, DTensor):
each rank holds 1/N of the fp32 weights, their gradients and AdamW's state, where DDP holds all of them on every
rank. distributed.py, loading.py, rollout.py and checkpoint.py call these; a trainer's loop is the same with or
without --fsdp (docs/fsdp.md).

    shard(module, bf16)         fully_shard every decoder layer, then the whole: fp32 master, bf16 compute on CUDA
    decode_copy(lm, bf16), release   the whole network, gathered once per step, for generate() and the decoder
    state_dict(module, d)       every weight whole on rank 0: the checkpoint is a plain Hugging Face model dir
    optimizer_state, load_optimizer_state, load_state   AdamW's state (and PPO's critic) whole in the checkpoint
    all_finite, full            the checks a save and check_replicas make, on the shards
    refusal, is_sharded         the one line refusing --fsdp where it cannot work; whether a module is sharded

A sharded forward all-gathers each layer's weights from every rank, so every rank must run the same number of
forwards (the trainers split their batches equally; dpo.py, whose ranks forward unequal numbers of pairs, and
LoRA, whose trainable state is already small, refuse --fsdp with one line: config.parse).
"""
import warnings
import weakref

import torch
import torch.nn as nn

_copies = weakref.WeakKeyDictionary()  # lm -> its gathered decode copy, until the next forward of the policy


def refusal(cfg, torchrun, trainer):
    """The one line refusing --fsdp where it cannot work, else None (config.parse raises it). One process
    under torchrun is allowed: nothing is sharded then, but the path is the same (the GPU check runs it)."""
    why = ("launch with torchrun --nproc_per_node=N" if not torchrun else
           "drop --lora_rank (LoRA trains a small state already, over a frozen bf16 base)" if cfg.lora_rank else
           "dpo.py's ranks forward unequal numbers of pairs, which a sharded forward cannot: drop --fsdp (DDP)"
           if trainer == "dpo" else None)
    return why and f"--fsdp shards full fine-tuning over torchrun's processes: {why}"


def is_sharded(module):
    """True if fully_shard placed any of module's parameters (they are DTensors)."""
    from torch.distributed.tensor import DTensor
    return module is not None and any(isinstance(p, DTensor) for p in module.parameters())


def full(t):
    """A DTensor's whole value (a collective: every rank calls it), any other tensor as it is."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard(module, bf16=False):
    """Shard `module` in place over all ranks: one FSDP unit per decoder layer (its weights are gathered just before
    it runs and freed after, in the forward and again in the backward), then the rest (embeddings, final norm, LM
    head, PPO's value head) as the root unit. With bf16 (distributed.cuda_numerics) the mixed-precision policy keeps
    the fp32 master shards and computes in bf16 (the gathered copies are bf16, gradients are reduced in fp32), in
    place of autocast."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    layers = [layer for m in module.modules() if isinstance(getattr(m, "layers", None), nn.ModuleList)
              for layer in m.layers]
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    # PPO's critic returns head(h).squeeze(-1), a view: FSDP2 warns that an in-place op on it would skip the
    # pre-backward all-gather. ppo.py uses it out of place only (value_loss), so the warning is not shown.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPCritic\) returned a view tensor")
    fully_shard(module, mp_policy=mp)
    return module


def decode_copy(lm, bf16=False):
    """lm itself if it is not sharded; else a plain copy of the whole network for decoding (bf16 under
    distributed.cuda_numerics, as the fast decoder and autocast compute; the master dtype elsewhere, so that a CPU
    run samples exactly as unsharded).
    The first call after the policy's last forward gathers it (a collective: every rank calls it together, at the
    rollout or the evaluation); later calls reuse it, as the weights cannot have changed; release() frees it."""
    if not is_sharded(lm):
        return lm
    if lm not in _copies:
        _copies[lm] = _gather(lm, bf16)
    return _copies[lm]


def release(lm):
    """Free lm's decode copy (the policy's forward calls this: an optimizer step may follow)."""
    _copies.pop(lm, None)


def _gather(lm, bf16):
    """A plain module of lm's class built on the meta device, then given lm's gathered weights and its buffers."""
    with torch.device("meta"):
        plain = type(lm)(lm.config)
    plain.generation_config = lm.generation_config
    done = {}
    for name, p in lm.named_parameters(remove_duplicate=False):  # tied weights: one tensor, two names
        if id(p) not in done:
            w = full(p).detach()
            done[id(p)] = nn.Parameter(w.to(torch.bfloat16) if bf16 and w.is_floating_point() else w.clone(),
                                       requires_grad=False)
        owner, _, attr = name.rpartition(".")
        plain.get_submodule(owner)._parameters[attr] = done[id(p)]
    for name, b in lm.named_buffers(remove_duplicate=False):  # rotary tables: never sharded, kept in their dtype
        owner, _, attr = name.rpartition(".")
        plain.get_submodule(owner)._buffers[attr] = b
    left = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"fsdp: the decode copy has no value for {left[:3]}: this model's layout is not supported")
    return plain.eval()


def all_finite(module, d):
    """True on every rank if every weight of module is finite (each rank checks its shards, then all agree)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    ok = all(bool(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all()) for p in module.parameters())
    flag = torch.tensor([float(ok)], device=d.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def state_dict(module, d):
    """module's state dict with every tensor whole, on the CPU, on rank 0 (None elsewhere); every rank calls it.
    A tied LM head is left out, as save_pretrained leaves it (from_pretrained ties it back)."""
    out = {}
    for name, t in module.state_dict().items():
        t = full(t).detach()
        if d.master_process:
            out[name] = t.cpu().contiguous()
    if getattr(getattr(module, "config", None), "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)
    return out if d.master_process else None


def optimizer_state(optimizer, d):
    """optimizer.state_dict() with every sharded state tensor whole, on the CPU: the format of an unsharded run's
    (so the checkpoint holds plain tensors only), on rank 0 (None elsewhere); every rank calls it, in one order."""
    sd = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: copied, never changed
    sd["state"] = {i: {k: full(v).detach().cpu() if torch.is_tensor(v) else v for k, v in s.items()}
                   for i, s in sd["state"].items()}
    return sd if d.master_process else None


def load_optimizer_state(optimizer, sd):
    """Load a whole optimizer state (optimizer_state's) into an optimizer over sharded parameters: each rank keeps
    the shard of every state tensor that matches its shard of the parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    optimizer.load_state_dict(sd)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            s = optimizer.state.get(p, {})
            for k, v in s.items():
                if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.shape:
                    s[k] = distribute_tensor(v.to(p.device_mesh.device_type), p.device_mesh, p.placements)


def load_state(module, sd):
    """Copy a whole state dict (state_dict's, e.g. PPO's critic) into module, sharded or not."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if not is_sharded(module):
        return module.load_state_dict(sd)
    own = module.state_dict()
    if set(own) != set(sd):
        raise KeyError(f"state dict keys differ: {sorted(set(own) ^ set(sd))[:3]}")
    with torch.no_grad():
        for name, t in own.items():
            v = sd[name].to(t.device if not isinstance(t, DTensor) else t.device_mesh.device_type, t.dtype)
            if isinstance(t, DTensor):
                v = distribute_tensor(v, t.device_mesh, t.placements)
                t.to_local().copy_(v.to_local())
            else:
                t.copy_(v)

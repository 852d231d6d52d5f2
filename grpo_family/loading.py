"""
loading.py: what a run starts from, the models and the problems, in the dtype and on the device it trains on.

    model_path      "tiny" (built once), a hub name, a local model dir, or a run dir (its `latest` checkpoint)
    holds_model     whether a dir holds a model or checkpoint (never a place to write a tool's output)
    tokenizer       a hub name or local dir's tokenizer, left-padding, with a chat template
    model           a causal LM, fp32 by default (master weights), no pickles
    policy          the model to train, wrapped as logprobs.Policy; with --lora_rank a frozen base plus adapters
    reference       the frozen reference policy of the KL term (bf16 under cuda_numerics; LoRA: adapters off)
    problems        the train or held-out problems: "tiny", local jsonl, or the hub
    prompt_indices  the global prompt indices of a step: a fresh seeded permutation every epoch
"""
import importlib.util
import os

import torch

from grpo_family import checkpoint, distributed, fsdp, gsm8k, jsonfile, lora, tiny
from grpo_family.config import UserError, same_on_every_rank
from grpo_family.logprobs import Policy

# -----------------------------------------------------------------------------
# models and tokenizers


@same_on_every_rank
def model_path(name, d):
    """'tiny' (the embedded tiny model, built once), a hub name, a local model dir, or a run dir (its latest)."""
    if name == "tiny":
        return tiny.ensure_model(d, log=print if d.master_process else (lambda *a, **k: None))
    local = os.path.expanduser(name)
    if os.path.isdir(local):
        ckpt = checkpoint.resolve_latest(local)
        if ckpt == local and (checkpoint.run_files(local) or os.path.isfile(os.path.join(local, "metrics.jsonl"))):
            raise UserError(f"{name} is a run dir with no `latest` checkpoint yet: give one of its ckpt-* dirs, "
                            "or wait for the run's first save")
        if not os.path.isfile(os.path.join(ckpt, "config.json")):
            where = f" (its `latest` names {ckpt})" if ckpt != local else ""
            raise UserError(f"{name}{where} is not a model or checkpoint dir: it has no config.json")
        return ckpt
    if _looks_local(local):
        raise UserError(f"model or checkpoint directory {name} does not exist")
    return name  # a hub name, 'owner/name'


def holds_model(path):
    """True if the dir `path` holds a model, tokenizer or checkpoint: an output dir that would mix into it."""
    found = set(os.listdir(path)) if os.path.isdir(path) else set()
    return bool(found & {"config.json", "tokenizer.json", "tokenizer_config.json", "run_id", "latest"}) or \
        any(x.endswith((".safetensors", ".bin")) or x.startswith("ckpt-") for x in found)


def _looks_local(path):
    """True for a path that cannot be a hub name: absolute, relative with ./, deeper than owner/name, or under a dir."""
    return path.startswith((os.sep, ".")) or path.count("/") > 1 or os.path.isdir(path.split(os.sep, 1)[0])


def _load_error(what, path, e):
    """The UserError for a model or tokenizer that would not load: the real cause, for a local dir or a hub name."""
    cause = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    if os.path.isdir(os.path.expanduser(path)):
        return UserError(f"cannot load the {what} in {path}: {cause}")
    if _looks_local(os.path.expanduser(path)):
        return UserError(f"model or checkpoint directory {path} does not exist")
    return UserError(f"cannot load the {what} {path!r} from the Hugging Face hub ({cause}); check the name and the "
                     "network, or pass --model=<a local model dir> (and --data_path=<a local GSM8K dir>), or run --tiny")


@same_on_every_rank
def tokenizer(path):
    """Tokenizer from a hub name or local dir, left-padding for batched generation."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    # A plain tokenizer.json tokenizer (our tiny one) is loaded as itself: AutoTokenizer would
    # follow config.json's model_type and rebuild it as Qwen2's byte-level BPE.
    cfg_file = os.path.join(os.path.expanduser(path), "tokenizer_config.json")
    try:
        declared = jsonfile.load(cfg_file) if os.path.isfile(cfg_file) else {}
    except (OSError, jsonfile.JSONError) as e:
        raise UserError(f"cannot read the tokenizer's settings: {e}; fix or replace {path}'s tokenizer files") from None
    declared = declared.get("tokenizer_class") if isinstance(declared, dict) else None
    loader = PreTrainedTokenizerFast if declared in ("PreTrainedTokenizerFast", "TokenizersBackend") else AutoTokenizer
    try:
        with gsm8k.quiet_hub():
            tok = loader.from_pretrained(os.path.expanduser(path))
    except (OSError, ValueError) as e:  # missing files, no network, a dir with no tokenizer in it
        raise _load_error("tokenizer", path, e) from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    template_file = os.path.join(os.path.expanduser(path), "chat_template.jinja")
    if tok.chat_template is None and os.path.isfile(template_file):  # transformers < 4.47 does not read this file
        tok.chat_template = open(template_file).read()
    if tok.chat_template is None:
        raise UserError(f"the tokenizer of {path} has no chat template: use an instruct/chat model")
    return tok


def _dtype_kwarg(dtype):
    """transformers renamed `torch_dtype` to `dtype` in 4.56; pass whichever this version takes."""
    import transformers
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


@same_on_every_rank
def model(path, device, dtype=torch.float32):
    """Causal LM from a hub name or local dir, in `dtype` (fp32 master weights: bf16 would round lr=1e-6
    updates away), on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # transformers >= 5 draws a bar per load on stderr, where errors go
    try:
        with gsm8k.quiet_hub():
            lm = AutoModelForCausalLM.from_pretrained(os.path.expanduser(path), use_safetensors=True,  # no pickles
                                                      **_dtype_kwarg(dtype))
    except Exception as e:  # missing or damaged weights (safetensors, pickle, json) each raise their own type
        raise _load_error("model", path, e) from None
    return lm.to(device).eval()


def _frozen_dtype(d):
    """The dtype of weights that are never updated (a reference, a LoRA base): bf16 under cuda_numerics."""
    return torch.bfloat16 if distributed.cuda_numerics(d.device) else torch.float32


@same_on_every_rank
def policy(path, ckpt, cfg, d):
    """The policy to train: the model at ckpt (or path) in fp32 master weights; with --lora_rank, the base at
    path frozen (bf16 on GPU) plus fp32 adapters (lora.py), restored from ckpt when resuming."""
    if not cfg.lora_rank:
        return Policy(model(ckpt or path, d.device), cfg.logprob_chunk, cfg.gradient_checkpointing, _entropy_grad(cfg))
    if importlib.util.find_spec("peft") is None:
        raise UserError("--lora_rank needs peft, an optional dependency: pip install peft")
    base = model(path, d.device, _frozen_dtype(d))
    return Policy(lora.add(base, cfg.lora_rank, ckpt), cfg.logprob_chunk, cfg.gradient_checkpointing,
                  _entropy_grad(cfg))


def _entropy_grad(cfg):
    """True where the loss takes the entropy's gradient (--entropy_coef > 0; DPO has no such flag)."""
    return getattr(cfg, "entropy_coef", 0) > 0


def reference(policy, path, cfg, d):
    """The frozen reference policy for the KL term: the base model, bf16 on GPU (it is never updated), fp32 on
    CPU; with LoRA, the policy's own network with its adapters off (no second copy)."""
    if cfg.lora_rank:
        return lora.AdaptersOff(policy)
    ref = Policy(model(path, d.device, _frozen_dtype(d)), cfg.logprob_chunk).eval().requires_grad_(False)
    if getattr(cfg, "fsdp", False):  # sharded as the policy: 2/N bytes per parameter
        return fsdp.shard(ref, distributed.cuda_numerics(d.device))
    return ref


# -----------------------------------------------------------------------------
# the problems, and which of them a step takes


@same_on_every_rank
def problems(cfg, split):
    """The problems a run trains on ("train") or holds out ("test"): "tiny", local jsonl, or the hub."""
    if split == "test" and getattr(cfg, "test_path", ""):
        return gsm8k.load_gsm8k(split, cfg.test_path)
    if cfg.data_path == "tiny":
        return tiny.dataset(split)
    if split == "test" and cfg.data_path and os.path.isfile(os.path.expanduser(cfg.data_path)):
        raise UserError(f"--data_path={cfg.data_path} is a single file, so nothing is held out for evaluation: "
                        "give --test_path=<test jsonl>, or a --data_path dir with train.jsonl and test.jsonl")
    return gsm8k.load_gsm8k(split, cfg.data_path)


def prompt_indices(n, step, batch, seed):
    """Global indices of the `batch` prompts for `step`: a fresh seeded permutation every epoch. The generator's
    seed wraps at 2**64 (torch's range), so every seed up to 1e18 works and seeds below ~9e13 keep their order."""
    out, pos = [], step * batch
    while len(out) < batch:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed((seed * 100003 + epoch) % 2**64))
        take = perm[offset:offset + batch - len(out)].tolist()
        out += take
        pos += len(take)
    return out

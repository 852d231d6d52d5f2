"""
common.py: the plumbing a trainer's loop calls, in the order it calls it, and nothing a reader
needs to diff. The algorithms live in the trainer files.

    config          parse_config: a typed dataclass per trainer, --key=value flags, --tiny, --help
    distributed     setup_distributed, wrap (DDP or --fsdp), micro_batch, all_reduce_sum, check_replicas
    loading         model_path, load_tokenizer, load_model, load_policy, reference_model, autocast
    data            load_problems, prompt_indices, tokenize_prompts
    rollout         Rollout (select, cat), rollout, generate, compute_rewards, rollout_metrics
    log-probs       Policy (the module DDP wraps), batched_logprobs
    metrics         accumulate, reduce_metrics, progress, Logger (metrics.jsonl, optional wandb)
    checkpoints     in checkpoint.py (start_run, save_checkpoint, resolve_latest, load_trainer_state)

Neighbouring rooms: gsm8k.py (the task and its rewards), tiny.py (the embedded tiny default),
decoder.py (the fast static-KV-cache rollout), lora.py (LoRA adapters), evaluation.py (held-out accuracy),
checkpoint.py (checkpoints and run dirs), fsdp.py (--fsdp: sharding with FSDP2).
"""
import dataclasses
import datetime
import importlib.util
import inspect
import json
import math
import os
import random
import re
import sys
import traceback
from contextlib import ExitStack, nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import decoder
import fsdp
import gsm8k
import lora
import tiny

_HERE = os.path.dirname(os.path.abspath(__file__))
GPU_PATH = False  # memory.py sets it: its fake CPU tensors take CUDA's path (bf16 copies, autocast), as on a GPU
# -----------------------------------------------------------------------------
# config: a typed dataclass at the top of each trainer, overridden by --key=value


class UserError(ValueError):
    """A mistake the user can fix (a flag, a path, a file): reported in one line, exit status 2."""


def run(main):
    """Run a script's main(): a UserError prints `script: error: message` on stderr and exits 2, no traceback; a
    collective that timed out or lost a peer prints one line naming this rank, the last step done and where (exit 1)."""
    try:
        main()
    except (UserError, gsm8k.DataError) as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr, flush=True)
        _exit(2)
    except RuntimeError as e:
        if not (dist.is_initialized() and re.search(r"Timed out waiting|Connection (closed|reset) by peer", str(e))):
            raise
        print(f"{os.path.basename(sys.argv[0])}: error: {_collective_failure(e)}", file=sys.stderr, flush=True)
        _exit(1)
    if _progress["joined"]:
        _exit(0)


def _exit(code):
    """Exit with `code`. A process that joined a process group leaves through os._exit once its output is flushed
    (and wandb finished): interpreter finalization would run while a gloo worker thread may still be dropping the
    last collective's work, whose tensors then need the GIL of a dying interpreter, and the process aborts after a
    correct run (SIGABRT: "terminate called without an active exception"). Every file we write is closed by then."""
    if not _progress["joined"]:
        sys.exit(code)
    if getattr(sys.modules.get("wandb"), "run", None) is not None:
        sys.modules["wandb"].finish(exit_code=code)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def _field_docs(cls):
    """Map each dataclass field to the comment on its line (`name: type = default  # doc`)."""
    found = (re.match(r"\s+(\w+)\s*:\s*[^=]+=.*?#\s*(.*)$", l) for l in inspect.getsource(cls).splitlines())
    return {m.group(1): m.group(2).strip() for m in found if m}


def _valid_values(doc):
    """The range a field's comment declares: 'in [1, inf)', 'in (0, 1]' -> a test; 'in {a, b}' -> the choices."""
    num = r"(-?(?:inf|\d+(?:\.\d+)?(?:e-?\d+)?))"
    m = re.search(r"\bin ([\[(])\s*" + num + r"\s*,\s*" + num + r"\s*([\])])", doc)
    if m:
        lo, hi, closed_lo, closed_hi = float(m.group(2)), float(m.group(3)), m.group(1) == "[", m.group(4) == "]"
        return m.group(0)[3:], lambda v: (lo <= v if closed_lo else lo < v) and (v <= hi if closed_hi else v < hi)
    m = re.search(r"\bin \{([^}]*)\}", doc)
    if m:
        choices = [c.strip() for c in m.group(1).split(",")]
        return "{" + ", ".join(choices) + "}", lambda v: v in choices
    return None, None


def _parse_value(name, typ, text):
    """Convert the command-line text for field `name` to its declared type, or raise UserError."""
    if typ is bool:
        if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise UserError(f"--{name} expects a boolean (true/false), got {text!r}")
        return text.lower() in ("1", "true", "yes", "on")
    try:
        return typ(text)  # int, float or str
    except ValueError:
        raise UserError(f"--{name} expects {'an integer' if typ is int else 'a number'}, got {text!r}") from None


def config_help(cls, tiny=None):
    """The --help text: every field with its type, default, --tiny value and comment."""
    docs = _field_docs(cls)
    lines = [f"usage: python {os.path.basename(sys.argv[0])} [--key=value ...]", "", "options:"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        extra = f" (--tiny: {tiny[f.name]!r})" if tiny and f.name in tiny else ""
        lines.append(f"  --{f.name}={default!r}  [{f.type.__name__}]{extra}  {docs.get(f.name, '')}")
    return "\n".join(lines)


def parse_config(cls, argv=None, tiny=None):
    """Build cls from defaults, then the `tiny` overrides if --tiny is given, then --key=value flags; every
    value is checked against the range its field's comment declares. Raises UserError."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print(config_help(cls, tiny))
        sys.exit(0)
    types = {f.name: (f.type if isinstance(f.type, type) else eval(f.type)) for f in dataclasses.fields(cls)}
    given = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: options look like --key=value (see --help)")
        key, eq, text = arg[2:].partition("=")
        if key not in types:
            raise UserError(f"unknown config key --{key}. Valid keys: {', '.join(sorted(types))}")
        if not eq:
            if types[key] is not bool:
                raise UserError(f"--{key} needs a value: --{key}=...")
            text = "true"
        given[key] = _parse_value(key, types[key], text)
    values = dict(tiny) if given.get("tiny", False) and tiny else {}
    values.update(given)  # explicit flags win over --tiny
    cfg = cls(**values)
    for name, doc in _field_docs(cls).items():
        shown, ok = _valid_values(doc)
        if ok is not None and not ok(getattr(cfg, name)):
            raise UserError(f"--{name}={getattr(cfg, name)!r} is out of range: it must be in {shown}")
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's processes: each takes an equal share of the batch
    if hasattr(cfg, "batch_prompts") and (cfg.batch_prompts % world or
                                          cfg.batch_prompts // world * cfg.group_size % cfg.num_minibatches):
        raise UserError(f"--batch_prompts={cfg.batch_prompts} must split over the {world} process(es), and each one's "
                        f"completions (x --group_size={cfg.group_size}) into --num_minibatches={cfg.num_minibatches}")
    if getattr(cfg, "fsdp", False) and (why := fsdp.refusal(cfg, "RANK" in os.environ, run_name(cls))):
        raise UserError(why)
    if getattr(cfg, "rollout_correction", "").endswith("mask") and not cfg.rc_min < cfg.rc_max:
        raise UserError(f"--rc_min={cfg.rc_min} must be below --rc_max={cfg.rc_max}: tokens with ρ in between are kept")
    if hasattr(cfg, "run_dir") and not cfg.run_dir:  # derived from the file name, as CleanRL's exp_name
        cfg.run_dir = os.path.join("runs", run_name(cls) + ("-tiny" if cfg.tiny else ""))
    return cfg


def run_name(cls):
    """The name of the file that defines `cls`: 'grpo' for grpo.Config, also when run as __main__."""
    return os.path.splitext(os.path.basename(inspect.getfile(cls)))[0]


# -----------------------------------------------------------------------------
# distributed setup: plain `python x.py` is one process, `torchrun` gives DDP


@dataclasses.dataclass
class Dist:
    """What a trainer needs to know about the process group."""
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    master_process: bool


_progress = {"step": 0, "timeout": 600.0, "joined": False}  # the last step done (Logger.log, a resume), the collective
# timeout, and whether this process joined a process group (common.run then leaves through os._exit)


def _collective_failure(e):
    """The one line for a collective that failed: this rank, the last step done, the line of ours that waited."""
    ours = [f for f in traceback.extract_tb(e.__traceback__) if os.path.dirname(os.path.abspath(f.filename)) == _HERE]
    at = f" at {os.path.basename(ours[-1].filename)}:{ours[-1].lineno}" if ours else ""
    what = (f"waited {_progress['timeout']:g} s for the other ranks in a collective{at}: one of them stalled or is "
            "far slower; see its output, or raise --dist_timeout" if "Timed out" in str(e) else
            f"lost the connection to another rank in a collective{at}: it died or was killed; see its output")
    return f"rank {dist.get_rank()}: after step {_progress['step']}, {what}"


def setup_distributed(cfg=None):
    """Init the process group when launched by torchrun (nccl on GPU, gloo on CPU); pick the device. A collective
    waits at most cfg.dist_timeout seconds (default 600: a few minutes beyond the longest expected wait, rank 0
    writing a 1.5B checkpoint with its AdamW state, about 18 GB, while the others wait); then gloo raises and
    common.run names the rank and the step, and nccl's watchdog stops the job."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        _progress["timeout"] = getattr(cfg, "dist_timeout", 600.0)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=_progress["timeout"]))
        _progress["joined"] = True
    else:
        rank, local_rank, world_size = 0, 0, 1
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return Dist(ddp, rank, local_rank, world_size, device, rank == 0)


def check_replicas(module, optimizer, d):
    """Raise unless every rank holds identical parameters and took the same number of optimizer steps."""
    if not d.ddp:
        return
    steps = max((int(s["step"]) for s in optimizer.state.values() if "step" in s), default=0)
    with torch.no_grad():
        probe = torch.tensor([float(steps)] + [fsdp.full(p).double().sum().item() for p in module.parameters()],
                             dtype=torch.float64, device=d.device)
    lo, hi = probe.clone(), probe.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError(f"DDP replicas diverged: optimizer steps {lo[0].item():.0f}..{hi[0].item():.0f}, "
                           f"{int((lo[1:] != hi[1:]).sum())} parameter tensors differ across ranks")


def wrap(module, cfg, d):
    """What the loop's forward goes through: `module` sharded in place (--fsdp), DDP around it (torchrun), or itself."""
    if getattr(cfg, "fsdp", False):
        return fsdp.shard(module, d)
    return DDP(module, device_ids=[d.local_rank] if d.device.type == "cuda" else None) if d.ddp else module


def micro_batch(model, d, last):
    """One micro-batch's forward and backward: under DDP only the mini-batch's last all-reduces gradients; under
    --fsdp each reduce-scatters its own (they stay sharded); autocast on CUDA unless FSDP computes in bf16."""
    stack = ExitStack()
    if isinstance(model, DDP) and not last:
        stack.enter_context(model.no_sync())
    stack.enter_context(autocast(d.device, model))
    return stack


def cleanup_distributed(d):
    """Tear down the process group if there is one, every rank at once (a peer that leaves early can abort gloo)."""
    if d.ddp:
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t, d):
    """Sum a tensor over ranks (a no-op on one process); returns the tensor."""
    if d.ddp:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj, d):
    """Every rank's picklable `obj`, in rank order (a one-item list on one process)."""
    parts = [obj] * d.world_size
    if d.ddp:
        dist.all_gather_object(parts, obj)
    return parts


def seed_everything(seed):
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# model and tokenizer loading


def _dtype_kwarg(dtype):
    """transformers renamed `torch_dtype` to `dtype` in 4.56; pass whichever this version takes."""
    import transformers
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _load_error(what, path, e):
    """The UserError for a model or tokenizer that would not load: the real cause, for a local dir or a hub name."""
    cause = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    if os.path.isdir(os.path.expanduser(path)):
        return UserError(f"cannot load the {what} in {path}: {cause}")
    if _looks_local(os.path.expanduser(path)):
        return UserError(f"model or checkpoint directory {path} does not exist")
    return UserError(f"cannot load the {what} {path!r} from the Hugging Face hub ({cause}); check the name and the "
                     "network, or pass a local model dir")


def load_tokenizer(path):
    """Tokenizer from a hub name or local dir, left-padding for batched generation."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    # A plain tokenizer.json tokenizer (our tiny one) is loaded as itself: AutoTokenizer would
    # follow config.json's model_type and rebuild it as Qwen2's byte-level BPE.
    cfg_file = os.path.join(os.path.expanduser(path), "tokenizer_config.json")
    declared = json.load(open(cfg_file)).get("tokenizer_class") if os.path.isfile(cfg_file) else None
    loader = PreTrainedTokenizerFast if declared in ("PreTrainedTokenizerFast", "TokenizersBackend") else AutoTokenizer
    try:
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


def model_path(name, d):
    """'tiny' (the embedded tiny model, built once), a hub name, a local model dir, or a run dir (its latest)."""
    if name == "tiny":
        return tiny.ensure_model(d, log=print if d.master_process else (lambda *a, **k: None))
    local = os.path.expanduser(name)
    if os.path.isdir(local):
        ckpt = resolve_latest(local)
        if ckpt == local and (_run_files(local) or os.path.isfile(os.path.join(local, "metrics.jsonl"))):
            raise UserError(f"{name} is a run dir with no `latest` checkpoint yet: give one of its ckpt-* dirs, "
                            "or wait for the run's first save")
        if not os.path.isfile(os.path.join(ckpt, "config.json")):
            where = f" (its `latest` names {ckpt})" if ckpt != local else ""
            raise UserError(f"{name}{where} is not a model or checkpoint dir: it has no config.json")
        return ckpt
    if _looks_local(local):
        raise UserError(f"model or checkpoint directory {name} does not exist")
    return name  # a hub name, 'owner/name'


def _looks_local(path):
    """True for a path that cannot be a hub name: absolute, relative with ./, deeper than owner/name, or under a dir."""
    return path.startswith((os.sep, ".")) or path.count("/") > 1 or os.path.isdir(path.split(os.sep, 1)[0])


def load_model(path, device, dtype=torch.float32):
    """Causal LM from a hub name or local dir, in `dtype` (fp32 master weights: bf16 would round lr=1e-6
    updates away), on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # transformers >= 5 draws a bar per load on stderr, where errors go
    try:
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(path), use_safetensors=True,  # no pickles
                                                     **_dtype_kwarg(dtype))
    except Exception as e:  # missing or damaged weights (safetensors, pickle, json) each raise their own type
        raise _load_error("model", path, e) from None
    return model.to(device).eval()


def load_policy(path, ckpt, cfg, d):
    """The policy to train: the model at ckpt (or path) in fp32 master weights; with --lora_rank, the base at
    path frozen (bf16 on GPU) plus fp32 adapters (lora.py), restored from ckpt when resuming."""
    if not cfg.lora_rank:
        return Policy(load_model(ckpt or path, d.device), cfg.logprob_chunk, cfg.gradient_checkpointing)
    if importlib.util.find_spec("peft") is None:
        raise UserError("--lora_rank needs peft, an optional dependency: pip install peft")
    base = load_model(path, d.device, torch.bfloat16 if (d.device.type == "cuda" or GPU_PATH) else torch.float32)
    return Policy(lora.add(base, cfg.lora_rank, ckpt), cfg.logprob_chunk, cfg.gradient_checkpointing)


def reference_model(policy, path, cfg, d):
    """The frozen reference policy for the KL term: the base model, bf16 on GPU (it is never updated), fp32 on
    CPU; with LoRA, the policy's own network with its adapters off (no second copy)."""
    if cfg.lora_rank:
        return lora.AdaptersOff(policy)
    dtype = torch.bfloat16 if (d.device.type == "cuda" or GPU_PATH) else torch.float32
    ref = Policy(load_model(path, d.device, dtype), cfg.logprob_chunk).eval().requires_grad_(False)
    return fsdp.shard(ref, d) if getattr(cfg, "fsdp", False) else ref  # --fsdp: sharded as the policy, 2/N bytes


def autocast(device, model=None):
    """bf16 autocast on CUDA (fp32 master weights stay fp32); none on CPU, nor for a model --fsdp sharded (bf16)."""
    if (device.type == "cuda" or GPU_PATH) and not fsdp.is_sharded(model):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def eos_token_ids(model, tok):
    """Every token id that ends a completion: the tokenizer's EOS plus the generation config's."""
    ids = {tok.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    if gen_eos is not None:
        ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return sorted(i for i in ids if i is not None)


# -----------------------------------------------------------------------------
# data: the problems, this step's prompts, tokenized


def load_problems(cfg, split):
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
    """Global indices of the `batch` prompts for `step`: a fresh seeded permutation every epoch."""
    out, pos = [], step * batch
    while len(out) < batch:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        take = perm[offset:offset + batch - len(out)].tolist()
        out += take
        pos += len(take)
    return out


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


def tokenize_prompts(tok, prompts, device):
    """Left-padded (B, P) input ids and attention mask for a list of prompt strings."""
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


# -----------------------------------------------------------------------------
# rollout: G sampled completions per prompt, and their rewards


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
        return Rollout(torch.cat([left(r.prompt_ids, pad) for r in rs]), torch.cat([left(r.prompt_mask, 0) for r in rs]),
                       torch.cat([right(r.completion_ids, pad) for r in rs]),
                       torch.cat([right(r.completion_mask, 0) for r in rs]),
                       torch.cat([r.lengths.to(device) for r in rs]), torch.cat([r.truncated.to(device) for r in rs]),
                       [t for r in rs for t in r.texts], pad, answers, mu)


def rollout(model, tok, problems, cfg, device):
    """G = cfg.group_size completions sampled from `model` for each problem's chat prompt, with the answers and
    the sampler's log-probs."""
    prompts = [gsm8k.build_prompt(tok, p["question"], cfg.system_prompt) for p in problems]
    ids, mask = tokenize_prompts(tok, prompts, device)
    r = generate(model, tok, ids, mask, cfg.group_size, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                 fast=cfg.fast_rollout, logprobs=True)
    r.answers = [p["answer"] for p in problems for _ in range(cfg.group_size)]
    return r


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
    model = fsdp.decode_copy(model)  # --fsdp: the whole network, gathered once per step
    was_training, eos = model.training, eos_token_ids(model, tok)
    model.eval()
    ids = prompt_ids.repeat_interleave(group_size, 0)
    mask = prompt_mask.repeat_interleave(group_size, 0)
    if fast:
        out, mu = decoder.fast_decode(model, prompt_ids, prompt_mask, max_new_tokens, eos, tok.pad_token_id,
                                      temperature, top_p, greedy, group_size, return_logprobs=logprobs,
                                      dtype=torch.bfloat16 if (ids.device.type == "cuda" or GPU_PATH) else None)
    else:
        with autocast(ids.device):
            out, mu = decoder.hf_generate(model, ids, mask, max_new_tokens, eos, tok.pad_token_id, temperature,
                                          top_p, greedy, return_logprobs=logprobs)
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


def compute_rewards(completions, answers, reward_fns):
    """Sum of weight * fn(completion, answer) over [(weight, fn)], per completion: (N,) float32."""
    return torch.tensor([sum(w * fn(c, a) for w, fn in reward_fns) for c, a in zip(completions, answers)],
                        dtype=torch.float32)


def rollout_metrics(sums, r, rewards, group_size):
    """Accumulate what a reader checks first about a rollout: reward, accuracy, length, truncation, dead groups."""
    correct = torch.tensor([gsm8k.correctness_reward(t, a) for t, a in zip(r.texts, r.answers)])
    zero_std = rewards.view(-1, group_size).std(1) < 1e-6  # all-equal groups: Â = 0, no gradient
    n = len(r.texts)
    for key, s, c in [("reward", rewards.sum(), n), ("accuracy", correct.sum(), n),
                      ("response_length", r.lengths.float().sum(), n), ("truncated", r.truncated.sum(), n),
                      ("zero_std_groups", zero_std.sum(), len(zero_std))]:
        accumulate(sums, key, s, c)


# -----------------------------------------------------------------------------
# rollout correction: the sampler μ (decoder) is not exactly π_old (the trainer's forward): docs/rollout_correction.md


def correction_weights(log_ratio, mask, mode, rc_min, rc_max):
    """Detached (B, T) weights from log ρ_t = log π_old - log μ (B, T). token_tis: min(ρ_t, C); seq_tis: min(Π_t ρ_t,
    C) on every token; token_mask: ρ_t if C_min <= ρ_t <= C_max else 0 (IcePop); seq_mask: the same test on Π_t ρ_t."""
    log_ratio = log_ratio.detach() * mask
    if mode.startswith("seq"):
        log_ratio = log_ratio.sum(1, keepdim=True).expand_as(log_ratio)  # Π_t ρ_t: no length normalisation
    rho = torch.exp(log_ratio)
    if mode.endswith("tis"):
        return rho.clamp(max=rc_max)
    return torch.where((rho >= rc_min) & (rho <= rc_max), rho, torch.zeros_like(rho))  # inf -> 0, never NaN


def rollout_correction(r, old_logp, cfg, sums):
    """Log how far the sampler μ is from π_old on this rollout (mean |log μ - log π_old| per token, and KL(μ || π_old)
    per sequence: k3 summed over its tokens); return --rollout_correction's weights (B, T), or None when it is none."""
    mask = r.completion_mask.float()
    log_ratio = (old_logp - r.sampler_logp) * mask                        # log ρ = log π_old - log μ
    accumulate(sums, "mismatch", log_ratio.abs().sum(), mask.sum())
    x = log_ratio.double()  # k3 = ρ - 1 - log ρ >= 0, as expm1 in fp64: no cancellation at ρ ≈ 1
    accumulate(sums, "mismatch_kl", ((torch.expm1(x) - x) * mask).sum(), len(mask))
    if cfg.rollout_correction == "none":
        return None
    w = correction_weights(log_ratio, mask, cfg.rollout_correction, cfg.rc_min, cfg.rc_max)
    accumulate(sums, "rc_weight", (w * mask).sum(), mask.sum())
    accumulate(sums, "rc_masked", ((w == 0).float() * mask).sum(), mask.sum())
    return w


def reweight(logp, w, rows):
    """log π_θ of the micro-batch `rows` with its value unchanged and each token's gradient times w[rows] (w None:
    logp itself). Every loss term built on it then weighs token t by w_t, as a detached weight multiplied into a
    per-token loss would; the loss value logged stays the uncorrected one."""
    return logp if w is None else logp.detach() + w[rows] * (logp - logp.detach())


# -----------------------------------------------------------------------------
# log-probs: per-token log-probs and entropies of completion tokens, memory-lean


def _token_logprobs(lm_head, h, targets, temperature):
    """log p(target) and entropy from hidden states h (B, t, D), fp32 softmax over the vocab."""
    logits = lm_head(h).float() / temperature                     # (B, t, V), one chunk only
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz
    with torch.no_grad():
        p = torch.softmax(logits.detach(), dim=-1)
        entropy = logz.detach() - (p * logits.detach()).sum(-1)
    return logp, entropy


class Policy(nn.Module):
    """The causal LM plus a forward that returns per-token log-probs of completion tokens (the module DDP wraps,
    so the loss goes through the DDP forward)."""

    def __init__(self, lm, chunk_size=128, gradient_checkpointing=False):
        super().__init__()
        self.lm, self.chunk_size = lm, chunk_size
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
                lp, ent = torch.utils.checkpoint.checkpoint(_token_logprobs, lm_head, hc, tc, temperature,
                                                            use_reentrant=False)
            else:
                lp, ent = _token_logprobs(lm_head, hc, tc, temperature)
            logps.append(lp)
            ents.append(ent)
        return torch.cat(logps, 1), torch.cat(ents, 1)


@torch.no_grad()
def batched_logprobs(policy, r, micro_batch_size, temperature):
    """(B, T) log-probs and entropies of a rollout under `policy`, without grad, in micro-batches, in eval mode."""
    was_training = policy.training
    policy.eval()
    logps, ents = [], []
    for s in range(0, r.completion_ids.shape[0], micro_batch_size):
        sl = slice(s, s + micro_batch_size)
        with autocast(r.prompt_ids.device, policy):
            lp, ent = policy(r.prompt_ids[sl], r.prompt_mask[sl], r.completion_ids[sl], r.completion_mask[sl],
                             temperature)
        logps.append(lp.float())
        ents.append(ent.float())
    policy.train(was_training)
    return torch.cat(logps), torch.cat(ents)


# -----------------------------------------------------------------------------
# metrics: sums over micro-batches and ranks, the progress bar, metrics.jsonl, optional wandb


def accumulate(sums, key, total, count):
    """Add (total, count) into sums[key], for metrics averaged later by reduce_metrics."""
    old = sums.get(key, (0.0, 0.0))
    sums[key] = (old[0] + float(fsdp.full(total)), old[1] + float(count))  # a gradient norm under --fsdp: a DTensor


class Metrics(dict):
    """{name: mean}, NaN where nothing was counted; .diverged: the losses and gradient norms that are not finite."""
    diverged = ()


def reduce_metrics(sums, d):
    """Average a dict of {name: (sum, count)} over all ranks; returns Metrics {name: mean}, the same on every rank."""
    names = sorted(sums)
    t = torch.tensor([[float(sums[k][0]), float(sums[k][1])] for k in names], dtype=torch.float64, device=d.device)
    t = all_reduce_sum(t, d).cpu()
    m = Metrics({k: (t[i, 0] / t[i, 1]).item() if t[i, 1] > 0 else float("nan") for i, k in enumerate(names)})
    m.diverged = [k for i, k in enumerate(names) if k.endswith(("loss", "grad_norm")) and t[i, 1] > 0
                  and not math.isfinite(m[k])]
    return m


def progress(metrics):
    """The progress bar's postfix: reward, sampled accuracy, length, and the clip fraction where there is one."""
    show = [("reward", "reward", "{:.3f}"), ("acc", "accuracy", "{:.3f}"), ("len", "response_length", "{:.0f}"),
            ("clip", "clip_frac", "{:.3f}")]
    return {label: fmt.format(metrics[key]) for label, key, fmt in show if key in metrics}


def versions(cfg=None):
    """python, torch, transformers and, when --lora_rank uses it, peft: what a problem report needs."""
    import transformers
    v = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}
    return {**v, "peft": __import__("peft").__version__} if getattr(cfg, "lora_rank", 0) else v


class Logger:
    """Writes one JSON line of metrics per step to run_dir/metrics.jsonl (and wandb if asked); prints the versions
    once and keeps them in config.json."""

    def __init__(self, run_dir, cfg, master, wandb_project=""):
        self.master, self.wandb, self.lr = master, None, cfg.lr
        if not master:
            return
        print("versions:", json.dumps(v := versions(cfg)), flush=True)
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if not getattr(cfg, "resume", ""):  # a fresh run starts a fresh log; a resumed one appends
            open(self.path, "w").close()
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump({**dataclasses.asdict(cfg), "versions": v}, f, indent=2)
        if wandb_project:
            if importlib.util.find_spec("wandb") is None:
                raise UserError("--wandb_project was given but wandb is not installed: pip install wandb")
            self.wandb = __import__("wandb").init(project=wandb_project, config=dataclasses.asdict(cfg))

    def log(self, step, metrics):
        """Append {'step': step, **metrics} to metrics.jsonl (master process only); NaN (nothing counted) as null.
        A loss or gradient norm that is not finite stops the run on every rank (they hold the same reduced metrics)
        before this step is logged or saved."""
        _progress["step"] = step
        for k in getattr(metrics, "diverged", ()):
            raise UserError(f"step {step}: {k} is {metrics[k]} (not finite): the update diverged, most often from too "
                            f"high a learning rate (--lr={self.lr}); this step was neither logged nor saved")
        if not self.master:
            return
        metrics = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)


# checkpoints and run dirs live in checkpoint.py; their names stay reachable here, as the trainers call them
from checkpoint import (RESUME_MAY_CHANGE, _load, _read_run_config, _run_files, find_checkpoint,  # noqa: E402
                        load_trainer_state, resolve_latest, save_checkpoint, start_run)

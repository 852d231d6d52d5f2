"""
common.py: the plumbing every trainer shares, and nothing a reader needs to diff.

Sections, in order: config, distributed setup, model and tokenizer loading, data (GSM8K and the
embedded tiny task), rewards, rollout, log-probs, evaluation, logging, checkpoints. Every
function is small and documented in one line. The algorithms live in the trainer files.
"""
import dataclasses
import datetime
import inspect
import json
import math
import os
import random
import re
import shutil
import sys
import time
from contextlib import nullcontext
from fractions import Fraction

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# config: a typed dataclass at the top of each trainer, overridden by --key=value


def _field_docs(cls):
    """Map each dataclass field to the comment on its line (`name: type = default  # doc`)."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        for line in inspect.getsource(klass).splitlines():
            m = re.match(r"\s+(\w+)\s*:\s*[^=]+=.*?#\s*(.*)$", line)
            if m:
                docs[m.group(1)] = m.group(2).strip()
    return docs


def _parse_value(name, typ, text):
    """Convert the command-line text for field `name` to its declared type, or raise ValueError."""
    if typ is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name} expects a boolean (true/false), got {text!r}")
    if typ is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"--{name} expects an integer, got {text!r}") from None
    if typ is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--{name} expects a number, got {text!r}") from None
    return text


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
    """Build cls from defaults, then the `tiny` overrides if --tiny is given, then --key=value flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print(config_help(cls, tiny))
        sys.exit(0)
    types = {f.name: (f.type if isinstance(f.type, type) else eval(f.type)) for f in dataclasses.fields(cls)}
    given = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: options look like --key=value (see --help)")
        key, eq, text = arg[2:].partition("=")
        if key not in types:
            raise ValueError(f"unknown config key --{key}. Valid keys: {', '.join(sorted(types))}")
        if not eq:
            if types[key] is not bool:
                raise ValueError(f"--{key} needs a value: --{key}=...")
            text = "true"
        given[key] = _parse_value(key, types[key], text)
    values = {}
    if given.get("tiny", False) and tiny:
        for key, value in tiny.items():
            if key not in types:
                raise ValueError(f"tiny override names unknown config key {key!r}")
            values[key] = value
    values.update(given)
    return cls(**values)


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


def setup_distributed():
    """Init the process group when launched by torchrun (nccl on GPU, gloo on CPU); pick the device."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
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
        probe = torch.tensor([float(steps)] + [p.double().sum().item() for p in module.parameters()],
                             dtype=torch.float64, device=d.device)
    lo, hi = probe.clone(), probe.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError(f"DDP replicas diverged: optimizer steps {lo[0].item():.0f}..{hi[0].item():.0f}, "
                           f"{int((lo[1:] != hi[1:]).sum())} parameter tensors differ across ranks")


def cleanup_distributed(d):
    """Tear down the process group if there is one."""
    if d.ddp:
        dist.destroy_process_group()


def all_reduce_sum(t, d):
    """Sum a tensor over ranks (a no-op on one process); returns the tensor."""
    if d.ddp:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


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


def _check_model_path(path):
    """Fail early with a clear message when a local path (/, ., ~) does not exist."""
    if path.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(path)):
        raise FileNotFoundError(f"model directory {path!r} does not exist")


def load_tokenizer(path):
    """Tokenizer from a hub name or local dir, left-padding for batched generation."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    _check_model_path(path)
    # A plain tokenizer.json tokenizer (our tiny one) is loaded as itself: AutoTokenizer would
    # follow config.json's model_type and rebuild it as Qwen2's byte-level BPE.
    cfg_file = os.path.join(os.path.expanduser(path), "tokenizer_config.json")
    declared = json.load(open(cfg_file)).get("tokenizer_class") if os.path.isfile(cfg_file) else None
    loader = PreTrainedTokenizerFast if declared in ("PreTrainedTokenizerFast", "TokenizersBackend") else AutoTokenizer
    try:
        tok = loader.from_pretrained(os.path.expanduser(path))
    except OSError as e:
        raise FileNotFoundError(f"cannot load tokenizer {path!r} (not a local dir, and not on the hub or no network): {e}") from e
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    template_file = os.path.join(os.path.expanduser(path), "chat_template.jinja")
    if tok.chat_template is None and os.path.isfile(template_file):  # transformers < 4.47 does not read this file
        tok.chat_template = open(template_file).read()
    if tok.chat_template is None:
        raise ValueError(f"tokenizer {path!r} has no chat template; use an instruct/chat model")
    return tok


def load_model(path, device, dtype=torch.float32):
    """Causal LM from a hub name or local dir, in `dtype`, on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM
    _check_model_path(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(path), **_dtype_kwarg(dtype))
    except OSError as e:
        raise FileNotFoundError(f"cannot load model {path!r} (not a local dir, and not on the hub or no network): {e}") from e
    return model.to(device).eval()


def autocast(device):
    """bf16 autocast on CUDA (fp32 master weights stay fp32); nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def eos_token_ids(model, tok):
    """Every token id that ends a completion: the tokenizer's EOS plus the generation config's."""
    ids = {tok.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    if gen_eos is not None:
        ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return sorted(i for i in ids if i is not None)


# -----------------------------------------------------------------------------
# data: GSM8K from the hub or local jsonl, and the embedded tiny task

SYSTEM_PROMPT = ("Solve the math problem step by step. "
                 "On the last line write the final answer as '#### <number>'.")
GSM8K_HUB = "openai/gsm8k"


def load_gsm8k(split, data_path=""):
    """GSM8K problems [{question, answer}] from local jsonl (`data_path` file or dir) or the hub."""
    from datasets import load_dataset  # imported here: only data loading needs `datasets`
    if data_path:
        path = os.path.expanduser(data_path)
        if os.path.isdir(path):
            path = os.path.join(path, f"{split}.jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GSM8K {split} file {path!r} does not exist")
        if not open(path).read().strip():
            raise ValueError(f"dataset {path!r} is empty")
        ds = load_dataset("json", data_files=path, split="train")
    else:
        ds = load_dataset(GSM8K_HUB, "main", split=split)
    return check_problems([dict(row) for row in ds], source=data_path or GSM8K_HUB)


def check_problems(rows, source):
    """Raise on an empty dataset or a row without a question and a '#### answer'."""
    if not rows:
        raise ValueError(f"dataset {source!r} is empty")
    for i, row in enumerate(rows):
        if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
            raise ValueError(f"dataset {source!r} row {i} needs string fields 'question' and 'answer', got {sorted(row)}")
        if extract_answer(row["answer"]) is None:
            raise ValueError(f"dataset {source!r} row {i}: answer has no '#### <number>' line: {row['answer'][-80:]!r}")
    return rows


def build_prompt(tok, question, system_prompt=SYSTEM_PROMPT):
    """The chat-templated prompt string for one question (system message omitted if empty)."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    messages.append({"role": "user", "content": question})
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def tokenize_prompts(tok, prompts, device):
    """Left-padded (B, P) input ids and attention mask for a list of prompt strings."""
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


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


# The embedded tiny task: two-step arithmetic word problems in GSM8K's answer format. The tiny
# model is warm-started on a *sloppy teacher* that, like a weak SFT model, often stops after the
# first step and reports the intermediate number, and sometimes forgets the '####' line. The
# warm start therefore knows how to solve the problems but usually does not, which leaves RL
# clear headroom, and RL has to find the fix from the reward alone.
TINY_NAMES = ["Ann", "Ben", "Sam", "Mia", "Tom", "Eva", "Leo", "Zoe"]
TINY_THINGS = ["apples", "pens", "cards", "coins", "books", "eggs"]


def tiny_problem(rng):
    """One random problem: (question, steps [(expr, value)], final answer)."""
    name, thing = rng.choice(TINY_NAMES), rng.choice(TINY_THINGS)
    kind = rng.randrange(3)
    if kind == 0:  # a + b - c
        a, b = rng.randint(2, 9), rng.randint(1, 9)
        c = rng.randint(1, min(9, a + b))
        q = f"{name} has {a} {thing}, gets {b} more, gives {c} away. How many now?"
        steps = [(f"{a}+{b}", a + b), (f"{a + b}-{c}", a + b - c)]
    elif kind == 1:  # a - b + c
        a = rng.randint(5, 15)
        b, c = rng.randint(1, 4), rng.randint(1, 9)
        q = f"{name} has {a} {thing}, loses {b}, finds {c}. How many now?"
        steps = [(f"{a}-{b}", a - b), (f"{a - b}+{c}", a - b + c)]
    else:  # a * b + c
        a, b, c = rng.randint(2, 5), rng.randint(2, 5), rng.randint(1, 9)
        q = f"{name} buys {a} bags of {b} {thing}, gets {c} more. How many now?"
        steps = [(f"{a}*{b}", a * b), (f"{a * b}+{c}", a * b + c)]
    return q, steps, steps[-1][1]


def tiny_solution(steps, stop_early=False, hash_line=True):
    """A GSM8K-style solution text; the sloppy teacher may stop early or drop the '####' line."""
    used = steps[:1] if stop_early else steps
    body = "\n".join(f"{e}={v}" for e, v in used)
    final = used[-1][1]
    return body + (f"\n#### {final}" if hash_line else f"\nThe answer is {final}.")


def tiny_dataset(split, n=None):
    """The tiny task's problems [{question, answer}]; train and test never share a question."""
    n = n or (4000 if split == "train" else 200)
    rng = random.Random(1234 if split == "train" else 5678)
    rows, seen = [], set()
    other = {r["question"] for r in tiny_dataset("test")} if split == "train" else set()
    while len(rows) < n:
        q, steps, _ = tiny_problem(rng)
        if q in seen or q in other:
            continue
        seen.add(q)
        rows.append({"question": q, "answer": tiny_solution(steps)})
    return rows


def load_problems(cfg, split):
    """The problems a run trains or evaluates on: the tiny task, local jsonl, or the hub."""
    if cfg.tiny:
        return tiny_dataset(split)
    return load_gsm8k(split, cfg.data_path)


# -----------------------------------------------------------------------------
# rewards: GSM8K answer extraction and numeric comparison, composable reward terms

_NUM = r"-?\$?\s*\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d[\d,]*)?|-?\$?\s*\.\d+"


def parse_number(text):
    """'$1,234.50', '-3', '3/4', '.5' -> exact Fraction, or None if `text` holds no number."""
    if text is None:
        return None
    m = re.search(_NUM, text)
    if m is None:
        return None
    s = m.group(0).replace("$", "").replace(",", "").replace(" ", "")
    try:
        if "/" in s:
            num, den = s.split("/")
            return None if Fraction(den) == 0 else Fraction(num) / Fraction(den)
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(text):
    """Strict: the number after the last '####', as a Fraction (None if absent)."""
    if "####" not in text:
        return None
    return parse_number(text.rsplit("####", 1)[1])


def extract_last_number(text):
    """Lenient: the last number anywhere in the text, as a Fraction (None if there is none)."""
    found = re.findall(_NUM, text)
    return parse_number(found[-1]) if found else None


def correctness_reward(completion, answer):
    """1.0 if the '####' answer of the completion equals the reference answer numerically."""
    pred, ref = extract_answer(completion), extract_answer(answer)
    return float(pred is not None and ref is not None and pred == ref)


def format_reward(completion, answer=None):
    """1.0 if the completion's last non-empty line is exactly '#### <number>'."""
    lines = [l.strip() for l in completion.strip().splitlines() if l.strip()]
    return float(bool(lines) and re.fullmatch(r"####\s*(" + _NUM + r")", lines[-1]) is not None)


def lenient_correct(completion, answer):
    """1.0 if the last number in the completion equals the reference answer (any format)."""
    pred, ref = extract_last_number(completion), extract_answer(answer)
    return float(pred is not None and ref is not None and pred == ref)


def compute_rewards(completions, answers, reward_fns):
    """Sum of weight * fn(completion, answer) over [(weight, fn)], per completion: (N,) float32."""
    return torch.tensor([sum(w * fn(c, a) for w, fn in reward_fns) for c, a in zip(completions, answers)],
                        dtype=torch.float32)


# -----------------------------------------------------------------------------
# rollout: G sampled completions per prompt


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


def completion_mask(completion_ids, eos_ids):
    """(B, T) mask that is 1 up to and including the first EOS, 0 after; truncated rows all 1."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    T = completion_ids.shape[1]
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], T, dtype=torch.long))
    arange = torch.arange(T, device=completion_ids.device)
    return (arange[None, :] <= first[:, None]).long(), ~is_eos.any(1)


@torch.no_grad()
def generate(model, tok, prompt_ids, prompt_mask, group_size, max_new_tokens, temperature=1.0,
             top_p=1.0, greedy=False, fast=False):
    """Sample `group_size` completions per prompt with Hugging Face generate (the readable path).

    fast=True takes fast_generate instead: the same sampling from a static-KV-cache decode loop.
    """
    if fast:
        return fast_generate(model, tok, prompt_ids, prompt_mask, group_size, max_new_tokens, temperature, top_p,
                             greedy)
    from transformers import GenerationConfig
    eos = eos_token_ids(model, tok)
    ids = prompt_ids.repeat_interleave(group_size, 0)
    mask = prompt_mask.repeat_interleave(group_size, 0)
    # A fresh GenerationConfig, so a model's own defaults (top_k, repetition_penalty) never leak
    # in: the sampling distribution must be exactly softmax(logits / temperature), top-p cut.
    gen_cfg = GenerationConfig(
        do_sample=not greedy, temperature=None if greedy else temperature, top_p=None if greedy else top_p,
        top_k=0 if not greedy else None, max_new_tokens=max_new_tokens, eos_token_id=eos,
        pad_token_id=tok.pad_token_id, repetition_penalty=1.0)
    with autocast(ids.device):
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
    return make_rollout(tok, ids, mask, out[:, ids.shape[1]:], eos)


def make_rollout(tok, prompt_ids, prompt_mask, completion_ids, eos):
    """Package generated ids into a Rollout (mask to first EOS, lengths, truncation, texts)."""
    cmask, truncated = completion_mask(completion_ids, eos)
    completion_ids = torch.where(cmask.bool(), completion_ids, tok.pad_token_id)
    texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(prompt_ids, prompt_mask, completion_ids, cmask, cmask.sum(1), truncated, texts)


# -----------------------------------------------------------------------------
# fast rollout: generate()'s sampling from a hand-written decode loop with a static KV cache
#
# Hugging Face generate() spends a decode step mostly in Python (cache and mask bookkeeping,
# logits processors, stopping criteria) and, under bf16
# autocast, re-casts every fp32 weight on every step. This loop runs the decoder of a
# Qwen2/Llama-style model from bf16 copies of its weights made once per rollout, runs each prompt
# through the model once for its whole group, writes keys and values into a cache allocated once,
# and on CUDA replays each one-token step as a CUDA graph.
# It mirrors the plain path: the numerics of autocast (fp32 residual stream and RMSNorm, bf16
# matmuls and attention; plain fp32 on CPU), left-padded prompts with positions counted from the
# first real token, tokens drawn as generate() draws them (temperature, then top-p, then the
# exponential race torch.multinomial runs for one sample, so the same seed gives the same
# tokens), the pad token after EOS, and a stop once every row has ended.

FAST_ROLLOUT_ARCHS = ("qwen2", "llama")


def check_fast_rollout(model):
    """Raise NotImplementedError, saying why, unless the fast rollout supports this model."""
    cfg, base = model.config, model.base_model
    rope = getattr(getattr(base, "rotary_emb", None), "rope_type", None)
    problems = []
    if getattr(cfg, "model_type", None) not in FAST_ROLLOUT_ARCHS:
        problems.append(f"model_type {getattr(cfg, 'model_type', None)!r} (supported: {', '.join(FAST_ROLLOUT_ARCHS)})")
    if getattr(cfg, "use_sliding_window", False):
        problems.append("sliding-window attention")
    if rope is None or rope in ("dynamic", "longrope"):  # these rescale with the sequence length
        problems.append(f"rotary embedding type {rope!r}")
    if problems:
        raise NotImplementedError(f"fast rollout does not support {'; '.join(problems)}: "
                                  "use the plain path (fast=False, --fast_rollout=false)")


def _rms_norm(x, norm):
    """A Hugging Face (Qwen2/Llama) RMSNorm module's output, as one fused op: w * x / rms(x), in fp32 for fp32 x."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def _linear(x, wb):
    """x @ W^T + b for a (weight, bias-or-None) pair."""
    return F.linear(x, wb[0], wb[1])


class StaticDecoder:
    """Prefill and one-token decode steps of a Qwen2/Llama-style decoder over a preallocated KV cache.

    dtype is the matmul and attention dtype (bf16 on CUDA, like autocast); the residual stream,
    RMSNorm and rotary tables stay in the embedding's dtype (fp32 master weights), as under autocast.
    """

    def __init__(self, model, batch, cache_len, dtype):
        base, cfg = model.base_model, model.config
        self.base, self.dtype = base, dtype
        emb = base.embed_tokens.weight
        attn = base.layers[0].self_attn
        self.H, self.Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = attn.head_dim
        self.scale = getattr(attn, "scaling", self.hd ** -0.5)

        def fuse(*lins):  # (weight, bias) of one matmul for several projections, in `dtype`
            ws = [l.weight.detach().to(dtype) for l in lins]
            if all(l.bias is None for l in lins):
                return (torch.cat(ws) if len(ws) > 1 else ws[0]), None
            bs = [(l.bias.detach() if l.bias is not None else l.weight.new_zeros(l.out_features)).to(dtype) for l in lins]
            return (torch.cat(ws), torch.cat(bs)) if len(ws) > 1 else (ws[0], bs[0])
        self.w = [(fuse(l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj), fuse(l.self_attn.o_proj),
                   fuse(l.mlp.gate_proj, l.mlp.up_proj), fuse(l.mlp.down_proj)) for l in base.layers]
        self.mods = [(l.input_layernorm, l.post_attention_layernorm, l.mlp.act_fn) for l in base.layers]
        self.lm_head = fuse(model.get_output_embeddings())
        shape = (batch, self.Hkv, cache_len, self.hd)
        # zeros, not empty: an unfilled slot is masked out, and 0 * garbage could be NaN
        self.k = [torch.zeros(shape, dtype=dtype, device=emb.device) for _ in base.layers]
        self.v = [torch.zeros(shape, dtype=dtype, device=emb.device) for _ in base.layers]
        self.valid = torch.zeros(batch, cache_len, dtype=torch.bool, device=emb.device)  # slot holds a real token
        positions = torch.arange(cache_len, device=emb.device)[None]
        cos, sin = base.rotary_emb(torch.zeros(1, dtype=emb.dtype, device=emb.device), positions)
        # Hugging Face rotates as x * cos + rotate_half(x) * sin, rotate_half(x1, x2) = (-x2, x1);
        # that is exactly x * cos + x.roll(hd/2) * (sin with its first half negated), in fewer ops.
        sign = torch.ones(self.hd, dtype=emb.dtype, device=emb.device)
        sign[:self.hd // 2] = -1
        self.cos, self.sin = cos[0], sin[0] * sign                            # (cache_len, hd)
        # the inputs of one decode step, updated in place (a CUDA graph reads them by address)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=emb.device)  # token fed this step
        self.pos = torch.zeros(batch, dtype=torch.long, device=emb.device)     # its rotary position
        self.col = torch.zeros(1, dtype=torch.long, device=emb.device)         # its cache slot
        self.graphs, self.pool = {}, None

    def _layer(self, i, x, cos, sin, attend):
        """Decoder layer i on the residual stream x (B, S, D); attend(i, q, k, v) caches k, v and attends."""
        (norm1, norm2, act), (wqkv, wo, wgu, wd) = self.mods[i], self.w[i]
        B, S, _ = x.shape
        H, Hkv = self.H, self.Hkv
        h = _rms_norm(x, norm1).to(self.dtype)
        qkv = _linear(h, wqkv).view(B, S, H + 2 * Hkv, self.hd).transpose(1, 2)  # (B, H + 2 Hkv, S, hd)
        qk = qkv[:, :H + Hkv]
        qk = (qk * cos + qk.roll(self.hd // 2, -1) * sin).to(self.dtype)  # rotary in the residual dtype, as autocast
        x = x + _linear(attend(i, qk[:, :H], qk[:, H:], qkv[:, H + Hkv:]), wo)
        gate, up = _linear(_rms_norm(x, norm2).to(self.dtype), wgu).chunk(2, dim=-1)
        return x + _linear(act(gate) * up, wd)

    def _logits(self, x):
        """(B, V) fp32 logits from the last residual state (B, D)."""
        return _linear(_rms_norm(x, self.base.norm).to(self.dtype), self.lm_head).float()

    def prefill(self, ids, mask, group_size=1):
        """Run left-padded prompts (n, P) through the model once, into cache slots [0, P) of each
        prompt's group_size consecutive rows; (n * group_size, V) logits of the last prompt token."""
        n, P = ids.shape
        pos = (mask.cumsum(1) - 1).clamp_min(0)                              # positions skip the left padding
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]            # (n, 1, P, hd)
        self.valid[:, :P] = mask.bool().repeat_interleave(group_size, 0)
        eye = torch.eye(P, dtype=torch.bool, device=ids.device)
        causal = torch.ones(P, P, dtype=torch.bool, device=ids.device).tril()
        allowed = (causal & (mask.bool()[:, None, :] | eye))[:, None]       # (n, 1, P, P); a pad sees itself only
        rep = self.H // self.Hkv

        def attend(i, q, k, v):
            for cache, new in ((self.k[i], k), (self.v[i], v)):  # each group's rows share the prompt's keys
                cache.view(n, group_size, *cache.shape[1:])[:, :, :, :P] = new[:, None]
            o = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                               attn_mask=allowed, scale=self.scale)
            return o.transpose(1, 2).reshape(n, P, self.H * self.hd)

        x = self.base.embed_tokens(ids)
        for i in range(len(self.w)):
            x = self._layer(i, x, cos, sin, attend)
        return self._logits(x[:, -1]).repeat_interleave(group_size, 0)

    def step(self, window):
        """Feed self.tokens at self.pos into cache slot self.col; logits (B, V), attending to slots [0, window)."""
        B = self.tokens.shape[0]
        self.valid.index_fill_(1, self.col, True)
        mask = self.valid[:, None, None, :window]                            # (B, 1, 1, window)
        cos, sin = self.cos[self.pos][:, None, None], self.sin[self.pos][:, None, None]  # (B, 1, 1, hd)
        rep = self.H // self.Hkv

        def attend(i, q, k, v):
            self.k[i].index_copy_(2, self.col, k)
            self.v[i].index_copy_(2, self.col, v)
            # grouped-query attention without copying the cache: the `rep` query heads that share
            # a KV head become `rep` query rows against it (query head h uses KV head h // rep)
            o = F.scaled_dot_product_attention(q.reshape(B, self.Hkv, rep, self.hd), self.k[i][:, :, :window],
                                               self.v[i][:, :, :window], attn_mask=mask, scale=self.scale)
            return o.reshape(B, 1, self.H * self.hd)

        x = self.base.embed_tokens(self.tokens)[:, None]
        for i in range(len(self.w)):
            x = self._layer(i, x, cos, sin, attend)
        return self._logits(x[:, 0])

    def graphed_step(self, window):
        """step(window) as a CUDA graph: captured on first use of each window, then replayed."""
        if window not in self.graphs:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture (cuBLAS and attention workspaces)
                for _ in range(2):
                    eager = self.step(window)  # a step is idempotent: it rewrites the same slot
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            self.pool = self.pool or torch.cuda.graph_pool_handle()  # graphs replay one at a time: share memory
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.step(window)
            graph.replay()
            err, scale = (out - eager).abs().max().item(), eager.abs().max().item()
            if not err <= 0.05 * scale + 1e-3:
                raise RuntimeError(f"CUDA graph replay of the decode step differs from eager (max |diff| {err:.3g} "
                                   f"vs max |logit| {scale:.3g}); use the plain path (--fast_rollout=false) "
                                   "or fast_decode(cuda_graphs=False)")
            self.graphs[window] = (graph, out)
        graph, out = self.graphs[window]
        graph.replay()
        return out


def sample_tokens(logits, temperature, top_p, greedy):
    """(B,) next tokens from fp32 logits (B, V), drawn exactly as Hugging Face generate() draws them."""
    if greedy:
        return logits.argmax(-1)
    if temperature != 1.0:                                 # TemperatureLogitsWarper
        logits = logits / temperature
    if top_p < 1.0:                                        # TopPLogitsWarper, line for line
        sorted_logits, sorted_idx = torch.sort(logits, descending=False)
        remove = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[..., -1:] = False
        logits = logits.masked_fill(remove.scatter(1, sorted_idx, remove), -float("inf"))
    probs = torch.softmax(logits, dim=-1)
    # torch.multinomial(probs, 1) computes exactly this (an exponential race, argmax of p / E),
    # after validity checks over all of probs (a host sync in older torch versions); fast_decode
    # checks the drawn tokens' logits instead, once per rollout.
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(-1)


@torch.no_grad()
def fast_decode(model, prompt_ids, prompt_mask, max_new_tokens, eos, pad_id, temperature=1.0, top_p=1.0,
                greedy=False, group_size=1, cuda_graphs=None, window_multiple=None, return_logprobs=False):
    """(B, T) completions of left-padded prompts (pad after EOS, T trimmed as generate() trims it), and
    their (B, T) log-probs under softmax(logits / temperature) if return_logprobs.

    Each of the n prompt rows is sampled group_size times, in consecutive rows (B = n * group_size,
    the order of generate()'s repeat_interleave); the prompt itself goes through the model once.

    cuda_graphs (default: on for CUDA) replays each decode step as a CUDA graph; a graph needs a
    fixed attention length, so steps attend to the cache in windows of window_multiple slots
    (default 128 with graphs, else 1 = exactly the filled slots), unfilled slots masked out.
    """
    check_fast_rollout(model)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    device = prompt_ids.device
    cuda_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs a CUDA device, got {device}")
    m = window_multiple or (128 if cuda_graphs else 1)
    B, P = prompt_ids.shape[0] * group_size, prompt_ids.shape[1]
    cache_len = -(-(P + max_new_tokens) // m) * m
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and P + max_new_tokens > limit:
        raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds max_position_embeddings={limit}")
    dtype = torch.bfloat16 if device.type == "cuda" else model.get_input_embeddings().weight.dtype
    check_every = 16 if device.type == "cuda" else 1       # steps between host syncs on "all rows ended?"
    eos_t = torch.tensor(eos, device=device)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros(B, max_new_tokens, device=device) if return_logprobs else None
    finite = torch.ones((), dtype=torch.bool, device=device)
    unfinished = torch.ones(B, dtype=torch.long, device=device)
    with torch.autocast(device.type, enabled=False):       # the decoder casts explicitly, as autocast would
        dec = StaticDecoder(model, B, cache_len, dtype)
        dec.pos.copy_((prompt_mask.sum(1) - 1).repeat_interleave(group_size))
        dec.col.fill_(P - 1)
        for t in range(max_new_tokens):
            if t == 0:
                logits = dec.prefill(prompt_ids, prompt_mask, group_size)
            else:
                window = min(cache_len, -(-(P + t) // m) * m)  # slots 0 .. P+t-1 are filled
                logits = dec.graphed_step(window) if cuda_graphs else dec.step(window)
            nxt = sample_tokens(logits, temperature, top_p, greedy)              # (B,)
            # a NaN or inf logit makes the drawn token's logit non-finite (argmax picks NaN): O(B) check
            finite &= torch.isfinite(logits.gather(1, nxt[:, None])).all()
            if return_logprobs:
                logps[:, t] = torch.log_softmax(logits / temperature, -1).gather(1, nxt[:, None])[:, 0]
            nxt = nxt * unfinished + pad_id * (1 - unfinished)                   # pad after EOS
            out[:, t] = nxt
            unfinished = unfinished & ~torch.isin(nxt, eos_t)
            if t + 1 == max_new_tokens or ((t + 1) % check_every == 0 and not unfinished.any()):
                break
            dec.tokens.copy_(nxt)
            dec.pos += 1
            dec.col += 1
    if not finite:
        raise FloatingPointError("fast rollout produced non-finite logits (check the model weights)")
    T = t + 1
    if not unfinished.any():  # generate() stops right after the step where the last row ended
        T = int(completion_mask(out[:, :T], eos)[0].sum(1).max())
    return out[:, :T], (logps[:, :T] if return_logprobs else None)


def fast_generate(model, tok, prompt_ids, prompt_mask, group_size, max_new_tokens, temperature=1.0, top_p=1.0,
                  greedy=False):
    """generate() through fast_decode: the same Rollout, the same sampling, less overhead."""
    eos = eos_token_ids(model, tok)
    completion_ids, _ = fast_decode(model, prompt_ids, prompt_mask, max_new_tokens, eos, tok.pad_token_id,
                                    temperature, top_p, greedy, group_size)
    ids, mask = prompt_ids.repeat_interleave(group_size, 0), prompt_mask.repeat_interleave(group_size, 0)
    return make_rollout(tok, ids, mask, completion_ids, eos)


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
    """The causal LM plus a forward that returns per-token log-probs of completion tokens.

    The trainers wrap this module in DDP, so the loss goes through the DDP forward.
    """

    def __init__(self, lm, chunk_size=128, gradient_checkpointing=False):
        super().__init__()
        self.lm, self.chunk_size = lm, chunk_size
        if gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            lm.config.use_cache = False

    def forward(self, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=1.0):
        """(B, T) log-probs and entropies of completion_ids under softmax(logits / temperature)."""
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
    """(B, T) log-probs and entropies of a rollout under `policy`, without grad, in micro-batches."""
    logps, ents = [], []
    for s in range(0, r.completion_ids.shape[0], micro_batch_size):
        sl = slice(s, s + micro_batch_size)
        with autocast(r.prompt_ids.device):
            lp, ent = policy(r.prompt_ids[sl], r.prompt_mask[sl], r.completion_ids[sl], r.completion_mask[sl],
                             temperature)
        logps.append(lp.float())
        ents.append(ent.float())
    return torch.cat(logps), torch.cat(ents)


# -----------------------------------------------------------------------------
# evaluation: held-out accuracy (greedy pass@1, or n samples with pass@k and majority vote)
# One function, `evaluate`, serves the trainers' periodic eval and eval_gsm8k.py.


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021, eq. 1)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)  # exact integers; C(n-c, k) = 0 when k > n-c


def majority_vote(answers):
    """The most frequent non-None answer, ties broken by first occurrence; None if every answer is None."""
    counts = {}
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    # dicts keep insertion (first-occurrence) order and max() returns the first maximal key
    return max(counts, key=counts.get) if counts else None


def wilson_interval(p, n, z=1.96):
    """The 95% Wilson score interval (lo, hi) for a rate p measured on n trials; (0, 1) when n = 0."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def default_ks(n):
    """The k of pass@k reported for n samples: 1, 2, 4, ... up to n, and n itself."""
    return sorted({2 ** i for i in range(n.bit_length()) if 2 ** i <= n} | {n})


def _answer_str(x):
    """An extracted Fraction as JSON-friendly text ('18', '5/2'), or None."""
    return None if x is None else str(x)


def score_problem(index, problem, texts, truncated):
    """The prediction record of one problem: its n completions, their extracted answers and scores."""
    ref = extract_answer(problem["answer"])
    strict = [extract_answer(t) for t in texts]
    last = [extract_last_number(t) for t in texts]
    maj, maj_lenient = majority_vote(strict), majority_vote(last)
    return {"index": index, "question": problem["question"], "reference": _answer_str(ref),
            "completions": list(texts), "extracted": [_answer_str(a) for a in strict],
            "last_number": [_answer_str(a) for a in last],
            "correct": [correctness_reward(t, problem["answer"]) == 1.0 for t in texts],
            "lenient": [lenient_correct(t, problem["answer"]) == 1.0 for t in texts],
            "format": [format_reward(t) == 1.0 for t in texts], "truncated": [bool(x) for x in truncated],
            "majority": _answer_str(maj), "majority_correct": maj is not None and maj == ref,
            "majority_lenient": _answer_str(maj_lenient),
            "majority_lenient_correct": maj_lenient is not None and maj_lenient == ref}


def summarize_eval(records, ks=None):
    """Rates over problems (each problem's mean over its n samples) with Wilson bounds <key>_lo/<key>_hi.

    strict/lenient/format are pass@1 averaged over the n samples; with n > 1 also pass@k (strict, for k
    in ks) and maj / maj_lenient (majority vote). The interval treats the problems as the trials: exact
    binomial variance for 0/1 scores, conservative for per-problem means in [0, 1] (their variance is at
    most p(1-p)).
    """
    N, n = len(records), len(records[0]["completions"])
    mean = lambda key: math.fsum(sum(r[key]) / n for r in records) / N  # noqa: E731
    rates = {"strict": mean("correct"), "lenient": mean("lenient"), "format": mean("format")}
    if n > 1:
        for k in (ks or default_ks(n)):
            rates[f"pass@{k}"] = math.fsum(pass_at_k(n, sum(r["correct"]), k) for r in records) / N
        rates["maj"] = math.fsum(r["majority_correct"] for r in records) / N
        rates["maj_lenient"] = math.fsum(r["majority_lenient_correct"] for r in records) / N
    out = dict(rates)
    for key, p in rates.items():
        out[f"{key}_lo"], out[f"{key}_hi"] = wilson_interval(p, N)
    out.update(truncated=mean("truncated"), n=N, samples=n)
    return out


@torch.no_grad()
def evaluate(model, tok, problems, d, max_new_tokens, batch_size=64, system_prompt=SYSTEM_PROMPT, n=1,
             temperature=0.0, top_p=1.0, ks=None, seed=0, progress=False, return_predictions=False, fast=False):
    """Accuracy on `problems`, sharded over ranks: greedy pass@1 (temperature 0) or n samples per problem.

    Returns summarize_eval's dict (strict, lenient, format, n, ...); with return_predictions=True, the
    tuple (metrics, records) with one record per problem in problem order, the same on every rank.
    batch_size counts completions per generate call, so a batch holds batch_size // n problems.
    fast=True generates with fast_generate (static KV cache) instead of Hugging Face generate.
    """
    if not problems:
        raise ValueError("evaluate: no problems to evaluate")
    if n < 1 or (n > 1 and temperature <= 0):
        raise ValueError(f"evaluate: n={n} samples at temperature={temperature}: n must be >= 1, and n > 1 "
                         "needs temperature > 0 (greedy samples would all be identical)")
    if ks and any(not 1 <= k <= n for k in ks):
        raise ValueError(f"evaluate: every k of pass@k must be in 1..n={n}, got {list(ks)}")
    was_training = model.training
    model.eval()
    per_batch = max(1, batch_size // n)
    starts = range(0, len(problems), per_batch)
    # Shard whole batches, not problems: batch j holds the same problems (hence the same padding) and
    # draws from the same seed (seed + j) on any number of ranks, so results do not depend on it.
    mine = range(d.rank, len(starts), d.world_size)
    if progress and d.master_process:
        from tqdm import tqdm
        mine = tqdm(mine, desc="eval", unit="batch")
    greedy = temperature <= 0
    cuda = [torch.cuda.current_device()] if d.device.type == "cuda" else []
    records = []
    for j in mine:
        batch = problems[starts[j]:starts[j] + per_batch]
        ids, mask = tokenize_prompts(tok, [build_prompt(tok, p["question"], system_prompt) for p in batch], d.device)
        with nullcontext() if greedy else torch.random.fork_rng(devices=cuda):  # a trainer's RNG stream is untouched
            if not greedy:
                torch.manual_seed(seed + j)
            r = generate(model, tok, ids, mask, n, max_new_tokens, temperature, top_p, greedy=greedy, fast=fast)
        for i, p in enumerate(batch):
            rows = slice(i * n, (i + 1) * n)
            records.append(score_problem(starts[j] + i, p, r.texts[rows], r.truncated[rows].tolist()))
    model.train(was_training)
    if d.ddp:  # every rank gets every record; merged in problem order, so sums run in the same order
        parts = [None] * d.world_size
        dist.all_gather_object(parts, records)
        records = [rec for part in parts for rec in part]
    records.sort(key=lambda rec: rec["index"])
    metrics = summarize_eval(records, ks)
    return (metrics, records) if return_predictions else metrics


def resolve_model_path(path):
    """A hub name, a local HF model dir, or a run dir (its `latest` checkpoint); raise if a local path is missing."""
    local = os.path.expanduser(path)
    if os.path.isfile(os.path.join(local, "latest")):
        with open(os.path.join(local, "latest")) as f:
            local = os.path.join(local, f.read().strip())
    if os.path.isdir(local):
        if not os.path.isfile(os.path.join(local, "config.json")):
            raise FileNotFoundError(f"{local!r} is not a model or checkpoint directory (no config.json)")
        return local
    # Not a directory: a hub name ('owner/name') unless it is clearly a local path that does not exist.
    first = local.split(os.sep, 1)[0]
    if local.startswith((os.sep, ".")) or local.count("/") > 1 or os.path.isdir(first):
        where = f" (its `latest` names {local!r})" if local != os.path.expanduser(path) else ""
        raise FileNotFoundError(f"checkpoint or model directory {path!r} does not exist{where}")
    return path


# -----------------------------------------------------------------------------
# the embedded tiny default: a tiny Qwen2 model and char-level tokenizer, built locally

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_VERSION = "v1"  # bump to invalidate cached tiny models when the recipe below changes


def build_tiny_tokenizer(out_dir):
    """A character-level tokenizer with Qwen's chat special tokens, saved to out_dir."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(TINY_SPECIALS + chars + ["<unk>"])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="<unk>", additional_special_tokens=["<|im_start|>"],
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.padding_side = "left"
    tok.save_pretrained(out_dir)
    return tok


def build_tiny_model(tok, seed=0):
    """A randomly initialised tiny Qwen2ForCausalLM (about 0.35M parameters) for `tok`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=96, intermediate_size=288, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def tiny_sft_examples(n, seed=0, p_stop_early=0.6, p_no_hash=0.15):
    """Warm-start texts from the sloppy teacher: (prompt, completion) pairs on the tiny train set."""
    rng = random.Random(seed)
    rows = tiny_dataset("train")
    out = []
    for i in range(n):
        q = rows[i % len(rows)]["question"]
        steps = _tiny_steps_from_answer(rows[i % len(rows)]["answer"])
        out.append((q, tiny_solution(steps, stop_early=rng.random() < p_stop_early,
                                     hash_line=rng.random() >= p_no_hash)))
    return out


def _tiny_steps_from_answer(answer):
    """Recover [(expr, value)] from a tiny reference solution."""
    return [(l.split("=")[0], int(l.split("=")[1])) for l in answer.splitlines() if "=" in l]


def tiny_sft(model, tok, steps=400, batch_size=64, lr=3e-3, seed=0, log=print):
    """Supervised warm start on the sloppy teacher: cross-entropy on completion tokens only."""
    torch.manual_seed(seed)
    pairs = tiny_sft_examples(steps * batch_size, seed=seed)
    prompt_ids = tok([build_prompt(tok, q, "") for q, _ in pairs], add_special_tokens=False)["input_ids"]
    compl_ids = tok([c + tok.eos_token for _, c in pairs], add_special_tokens=False)["input_ids"]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        rows = range(step * batch_size, (step + 1) * batch_size)
        L = max(len(prompt_ids[i]) + len(compl_ids[i]) for i in rows)
        ids = torch.full((batch_size, L), tok.pad_token_id)
        labels = torch.full((batch_size, L), -100)
        for b, i in enumerate(rows):  # right-padded; labels only on the completion
            p, c = prompt_ids[i], compl_ids[i]
            ids[b, :len(p) + len(c)] = torch.tensor(p + c)
            labels[b, len(p):len(p) + len(c)] = torch.tensor(c)
        for g in opt.param_groups:  # linear warm-up, cosine decay to 10%
            g["lr"] = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        loss = model(input_ids=ids, attention_mask=(labels != -100) | (ids != tok.pad_token_id), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"tiny warm start: step {step}/{steps} loss {loss.item():.4f}")
    model.eval()
    return model


def tiny_model_dir(cache_dir=""):
    """Where the warm-started tiny model lives; built once, then loaded from disk."""
    root = os.path.expanduser(cache_dir or os.environ.get("GRPO_TINY_CACHE", "~/.cache/grpo-family"))
    return os.path.join(root, f"tiny-qwen2-sft-{TINY_VERSION}")


def ensure_tiny_model(d, cache_dir="", log=print):
    """Build and warm-start the tiny model on rank 0 if it is not cached; every rank waits for it."""
    out = tiny_model_dir(cache_dir)
    if d.master_process and not os.path.isfile(os.path.join(out, "config.json")):
        t0 = time.time()
        tmp = f"{out}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        threads = torch.get_num_threads()
        torch.set_num_threads(max(threads, os.cpu_count() or 1))
        tok = build_tiny_tokenizer(tmp)
        model = tiny_sft(build_tiny_model(tok), tok, log=log)
        model.save_pretrained(tmp)
        torch.set_num_threads(threads)
        if os.path.isdir(out):  # another process finished the same build first: keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
        log(f"tiny model warm-started and cached in {out} ({time.time() - t0:.0f}s)")
    if d.ddp:
        dist.barrier()
    return out


# -----------------------------------------------------------------------------
# logging: tqdm on the master process, metrics.jsonl in the run dir, optional wandb


class Logger:
    """Writes one JSON line of metrics per step to run_dir/metrics.jsonl (and wandb if asked)."""

    def __init__(self, run_dir, cfg, master, wandb_project=""):
        self.master, self.wandb = master, None
        if not master:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if not getattr(cfg, "resume", ""):  # a fresh run starts a fresh log; a resumed one appends
            open(self.path, "w").close()
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ImportError("--wandb_project was given but wandb is not installed: pip install wandb") from None
            self.wandb = wandb.init(project=wandb_project, config=dataclasses.asdict(cfg))

    def log(self, step, metrics):
        """Append {'step': step, **metrics} to metrics.jsonl (master process only)."""
        if not self.master:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)


def accumulate(sums, key, total, count):
    """Add (total, count) into sums[key], for metrics averaged later by reduce_metrics."""
    old = sums.get(key, (0.0, 0.0))
    sums[key] = (old[0] + float(total), old[1] + float(count))


def reduce_metrics(sums, d):
    """Average a dict of {name: (sum, count)} over all ranks; returns {name: mean}."""
    names = sorted(sums)
    t = torch.tensor([[float(sums[k][0]), float(sums[k][1])] for k in names], dtype=torch.float64, device=d.device)
    t = all_reduce_sum(t, d).cpu()
    return {k: (t[i, 0] / t[i, 1]).item() if t[i, 1] > 0 else float("nan") for i, k in enumerate(names)}


# -----------------------------------------------------------------------------
# checkpoints: Hugging Face weights + optimizer, step and RNG state; atomic via rename


def save_checkpoint(run_dir, step, lm, tok, optimizer, cfg, d, keep=2):
    """Write run_dir/ckpt-{step} (HF format + trainer state) atomically; keep the last `keep`."""
    final = os.path.join(run_dir, f"ckpt-{step:06d}")
    tmp = final + ".tmp"
    if d.master_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if d.ddp:
        dist.barrier()
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{d.rank}.pt"))
    if d.master_process:
        lm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "config": dataclasses.asdict(cfg),
                    "world_size": d.world_size}, os.path.join(tmp, "trainer_state.pt"))
    if d.ddp:
        dist.barrier()
    if d.master_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(run_dir, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(run_dir, "latest.tmp"), os.path.join(run_dir, "latest"))
        old = sorted(x for x in os.listdir(run_dir) if re.fullmatch(r"ckpt-\d+", x))[:-keep]
        for x in old:
            shutil.rmtree(os.path.join(run_dir, x))
    if d.ddp:
        dist.barrier()
    return final


def resolve_checkpoint(path):
    """A checkpoint dir, or a run dir whose `latest` file names one; raise if neither exists."""
    path = os.path.expanduser(path)
    if os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            path = os.path.join(path, f.read().strip())
    if not os.path.isfile(os.path.join(path, "trainer_state.pt")):
        raise FileNotFoundError(f"no checkpoint at {path!r} (expected trainer_state.pt, or a run dir with 'latest')")
    return path


def load_trainer_state(ckpt, optimizer, d):
    """Restore optimizer and this rank's RNG state from ckpt; returns the step to start from."""
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), map_location="cpu", weights_only=False)
    if state["world_size"] != d.world_size:
        raise ValueError(f"checkpoint was written by {state['world_size']} ranks, resuming with {d.world_size}")
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(torch.load(os.path.join(ckpt, f"rng_rank{d.rank}.pt"), weights_only=False))
    return state["step"]


def rng_state():
    """Every RNG a run draws from, to resume exactly."""
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s):
    """Inverse of rng_state()."""
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])

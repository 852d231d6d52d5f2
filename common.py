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
             top_p=1.0, greedy=False):
    """Sample `group_size` completions per prompt with Hugging Face generate (the readable path)."""
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
# evaluation: greedy held-out accuracy, sharded over ranks


@torch.no_grad()
def evaluate(model, tok, problems, d, max_new_tokens, batch_size=64, system_prompt=SYSTEM_PROMPT):
    """Greedy pass@1 on `problems` (sharded over ranks): strict, lenient and format rates."""
    was_training = model.training
    model.eval()
    mine = problems[d.rank::d.world_size]
    sums = torch.zeros(4, dtype=torch.float64)  # strict, lenient, format, n
    for s in range(0, len(mine), batch_size):
        batch = mine[s:s + batch_size]
        ids, mask = tokenize_prompts(tok, [build_prompt(tok, p["question"], system_prompt) for p in batch], d.device)
        r = generate(model, tok, ids, mask, 1, max_new_tokens, greedy=True)
        for text, p in zip(r.texts, batch):
            sums += torch.tensor([correctness_reward(text, p["answer"]), lenient_correct(text, p["answer"]),
                                  format_reward(text), 1.0], dtype=torch.float64)
    model.train(was_training)
    sums = all_reduce_sum(sums.to(d.device), d).cpu()
    n = max(sums[3].item(), 1.0)
    return {"strict": sums[0].item() / n, "lenient": sums[1].item() / n, "format": sums[2].item() / n,
            "n": int(sums[3].item())}


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

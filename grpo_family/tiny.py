"""
tiny.py: the embedded tiny default (--tiny, or --model=tiny / --data_path=tiny): a task, a tokenizer
and a model built locally, so every trainer runs its real code path on a CPU with no downloads.

    problem, solution, dataset     two-step arithmetic word problems in GSM8K's '#### N' format
    build_tokenizer, build_model   a character-level tokenizer with Qwen's chat tokens; a tiny Qwen2
    sft_examples, warm_start       a supervised warm start on a *sloppy teacher*
    model_dir, ensure_model        built once on rank 0, cached on disk, loaded with from_pretrained
    build_seed                     the seed of the build: 0, or $GRPO_TINY_SEED (another build, as another CPU's)

The sloppy teacher, like a weak SFT model, often stops after the first step and reports the
intermediate number, and sometimes forgets the '####' line. The warm-started model therefore knows
how to solve the problems but usually does not, which leaves RL clear headroom, and RL has to find
the fix from the reward alone.
"""
import math
import os
import random
import shutil
import time

import torch
import torch.distributed as dist

from grpo_family.gsm8k import build_prompt

NAMES = ["Ann", "Ben", "Sam", "Mia", "Tom", "Eva", "Leo", "Zoe"]
THINGS = ["apples", "pens", "cards", "coins", "books", "eggs"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VERSION = "v1"  # bump to invalidate cached tiny models when the recipe below changes

# -----------------------------------------------------------------------------
# the task


def problem(rng):
    """One random problem: (question, steps [(expr, value)], final answer)."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
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


def solution(steps, stop_early=False, hash_line=True):
    """A GSM8K-style solution text; the sloppy teacher may stop early or drop the '####' line."""
    used = steps[:1] if stop_early else steps
    body = "\n".join(f"{e}={v}" for e, v in used)
    final = used[-1][1]
    return body + (f"\n#### {final}" if hash_line else f"\nThe answer is {final}.")


def dataset(split, n=None):
    """The tiny task's problems [{question, answer}]; train and test never share a question."""
    n = n or (4000 if split == "train" else 200)
    rng = random.Random(1234 if split == "train" else 5678)
    rows, seen = [], set()
    other = {r["question"] for r in dataset("test")} if split == "train" else set()
    while len(rows) < n:
        q, steps, _ = problem(rng)
        if q in seen or q in other:
            continue
        seen.add(q)
        rows.append({"question": q, "answer": solution(steps)})
    return rows


# -----------------------------------------------------------------------------
# the tokenizer and the model


def build_tokenizer(out_dir):
    """A character-level tokenizer with Qwen's chat special tokens, saved to out_dir."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars + ["<unk>"])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="<unk>", additional_special_tokens=["<|im_start|>"],
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    tok.save_pretrained(out_dir)
    return tok


def build_model(tok, seed=0):
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


# -----------------------------------------------------------------------------
# the warm start


def sft_examples(n, seed=0, p_stop_early=0.6, p_no_hash=0.15):
    """Warm-start texts from the sloppy teacher: (prompt, completion) pairs on the tiny train set."""
    rng = random.Random(seed)
    rows = dataset("train")
    out = []
    for i in range(n):
        q = rows[i % len(rows)]["question"]
        lines = rows[i % len(rows)]["answer"].splitlines()
        steps = [(l.split("=")[0], int(l.split("=")[1])) for l in lines if "=" in l]
        out.append((q, solution(steps, stop_early=rng.random() < p_stop_early, hash_line=rng.random() >= p_no_hash)))
    return out


def warm_start(model, tok, steps=400, batch_size=64, lr=3e-3, seed=0, log=print):
    """Supervised warm start on the sloppy teacher: cross-entropy on completion tokens only."""
    torch.manual_seed(seed)
    pairs = sft_examples(steps * batch_size, seed=seed)
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


def build_seed():
    """The seed the tiny model is built and warm-started from: 0, or $GRPO_TINY_SEED. The build is bit-reproducible
    on one CPU but not across CPUs (summation order differs), so another seed stands in for another machine's build:
    the test suite must pass on any of them."""
    text = os.environ.get("GRPO_TINY_SEED", "0")
    if not text.isdigit():
        raise ValueError(f"GRPO_TINY_SEED={text!r}: give a whole number (0 is the default build)")
    return int(text)


def model_dir(cache_dir=""):
    """Where the warm-started tiny model lives; built once, then loaded from disk (one dir per build seed)."""
    root = os.path.expanduser(cache_dir or os.environ.get("GRPO_TINY_CACHE", "~/.cache/grpo-family"))
    seed = build_seed()
    return os.path.join(root, f"tiny-qwen2-sft-{VERSION}" + (f"-seed{seed}" if seed else ""))


def ensure_model(d, cache_dir="", log=print):
    """Build and warm-start the tiny model on rank 0 if it is not cached; every rank waits for it."""
    out = model_dir(cache_dir)
    if d.master_process and not os.path.isfile(os.path.join(out, "config.json")):
        t0 = time.time()
        tmp = f"{out}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        threads = torch.get_num_threads()
        torch.set_num_threads(max(threads, os.cpu_count() or 1))
        tok = build_tokenizer(tmp)
        model = warm_start(build_model(tok, build_seed()), tok, seed=build_seed(), log=log)
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

"""
explain.py: what each trainer does to each token, as one picture a class can read.

One real rollout batch (a few prompts x G completions), then a few GRPO optimizer steps on it so that the
ratios ρ = π_θ/π_old are no longer 1 (the situation of every mini-batch after a step's first). On the same
tokens, every trainer's per-token gradient weight w_t = -∂loss/∂log π_θ(o_t) is read off the trainer's own
step: its main() runs once (tools/harness.py) on this batch, its rewards, filters, advantages and loss as its
loop computes them, and its backward fills the gradient. Nothing of a trainer is re-written here, so the page
follows any change to one. w > 0 pushes the token up, w < 0 down. The page colours each token by w, one row
per trainer, and marks the tokens whose gradient the ratio's trust region removed (clipped, masked) and those
that never had one (filtered, Â = 0, no pair).

    python -m tools.explain --tiny                         # the tiny default, CPU, no downloads
    python -m tools.explain --model=runs/grpo --data_path=/data/gsm8k --max_new_tokens=200

Writes <out_dir>/explain.html (a self-contained page: no network, no script), explain.json beside it (every number
shown), and explain.png, the page rendered by headless Chromium when one is installed (apt-get install chromium).
Walk-through of an example: docs/explain.md. The page itself: tools/explain_page.py.

What it holds: page_flags (the trainer's flags for a step on the page's batch), RowIndex and PagePolicy (finding
the page's rows in what the trainer asks, and reading the gradient it gives them), critic_body, run_trainer,
token_weights, token_states (the three states the legend shows), make_batch and page_batch (the batch and its
log-probs), shown_rows (the completions on the page), Config, check_outputs and write_outputs (the folder checked
before the work, the files written after it), main.
"""
import inspect
import json
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from grpo_family import config, distributed, gsm8k, loading, logprobs, rollout
from tools import explain_page, harness, output, trainers


@dataclass
class Config:
    tiny: bool = False  # the tiny model and task (CPU, no downloads); explicit flags still win
    model: str = "Qwen/Qwen2.5-1.5B-Instruct"  # the policy: hub name, model or checkpoint dir, run dir, or "tiny"
    data_path: str = ""  # GSM8K: a dir with train.jsonl, a train jsonl file, "tiny", or "" (the hub)
    prompts: int = 2  # prompts in the rollout batch (training prompts, from --seed), in [1, inf)
    group_size: int = 8  # G: completions per prompt, in [2, inf)
    show: int = 4  # completions on the page, from the first group whose rewards differ, in [1, inf)
    max_new_tokens: int = 300  # completion length cap, in [1, inf)
    temperature: float = 1.0  # sampling temperature (log-probs under the same one), in (0, inf)
    system_prompt: str = gsm8k.SYSTEM_PROMPT  # system message of the chat prompt ("" = none)
    steps: int = 2  # GRPO optimizer steps on the batch before the weights are taken (ratios move), in [0, inf)
    lr: float = 1e-5  # AdamW learning rate of those steps, in (0, inf) (10x grpo.py's, so ratios move visibly)
    seed: int = 0  # prompt choice and sampling, in [0, 1e18]
    out_dir: str = "runs/explain"  # where explain.html (the page), explain.json (its numbers) and explain.png go
    png: str = "auto"  # explain.png by headless Chromium, in {auto, always, none} (auto: when Chromium is found)


TINY = dict(model="tiny", data_path="tiny", max_new_tokens=32, system_prompt="", lr=2e-4)


# -----------------------------------------------------------------------------
# each trainer's own step on the batch: its main() for one step (tools/harness.py), with the rollout, the log-probs
# and the policy's forward replaced by the page's batch, and -∂loss/∂log π_θ read off what its backward computes


def page_flags(name, b, tiny, on_policy=False, kl=True):
    """The trainer's flags for one step on the page's batch: its TINY settings with --tiny, the batch's prompts
    and G, one mini-batch in one micro-batch (one gradient, on π_θ as the page shows it); kl=False sets β = 0 (the
    policy term alone) where β weighs a KL term, which is everywhere but dpo.py (its β is DPO's temperature)."""
    rows = len(b.texts)
    flags = ["--tiny"] if tiny else []
    flags += [f"--group_size={b.G}", f"--batch_prompts={rows // b.G}", "--num_minibatches=1",
              f"--micro_batch_size={rows}", f"--max_new_tokens={b.max_new_tokens}", "--fast_rollout=false"]
    if "keep" in trainers.load(name).Config.__dataclass_fields__:
        flags.append(f"--keep={b.G // 2}")  # gfpo.py samples 2k and trains k: the page's G is its 2k
    if not kl and name != "dpo":
        flags.append("--beta=0")
    return flags


class RowIndex:
    """Finds the page's rows in the rows a trainer hands its networks (it may reorder, select or repeat them):
    by their prompt and completion tokens, pads left out; identical rows are taken in turn."""

    def __init__(self, r):
        self.pad = r.pad_id
        self.rows = {}
        for i in range(len(r.texts)):
            self.rows.setdefault(self.key(r.prompt_ids[i], r.completion_ids[i]), []).append(i)

    def key(self, prompt, completion):
        p, c = prompt.tolist(), completion.tolist()
        while p and p[0] == self.pad:
            p.pop(0)
        while c and c[-1] == self.pad:
            c.pop()
        return tuple(p), tuple(c)

    def find(self, prompt_ids, completion_ids):
        taken, out = {}, []
        for p, c in zip(prompt_ids, completion_ids):
            k = self.key(p, c)
            if k not in self.rows:
                raise KeyError("explain: the trainer asked about a row that is not in the page's batch")
            n = taken.get(k, 0)
            out.append(self.rows[k][n % len(self.rows[k])])
            taken[k] = n + 1
        return torch.tensor(out, dtype=torch.long)


class PagePolicy(torch.nn.Module):
    """The policy of an explain step. Its forward returns the page's log π_θ of the rows asked, as a fresh leaf
    whose gradient (what the trainer's backward gives it) is added into .grad at those rows; .adv holds the
    advantages the trainer's policy_loss was given for them; .objective sums what the trainer's backward()
    calls were given (its loss: the finite-difference test differentiates it)."""

    def __init__(self, b, index):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the optimizer needs a parameter; no gradient reaches it
        self.lm, self.b, self.index, self.last = None, b, index, None
        self.grad, self.adv, self.objective = torch.zeros_like(b.new), None, 0.0

    def forward(self, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=1.0):
        rows, T = self.index.find(prompt_ids, completion_ids), completion_ids.shape[1]
        logp = self.b.new[rows, :T].clone().requires_grad_(True)
        logp.register_hook(lambda g: self.add_grad(rows, g))
        self.last = rows
        return logp, self.b.entropy[rows, :T]

    def add_grad(self, rows, g):
        self.grad[:, :g.shape[1]].index_add_(0, rows, g.to(self.grad.dtype))

    def record_advantages(self, advantages):
        """The advantages of the rows of the last forward (what policy_loss is given)."""
        adv = advantages.detach().to(torch.float64)
        if self.adv is None:
            self.adv = torch.zeros((len(self.b.new),) + tuple(adv.shape[1:]), dtype=torch.float64)
        self.adv[self.last] = adv


def critic_body(b):
    """A small network of the page's vocabulary for PPO's critic: the head starts at zero, so V_old = 0 whatever
    the body, as a fresh critic gives on the first step."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    width = b.rollout.prompt_ids.shape[1] + b.rollout.completion_ids.shape[1]
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=b.vocab_size, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=width + 8, tie_word_embeddings=True)).float()


def run_trainer(name, b, tiny, on_policy, kl):
    """The trainer's own step on the page's batch; returns (its PagePolicy, its Config). π_old is the page's old
    log-probs, or its new ones on_policy (ρ = 1); π_ref the page's ref."""
    index = RowIndex(b.rollout)
    policy = PagePolicy(b, index)
    problems = [{"question": q, "answer": a} for q, a in zip(b.questions, b.answers[::b.G])]
    step = harness.Step(name, page_flags(name, b, tiny, on_policy, kl), b.d, problems, b.tok)
    reference = object()  # what loading.reference returns: batched() gives the page's π_ref for it

    def sample(model, tok, asked, cfg, device):
        groups = [b.questions.index(p["question"]) for p in asked]
        return b.rollout.select(torch.tensor([g * b.G + k for g in groups for k in range(b.G)]))

    def batched(module, r, micro_batch_size, temperature):
        rows = index.find(r.prompt_ids, r.completion_ids)
        logp = b.ref if module is reference else b.new if on_policy else b.old
        T = r.completion_ids.shape[1]
        return logp[rows, :T].float(), b.entropy[rows, :T].float()

    loss_fn = getattr(step.trainer, "policy_loss", None)  # dpo.py has dpo_loss, with no advantages
    takes_advantages = loss_fn is not None and "advantages" in inspect.signature(loss_fn).parameters

    def policy_loss(*args, **kwargs):
        policy.record_advantages(inspect.signature(loss_fn).bind(*args, **kwargs).arguments["advantages"])
        return loss_fn(*args, **kwargs)

    for obj, attr, value in [(rollout, "sample", sample), (logprobs, "batched", batched),
                             (loading, "policy", lambda path, ckpt, cfg, d: policy),
                             (loading, "reference", lambda *a: reference),
                             (loading, "model", lambda path, device, dtype=torch.float32: critic_body(b))]:
        step.replace(obj, attr, value)
    if takes_advantages:
        step.replace(step.trainer, "policy_loss", policy_loss)
    backward = torch.Tensor.backward

    def recorded_backward(loss, *args, **kwargs):
        policy.objective += float(loss.detach().double())
        return backward(loss, *args, **kwargs)

    step.replace(torch.Tensor, "backward", recorded_backward)
    try:
        harness.quiet(step.run)
    except config.UserError as e:  # DAPO's dynamic sampling with no group to keep: it would draw fresh prompts
        if "dynamic sampling" not in str(e):
            raise
        why = str(e).split(";")[0]  # what happened; the trainer's own fix names flags explain does not take
        raise config.UserError(f"{name}: {why}; on this page's batch: try another --seed or more --prompts") from None
    return policy, step.cfg


def token_weights(b, name, tiny=True):
    """{w, pg, w_on, pg_on, adv} and the trainer's Config: -∂loss/∂log π_θ (B, T) with the trainer's β and with β = 0
    (its policy term alone), at the batch's ratios and on-policy (π_old := π_θ, ρ = 1), and the advantages its
    policy_loss was given (dpo.py has none: +1 for a chosen row, -1 a rejected one, from the sign of its weight)."""
    out, cfg = {}, None
    for key, on_policy, kl in (("w", False, True), ("pg", False, False), ("w_on", True, True), ("pg_on", True, False)):
        policy, c = run_trainer(name, b, tiny, on_policy, kl)
        if not torch.isfinite(policy.grad).all():
            raise FloatingPointError(f"{name}: the gradient is not finite on this batch")
        out[key] = -policy.grad * b.mask
        if key == "w":
            cfg = c
            out["adv"] = policy.adv if policy.adv is not None else torch.sign(out["w"].sum(1))
    return out, cfg


def token_states(t, mask):
    """(B, T) ints: 0 a token with a gradient, 1 clipped or masked by the ratio's trust region (no policy-term
    gradient here, one at ρ = 1), 2 no policy-term gradient even at ρ = 1 (filtered, Â = 0, no pair, λ = 0)."""
    real = mask.bool()
    clipped = real & (t["pg"] == 0) & (t["pg_on"] != 0)
    idle = real & (t["pg_on"] == 0)
    return clipped.long() + 2 * idle.long()


# -----------------------------------------------------------------------------
# the batch: a rollout, π_old and π_ref of it, then a few GRPO steps so that π_θ moves


def make_batch(cfg, d, log=print):
    path = loading.model_path(cfg.model, d)
    tok = loading.tokenizer(path)
    lm = loading.model(path, d.device)
    policy = logprobs.Policy(lm)
    distributed.seed_everything(cfg.seed)
    train = loading.problems(cfg, "train")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.prompts].tolist()
    problems = [train[i] for i in idx]
    rollout.check_context(lm, tok, [gsm8k.build_prompt(tok, p["question"], cfg.system_prompt) for p in problems],
                          cfg.max_new_tokens)
    rcfg = SimpleNamespace(group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                           top_p=1.0, fast_rollout=False, system_prompt=cfg.system_prompt)
    r = rollout.sample(lm, tok, problems, rcfg, d.device)
    mask = r.completion_mask.double()
    old, entropy = (x.double() for x in logprobs.batched(policy, r, 64, cfg.temperature))
    # π_θ: a few GRPO steps on this batch (β = 0), as the later mini-batches of a training step see it
    optimizer = torch.optim.AdamW(lm.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    R = rollout.rewards(r.texts, r.answers, [(1.0, gsm8k.correctness_reward), (0.1, gsm8k.format_reward)])
    grpo = trainers.load("grpo")
    adv = grpo.group_advantages(R, cfg.group_size).to(d.device)
    for _ in range(cfg.steps):
        with distributed.autocast(d.device):
            logp, _ = policy(r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, cfg.temperature)
            loss, _ = grpo.policy_loss(logp.float(), old.float(), None, adv, r.completion_mask, 0.2, 0.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    new = logprobs.batched(policy, r, 64, cfg.temperature)[0].double()
    log(f"batch: {cfg.prompts} prompt(s) x G={cfg.group_size}, {int(mask.sum())} tokens; after {cfg.steps} GRPO "
        f"step(s) at lr {cfg.lr:g}: mean |log ρ| = {((new - old).abs() * mask).sum().item() / mask.sum().item():.4f}")
    cpu = lambda x: (x * mask).cpu()  # noqa: E731  the trainers' steps run on the CPU, whatever the model's device
    return page_batch(tok, r, [p["question"] for p in problems], cpu(old), cpu(old), cpu(new), cpu(entropy),
                      cfg.group_size, cfg.max_new_tokens, lm.config.vocab_size)


def page_batch(tok, r, questions, old, ref, new, entropy, G, max_new_tokens, vocab_size):
    """The page's batch: the rollout r (its sampler log-probs taken as π_old's: no correction to show), the
    questions of its groups, π_old, π_ref, π_θ and the entropies of its tokens (B, T), on the CPU."""
    r = rollout.Rollout(*(getattr(r, f).cpu() if torch.is_tensor(getattr(r, f)) else getattr(r, f)
                          for f in rollout.Rollout.__dataclass_fields__))
    r.sampler_logp = old.float()
    mask = r.completion_mask.double()
    fmt = torch.tensor([gsm8k.format_reward(t) for t in r.texts], dtype=torch.float32)
    correct = torch.tensor([gsm8k.correctness_reward(t, a) for t, a in zip(r.texts, r.answers)], dtype=torch.float32)
    return SimpleNamespace(tok=tok, rollout=r, questions=questions, texts=r.texts, answers=r.answers,
                           ids=r.completion_ids, mask=mask, lengths=r.lengths, truncated=r.truncated, old=old,
                           ref=ref, new=new, entropy=entropy, fmt=fmt, correct=correct, G=G,
                           max_new_tokens=max_new_tokens, vocab_size=vocab_size,
                           d=distributed.Dist(False, 0, 0, 1, torch.device("cpu"), True))


def shown_rows(b, n):
    """n completions of the first group whose correctness differs (else whose rewards do): distinct texts first,
    right and wrong answers alternating."""
    correct, score = b.correct, b.correct + 0.1 * b.fmt
    groups = range(len(b.texts) // b.G)
    g = next((g for g in groups if correct[g * b.G:(g + 1) * b.G].unique().numel() > 1),
             next((g for g in groups if score[g * b.G:(g + 1) * b.G].unique().numel() > 1), 0))
    rows = list(range(g * b.G, (g + 1) * b.G))
    distinct = [i for i in rows if b.texts[i] not in b.texts[g * b.G:i]]  # a group often repeats a completion
    right, wrong = [i for i in distinct if correct[i] > 0], [i for i in distinct if correct[i] == 0]
    picked = [x for pair in zip(right, wrong) for x in pair] + right[len(wrong):] + wrong[len(right):]
    return (picked + [i for i in rows if i not in picked])[:n]


def check_outputs(cfg):
    """Before the work: the settings the page needs, a writable --out_dir, and Chromium where --png=always asks."""
    if cfg.show > cfg.group_size:
        raise config.UserError(f"--show={cfg.show} is more than one group's --group_size={cfg.group_size}: the page "
                               "shows completions of one prompt; lower --show or raise --group_size")
    if cfg.png == "always" and not explain_page.find_chromium():
        raise config.UserError("--png=always needs headless Chromium, and none was found: apt-get install chromium "
                               "(or set $CHROMIUM), or use --png=auto")
    output.writable_dir(cfg.out_dir, f"--out_dir={cfg.out_dir}")


def write_outputs(cfg, b, rows, results):
    """The page and its numbers, each written whole; then the screenshot where Chromium is found (or asked for)."""
    page, record = explain_page.render(cfg, b, rows, results)
    html, numbers = (os.path.join(cfg.out_dir, f"explain.{ext}") for ext in ("html", "json"))
    fix = "free disk space or pick another --out_dir"
    output.write(html, page, fix)
    output.write(numbers, json.dumps(record), fix)
    print(f"wrote {html} and {numbers}: {len(trainers.TRAINERS)} trainers x {len(rows)} completions")
    png = os.path.join(cfg.out_dir, "explain.png")
    if cfg.png != "none" and explain_page.find_chromium():
        explain_page.screenshot(html, png, explain_page.page_height(b, rows))  # a failing Chromium: one line
        print(f"wrote {png} (headless Chromium)")
    elif cfg.png == "auto":
        print("no PNG: headless Chromium was not found (apt-get install chromium, or set $CHROMIUM)")


def main(argv=None):
    cfg = config.parse(Config, argv, tiny=TINY)
    check_outputs(cfg)
    d = distributed.Dist(False, 0, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"), True)
    b = make_batch(cfg, d)
    rows = shown_rows(b, cfg.show)
    results = {}
    for name in trainers.TRAINERS:
        t, c = token_weights(b, name, cfg.tiny)
        results[name] = (t, token_states(t, b.mask), c)
    write_outputs(cfg, b, rows, results)


if __name__ == "__main__":
    config.run(main)

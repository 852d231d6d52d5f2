"""
explain.py: what each trainer does to each token, as one picture a class can read.

One real rollout batch (a few prompts x G completions), then a few GRPO optimizer steps on it so that the
ratios ρ = π_θ/π_old are no longer 1 (the situation of every mini-batch after a step's first). On the same
tokens, every trainer's per-token gradient weight w_t = -∂loss/∂log π_θ(o_t) comes from the trainer's own
pure functions (its advantages and its loss, imported, never re-written): w > 0 pushes the token up, w < 0
down. The page colours each token by w, one row per trainer, and marks the tokens whose gradient the
ratio's trust region removed (clipped, masked) and those that never had one (filtered, Â = 0, no pair).

    python explain.py --tiny                               # the tiny default, CPU, no downloads
    python explain.py --model=runs/grpo --data_path=/data/gsm8k --max_new_tokens=200

Writes <out> (a self-contained HTML page: no network, no script), <out>.json (every number shown), and a
PNG of the page rendered by headless Chromium when one is installed (Debian: apt-get install chromium).
Walk-through of an example: docs/explain.md
"""
import html
import json
import math
import os
import shutil
import subprocess
from dataclasses import dataclass
from types import SimpleNamespace

import torch

import common
import gsm8k
import cispo, dapo, dppo, dpo, drgrpo, gdpo, gfpo, gmpo, grpo, gspo, gtpo, maxrl, ppo, reinforcepp, rloo, sapo  # noqa: E401


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
    out: str = "runs/explain/explain.html"  # the page; <out>.json beside it holds every number
    png: str = "auto"  # the screenshot: "auto" (beside the page when Chromium is found), a path, or "none"


TINY = dict(model="tiny", data_path="tiny", max_new_tokens=32, system_prompt="", lr=2e-4)

TRAINERS = [grpo, dapo, gspo, sapo, gfpo, gtpo, ppo, dpo, drgrpo, cispo, rloo, maxrl, gmpo, gdpo, dppo, reinforcepp]


# -----------------------------------------------------------------------------
# each trainer's loss on the batch, from its own functions: (c, b, logp, old_logp, beta) -> (loss, Â)
# c: the trainer's Config (its TINY with --tiny); b: the batch; beta replaces c.beta (0: the policy term alone)


def rewards(b, c, correct=gsm8k.correctness_reward):
    return common.compute_rewards(b.texts, b.answers, [(1.0, correct), (c.format_weight, gsm8k.format_reward)])


def loss_grpo(c, b, logp, old, beta):
    adv = grpo.group_advantages(rewards(b, c), b.G)
    return grpo.policy_loss(logp, old, b.ref, adv, b.mask, c.clip_eps, beta)[0], adv


def loss_dapo(c, b, logp, old, beta):
    r = rewards(b, c, dapo.signed_correctness) + dapo.overlong_penalty(b.lengths, b.max_new_tokens, c.overlong_cache)
    keep = dapo.keep_groups(b.correct, b.G)  # the filter on accuracy (eq. 11), as dapo.py's default
    kept = keep.repeat_interleave(b.G).float()                                # dynamic sampling drops the rest
    mask = b.mask * ~b.truncated[:, None] if c.overlong_filter else b.mask
    adv = dapo.group_advantages(r, b.G) * kept
    num_tokens = (mask * kept[:, None]).sum().clamp_min(1)
    return dapo.policy_loss(logp, old, b.ref, adv, mask * kept[:, None], c.clip_eps_low, c.clip_eps_high, beta,
                            num_tokens)[0], adv


def loss_gspo(c, b, logp, old, beta):
    adv = gspo.group_advantages(rewards(b, c), b.G)
    return gspo.policy_loss(logp, old, b.ref, adv, b.mask, c.clip_eps_low, c.clip_eps_high, beta, c.gspo_token)[0], adv


def loss_sapo(c, b, logp, old, beta):
    adv = sapo.group_advantages(rewards(b, c), b.G)
    return sapo.policy_loss(logp, old, b.ref, adv, b.mask, c.tau_pos, c.tau_neg, beta)[0], adv


def loss_gfpo(c, b, logp, old, beta):
    r = rewards(b, c)
    keep = c.keep if c.keep < b.G else b.G // 2  # gfpo.py samples 2k; here G is the page's, so k = G/2
    retained = gfpo.retain_mask(r, b.lengths, keep, b.G, c.filter_metric)
    adv = gfpo.filtered_advantages(r, retained, b.G)
    num_tokens = (b.mask * retained[:, None]).sum().clamp_min(1)
    return gfpo.policy_loss(logp, old, b.ref, adv, b.mask, c.clip_eps, beta, num_tokens)[0], adv


def loss_gtpo(c, b, logp, old, beta):
    adv = gtpo.group_advantages(rewards(b, c), b.G, c.scale_adv)
    lam, _, _ = gtpo.conflict_weights(b.ids, b.mask, adv, b.G, c.conflict_weight)
    seq_ent = (b.entropy * b.mask).sum(1) / b.mask.sum(1)
    h_ini = c.ent_initial if c.ent_initial >= 0 else seq_ent.mean().item()  # this batch is "batch one"
    threshold = gtpo.entropy_threshold(c.ent_rule, c.ent_threshold, h_ini, seq_ent.tolist(), c.ent_percentile)
    adv, _ = gtpo.shaped_advantages(adv, seq_ent, threshold, c.ent_gamma)
    return gtpo.policy_loss(logp, old, b.ref, adv, b.mask, c.clip_eps, beta, lam,
                            (c.gspo_eps_low, c.gspo_eps_high) if c.gspo_token else None)[0], adv[:, None] * lam


def loss_ppo(c, b, logp, old, beta):  # a fresh critic: its head starts at zero, so V_old = 0 on the first step
    token_r, _ = ppo.token_rewards(rewards(b, c), old, b.ref, b.mask, beta)
    adv_raw, _ = ppo.gae(token_r, torch.zeros_like(token_r), b.mask, c.gamma, c.lam)
    adv = ppo.whiten(adv_raw, b.mask, b.d)
    return ppo.policy_loss(logp, old, adv, b.mask, c.clip_eps)[0], adv


def loss_dpo(c, b, logp, old, beta):  # DPO has no π_old; its β is the DPO temperature, not a KL weight
    r = rewards(b, c)
    pairs = dpo.preference_pairs(r, b.G)
    rows = pairs.flatten()
    role = torch.zeros_like(r)
    role[pairs[:, 0]], role[pairs[:, 1]] = 1.0, -1.0                          # +1 chosen, -1 rejected, 0 unused
    if not len(pairs):
        return (logp * 0).sum(), role
    return dpo.dpo_loss(logp[rows], b.ref[rows], b.mask[rows], c.beta, len(pairs))[0], role


def loss_drgrpo(c, b, logp, old, beta):
    adv = drgrpo.group_advantages(rewards(b, c), b.G)
    return drgrpo.policy_loss(logp, old, b.ref, adv, b.mask, c.clip_eps, beta, b.max_new_tokens)[0], adv


def loss_cispo(c, b, logp, old, beta):
    adv = cispo.group_advantages(rewards(b, c), b.G)
    return cispo.policy_loss(logp, old, b.ref, adv, b.mask, c.clip_eps_low, c.clip_eps_high, beta,
                             b.mask.sum())[0], adv


def loss_rloo(c, b, logp, old, beta):
    kl = ((old - b.ref) * b.mask).sum(1)
    adv = rloo.group_advantages(rewards(b, c) - beta * kl, b.G)
    return rloo.policy_loss(logp, old, adv, b.mask, c.clip_eps)[0], adv


def loss_maxrl(c, b, logp, old, beta):
    adv = maxrl.group_advantages(rewards(b, c), b.G)
    return maxrl.policy_loss(logp, old, b.ref, adv, b.mask, c.clip_eps, beta, b.mask.sum())[0], adv


def loss_gmpo(c, b, logp, old, beta):
    adv = gmpo.group_advantages(rewards(b, c), b.G)
    return gmpo.policy_loss(logp, old, b.ref, adv, b.mask, c.clip_eps, beta)[0], adv


def loss_gdpo(c, b, logp, old, beta):
    parts = torch.stack([common.compute_rewards(b.texts, b.answers, [(1.0, fn)])
                         for fn in (gsm8k.correctness_reward, gsm8k.format_reward)])
    adv = gdpo.group_advantages(parts, [1.0, c.format_weight], b.G, b.d)
    return gdpo.policy_loss(logp, old, b.ref, adv, b.mask, c.clip_eps, beta)[0], adv


def loss_dppo(c, b, logp, old, beta):
    adv = dppo.group_advantages(rewards(b, c), b.G)
    delta = c.delta_tv if c.divergence == "tv" else c.delta_kl
    return dppo.policy_loss(logp, old, b.ref, adv, b.mask, c.divergence, delta, beta, b.mask.sum())[0], adv


def loss_reinforcepp(c, b, logp, old, beta):
    kl = (old - b.ref) * b.mask
    adv = reinforcepp.reinforce_advantages(rewards(b, c), kl, b.mask, b.G, beta, c.baseline, b.d)
    return reinforcepp.policy_loss(logp, old, b.ref, adv, b.mask, c.clip_eps, beta if c.baseline else 0.0,
                                   b.mask.sum())[0], adv


LOSSES = {m.__name__: globals()[f"loss_{m.__name__}"] for m in TRAINERS}


def trainer_config(module, tiny):
    """The trainer's own Config, with its TINY settings when --tiny (what `python <trainer>.py --tiny` runs)."""
    return module.Config(**(module.TINY if tiny else {}))


def token_weights(b, name, c):
    """{w, pg, w_on, pg_on, adv}: -∂loss/∂log π_θ (B, T) for the trainer's β and for β = 0 (its policy term
    alone), at the batch's ratios and on-policy (π_old := π_θ, ρ = 1), and its advantages; float64."""
    out = {}
    for key, on_policy, beta in (("w", False, None), ("pg", False, 0.0), ("w_on", True, None), ("pg_on", True, 0.0)):
        leaf = b.new.clone().requires_grad_(True)
        old = b.new if on_policy else b.old
        loss, adv = LOSSES[name](c, b, leaf, old, c.beta if beta is None else beta)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name}: the loss is {loss.item()} on this batch")
        grad, = torch.autograd.grad(loss, leaf, allow_unused=True)
        out[key] = (-grad if grad is not None else torch.zeros_like(leaf)) * b.mask
        out.setdefault("adv", adv.detach())
    return out


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
    path = common.model_path(cfg.model, d)
    tok = common.load_tokenizer(path)
    lm = common.load_model(path, d.device)
    policy = common.Policy(lm)
    common.seed_everything(cfg.seed)
    train = common.load_problems(cfg, "train")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.prompts].tolist()
    problems = [train[i] for i in idx]
    common.check_context(lm, tok, [gsm8k.build_prompt(tok, p["question"], cfg.system_prompt) for p in problems],
                         cfg.max_new_tokens)
    rcfg = SimpleNamespace(group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                           top_p=1.0, fast_rollout=False, system_prompt=cfg.system_prompt)
    r = common.rollout(lm, tok, problems, rcfg, d.device)
    mask = r.completion_mask.double()
    old, entropy = (x.double() for x in common.batched_logprobs(policy, r, 64, cfg.temperature))
    # π_θ: a few GRPO steps on this batch (β = 0), as the later mini-batches of a training step see it
    optimizer = torch.optim.AdamW(lm.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    R = common.compute_rewards(r.texts, r.answers, [(1.0, gsm8k.correctness_reward), (0.1, gsm8k.format_reward)])
    adv = grpo.group_advantages(R, cfg.group_size).to(d.device)
    for _ in range(cfg.steps):
        with common.autocast(d.device):
            logp, _ = policy(r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, cfg.temperature)
            loss, _ = grpo.policy_loss(logp.float(), old.float(), None, adv, r.completion_mask, 0.2, 0.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    new = common.batched_logprobs(policy, r, 64, cfg.temperature)[0].double()
    fmt = torch.tensor([gsm8k.format_reward(t) for t in r.texts], dtype=torch.float32)
    correct = torch.tensor([gsm8k.correctness_reward(t, a) for t, a in zip(r.texts, r.answers)], dtype=torch.float32)
    log(f"batch: {cfg.prompts} prompt(s) x G={cfg.group_size}, {int(mask.sum())} tokens; after {cfg.steps} GRPO "
        f"step(s) at lr {cfg.lr:g}: mean |log ρ| = {((new - old).abs() * mask).sum().item() / mask.sum().item():.4f}")
    cpu = lambda x: (x * mask).cpu()  # noqa: E731  the losses run on the CPU in float64, whatever the model's device
    return SimpleNamespace(tok=tok, texts=r.texts, answers=r.answers, ids=r.completion_ids.cpu(), mask=mask.cpu(),
                           lengths=r.lengths.cpu(), truncated=r.truncated.cpu(), old=cpu(old), ref=cpu(old),
                           new=cpu(new), entropy=cpu(entropy), fmt=fmt, correct=correct, G=cfg.group_size,
                           max_new_tokens=cfg.max_new_tokens, d=common.Dist(False, 0, 0, 1, torch.device("cpu"), True))


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


# -----------------------------------------------------------------------------
# the page


CSS = """
body { font: 14px/1.35 system-ui, sans-serif; margin: 16px 24px; color: #222; max-width: 1500px; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 15px; margin: 18px 0 4px; }
p.meta { color: #555; margin: 2px 0 8px; }
.legend span.sw { display: inline-block; width: 180px; height: 12px; vertical-align: middle;
  background: linear-gradient(to right, rgb(178,24,43), #fff, rgb(33,102,172)); border: 1px solid #999; }
.legend .tok { margin: 0 4px; }
table.summary { border-collapse: collapse; margin: 6px 0 10px; font-size: 12.5px; }
table.summary td, table.summary th { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
table.summary td:first-child, table.summary th:first-child { text-align: left; }
.text { font: 12.5px/1.3 ui-monospace, monospace; background: #f6f6f6; padding: 4px 6px; white-space: pre-wrap; }
.row { display: flex; align-items: flex-start; font: 12.5px/1.5 ui-monospace, monospace; border-top: 1px solid #eee; }
.row .name { flex: 0 0 150px; font: 12px/1.6 system-ui, sans-serif; color: #333; }
.row .toks { flex: 1; white-space: pre-wrap; }
.tok { border-radius: 2px; padding: 0 1px; }
.tok.clipped { outline: 1.5px dashed #000; outline-offset: -1px; }
.tok.idle { color: #aaa; }
"""


def colour(w, scale):
    """Diverging: blue pushes the token up, red down; white for 0 (scale: the trainer's largest |w| shown)."""
    a = 0.0 if scale == 0 else min(1.0, abs(w) / scale)
    r, g, bl = (33, 102, 172) if w > 0 else (178, 24, 43)
    mix = lambda c: round(255 + (c - 255) * a)  # noqa: E731
    return f"rgb({mix(r)},{mix(g)},{mix(bl)})"


def render(cfg, b, rows, results):
    """The HTML page (a string) and the JSON record of every number it shows."""
    tok = b.tok
    esc = lambda s: html.escape(s, quote=True)  # noqa: E731
    record = {"model": cfg.model, "steps": cfg.steps, "lr": cfg.lr, "group_size": b.G, "rows": rows,
              "log_rho": [((b.new - b.old) * b.mask)[i, :int(b.lengths[i])].tolist() for i in rows], "trainers": {}}
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>explain: per-token gradient weights</title>"
           f"<style>{CSS}</style></head><body>",
           "<h1>What each trainer does to each token</h1>",
           f"<p class='meta'>model {esc(cfg.model)}; {len(b.texts) // b.G} prompt(s) x G = {b.G}; π_θ after "
           f"{cfg.steps} GRPO step(s) at lr {cfg.lr:g} on this batch (π_old = π_ref = the model before them). "
           "Each token is coloured by w = −∂loss/∂log π_θ(o_t) from the trainer's own loss function: "
           "blue pushes it up, red down, each row scaled to its trainer's largest |w| on the page "
           "(hover a token for the numbers).</p>",
           "<p class='legend'>push down <span class='sw'></span> push up &nbsp; "
           "<span class='tok clipped'>clipped</span> the ratio's trust region removed its gradient &nbsp; "
           "<span class='tok idle'>grey</span> no gradient even at ρ = 1 (filtered, Â = 0, not in a pair)</p>",
           "<table class='summary'><tr><th>trainer</th><th>Σ|w| per completion shown</th>"
           "<th>share of the ρ = 1 weight the trust region removed</th><th>tokens clipped</th>"
           "<th>tokens without gradient</th></tr>"]
    m = b.mask.bool()
    for name, (t, states, c) in results.items():
        per_row = [float(t["w"][i].abs().sum()) for i in rows]
        on = float(t["pg_on"].abs().sum())
        removed = float((t["pg_on"].abs() * (states == 1)).sum()) / on if on > 0 else 0.0
        record["trainers"][name] = {
            "sum_abs_w": per_row, "removed": removed, "clipped": int((states == 1).sum()),
            "idle": int((states == 2).sum()), "tokens": int(m.sum()),
            "adv": [t["adv"][i, :int(b.lengths[i])].tolist() if t["adv"].dim() > 1 else float(t["adv"][i])
                    for i in rows], "num_tokens": int(m.sum()),
            "w": [t["w"][i, :int(b.lengths[i])].tolist() for i in rows],
            "state": [states[i, :int(b.lengths[i])].tolist() for i in rows]}
        out.append(f"<tr data-trainer='{name}'><td><a href='#{name}'>{name}</a></td>"
                   f"<td>{', '.join(f'{x:.3g}' for x in per_row)}</td><td>{removed:.1%}</td>"
                   f"<td>{int((states == 1).sum())} / {int(m.sum())}</td><td>{int((states == 2).sum())}</td></tr>")
    out.append("</table>")
    log_rho = (b.new - b.old) * b.mask
    for k, i in enumerate(rows):
        n = int(b.lengths[i])
        correct = gsm8k.correctness_reward(b.texts[i], b.answers[i])
        s_i = math.exp(float(log_rho[i].sum()) / max(n, 1))
        out.append(f"<section class='completion' data-row='{i}'><h2>completion {k + 1} of {len(rows)} "
                   f"(row {i}): {'right' if correct else 'wrong'} answer, format {float(b.fmt[i]):.0f}, {n} tokens, "
                   f"sequence ratio exp(mean log ρ) = {s_i:.4f}</h2>")
        out.append(f"<div class='text'>{esc(b.texts[i])}</div>")
        pieces = [tok.decode([int(x)]) for x in b.ids[i, :n]]
        for name, (t, states, c) in results.items():
            scale = float(t["w"][rows].abs().max())
            adv = t["adv"][i]
            spans = []
            for j, text in enumerate(pieces):
                w, st = float(t["w"][i, j]), int(states[i, j])
                a = float(adv[j]) if adv.dim() else float(adv)
                cls = "tok" + ["", " clipped", " idle"][st]
                tip = (f"{name} | token {j}: {text!r} | w = {w:.4g} | ρ = {math.exp(float(log_rho[i, j])):.4f} | "
                       f"{'role' if name == 'dpo' else 'Â'} = {a:.4g}" + ["", " | clipped", " | no gradient"][st])
                shown = text.replace("\n", "↵")  # one flowing line per trainer; the text block above keeps them
                spans.append(f"<span class='{cls}' data-w='{w:.9g}' data-state='{st}' title='{esc(tip)}' "
                             f"style='background:{colour(w, scale)}'>{esc(shown)}</span>")
            out.append(f"<div class='row' id='{name}' data-trainer='{name}' data-row='{i}'><span class='name'>"
                       f"{name}</span><span class='toks'>{''.join(spans)}</span></div>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out), record


def page_height(b, rows, chars_per_line=150):
    """Pixels the page needs at 1500 px wide (a headless screenshot shows the window only): a generous estimate."""
    h = 240 + 24 * len(TRAINERS)                                              # title, legend, summary table
    for i in rows:
        text = b.texts[i]
        chars = len(text.replace("\n", "")) + text.count("\n") + 12
        h += 60 + 18 * (text.count("\n") + 1 + len(text) // chars_per_line)  # heading and the text block
        h += len(TRAINERS) * (21 * math.ceil(chars / chars_per_line) + 2)    # one flowing row per trainer
    return h


def find_chromium():
    """A headless-capable Chromium on PATH (or $CHROMIUM), else None."""
    for name in (os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome", "chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def chromium(args, timeout=120):
    """Run headless Chromium with `args`; its stdout. Raises RuntimeError with its stderr's last line on failure."""
    exe = find_chromium()
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--disable-dev-shm-usage", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:2])} exited {p.returncode}: {(p.stderr.strip().splitlines() or [''])[-1]}")
    return p.stdout


def screenshot(page, png, height):
    chromium([f"--screenshot={os.path.abspath(png)}", f"--window-size=1500,{height}",
              "file://" + os.path.abspath(page)])
    if not os.path.isfile(png):
        raise RuntimeError(f"Chromium wrote no screenshot to {png}")


def main(argv=None):
    cfg = common.parse_config(Config, argv, tiny=TINY)
    if cfg.show > cfg.group_size:
        raise common.UserError(f"--show={cfg.show} is more than one group's --group_size={cfg.group_size}: the page "
                               "shows completions of one prompt; lower --show or raise --group_size")
    if cfg.png not in ("auto", "none") and not cfg.png.endswith(".png"):
        raise common.UserError(f"--png={cfg.png!r}: give a path ending in .png, auto, or none")
    if cfg.png.endswith(".png") and not find_chromium():
        raise common.UserError("--png needs headless Chromium, and none was found: apt-get install chromium "
                               "(or set $CHROMIUM), or use --png=auto")
    out_dir = os.path.dirname(os.path.abspath(cfg.out))
    os.makedirs(out_dir, exist_ok=True)
    d = common.Dist(False, 0, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"), True)
    b = make_batch(cfg, d)
    rows = shown_rows(b, cfg.show)
    results = {}
    for module in TRAINERS:
        c = trainer_config(module, cfg.tiny)
        t = token_weights(b, module.__name__, c)
        results[module.__name__] = (t, token_states(t, b.mask), c)
    page, record = render(cfg, b, rows, results)
    with open(cfg.out, "w", encoding="utf-8") as f:
        f.write(page)
    with open(cfg.out + ".json", "w") as f:
        json.dump(record, f)
    print(f"wrote {cfg.out} and {cfg.out}.json: {len(TRAINERS)} trainers x {len(rows)} completions")
    png = os.path.splitext(cfg.out)[0] + ".png" if cfg.png == "auto" else cfg.png
    if cfg.png != "none" and find_chromium():
        screenshot(cfg.out, png, page_height(b, rows))
        print(f"wrote {png} (headless Chromium)")
    elif cfg.png == "auto":
        print("no PNG: headless Chromium was not found (apt-get install chromium, or set $CHROMIUM)")


if __name__ == "__main__":
    common.run(main)

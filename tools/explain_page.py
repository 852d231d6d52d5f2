"""
explain_page.py: the page tools/explain.py writes, and its picture: every trainer's gradient weight on each token
of a few completions, one row per trainer, self-contained (no network, no script).

    render          the HTML page (a string) and the JSON record of every number it shows
    colour          a weight's colour: blue pushes the token up, red down, white for 0
    CSS             the page's style
    page_height     the pixels the page needs at 1500 px wide, for the screenshot
    find_chromium, chromium, screenshot   headless Chromium: found on PATH or $CHROMIUM, run (within TIMEOUT
                    seconds; a failure is one line), and the PNG it takes
"""
import contextlib
import html
import math
import os
import shutil
import signal
import subprocess

from grpo_family import config, gsm8k
from tools import trainers

TIMEOUT = 120  # seconds headless Chromium may take (a page of 16 rows renders in a few)
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # a PNG's last chunk: a file cut short lacks it


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
    h = 240 + 24 * len(trainers.TRAINERS)                                              # title, legend, summary table
    for i in rows:
        text = b.texts[i]
        chars = len(text.replace("\n", "")) + text.count("\n") + 12
        h += 60 + 18 * (text.count("\n") + 1 + len(text) // chars_per_line)  # heading and the text block
        h += len(trainers.TRAINERS) * (21 * math.ceil(chars / chars_per_line) + 2)    # one flowing row per trainer
    return h


def find_chromium():
    """A headless-capable Chromium on PATH (or $CHROMIUM), else None."""
    for name in (os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome", "chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def chromium(args, timeout=None):
    """Run headless Chromium with `args`; its stdout. A Chromium that cannot start, fails, or runs past `timeout`
    seconds (TIMEOUT; its whole process group then killed) is a UserError of one line."""
    exe, timeout = find_chromium(), timeout or TIMEOUT
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--disable-dev-shm-usage", *args]
    fix = "install a working one (apt-get install chromium) or point $CHROMIUM at it, or pass --png=none"
    try:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                             start_new_session=True)  # its own process group: a hang is killed with its helpers
    except OSError as e:
        raise config.UserError(f"cannot run headless Chromium {exe}: {e.strerror or e}; {fix}") from None
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        p.stdout.close()
        p.stderr.close()
        raise config.UserError(f"headless Chromium {exe} did not finish within {timeout} s; {fix}") from None
    if p.returncode != 0:
        last = (err.strip().splitlines() or ["no message"])[-1]
        raise config.UserError(f"headless Chromium {exe} exited {p.returncode} ({last}); {fix}")
    return out


def screenshot(page, png, height):
    """The page rendered by headless Chromium into `png` at 1500 x height pixels, kept only when whole (Chromium
    exits 0 after a full disk cut its file short); a UserError otherwise."""
    tmp = os.path.splitext(png)[0] + ".partial.png"
    try:
        chromium([f"--screenshot={os.path.abspath(tmp)}", f"--window-size=1500,{height}",
                  "file://" + os.path.abspath(page)])
        with open(tmp, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - len(PNG_END)))
            whole = f.read() == PNG_END
        if not whole:
            raise OSError(f"{tmp} ends before the image does")
        os.replace(tmp, png)
    except OSError as e:
        raise config.UserError(f"headless Chromium wrote no whole screenshot to {png} ({e.strerror or e}): free "
                               "disk space, or pass --png=none") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)

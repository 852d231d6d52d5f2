"""tools/explain.py: the weights it shows are each trainer's gradient, read off the trainer's own step (its main()
run once on the page's batch: finite differences of the loss that step computes agree), the picture follows a change
to a trainer's loss or loop with no change to explain.py, the token states mean what the legend says, and the page,
rendered by headless Chromium as a reader's browser would, shows one row per trainer with the numbers explain.py
computed (CISPO's checked against its closed form). The browser test skips without Chromium, except in CI
(.ci/run installs it and requires it)."""
import errno
import json
import os
import struct
import time
from html.parser import HTMLParser

import pytest
import torch

from helpers import F64, cli_error
from grpo_family import rollout
from tools import explain, explain_page, output, trainers

G, T = 4, 5


def synthetic_batch(seed=0):
    """3 groups of G = 4: right/wrong answers with and without the '####' format (group 3 all wrong: Â = 0),
    ragged lengths, ratios that cross every trust region, shared token runs for GTPO's conflicts; each row its own
    one-token prompt, so that explain finds every row by its tokens."""
    g = torch.Generator().manual_seed(seed)
    texts = ["#### 9", "#### 8", "The answer is 9", "#### 9",
             "#### 5", "#### 4", "#### 5", "no idea",
             "#### 1", "#### 2", "#### 2", "#### 3"]
    answers = ["#### 9"] * 4 + ["#### 5"] * 4 + ["#### 7"] * 4
    lengths = torch.tensor([5, 3, 4, 2, 5, 5, 1, 4, 3, 2, 5, 4])
    mask = (torch.arange(T)[None] < lengths[:, None]).to(F64)
    old = -torch.rand(12, T, generator=g, dtype=F64) * 2 * mask
    new = (old + torch.randn(12, T, generator=g, dtype=F64) * 0.3) * mask
    ref = (old + torch.randn(12, T, generator=g, dtype=F64) * 0.1) * mask
    ids = (1 + torch.randint(0, 3, (12, T), generator=g)) * mask.long()               # 0 is the pad
    r = rollout.Rollout(prompt_ids=100 + torch.arange(12)[:, None], prompt_mask=torch.ones(12, 1, dtype=torch.long),
                        completion_ids=ids, completion_mask=mask.long(), lengths=lengths, truncated=lengths == T,
                        texts=texts, pad_id=0, answers=answers)
    entropy = torch.rand(12, T, generator=g, dtype=F64) * mask
    return explain.page_batch(None, r, ["q1", "q2", "q3"], old, ref, new, entropy, G, T, vocab_size=128)


@pytest.fixture(scope="module")
def batch():
    return synthetic_batch()


def objective(b, name, new, kl=True):
    """The loss the trainer's own step computes on the batch, with log π_θ = new."""
    moved = explain.page_batch(None, b.rollout, b.questions, b.old, b.ref, new, b.entropy, b.G, b.max_new_tokens,
                               b.vocab_size)
    return explain.run_trainer(name, moved, True, False, kl)[0].objective


@pytest.mark.parametrize("name", trainers.TRAINERS)
def test_shown_weights_are_the_gradient_of_the_trainer_s_own_loss(batch, name):
    """w = -∂loss/∂log π_θ against central differences of the loss the trainer's step computes (in its float32),
    along three random directions over every token: <w, v> = -(L(new + h v) - L(new - h v)) / 2h."""
    t, c = explain.token_weights(batch, name)
    assert (t["w"] * (1 - batch.mask)).abs().sum() == 0 and t["w"].abs().sum() > 0
    if name == "cispo":  # its IS weight is a stop-gradient, so the loss value's slope is not its gradient:
        ratio, adv = torch.exp(batch.new - batch.old), t["adv"][:, None]  # the closed form instead (β = 0)
        want = torch.clamp(ratio, max=1 + c.clip_eps_high) * adv / batch.mask.sum() * batch.mask
        torch.testing.assert_close(t["w"], want, atol=1e-8, rtol=1e-6)
        return
    h, g = 1e-3, torch.Generator().manual_seed(1)
    for key, kl in (("w", True), ("pg", False)):
        for _ in range(3):
            v = torch.randn(batch.new.shape, generator=g, dtype=F64) * batch.mask
            up, down = objective(batch, name, batch.new + h * v, kl), objective(batch, name, batch.new - h * v, kl)
            fd = -(up - down) / (2 * h)
            assert (t[key] * v).sum().item() == pytest.approx(fd, rel=2e-3, abs=2e-4), (key, name)


def test_the_picture_follows_a_change_to_a_trainer_s_loss_and_loop(batch, monkeypatch):
    """explain.py re-writes nothing of a trainer: change grpo.py's loss or dapo.py's filter and the weights it shows
    change with them, with no edit to explain.py."""
    grpo, dapo = trainers.load("grpo"), trainers.load("dapo")
    before = explain.token_weights(batch, "grpo")[0]["w"]
    loss = grpo.policy_loss
    monkeypatch.setattr(grpo, "policy_loss", lambda *a, **k: (lambda out: (3 * out[0], out[1]))(loss(*a, **k)))
    torch.testing.assert_close(explain.token_weights(batch, "grpo")[0]["w"], 3 * before)
    filtered = explain.token_weights(batch, "dapo")[0]
    assert (explain.token_states(filtered, batch.mask)[8:] == 2 * batch.mask[8:]).all()  # group 3 all wrong: dropped
    monkeypatch.setattr(dapo, "keep_groups", lambda metric, group_size: torch.ones(len(metric) // group_size).bool())
    kept = explain.token_weights(batch, "dapo")[0]
    assert not torch.equal(kept["w"], filtered["w"])  # the token mean now counts group 3's tokens too


def test_states_mean_what_the_legend_says(batch):
    t, c = explain.token_weights(batch, "grpo")
    states = explain.token_states(t, batch.mask)
    adv, ratio = t["adv"], torch.exp(batch.new - batch.old)
    clipped = ((adv[:, None] > 0) & (ratio > 1.2)) | ((adv[:, None] < 0) & (ratio < 0.8))
    real = batch.mask.bool()
    assert torch.equal(states[8:] == 2, real[8:])  # the all-wrong group: Â = 0, no gradient even at ρ = 1
    assert torch.equal((states == 1)[:8], (clipped & real)[:8]) and (states == 1).sum() >= 3
    assert torch.equal(states[~real], torch.zeros(int((~real).sum()), dtype=torch.long))
    # SAPO's gate and CISPO's capped weight never remove a gradient; GSPO's sequence clip removes whole rows
    for name in ("sapo", "cispo"):
        assert (explain.token_states(explain.token_weights(batch, name)[0], batch.mask) == 1).sum() == 0
    s = explain.token_states(explain.token_weights(batch, "gspo")[0], batch.mask)
    assert all(len(set(s[i, :int(batch.lengths[i])].tolist())) == 1 for i in range(12))


# -----------------------------------------------------------------------------
# the command and the page, as a browser renders it


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    out = tmp_path_factory.mktemp("explain")
    explain.main(["--tiny", f"--out_dir={out}", "--png=none"])
    assert sorted(os.listdir(out)) == ["explain.html", "explain.json"]
    return out / "explain.html", json.load(open(out / "explain.json"))


class Rows(HTMLParser):
    """The page's trainer rows: [(trainer, data-row, [(data-w, data-state, text)])]."""

    def __init__(self):
        super().__init__()
        self.rows, self.span = [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and "row" in a.get("class", "").split():
            self.rows.append((a["data-trainer"], int(a["data-row"]), []))
        elif tag == "span" and "tok" in a.get("class", "").split() and self.rows and "data-w" in a:
            self.span = [float(a["data-w"]), int(a["data-state"]), ""]
            self.rows[-1][2].append(self.span)

    def handle_data(self, data):
        if self.span is not None:
            self.span[2] += data

    def handle_endtag(self, tag):
        if tag == "span":
            self.span = None


def check_rows(html_text, record):
    parser = Rows()
    parser.feed(html_text)
    names = trainers.TRAINERS
    assert [(n, r) for n, r, _ in parser.rows] == [(n, r) for r in record["rows"] for n in names]
    for name, row, spans in parser.rows:
        k = record["rows"].index(row)
        want = record["trainers"][name]
        assert [w for w, _, _ in spans] == pytest.approx(want["w"][k], rel=1e-8, abs=1e-15), (name, row)
        assert [s for _, s, _ in spans] == want["state"][k]
        assert all(text for _, _, text in spans)
    # CISPO in closed form: w_t = min(ρ_t, 1 + ε_high) Â_i / (tokens of the batch), β = 0, no token loses it
    cis = record["trainers"]["cispo"]
    for k, log_rho in enumerate(record["log_rho"]):
        want = [min(torch.tensor(x, dtype=F64).exp().item(), 1.28) * cis["adv"][k] / cis["num_tokens"] for x in log_rho]
        assert cis["w"][k] == pytest.approx(want, rel=1e-6, abs=1e-9)  # the trainer computes in float32
    return parser.rows


def test_the_command_writes_the_page_and_its_numbers(page):
    out, record = page
    assert len(record["trainers"]) == 16 and len(record["rows"]) == 4
    text = open(out, encoding="utf-8").read()
    assert "<script" not in text and "http://" not in text and "https://" not in text  # self-contained
    rows = check_rows(text, record)
    grpo_w = [w for name, _, spans in rows if name == "grpo" for w, _, _ in spans]
    assert min(grpo_w) < 0 < max(grpo_w)  # right answers pushed up, wrong ones down
    assert record["trainers"]["gspo"]["removed"] > 0.5  # GSPO's 4e-4 region is left after two steps at lr 2e-4


@pytest.mark.slow
def test_a_browser_renders_the_page(page, tmp_path):
    if not explain_page.find_chromium():
        if os.environ.get("EXPLAIN_BROWSER_REQUIRED"):
            pytest.fail("EXPLAIN_BROWSER_REQUIRED is set but no Chromium was found (apt-get install chromium)")
        pytest.skip("no headless Chromium (apt-get install chromium)")
    out, record = page
    dom = explain_page.chromium(["--dump-dom", "file://" + os.path.abspath(out)])  # the DOM after the browser parsed it
    check_rows(dom, record)
    png = tmp_path / "page.png"
    explain_page.screenshot(str(out), str(png), 1200)
    head = open(png, "rb").read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24]) == (1500, 1200)
    assert os.path.getsize(png) > 20_000  # a rendered page, not a blank one


@pytest.mark.parametrize("argv,words", [
    (["--show=9"], "--show=9 is more than one group's --group_size=8"),
    (["--png=page.png"], "--png='page.png' is out of range"),
    (["--prompts=1", "--group_size=4", "--show=1", "--steps=1", "--png=none"],  # no group DAPO keeps: explain's fix
     "dapo: dynamic sampling: 0 of batch_prompts=1 groups kept after 10 prompts in max_sampling_rounds=10: nearly "
     "all groups are all right or all wrong; on this page's batch: try another --seed or more --prompts")])
def test_bad_settings_are_one_line(argv, words, tmp_path, capsys, monkeypatch):
    assert words in cli_error(explain, ["--tiny", f"--out_dir={tmp_path}", *argv], capsys, monkeypatch)


SMALL = ["--tiny", "--prompts=2", "--group_size=4", "--show=1", "--steps=1"]  # a page in about 2 s


def test_an_out_dir_that_cannot_be_written_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    """A file, a file on the way, a read-only disk (emulated: a root user writes through permissions): refused
    before the rollout, in one line naming --out_dir."""
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(explain, "make_batch", lambda *a: pytest.fail("the work started"))
    for where, words in [(tmp_path / "file", "is a file, not a folder"),
                         (tmp_path / "file" / "sub", "is not a writable folder (Not a directory)")]:
        assert f"--out_dir={where} {words}" in cli_error(explain, [*SMALL, f"--out_dir={where}"], capsys, monkeypatch)

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(output.tempfile, "TemporaryFile", read_only)
    line = cli_error(explain, [*SMALL, f"--out_dir={tmp_path}/ro"], capsys, monkeypatch)
    assert "is not a writable folder (Read-only file system): pick another" in line


def test_a_full_disk_or_a_folder_in_the_way_is_one_line_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    (tmp_path / "dir" / "explain.html").mkdir(parents=True)  # a folder where the page goes
    line = cli_error(explain, [*SMALL, f"--out_dir={tmp_path / 'dir'}", "--png=none"], capsys, monkeypatch)
    assert f"cannot write {tmp_path / 'dir' / 'explain.html'}: Is a directory" in line
    real_open = open

    class FullDisk:  # a file whose bytes never fit: what a write on a full disk raises (emulated)
        def __init__(self, path, *a, **k):
            self.f = real_open(path, *a, **k)

        def write(self, text):
            self.f.write(text[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
    monkeypatch.setattr(output, "open", FullDisk, raising=False)
    line = cli_error(explain, [*SMALL, f"--out_dir={tmp_path / 'full'}", "--png=none"], capsys, monkeypatch)
    assert f"cannot write {tmp_path / 'full' / 'explain.html'}: No space left on device; free disk space" in line
    assert os.listdir(tmp_path / "full") == []


CUT_PNG = "for a; do case $a in --screenshot=*) printf '\\211PNG' > \"${a#--screenshot=}\";; esac; done"


@pytest.mark.parametrize("script,words", [
    ("echo 'cannot open display' >&2; exit 3", "{fake} exited 3 (cannot open display); install a working one"),
    ("sleep 60", "{fake} did not finish within 1 s; install a working one"),
    (CUT_PNG, "wrote no whole screenshot to {out}/explain.png ({out}/explain.partial.png ends before the image")])
def test_a_failing_or_hanging_chromium_is_one_line(script, words, tmp_path, capsys, monkeypatch):
    """A $CHROMIUM that fails, hangs (killed at TIMEOUT), or exits 0 with its PNG cut short (as on a full disk): one
    line after the page and its numbers are written, and no partial PNG left."""
    fake, out = tmp_path / "chromium", tmp_path / "out"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CHROMIUM", str(fake))
    monkeypatch.setattr(explain_page, "TIMEOUT", 1)
    t0 = time.time()
    line = cli_error(explain, [*SMALL, f"--out_dir={out}"], capsys, monkeypatch)
    assert "headless Chromium " + words.format(fake=fake, out=out) in line and "--png=none" in line, line
    assert time.time() - t0 < 30 and sorted(os.listdir(out)) == ["explain.html", "explain.json"]

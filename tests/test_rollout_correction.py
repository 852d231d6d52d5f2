"""Rollout correction (rollout.correction_weights, rollout_correction, reweight) against the spec's vectors
(ALGORITHMS.md section 11.8, produced by running TRL's and verl's own functions) and an independent weighted loss
with finite differences; the sampler's log-probs of both decoding paths against Hugging Face's own warpers; the
mismatch of a bf16 decoder on the CPU; and what a run logs, refuses and inherits."""
import json
import math
import os

import pytest
import torch

from grpo_family import decoder, gsm8k, loading, logprobs, rollout, tiny
import dapo
import dpo
import grpo
from helpers import F64, ROOT, assert_finite_differences, cli_error, run_main, toy11, value_and_dj
from tools import trainers

CPU = torch.device("cpu")
EPS = 0.2


def weighted_loss(new, old, mask, A, w):
    """The spec's loss, written independently: Σ_t w_t · -min(ρ_t Â, clip(ρ_t) Â) / Σ|o| (token-mean, ε = 0.2)."""
    ratio = torch.exp(new - old)
    per_token = torch.min(ratio * A[:, None], ratio.clamp(1 - EPS, 1 + EPS) * A[:, None])
    return -(w * per_token * mask).sum() / mask.sum()


def corrected(mode, rc_min, rc_max):
    """(loss value of the weighted loss, dJ through rollout.reweight, w, toy) for one mode on section 11's toy."""
    new, old, _, mu, mask, _, A = toy11()
    w = rollout.correction_weights(old - mu, mask, mode, rc_min, rc_max) if mode != "none" else torch.ones_like(new)
    logp = rollout.reweight(new, None if mode == "none" else w, slice(None))
    loss, _ = dapo.policy_loss(logp, old, None, A, mask, EPS, EPS, 0.0, mask.sum())  # TRL "dapo" = verl token-mean
    _, dj = value_and_dj(loss, new)
    return weighted_loss(new.detach(), old, mask, A, w).item(), dj, w, (new, old, mask, A)


def rows(dj, lengths=(3, 4, 2, 4)):
    return [dj[i, :n].tolist() for i, n in enumerate(lengths)]


NONE = [[0, 0.0629793, 0], [0, -0.0425066, 0, -0.0425066], [-0.0850131, 0], [0.0404335, 0.0233281, 0.0404335, 0.0425066]]
TRUNC3 = [[0, 0.056986, 0], [0, -0.0314896, 0, -0.0425066], [-0.255039, 0], [0.0384615, 0.010482, 0.0425066, 0.046977]]
# mode, rc_min, rc_max, the spec's loss, its dJ per completion (None: the spec gives the loss only)
SPEC = [("none", 0, 1, -0.101193, NONE),
        ("seq_mask", 0.0, 3.0, -0.0782535,  # TRL's default sequence_mask, clip_max 3, no lower bound
         [[0, 0.056986, 0], [0, -0.0634124, 0, -0.0634124], [0, 0], [0.0200787, 0.0115844, 0.0200787, 0.0211081]]),
        ("token_tis", 0, 3.0, 0.109789, TRUNC3),  # TRL token_truncate
        ("token_tis", 0, 2.0, 0.0178364, [TRUNC3[0], TRUNC3[1], [-0.170026, 0], TRUNC3[3]]),  # verl token TIS
        ("seq_tis", 0, 2.0, 0.21485, None),  # verl sequence TIS
        ("token_mask", 0.5, 5.0, 0.17717,  # IcePop: TRL token_mask = verl "0.5_5.0" = OpenRLHF icepop
         [TRUNC3[0], TRUNC3[1], [-0.311938, 0], [0.0384615, 0, 0.0425066, 0.046977]]),
        ("seq_geo_mask", 0.9, 1.5, -0.077513,  # section 12.4: AReaL's geometric-mean rejection, o3 and o4 dropped
         [[0, 0.0609146, 0], [0, -0.046977, 0, -0.046977], [0, 0], [0, 0, 0, 0]])]


@pytest.mark.parametrize("mode,rc_min,rc_max,loss,dj", SPEC, ids=[f"{s[0]}-{s[2]}" for s in SPEC])
def test_weights_match_trl_and_verl(mode, rc_min, rc_max, loss, dj):
    value, got, w, (new, old, mask, A) = corrected(mode, rc_min, rc_max)
    assert value == pytest.approx(loss, abs=1e-6)
    if dj is not None:
        for g, want in zip(rows(got), dj):
            assert g == pytest.approx(want, abs=1e-6)
    # the independent computation: finite differences of the weighted loss (w fixed, as it is detached)
    ragged = [new[i, :n].tolist() for i, n in enumerate((3, 4, 2, 4))]

    def objective(rs):
        x = torch.tensor([r + [0.0] * (4 - len(r)) for r in rs], dtype=F64)
        return -weighted_loss(x, old, mask, A, w).item()
    assert_finite_differences(got, ragged, objective, jump=1.0)


def test_seq_mask_weights_are_trl_s():
    _, _, w, (_, _, mask, _) = corrected("seq_mask", 0.0, 3.0)
    assert w[:, 0].tolist() == pytest.approx([0.904837, 1.49182, 0, 0.496585], abs=5e-6)  # 6 digits
    assert torch.equal(w * mask, w[:, :1] * mask)  # one weight for every token of a completion
    _, _, w, _ = corrected("token_mask", 0.5, 5.0)
    assert w[2, 0].item() == pytest.approx(3.6693, abs=1e-4) and w[3, 1].item() == 0  # ρ = 0.449 < 0.5


def test_seq_geo_mask_tests_the_geometric_mean_and_weighs_by_it():
    _, _, w, (_, _, mask, _) = corrected("seq_geo_mask", 0.0, 10.0)
    assert w[:, 0].tolist() == pytest.approx([0.967216, 1.10517, 1.96403, 0.839457], abs=5e-6)  # section 12.4's g
    assert torch.equal(w * mask, w[:, :1] * mask)  # one weight for every token of a completion
    # ρ_t = 1.05 on every token: the product drops the 100-token completion (1.05^100 = 131 > 2), the mean keeps it
    log_ratio, mask = torch.full((2, 100), math.log(1.05)), torch.ones(2, 100)
    mask[0, 3:] = 0
    prod = rollout.correction_weights(log_ratio, mask, "seq_mask", 0.5, 2.0)
    geo = rollout.correction_weights(log_ratio, mask, "seq_geo_mask", 0.5, 2.0)
    assert prod[0, 0].item() == pytest.approx(1.05 ** 3) and prod[1, 0].item() == 0
    assert geo[:, 0].tolist() == pytest.approx([1.05, 1.05])


def test_extreme_ratios_give_finite_weights():
    log_ratio = torch.tensor([[800.0, 1.0], [-800.0, 0.0], [0.3, 900.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])  # the 900 is padding: it must not count
    for mode in ("token_tis", "seq_tis", "token_mask", "seq_mask", "seq_geo_mask"):
        w = rollout.correction_weights(log_ratio, mask, mode, 0.5, 2.0)
        assert torch.isfinite(w).all(), mode
    assert rollout.correction_weights(log_ratio, mask, "seq_tis", 0.5, 2.0)[:, 0].tolist() == \
        pytest.approx([2.0, 0.0, math.exp(0.3)])
    assert rollout.correction_weights(log_ratio, mask, "seq_mask", 0.5, 2.0)[:, 0].tolist() == \
        pytest.approx([0.0, 0.0, math.exp(0.3)])
    assert rollout.correction_weights(log_ratio, mask, "seq_geo_mask", 0.5, 2.0)[:, 0].tolist() == \
        pytest.approx([0.0, 0.0, math.exp(0.3)])  # means exp(400.5) and exp(-400): out of the band


def test_reweight_keeps_the_value_and_scales_every_term_of_grpo():
    """With β > 0 too: the KL term's gradient is weighted like the surrogate's (docs/rollout_correction.md)."""
    new, old, ref, mu, mask, _, A = toy11()
    w = rollout.correction_weights(old - mu, mask, "token_tis", 0.5, 2.0)
    logp = rollout.reweight(new, w, slice(None))
    assert torch.equal(logp, new)
    loss, _ = grpo.policy_loss(logp, old, ref, A, mask, 0.2, 0.04)
    _, dj = value_and_dj(loss, new)
    new2 = new.detach().clone().requires_grad_(True)
    ratio = torch.exp(new2 - old)
    per_token = torch.min(ratio * A[:, None], ratio.clamp(0.8, 1.2) * A[:, None]) - \
        0.04 * (torch.exp(ref - new2) - (ref - new2) - 1)
    manual = -((w * per_token * mask).sum(1) / mask.sum(1)).mean()  # per-token loss x w, then GRPO's means
    _, want = value_and_dj(manual, new2)
    torch.testing.assert_close(dj, want, atol=1e-15, rtol=0)
    assert rollout.reweight(new, None, slice(None)) is new  # none: the loss sees log π_θ itself


def test_the_two_stated_conventions_hold_and_are_stated():
    """docs/rollout_correction.md: token_tis caps without OpenRLHF's floor; GMPO weights each token's log-ratio by its
    own w_t, where verl scales the sequence by the geometric mean of its weights (equal when a row's weights are)."""
    import gmpo
    doc = open(os.path.join(ROOT, "docs", "rollout_correction.md")).read()
    assert "OpenRLHF's `tis` has a floor" in doc and "geometric mean of its token weights" in doc
    log_rho = torch.log(torch.tensor([[0.1, 1.0, 3.0]]))
    w = rollout.correction_weights(log_rho, torch.ones(1, 3), "token_tis", 0.5, 2.0)
    assert w[0].tolist() == pytest.approx([0.1, 1.0, 2.0])  # OpenRLHF tis ([0.5, 2]): [0.5, 1.0, 2.0]
    new, old, ref, _, mask, _, A = toy11()
    new = (old + 0.05 * (new - old)).detach()  # small ratios: no token clipped, the gradients compare exactly
    gen = torch.Generator().manual_seed(0)
    for w in (torch.rand(new.shape, generator=gen, dtype=F64) + 0.5, (torch.rand(4, 1, dtype=F64) + 0.5).expand_as(new)):
        x, y = new.clone().requires_grad_(True), new.clone().requires_grad_(True)
        ours = value_and_dj(gmpo.policy_loss(rollout.reweight(x, w, slice(None)), old, ref, A, mask, 0.4, 0.0)[0], x)[1]
        plain = value_and_dj(gmpo.policy_loss(y, old, ref, A, mask, 0.4, 0.0)[0], y)[1]
        g = torch.exp((torch.log(w) * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True))  # verl: per sequence
        torch.testing.assert_close(ours, plain * w * mask, atol=1e-12, rtol=0)  # token t: its own w_t
        assert torch.allclose(ours, plain * g * mask, atol=1e-12) == bool((w == w[:, :1]).all())


# -----------------------------------------------------------------------------
# the sampler's log-probs: both decoding paths, against Hugging Face's own warpers


@pytest.fixture(scope="module")
def setup(tiny_dir):
    tok, model = loading.tokenizer(tiny_dir), loading.model(tiny_dir, CPU)
    prompts = [gsm8k.build_prompt(tok, p["question"], "") for p in tiny.dataset("test")[:6]]
    ids, mask = rollout.tokenize_prompts(tok, prompts, CPU)
    return model, tok, ids, mask


def warped_logprobs(model, r, temperature, top_p):
    """log μ of the drawn tokens from one full forward and transformers' TemperatureLogitsWarper + TopPLogitsWarper."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    attn = torch.cat([r.prompt_mask, r.completion_mask], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp_min(0)).logits
    T, B = r.completion_ids.shape[1], ids.shape[0]
    out = torch.zeros(B, T)
    for t in range(T):
        z = logits[:, ids.shape[1] - T - 1 + t].float()
        z = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, z)) if top_p < 1 else z / temperature
        out[:, t] = torch.log_softmax(z, -1).gather(1, r.completion_ids[:, t:t + 1])[:, 0]
    return torch.where(r.completion_mask.bool(), out, 0.0)  # pads may be cut by top-p: -inf


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_sampler_logprobs_are_the_sampling_distribution(setup, fast, temperature, top_p):
    model, tok, ids, mask = setup
    torch.manual_seed(3)
    r = rollout.generate(model, tok, ids, mask, 4, 24, temperature, top_p, fast=fast, logprobs=True)
    m = r.completion_mask.bool()
    assert m.sum() > 200 and torch.equal(r.sampler_logp[~m], torch.zeros(int((~m).sum())))
    torch.testing.assert_close(r.sampler_logp, warped_logprobs(model, r, temperature, top_p), atol=2e-5, rtol=0)
    if top_p < 1:  # the cut renormalises: μ gives the kept tokens more than the trainer's π_old does
        old, _ = logprobs.batched(logprobs.Policy(model), r, 64, temperature)
        assert ((r.sampler_logp - old)[m] > -1e-5).all() and ((r.sampler_logp - old)[m] > 1e-3).any()


def test_a_bf16_decoder_on_the_cpu_shows_the_mismatch(setup, capsys):
    """The size docs/rollout_correction.md quotes: the fast decoder's bf16 weight copies against the fp32 forward."""
    model, tok, ids, mask = setup
    sizes = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(5)
        out, mu = decoder.fast_decode(model, ids, mask, 32, rollout.eos_token_ids(model, tok), tok.pad_token_id,
                                      group_size=8, return_logprobs=True, dtype=dtype)
        r = rollout.make_rollout(tok, ids.repeat_interleave(8, 0), mask.repeat_interleave(8, 0), out,
                                rollout.eos_token_ids(model, tok), mu)
        old, _ = logprobs.batched(logprobs.Policy(model), r, 64, 1.0)
        sums = {}
        assert rollout.correction(r, old, type("C", (), {"rollout_correction": "none"}), sums) is None
        sizes[dtype] = {k: s / n for k, (s, n) in sums.items()}
        sums = {}
        rollout.correction(r, old, type("C", (), {"rollout_correction": "token_mask", "rc_min": 0.9,
                                                         "rc_max": 1.1}), sums)
        sizes[dtype]["masked"] = sums["rc_masked"][0] / sums["rc_masked"][1]
    with capsys.disabled():
        print(f"\nCPU sampler/trainer mismatch: fp32 decoder {sizes[torch.float32]}, bf16 {sizes[torch.bfloat16]}")
    assert sizes[torch.float32]["mismatch"] < 1e-5 and 0 <= sizes[torch.float32]["mismatch_kl"] < 1e-8
    assert sizes[torch.bfloat16]["mismatch"] > 100 * sizes[torch.float32]["mismatch"]
    assert sizes[torch.bfloat16]["mismatch_kl"] > 0 and sizes[torch.float32]["masked"] == 0


# -----------------------------------------------------------------------------
# runs: what is logged, what is refused, who inherits it


def test_a_corrected_run_logs_the_mismatch_and_the_weights(tmp_path, monkeypatch):
    rd = tmp_path / "run"
    run_main(grpo, ["--tiny", "--num_steps=2", "--eval_every=0", "--eval_problems=8", f"--run_dir={rd}",
                    "--rollout_correction=seq_mask", "--rc_min=0.5", "--rc_max=2"], monkeypatch)
    rows = [json.loads(l) for l in open(rd / "metrics.jsonl")]
    for m in rows[1:]:
        assert 0 <= m["mismatch"] < 1e-4 and abs(m["mismatch_kl"]) < 1e-6  # fp32 plain path: μ = π_old to rounding
        assert m["rc_weight"] == pytest.approx(1, abs=1e-3) and m["rc_masked"] == 0
        assert math.isfinite(m["loss"])


@pytest.mark.parametrize("argv,words", [
    (["--rollout_correction=tis"], "--rollout_correction='tis' is out of range"),
    (["--rollout_correction=token_mask", "--rc_min=2", "--rc_max=2"], "--rc_min=2.0 must be below --rc_max=2.0"),
    (["--rc_max=0"], "--rc_max=0.0 is out of range")])
def test_bad_settings_are_one_line(argv, words, capsys, monkeypatch):
    assert words in cli_error(grpo, ["--tiny", *argv], capsys, monkeypatch)


def test_dpo_has_no_ratio_to_correct(capsys, monkeypatch):
    assert "unknown config key --rollout_correction" in cli_error(dpo, ["--tiny", "--rollout_correction=token_tis"],
                                                                   capsys, monkeypatch)


@pytest.mark.parametrize("name", [f"{n}.py" for n in trainers.TRAINERS if n != "dpo"])
def test_every_ratio_trainer_inherits_the_skeleton_lines(name):
    src = open(os.path.join(ROOT, name)).read()
    g = open(os.path.join(ROOT, "grpo.py")).read()
    for key in ("    rollout_correction: str", "    rc_min: float", "    rc_max: float", "is_w = rollout.correction(",
                "logp = rollout.reweight(logp, is_w, ix)"):
        line = next(l for l in g.splitlines() if key in l)
        assert src.count(line) == 1, (name, line)

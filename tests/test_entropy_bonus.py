"""--entropy_coef (ALGORITHMS.md §12.3 (b)): loss - c·H̄, the mean token entropy with its gradient, in every trainer
that samples (logprobs.entropy_bonus, through the skeleton); the spec's vectors, an independent computation, runs."""
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

import dapo
import dpo
import grpo
from grpo_family import logprobs
from helpers import F64, ROOT, T11, assert_finite_differences, cli_error, run_main
from tools import trainers

C = SimpleNamespace(entropy_coef=0.01)  # the flag as the trainers pass it (cfg)
THETA = [1.0, 0.0, -1.0]  # π_θ's logits of ids 1..3 at every position (§12.0); id 0 is the sampled token
H_SPEC = [[0.787941, 1.19356, 0.235476], [1.11615, 0.908376, 1.16955, 1.1775], [0.393535, 1.11216],
          [0.6242, 0.988841, 1.06394, 1.16955]]


def toy_logits():
    """(logits (4, 4, 4) float64 with grad, mask (4, 4)): §12.0's π_θ logits, the id-0 logit z0 = lp + log Σ_j e^z_j
    - log(1 - e^lp) so that log_softmax(z)[0] is §11.1's log π_θ; padding 0."""
    z, mask = torch.zeros(4, 4, 4, dtype=F64), torch.zeros(4, 4, dtype=F64)
    rest = math.log(sum(math.exp(v) for v in THETA))
    for i, row in enumerate(T11["new"]):
        for t, lp in enumerate(row):
            z[i, t] = torch.tensor([lp + rest - math.log(1 - math.exp(lp)), *THETA], dtype=F64)
            mask[i, t] = 1
    return z.requires_grad_(True), mask


def entropies(z):
    lp, h = logprobs.token_logprobs(torch.nn.Identity(), z, torch.zeros(z.shape[:2], dtype=torch.long), 1.0,
                                    entropy_grad=True)
    return lp, h


def test_entropy_and_its_gradient_are_the_spec_s():
    z, mask = toy_logits()
    lp, h = entropies(z)
    for i, row in enumerate(T11["new"]):
        assert lp[i, :len(row)].tolist() == pytest.approx(row, abs=1e-6)  # the toy is built right (fp32 softmax)
        assert h[i, :len(row)].tolist() == pytest.approx(H_SPEC[i], abs=5e-6)  # 6 digits
    loss = logprobs.entropy_bonus(torch.zeros((), dtype=F64), h, mask, C)
    assert loss.item() == pytest.approx(-0.00918522, abs=1e-8)  # token mean 0.918522 (verl, TRL, OpenRLHF, SkyRL)
    (-loss).backward()
    assert z.grad[0, 0].tolist() == pytest.approx([-0.000278058, 0.000128636, 9.61142e-05, 5.33079e-05], abs=1e-9)
    assert z.grad[mask == 0].abs().sum() == 0  # nothing on the padding


def test_the_gradient_equals_finite_differences_of_an_independent_entropy():
    """H = -Σ_v p_v log p_v, written from the definition; J = c · Σ H / N, differentiated numerically per logit."""
    z, mask = toy_logits()
    (-logprobs.entropy_bonus(torch.zeros((), dtype=F64), entropies(z)[1], mask, C)).backward()

    def objective(flat):
        x = torch.tensor(flat, dtype=F64).view(4, 4, 4)
        p = torch.softmax(x, -1)
        return 0.01 * ((-(p * torch.log(p)).sum(-1)) * mask).sum().item() / 13
    base = z.detach().reshape(-1).tolist()
    for k in range(0, 64, 3):  # every third logit, padding included
        up, dn = base[:], base[:]
        up[k] += 1e-6
        dn[k] -= 1e-6
        assert z.grad.reshape(-1)[k].item() == pytest.approx((objective(up) - objective(dn)) / 2e-6, abs=1e-9), k


def test_the_token_count_form_and_the_default_path():
    z, mask = toy_logits()
    h = entropies(z)[1]
    zero = torch.zeros((), dtype=F64)
    # DAPO's loss is a token sum over the global count: two ranks of these 13 tokens halve each rank's term
    assert logprobs.entropy_bonus(zero, h, mask, C, num_tokens=13).item() == pytest.approx(-0.00918522, abs=1e-8)
    assert logprobs.entropy_bonus(zero, h, mask, C, num_tokens=26).item() == pytest.approx(-0.00459261, abs=1e-8)
    assert logprobs.entropy_bonus(zero, h, mask, SimpleNamespace(entropy_coef=0.0)) is zero  # c = 0: the loss itself, bit for bit
    _, detached = logprobs.token_logprobs(torch.nn.Identity(), z, torch.zeros(4, 4, dtype=torch.long), 1.0)
    assert not detached.requires_grad and torch.equal(detached, h.detach())  # off: the same values, no graph


@pytest.mark.parametrize("module", [grpo, dapo], ids=["grpo-micro-batch-mean", "dapo-token-sum"])
def test_a_run_takes_minus_c_times_the_step_s_entropy(module, tmp_path, monkeypatch):
    """One step, one micro-batch: the term the trainer's backward takes is exactly -c x the step's mean token entropy
    as logged (both aggregations are a token mean over the batch), and it changes the update; c = 0 takes none."""
    taken, original = [], logprobs.entropy_bonus

    def recorded(loss, entropy, mask, cfg, num_tokens=None):
        out = original(loss, entropy, mask, cfg, num_tokens)
        taken.append((out - loss).item())
        return out
    monkeypatch.setattr(logprobs, "entropy_bonus", recorded)

    def step(coef, name):
        rd = tmp_path / name
        run_main(module, ["--tiny", "--num_steps=1", "--num_minibatches=1", "--micro_batch_size=128",
                          "--eval_every=0", "--eval_problems=4", f"--run_dir={rd}", f"--entropy_coef={coef}"],
                 monkeypatch)
        return [json.loads(l) for l in open(rd / "metrics.jsonl")][-1]
    off = step(0.0, "off")
    assert taken == [0.0]
    on = step(0.5, "on")
    assert len(taken) == 2 and on["entropy"] == pytest.approx(off["entropy"], rel=1e-6) and off["entropy"] > 0
    assert taken[1] == pytest.approx(-0.5 * on["entropy"], rel=1e-3)
    assert on["loss"] == pytest.approx(off["loss"], rel=1e-6)  # the loss logged stays the policy's
    assert math.isfinite(on["grad_norm"]) and on["grad_norm"] != off["grad_norm"]


def test_dpo_has_no_entropy_bonus(capsys, monkeypatch):
    assert "unknown config key --entropy_coef" in cli_error(dpo, ["--tiny", "--entropy_coef=0.01"], capsys,
                                                            monkeypatch)


def test_a_negative_coefficient_is_one_line(capsys, monkeypatch):
    assert "--entropy_coef=-0.1 is out of range" in cli_error(grpo, ["--tiny", "--entropy_coef=-0.1"], capsys,
                                                              monkeypatch)


@pytest.mark.parametrize("name", [n for n in trainers.TRAINERS if n != "dpo"])
def test_every_sampling_trainer_carries_the_option(name):
    src = open(os.path.join(ROOT, f"{name}.py")).read()
    assert src.count("    entropy_coef: float = 0.0  #") == 1 and src.count("(logprobs.entropy_bonus(loss, ent, ") == 1

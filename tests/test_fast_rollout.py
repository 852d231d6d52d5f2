"""The fast rollout (decoder.fast_decode, which rollout.generate(fast=True) calls) against the plain Hugging Face
generate path."""
import copy

import pytest
import torch

from grpo_family import decoder, gsm8k, loading, logprobs, rollout, tiny

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_setup(tiny_dir):
    """(model, tokenizer, prompt ids, prompt mask) for 12 held-out tiny prompts of different lengths."""
    tok, model = loading.tokenizer(tiny_dir), loading.model(tiny_dir, CPU)
    prompts = [gsm8k.build_prompt(tok, p["question"], "") for p in tiny.dataset("test")[:12]]
    ids, mask = rollout.tokenize_prompts(tok, prompts, CPU)
    assert (mask == 0).any(), "the prompts must need left padding for these tests to cover it"
    return model, tok, ids, mask


def both(tiny_setup, seed, **kw):
    """The plain and the fast Rollout of the same call, each after seeding torch with `seed`."""
    model, tok, ids, mask = tiny_setup
    torch.manual_seed(seed)
    plain = rollout.generate(model, tok, ids, mask, **kw)
    torch.manual_seed(seed)
    fast = rollout.generate(model, tok, ids, mask, fast=True, **kw)
    return plain, fast


def assert_same_rollout(a, b):
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert torch.equal(a.truncated, b.truncated)
    assert a.texts == b.texts


@pytest.mark.parametrize("max_new_tokens", [6, 40])
def test_greedy_matches_plain_generate(tiny_setup, max_new_tokens):
    plain, fast = both(tiny_setup, 0, group_size=2, max_new_tokens=max_new_tokens, greedy=True)
    assert_same_rollout(plain, fast)
    if max_new_tokens == 6:  # every row truncated: the width is max_new_tokens
        assert plain.truncated.all() and fast.completion_ids.shape[1] == 6
    else:  # rows end at different lengths: pad after EOS, width = longest completion
        assert not plain.truncated.any() and (plain.lengths < plain.completion_ids.shape[1]).any()


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampled_matches_plain_generate_for_the_same_seed(tiny_setup, temperature, top_p):
    plain, fast = both(tiny_setup, 123, group_size=4, max_new_tokens=40, temperature=temperature, top_p=top_p)
    assert_same_rollout(plain, fast)
    assert len(set(plain.texts)) > len(plain.texts) // 4  # it really sampled: the group members differ


def test_sample_tokens_is_hf_warpers_then_multinomial():
    """sample_tokens against Hugging Face's own warpers and torch.multinomial, same RNG state."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper
    logits = torch.randn(32, 50, generator=torch.Generator().manual_seed(0)) * 3
    hf = LogitsProcessorList([TemperatureLogitsWarper(0.6), TopPLogitsWarper(0.8)])
    for seed in range(5):
        torch.manual_seed(seed)
        ref = torch.multinomial(torch.softmax(hf(None, logits.clone()), -1), 1).squeeze(1)
        after_ref = torch.rand(3)
        torch.manual_seed(seed)
        got = decoder.sample_tokens(logits.clone(), 0.6, 0.8, greedy=False)
        assert torch.equal(got, ref)
        assert torch.equal(torch.rand(3), after_ref)  # and it consumed the RNG exactly as multinomial does
    assert torch.equal(decoder.sample_tokens(logits, 0.6, 0.8, greedy=True), logits.argmax(-1))


def test_logprobs_of_fast_samples_equal_policy_logprobs(tiny_setup):
    """The decode loop's distribution is the training forward's: log-probs of its samples match logprobs.Policy."""
    model, tok, ids, mask = tiny_setup
    torch.manual_seed(7)
    out, logps = decoder.fast_decode(model, ids, mask, 30, rollout.eos_token_ids(model, tok), tok.pad_token_id,
                                    temperature=0.8, return_logprobs=True)
    cmask, _ = rollout.completion_mask(out, rollout.eos_token_ids(model, tok))
    with torch.no_grad():
        ref, _ = logprobs.Policy(model).eval()(ids, mask, out, cmask, temperature=0.8)
    m = cmask.bool()
    assert m.sum() > 100
    torch.testing.assert_close(logps[m], ref[m], atol=1e-5, rtol=1e-5)


def test_prefill_and_decode_step_logits_equal_full_forward(tiny_setup):
    """StaticDecoder's logits against one full Hugging Face forward over prompt + generated tokens."""
    model, tok, ids, mask = tiny_setup
    B, P = ids.shape
    with torch.no_grad():
        dec = decoder.StaticDecoder(model, B, P + 4, torch.float32)
        seq, seq_mask = ids, mask
        dec.pos.copy_(mask.sum(1) - 1)
        dec.col.fill_(P - 1)
        for t in range(3):
            logits = dec.prefill(ids, mask) if t == 0 else dec.step(P + t)
            pos = (seq_mask.cumsum(1) - 1).clamp_min(0)
            full = model(input_ids=seq, attention_mask=seq_mask, position_ids=pos).logits[:, -1]
            torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)
            nxt = full.argmax(-1)
            seq, seq_mask = torch.cat([seq, nxt[:, None]], 1), torch.cat([seq_mask, torch.ones_like(nxt)[:, None]], 1)
            dec.tokens.copy_(nxt)
            dec.pos += 1
            dec.col += 1


def test_fixed_attention_windows_give_the_same_completions(tiny_setup):
    """The windowed attention CUDA graphs use (unfilled cache slots masked out) changes nothing."""
    model, tok, ids, mask = tiny_setup
    eos = rollout.eos_token_ids(model, tok)
    exact, lp_exact = decoder.fast_decode(model, ids, mask, 40, eos, tok.pad_token_id, greedy=True, return_logprobs=True)
    windowed, lp_win = decoder.fast_decode(model, ids, mask, 40, eos, tok.pad_token_id, greedy=True,
                                          window_multiple=16, return_logprobs=True)
    assert torch.equal(exact, windowed)
    torch.testing.assert_close(lp_exact, lp_win, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_random_models_of_each_supported_architecture(arch):
    """Grouped-query attention with 3 query heads per KV head, with and without q/k/v biases."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    kw = dict(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=arch == "qwen2")
    torch.manual_seed(0)
    model = (Qwen2ForCausalLM(Qwen2Config(**kw)) if arch == "qwen2" else LlamaForCausalLM(LlamaConfig(**kw))).eval()
    with torch.no_grad():  # random weights are too flat to sample anything interesting: sharpen the head
        model.get_output_embeddings().weight.mul_(20)
    ids = torch.randint(3, 64, (5, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = mask[3, :5] = 0
    torch.manual_seed(1)
    out, logps = decoder.fast_decode(model, ids, mask, 12, [1], 0, return_logprobs=True)
    cmask, _ = rollout.completion_mask(out, [1])
    with torch.no_grad():
        ref, _ = logprobs.Policy(model).eval()(ids, mask, out, cmask)
    torch.testing.assert_close(logps[cmask.bool()], ref[cmask.bool()], atol=1e-5, rtol=1e-5)


def test_unsupported_models_fail_with_a_clear_message():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True,
                                         sliding_window=8))
    with pytest.raises(NotImplementedError, match="sliding-window.*fast=False"):
        decoder.fast_decode(model, torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long), 2, [1], 0)


def test_cuda_graphs_need_cuda(tiny_setup):
    model, tok, ids, mask = tiny_setup
    with pytest.raises(ValueError, match="CUDA"):
        decoder.fast_decode(model, ids, mask, 4, [2], 0, cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graph_replay_matches_eager_on_gpu(tiny_dir):
    """On a GPU: graph replay gives the completions of the same loop run eagerly (same windows, same kernels)."""
    dev = torch.device("cuda")
    tok, model = loading.tokenizer(tiny_dir), loading.model(tiny_dir, dev)
    prompts = [gsm8k.build_prompt(tok, p["question"], "") for p in tiny.dataset("test")[:12]]
    ids, mask = rollout.tokenize_prompts(tok, prompts, dev)
    eos = rollout.eos_token_ids(model, tok)
    runs = []
    for graphs in (False, True):
        torch.manual_seed(0)
        runs.append(decoder.fast_decode(model, ids, mask, 40, eos, tok.pad_token_id, cuda_graphs=graphs,
                                       window_multiple=128)[0])
    assert torch.equal(runs[0], runs[1])


def test_non_finite_logits_raise(tiny_setup):
    model, tok, ids, mask = tiny_setup
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.base_model.norm.weight[5] = float("nan")
    for greedy in (True, False):
        with pytest.raises(FloatingPointError, match="non-finite"):
            decoder.fast_decode(broken, ids, mask, 4, [2], 0, greedy=greedy)


def test_group_prefill_equals_prefilling_every_row(tiny_setup):
    """group_size > 1 runs each prompt once and shares its cache rows; same result as repeated prompts."""
    model, tok, ids, mask = tiny_setup
    eos = rollout.eos_token_ids(model, tok)
    torch.manual_seed(3)
    shared, lp_shared = decoder.fast_decode(model, ids, mask, 20, eos, tok.pad_token_id, group_size=3,
                                           return_logprobs=True)
    torch.manual_seed(3)
    rows, lp_rows = decoder.fast_decode(model, ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0), 20, eos,
                                       tok.pad_token_id, return_logprobs=True)
    assert shared.shape[0] == 3 * ids.shape[0]
    assert torch.equal(shared, rows)
    torch.testing.assert_close(lp_shared, lp_rows, atol=1e-5, rtol=1e-5)

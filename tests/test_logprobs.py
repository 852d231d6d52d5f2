"""The memory-lean log-prob path equals a plain full-logits forward; masks end at the first EOS."""
import pytest
import torch

from grpo_family import gsm8k, loading, logprobs, rollout, tiny


@pytest.fixture(scope="module")
def model(tiny_dir):
    tok = loading.tokenizer(tiny_dir)
    return tok, loading.model(tiny_dir, torch.device("cpu"))


def plain_logprobs(lm, prompt, completion, temperature):
    """Unpadded single-sequence forward over the full vocabulary."""
    x = torch.cat([prompt, completion])[None]
    logits = lm(x).logits[0].float() / temperature
    logp = logits.log_softmax(-1)[len(prompt) - 1:-1]
    ent = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, completion[:, None]).squeeze(-1), ent


@pytest.mark.parametrize("chunk,temperature", [(4, 1.0), (128, 0.7)])
def test_chunked_logprobs_equal_full_forward_with_padding_on_both_sides(model, chunk, temperature):
    tok, lm = model
    torch.manual_seed(0)
    qs = [r["question"] for r in tiny.dataset("test")[:3]]
    ids, mask = rollout.tokenize_prompts(tok, [gsm8k.build_prompt(tok, q, "") for q in qs], torch.device("cpu"))
    assert (mask == 0).any(), "prompts must be left-padded for this test"
    r = rollout.generate(lm, tok, ids, mask, 2, 24, temperature=1.0)
    assert (r.completion_mask == 0).any(), "completions must be right-padded for this test"
    policy = logprobs.Policy(lm, chunk_size=chunk)
    lp, ent = logprobs.batched(policy, r, 4, temperature)
    for i in range(len(r.texts)):
        p = r.prompt_ids[i][r.prompt_mask[i].bool()]
        c = r.completion_ids[i][r.completion_mask[i].bool()]
        with torch.no_grad():
            ref_lp, ref_ent = plain_logprobs(lm, p, c, temperature)
        assert torch.allclose(lp[i, :len(c)], ref_lp, atol=1e-5)
        assert torch.allclose(ent[i, :len(c)], ref_ent, atol=1e-4)


def test_chunked_gradient_equals_full_gradient(model):
    tok, lm = model
    ids, mask = rollout.tokenize_prompts(tok, [gsm8k.build_prompt(tok, "Ann has 3 pens.", "")], torch.device("cpu"))
    comp = torch.tensor([tok("3+4=7\n#### 7", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
    cmask = torch.ones_like(comp)
    grads = []
    for chunk in (3, 1000):
        lm.zero_grad()
        lp, _ = logprobs.Policy(lm, chunk_size=chunk)(ids, mask, comp, cmask)
        lp.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in lm.parameters()]))
    lm.zero_grad()
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-5)  # fp32 summation order differs


def test_completion_mask_ends_at_first_eos():
    eos, pad = 2, 0
    ids = torch.tensor([[5, 6, eos, pad, pad],
                        [5, eos, 7, eos, pad],   # tokens after the first EOS are masked
                        [5, 6, 7, 8, 9],         # no EOS: truncated, all ones
                        [eos, pad, pad, pad, pad]])
    mask, truncated = rollout.completion_mask(ids, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, False, True, False]


def test_completion_mask_with_several_eos_ids():
    mask, truncated = rollout.completion_mask(torch.tensor([[5, 3, 6, 2]]), [2, 3])
    assert mask.tolist() == [[1, 1, 0, 0]] and truncated.tolist() == [False]


def test_rollout_fields(model):
    tok, lm = model
    ids, mask = rollout.tokenize_prompts(tok, [gsm8k.build_prompt(tok, q["question"], "") for q in tiny.dataset("test")[:2]],
                                        torch.device("cpu"))
    torch.manual_seed(1)
    r = rollout.generate(lm, tok, ids, mask, 3, 6, temperature=1.0)  # 6 tokens: most are truncated
    assert r.completion_ids.shape[0] == 6 and len(r.texts) == 6
    assert torch.equal(r.lengths, r.completion_mask.sum(1))
    for i in range(6):
        has_eos = (r.completion_ids[i][r.completion_mask[i].bool()] == tok.eos_token_id).any().item()
        assert r.truncated[i].item() == (not has_eos)
        assert (r.completion_ids[i][~r.completion_mask[i].bool()] == tok.pad_token_id).all()

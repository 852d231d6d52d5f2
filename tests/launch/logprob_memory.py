"""Peak memory of one log-prob forward + backward, chunked (logprobs.Policy) or through the full logits.

    python tests/launch/logprob_memory.py MODEL_DIR chunked|full [B] [P] [T] [CHUNK]

Loads the model (fp32, CPU), builds B sequences of P prompt and T completion tokens, runs the forward and
the backward of the summed completion log-probs, and prints one JSON line: the peak resident memory above
the level after loading, in MiB, and the seconds taken. The weights are copied out of the file's memory map
first and the kernel's high-water mark is then restarted (/proc/self/clear_refs), so neither loading's
transient nor weight pages first touched in the forward count (they moved the level by 1.9 GB between sessions).
test_real_tokenizer.py runs both modes; docs/bench.md quotes the figures at the real run's shape.
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from grpo_family import loading, logprobs


def status_mib(field):
    """VmRSS (resident now) or VmHWM (its peak since the last restart) of this process, in MiB (Linux)."""
    line = next(x for x in open("/proc/self/status") if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def main():
    path, mode = sys.argv[1], sys.argv[2]
    B, P, T, chunk = (int(x) for x in sys.argv[3:7]) if len(sys.argv) > 3 else (8, 160, 300, 128)
    torch.manual_seed(0)
    lm = loading.model(path, torch.device("cpu")).train()
    V = lm.config.vocab_size
    prompt, completion = torch.randint(0, V, (B, P)), torch.randint(0, V, (B, T))
    pmask, cmask = torch.ones(B, P, dtype=torch.long), torch.ones(B, T, dtype=torch.long)
    with torch.no_grad():
        for p in lm.parameters():
            p.data = p.data.clone()  # resident in anonymous memory now, not pages of the file touched later
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # restart the high-water mark from what is resident now
    base, t0 = status_mib("VmRSS"), time.time()
    if mode == "chunked":
        logp, _ = logprobs.Policy(lm, chunk).train()(prompt, pmask, completion, cmask)
    else:  # the plain way: every position's logits, then a log-softmax over the whole vocabulary
        logits = lm(input_ids=torch.cat([prompt, completion], 1)).logits[:, P - 1:-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, completion[..., None])[..., 0]
    logp.sum().backward()
    print(json.dumps({"mode": mode, "B": B, "P": P, "T": T, "chunk": chunk, "vocab": V,
                      "peak_mib_above_loaded": round(status_mib("VmHWM") - base), "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()

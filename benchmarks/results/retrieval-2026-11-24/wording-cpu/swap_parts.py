"""Which part of RULER's niah_single_2 prompt a model fails to read: the needle sentence, the question
or the haystack, each swapped for one of our training wordings (CPU, greedy and teacher-forced).

    python swap_parts.py MODEL_DIR LENGTH SAMPLES [orig,noise,ourneedle,ourq,both]
"""

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import subquad  # noqa: F401  (registers the model with AutoModelForCausalLM)
from subquad.eval import ruler

torch.set_num_threads(2)
P = sys.argv[1]
tok = AutoTokenizer.from_pretrained(P)
model = AutoModelForCausalLM.from_pretrained(P).eval()
L = int(sys.argv[2])
N = int(sys.argv[3])
variants = sys.argv[4].split(",") if len(sys.argv) > 4 else ["orig", "noise", "ourneedle", "ourq", "both"]


def variant(text, key, value, v):
    needle = f"One of the special magic numbers for {key} is: {value}."
    q_old = text[text.rindex("What is the special magic") :]
    if v in ("ourneedle", "both"):
        text = text.replace(needle, f"Please file {value} under the special magic number of {key}.")
    if v in ("ourq", "both"):
        text = text.replace(q_old, f"Recall the special magic number for {key} from earlier. It was")
    return text


res = {}
for v in variants:
    task = "niah_single_1" if v == "noise" else "niah_single_2"
    samples = ruler.generate(task, L, tok, num_samples=N, seed=1)
    hits, lp, first = 0, 0.0, 0
    t0 = time.time()
    for s in samples:
        value = s.answers[0]
        key = s.input.rsplit("special magic number for ", 1)[1].split(" ")[0]
        text = variant(s.input, key, value, v)
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=10, do_sample=False)
        pred = tok.decode(out[0, ids.shape[1] :])
        hits += value in pred
        # teacher-forced: prompt + " listed as" then the value
        ctx = tok(text + " listed as", return_tensors="pt").input_ids
        ans = tok(" " + value, return_tensors="pt", add_special_tokens=False).input_ids
        full = torch.cat([ctx, ans], 1)
        with torch.no_grad():
            logits = model(full).logits[0, ctx.shape[1] - 1 : -1].float().log_softmax(-1)
        t = ans[0]
        lp += logits.gather(-1, t[:, None]).sum().item()
        first += int(logits[0].argmax() == t[0])
        print(v, repr(pred[:30]), value, flush=True)
    res[v] = dict(acc=hits / N, first_token_acc=first / N, mean_logprob=lp / N, s=time.time() - t0)
    print(v, res[v], flush=True)
print(json.dumps(res, indent=1))

"""Teacher-forced log-probability of the needle's value after `` listed as`` (what the model answers
with), with RULER's needle sentence rewritten in a few forms (CPU).

    python needle_forms.py MODEL_DIR LENGTH SAMPLES
"""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import subquad  # noqa: F401  (registers the model with AutoModelForCausalLM)
from subquad.eval import ruler

torch.set_num_threads(2)
P = sys.argv[1]
tok = AutoTokenizer.from_pretrained(P)
model = AutoModelForCausalLM.from_pretrained(P).eval()
L, N = int(sys.argv[2]), int(sys.argv[3])
forms = {
    "orig": "One of the special magic numbers for {k} is: {v}.",
    "the_colon": "The special magic number for {k} is: {v}.",
    "oneof_nocolon": "One of the special magic numbers for {k} is {v}.",
    "the_plain": "The special magic number for {k} is {v}.",
    "colon_only": "{k} special magic number: {v}.",
}
samples = ruler.generate("niah_single_2", L, tok, num_samples=N, seed=1)
for name, form in forms.items():
    lp = first = 0
    for s in samples:
        v = s.answers[0]
        k = s.input.rsplit("special magic number for ", 1)[1].split(" ")[0]
        text = s.input.replace(f"One of the special magic numbers for {k} is: {v}.", form.format(k=k, v=v))
        assert text != s.input or name == "orig"
        ctx = tok(text + " listed as", return_tensors="pt").input_ids
        ans = tok(" " + v, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            lg = model(torch.cat([ctx, ans], 1)).logits[0, ctx.shape[1] - 1 : -1].float().log_softmax(-1)
        t = ans[0]
        lp += lg.gather(-1, t[:, None]).sum().item()
        first += int(lg[0].argmax() == t[0])
        # all answer tokens argmax-correct?
    print(name, "first", first / N, "logprob", round(lp / N, 3), flush=True)

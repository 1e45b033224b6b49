"""Is the graphed decode step of `small` (SSA, `--index`) reproducible at one position? After 70 warm-up
steps, compares logits rows (largest difference to the first row of each part):
(a) the step's graph replayed at one position, no crop; (d) the eager step there, against (a);
(b) crop back to that position and `GraphedDecoder.step`, 5 times (`captures`: graphs captured so far);
(e) the graph replayed again at that position after those crops;
(f) whether the key the step appends is the same after a crop.
Run from the repo root: `PYTHONPATH=src python <this file> --length 32768`."""

import argparse

import torch

import subquad
from subquad.models import GraphedDecoder, SubquadConfig, SubquadForCausalLM

parser = argparse.ArgumentParser()
parser.add_argument("--length", type=int, default=1 << 15)
parser.add_argument("--index", default="tree", choices=["flat", "tree"])
args = parser.parse_args()

torch.manual_seed(0)
cfg = SubquadConfig.from_flavor("small", attention="ssa", position_scheme="rope", ssa={"index": args.index})
model = SubquadForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
gen = torch.Generator(device="cuda").manual_seed(1)
cache = subquad.SSACache(cfg, max_length=args.length + 512)
for i in range(cfg.num_hidden_layers):
    kv = torch.randn(2, 1, args.length, cfg.num_key_value_heads, cfg.head_dim, device="cuda",
                     dtype=torch.bfloat16, generator=gen)  # fmt: skip
    cache.layer(i).append(kv[0], kv[1])
    del kv
decoder = GraphedDecoder(model, cache)
token = torch.randint(0, cfg.vocab_size, (1, 1), device="cuda")
base = args.length + 65


def spread(rows):
    return [round(float((r.float() - rows[0].float()).abs().max()), 4) for r in rows]


def replayed():
    decoder._set_position(base)
    decoder._ids.copy_(token)
    return decoder._replay(base + 1).clone()


with torch.no_grad():
    for _ in range(70):
        decoder.step(token)
    a = [replayed() for _ in range(5)]
    print("(a) the same graph at one position:", spread(a))
    decoder._set_position(base)
    eager = decoder._run(base + 1).clone()
    print("(d) the eager step there, against (a):", spread([a[0], eager])[1])
    b = []
    for _ in range(5):
        cache.crop(base - cache.get_seq_length())
        b.append(decoder.step(token).clone())
    print("(b) crop + step:", spread(b), "first against (a):", spread([a[0], b[0]])[1])
    print("    graphs captured so far:", decoder.captures)
    e = [replayed() for _ in range(5)]
    print("(e) replayed after the crops:", spread(e), "against (b)'s last:", spread([b[-1], e[0]])[1])
    key = cache.layers[0]._key_buf[0, base].clone()
    cache.crop(base - cache.get_seq_length())
    decoder.step(token)
    print("(f) the appended key the same after a crop:", torch.equal(key, cache.layers[0]._key_buf[0, base]))

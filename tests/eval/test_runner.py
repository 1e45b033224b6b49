from __future__ import annotations

import argparse
import itertools
import json
import threading
import time
import warnings

import pytest
import torch
from transformers import AutoTokenizer

from subquad.demo import default_model_path
from subquad.eval import mrcr, niah, parse_lengths, ruler, runner
from subquad.eval.cli import add_eval_arguments, main, run_eval

from .conftest import CharTokenizer

SHIPPED = default_model_path()


def test_parse_lengths():
    assert parse_lengths("4k,32k,128k,1m") == [4096, 32768, 131072, 1048576]
    assert parse_lengths("1000, 2K ,2k") == [1000, 2048]
    assert parse_lengths([4096, "8k"]) == [4096, 8192]
    assert parse_lengths("1.5k") == [1536]
    for bad in ("4q", "", "k", "0", "-4k", "0.3"):
        with pytest.raises(ValueError, match="length"):
            parse_lengths(bad)
    with pytest.raises(TypeError):
        parse_lengths([4.5])


def test_suite_tasks():
    assert len(runner.suite_tasks("ruler")) == 13
    assert runner.suite_tasks("ruler", "vt, cwe") == ["vt", "cwe"]
    assert runner.suite_tasks("niah", "0,50,depth_100") == ["depth_0", "depth_50", "depth_100"]
    assert runner.suite_tasks("mrcr", ["2needle"]) == ["2needle"]
    with pytest.raises(ValueError, match="suite 'babi' is not known"):
        runner.suite_tasks("babi")
    with pytest.raises(ValueError, match="task 'vtx' is not in suite 'ruler'"):
        runner.suite_tasks("ruler", "vt,vtx")
    with pytest.raises(ValueError, match="percent in 0..100"):
        runner.suite_tasks("niah", "150")


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(argv)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_ruler_end_to_end_and_resume(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ruler"
    argv = ["--model", str(tiny_model_dir), "--suite", "ruler", "--lengths", "1k", "--samples", "1"]
    argv += ["--out", str(out), "--device", "cpu", "--max-new-tokens", "3", "--batch-size", "2"]
    argv += ["--no-progress"]
    assert run_eval(_parse(argv)) == 0
    records = _lines(out / "results.jsonl")
    assert sorted(r["task"] for r in records) == sorted(runner.suite_tasks("ruler"))
    assert all(0.0 <= r["score"] <= 1.0 and r["prompt_tokens"] <= 1024 for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["scores"]) == set(runner.suite_tasks("ruler")) and "1024" in summary["average"]
    table = (out / "summary.md").read_text()
    assert "| niah_single_1 |" in table and "RULER average" in table
    assert "RULER average" in capsys.readouterr().out

    # Interrupted mid-write: a cut-off last line, and samples still to do (more samples asked for).
    raw = (out / "results.jsonl").read_text()
    (out / "results.jsonl").write_text(raw + '{"id": "ruler/vt/1024/0/1", "sco')
    argv[argv.index("--samples") + 1] = "2"
    assert main(argv + ["--tasks", "vt,fwe"]) == 0
    records = _lines(out / "results.jsonl")
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == 13 + 2
    assert {"ruler/vt/1024/0/1", "ruler/fwe/1024/0/1"} <= set(ids)
    assert json.loads((out / "summary.json").read_text())["num_results"] == 4


class InterruptingModel:
    """Wraps a model; raises KeyboardInterrupt on the n-th generate() call and counts calls."""

    def __init__(self, model, fail_at=None):
        self.model, self.fail_at, self.calls = model, fail_at, 0

    def parameters(self):
        return self.model.parameters()

    def generate(self, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return self.model.generate(**kwargs)


def test_resume_after_interruption(tiny_model_dir, tmp_path):
    model, tokenizer = runner.load_model(tiny_model_dir, device="cpu", dtype="float32")
    kwargs = dict(suite="niah", lengths="1k,2k", num_samples=2, out_dir=tmp_path, tasks="0,100",
                  max_new_tokens=2, progress=False)  # fmt: skip
    flaky = InterruptingModel(model, fail_at=4)
    with pytest.raises(KeyboardInterrupt):
        runner.evaluate(flaky, tokenizer, **kwargs)
    assert len(_lines(tmp_path / "results.jsonl")) == 3
    steady = InterruptingModel(model)
    summary = runner.evaluate(steady, tokenizer, **kwargs)
    assert steady.calls == 8 - 3  # only the samples that had not finished
    assert summary["num_results"] == 8 and set(summary["average"]) == {"1024", "2048"}
    assert (tmp_path / "niah_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    # A finished run does nothing more.
    again = InterruptingModel(model)
    runner.evaluate(again, tokenizer, **kwargs)
    assert again.calls == 0


def test_batched_equals_unbatched(tiny_model_dir, tmp_path):
    model, tokenizer = runner.load_model(tiny_model_dir, device="cpu", dtype="float32")
    common = dict(
        suite="mrcr", lengths="1k", num_samples=3, tasks="2needle", max_new_tokens=4, progress=False
    )
    one = runner.evaluate(model, tokenizer, out_dir=tmp_path / "a", batch_size=1, **common)
    three = runner.evaluate(model, tokenizer, out_dir=tmp_path / "b", batch_size=3, **common)
    first = [r["prediction"] for r in _lines(tmp_path / "a" / "results.jsonl")]
    batched = [r["prediction"] for r in _lines(tmp_path / "b" / "results.jsonl")]
    assert first == batched and one["scores"] == three["scores"]


def test_cli_errors(tiny_model_dir, tmp_path, capsys):
    base = ["--model", str(tiny_model_dir), "--suite", "ruler", "--out", str(tmp_path), "--device", "cpu"]
    assert main(base + ["--lengths", "4q"]) == 2
    assert "length '4q'" in capsys.readouterr().err
    assert main(base + ["--tasks", "nope"]) == 2
    assert "task 'nope' is not in suite 'ruler'" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "missing"), "--suite", "niah", "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(base + ["--samples", "0"]) == 2
    assert "num_samples must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["--model", "x", "--suite", "babi", "--out", "y"])


def test_ssa_overrides_route_the_same_weights_otherwise(tmp_path, bpe_tokenizer, capsys):
    import torch

    import subquad
    from subquad.models import SubquadConfig, SubquadForCausalLM

    path = tmp_path / "subquad-debug"
    config = SubquadConfig.from_flavor("debug", vocab_size=len(bpe_tokenizer), router="learned")
    SubquadForCausalLM(config).save_pretrained(path)
    bpe_tokenizer.save_pretrained(path)
    saved = runner.load_causal_lm(path, device="cpu")
    routed = runner.load_causal_lm(path, device="cpu", ssa={"summary": "max", "sub_block_size": 4})
    assert routed.config.ssa_config == subquad.SSAConfig(
        block_size=16, top_k=2, sink_blocks=1, local_blocks=2, summary="max", sub_block_size=4
    )
    assert saved.config.ssa_config.summary == "mean"
    for (name, a), (_, b) in zip(saved.state_dict().items(), routed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    routed.save_pretrained(tmp_path / "max4")  # back to "mean" from a model saved with "max"
    back = runner.load_causal_lm(tmp_path / "max4", device="cpu", ssa={"summary": "mean"})
    assert back.config.ssa_config == saved.config.ssa_config
    with pytest.raises(ValueError, match="needs sub_block_size"):
        runner.load_causal_lm(path, device="cpu", ssa={"summary": "max"})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['topk'\]"):
        runner.load_causal_lm(path, device="cpu", ssa={"topk": 8})

    out = tmp_path / "niah"
    argv = ["--model", str(path), "--suite", "niah", "--lengths", "1k", "--samples", "1", "--tasks", "50"]
    argv += ["--out", str(out), "--device", "cpu", "--max-new-tokens", "2", "--no-progress"]
    assert main(argv + ["--ssa", "summary=max,sub_block_size=4"]) == 0
    assert json.loads((out / "summary.json").read_text())["ssa"]["summary"] == "max"
    assert main(argv + ["--ssa", "top_k=-1"]) == 2
    assert "top_k=-1" in capsys.readouterr().err


def test_attention_ssa_routes_a_transformers_model(
    tiny_model_dir, tmp_path, capsys, monkeypatch, bpe_tokenizer
):
    from subquad import hf
    from subquad.models import SubquadConfig, SubquadForCausalLM
    from subquad.ops.ssa.config import SSAConfig

    small = {"block_size": 16, "top_k": 1, "local_blocks": 1}
    saved = runner.load_causal_lm(tiny_model_dir, device="cpu")
    routed = runner.load_causal_lm(tiny_model_dir, device="cpu", attention="ssa", ssa=small)
    assert saved.config._attn_implementation != "ssa" and runner.ssa_config_of(saved.config) is None
    assert routed.config._attn_implementation == "ssa"
    assert runner.ssa_config_of(routed.config) == SSAConfig(**small)
    rotary = [m for m in routed.modules() if hasattr(m, "inv_freq")]
    assert rotary and all(getattr(m, "_subquad_precise_rotary", False) for m in rotary)
    ids = torch.randint(3, len(bpe_tokenizer), (1, 200))
    with torch.no_grad():
        # 3 blocks of 16: every block is selected, so SSA is dense attention; 13 blocks: one routed
        torch.testing.assert_close(
            routed(ids[:, :40]).logits, saved(ids[:, :40]).logits, atol=1e-4, rtol=1e-4
        )
        assert (routed(ids).logits[0, -1] - saved(ids).logits[0, -1]).abs().max() > 1e-3

    # a rotary module it cannot make precise is kept, with a warning that says so
    def refuse(model):
        raise ValueError("not Llama-style")

    monkeypatch.setattr(hf, "precise_rotary", refuse)
    with pytest.warns(UserWarning, match="float32 rotary angles.*not Llama-style"):
        runner.load_causal_lm(tiny_model_dir, device="cpu", attention="ssa")
    monkeypatch.undo()

    out = tmp_path / "niah"
    argv = ["--model", str(tiny_model_dir), "--suite", "niah", "--lengths", "300", "--samples", "1"]
    argv += ["--tasks", "50", "--out", str(out), "--device", "cpu", "--max-new-tokens", "2", "--no-progress"]
    assert main([*argv, "--attention", "ssa", "--ssa", "block_size=16,top_k=1"]) == 0
    assert json.loads((out / "summary.json").read_text())["ssa"]["top_k"] == 1
    # SSA fields for a model that keeps its saved (dense) attention would be ignored: refused
    assert main([*argv, "--ssa", "top_k=1"]) == 2
    assert "keeps its saved attention; ask for attention='ssa'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="attention 'flash' is not supported"):
        runner.load_causal_lm(tiny_model_dir, device="cpu", attention="flash")
    # a dense Subquad model is converted by training, not switched at load time
    dense = tmp_path / "subquad-dense"
    config = SubquadConfig.from_flavor("debug", vocab_size=len(bpe_tokenizer), attention="dense")
    SubquadForCausalLM(config).save_pretrained(dense)
    with pytest.raises(ValueError, match="dense Subquad model; convert it first"):
        runner.load_causal_lm(dense, device="cpu", attention="ssa")
    assert runner.ssa_config_of(runner.load_causal_lm(dense, device="cpu").config) is None


def test_demo_runs_a_transformers_model_with_ssa(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from subquad import demo
    from subquad.cli import main as subquad_main

    monkeypatch.setattr(demo, "MAX_NEW_TOKENS", 2)
    args = ["demo", "--model", str(tiny_model_dir), "--lengths", "300", "--depths", "50", "--no-progress"]
    assert subquad_main([*args, "--out", str(tmp_path / "saved")]) == 0
    assert "dense attention" in capsys.readouterr().out
    assert subquad_main([*args, "--attention", "ssa", "--out", str(tmp_path / "ssa")]) == 0
    assert "SSA (block 64, 1 sink + 2 local + 16 routed blocks)" in capsys.readouterr().out
    assert json.loads((tmp_path / "ssa" / "demo.json").read_text())["attention"] == "ssa"


class EchoModel:
    """generate() repeats each prompt's last token: enough to write records, at no model cost."""

    def parameters(self):
        yield torch.zeros(1)

    def generate(self, input_ids, max_new_tokens, **kwargs):
        return torch.cat([input_ids, input_ids[:, -1:].repeat(1, max_new_tokens)], dim=1)


def _without_size(record):
    return {**record, "meta": {k: v for k, v in record["meta"].items() if k != "haystack_size"}}


def _prompts(rows):
    return {r["id"]: (r["prompt_tokens"], r["meta"], r["answers"]) for r in rows}


def test_resume_builds_only_the_missing_prompts_and_the_same_ones(tmp_path, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED)
    kwargs = dict(suite="ruler", tasks="niah_single_3", lengths="2k", num_samples=6, max_new_tokens=2,
                  progress=False)  # fmt: skip
    runner.evaluate(EchoModel(), tokenizer, out_dir=tmp_path / "straight", **kwargs)
    straight = _lines(tmp_path / "straight" / "results.jsonl")
    sizes = [r["meta"]["haystack_size"] for r in straight]
    # The hazard: searched from scratch, sample 3's haystack settles elsewhere than after sample 2's.
    alone = next(ruler.iter_samples("niah_single_3", 2048, tokenizer, start=3, stop=4))
    assert alone.meta["haystack_size"] != sizes[3]

    hints = []
    fit = ruler.fit_haystack

    def counted(build, tok, budget, **options):
        hints.append(options["hint"])
        return fit(build, tok, budget, **options)

    monkeypatch.setattr(ruler, "fit_haystack", counted)
    for name, lost, keep_sizes, expect_hints in [
        ("gaps", {1, 3, 4}, True, [sizes[0], sizes[2], sizes[3]]),
        # Records from before haystack_size was recorded: the run is rebuilt from sample 0.
        ("old", {3}, False, [None, sizes[0], sizes[1], sizes[2]]),
    ]:
        out = tmp_path / name
        out.mkdir()
        kept = [r if keep_sizes else _without_size(r) for r in straight if r["index"] not in lost]
        (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
        hints.clear()
        runner.evaluate(EchoModel(), tokenizer, out_dir=out, **kwargs)
        assert hints == expect_hints
        resumed = [r for r in _lines(out / "results.jsonl") if r["index"] in lost]
        assert _prompts(resumed) == _prompts(r for r in straight if r["index"] in lost)


def test_a_cap_shorter_than_the_answers_warns_once_per_task(tmp_path):
    # A UUID answer is ~25-34 tokens: a 2-token cap cuts every prediction short of it (warned once), a
    # cap the answers fit in, or the task's own length, warns nothing.
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED)
    kwargs = dict(
        suite="ruler", tasks="niah_single_3", lengths="2k", num_samples=2, batch_size=1, progress=False
    )
    with pytest.warns(
        UserWarning, match=r"max_new_tokens=2: niah_single_3 answers take up to \d+ tokens"
    ) as seen:
        runner.evaluate(EchoModel(), tokenizer, out_dir=tmp_path / "short", max_new_tokens=2, **kwargs)
    assert sum("answers take up to" in str(w.message) for w in seen) == 1
    for name, cap in (("fits", 64), ("default", None)):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            runner.evaluate(EchoModel(), tokenizer, out_dir=tmp_path / name, max_new_tokens=cap, **kwargs)
        assert not [w for w in seen if "answers take up to" in str(w.message)], name
    # Each row records the cap it ran under (the task's own, 128, when none lowers it).
    for name, cap in (("short", 2), ("fits", 64), ("default", 128)):
        rows = (tmp_path / name / "results.jsonl").read_text().splitlines()
        assert [json.loads(row)["max_new_tokens"] for row in rows] == [cap, cap], name


class NoCopy:
    """A tokenizer that cannot be deep-copied: the runner then builds prompts in the calling thread."""

    def __init__(self, inner):
        self.inner = inner

    def __deepcopy__(self, memo):
        raise TypeError("not copyable")

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_the_next_prompt_is_built_while_the_model_generates(tmp_path, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED)
    built, second_built, waited = [], threading.Event(), []
    iter_samples = runner._iter_samples

    def watched(*args):
        for sample in iter_samples(*args):
            built.append((sample.index, threading.current_thread().name))
            if sample.index == 1:
                second_built.set()
            yield sample

    class WaitingModel(EchoModel):
        def generate(self, input_ids, max_new_tokens, **kwargs):
            if not waited:  # the first prompt: generates until the second one is built (or 20 s)
                waited.append(second_built.wait(timeout=20))
            return super().generate(input_ids, max_new_tokens, **kwargs)

    monkeypatch.setattr(runner, "_iter_samples", watched)
    kwargs = dict(suite="ruler", tasks="niah_single_2,vt", lengths="1k", num_samples=3, max_new_tokens=3,
                  progress=False)  # fmt: skip
    ahead = runner.evaluate(WaitingModel(), tokenizer, out_dir=tmp_path / "ahead", **kwargs)
    assert waited == [True]
    assert {name for _, name in built} == {"eval-prompts"}

    built.clear()
    here = runner.evaluate(EchoModel(), NoCopy(tokenizer), out_dir=tmp_path / "here", **kwargs)
    assert {name for _, name in built} == {threading.current_thread().name}
    assert ahead["scores"] == here["scores"]

    def same(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    ahead_rows, here_rows = (_lines(tmp_path / name / "results.jsonl") for name in ("ahead", "here"))
    assert same(ahead_rows) == same(here_rows)


def test_ahead_raises_in_order_and_stops_when_closed():
    def failing():
        yield 1
        yield 2
        raise ValueError("length='0k': bad")

    got = []
    with pytest.raises(ValueError, match="length='0k'"):
        for item in runner._ahead(failing()):
            got.append(item)
    assert got == [1, 2]

    made = []

    def endless():
        for i in itertools.count():
            made.append(i)
            yield i

    stream = runner._ahead(endless())
    assert next(stream) == 0
    stream.close()
    count = len(made)
    time.sleep(0.3)
    assert len(made) == count <= 3  # the item handed out, one queued, at most one being made
    assert not [t for t in threading.enumerate() if t.name == "eval-prompts"]


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: ruler.iter_samples("niah_single_2", 700, CharTokenizer(), 3, **kw),
        lambda **kw: niah.iter_samples(700, 40, CharTokenizer(), 3, **kw),
        lambda **kw: mrcr.iter_samples("2needle", 4000, CharTokenizer(), 3, **kw),
    ],
)
def test_iter_samples_continue_generate(make):
    everything = list(make(stop=5))
    later = list(make(start=2, stop=5, hint=everything[1].meta["haystack_size"]))
    assert later == everything[2:]
    first = make(start=4, hint=everything[3].meta["haystack_size"])
    assert next(first) == everything[4] and next(first).index == 5  # no end without stop
    with pytest.raises(ValueError, match="stop must be >= 2, got 1"):
        make(start=2, stop=1)
    with pytest.raises(ValueError, match="start must be >= 0, got -1"):
        make(start=-1)
    with pytest.raises(TypeError, match="hint must be an int, got str"):
        make(hint="12")

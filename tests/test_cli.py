"""The `subquad bench` command end to end on the CPU (tiny length), and its argument errors."""

import json

import pytest

from subquad import SSAConfig
from subquad.cli import main
from subquad.ops.ssa.select import beam_cost_per_query


def test_bench_writes_results(tmp_path, capsys):
    # --device cpu: on a GPU machine the default is CUDA, and the results' names say which device ran.
    args = ["--lengths", "320", "--reps", "1", "--flex-max-len", "0", "--device", "cpu"]
    assert main(["bench", *args, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "attention-layer-8b-cpu.json").read_text())
    (row,) = result["rows"]
    assert row["seq_len"] == 320 and row["total_ms"] > 0 and row["flash_ms"] > 0
    # 320 tokens = 5 blocks of 64: every earlier block fits the budget, so each query sees all its keys.
    assert row["keys_per_query"] == pytest.approx((320 + 1) / 2)
    assert (tmp_path / "attention-layer-8b-cpu.md").exists() and (
        tmp_path / "attention-layer-8b-cpu.png"
    ).exists()
    assert "| 320 | 16 |" in capsys.readouterr().out


def test_bench_routing_compares_the_indexes_with_flat(tmp_path):
    # top_k 4: the beam keeps 4 of its 8 level-1 nodes, so it prunes (and the CPU reference is quick).
    args = ["--routing", "--lengths", "4k", "--top-k", "4", "--reps", "1", "--device", "cpu", "--tag", "r"]
    assert main(["bench", *args, "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert row["flat_dots_per_query"] == 64
    for name in ("tree", "beam"):
        assert 0 < row[f"{name}_agreement_random"] < 1 and row[f"{name}_ms_needle"] > 0
    assert row["beam_dots_per_query"] == beam_cost_per_query(64, SSAConfig(top_k=4, index="beam"))
    table = (tmp_path / "r.md").read_text()
    assert "| 4096 | 64 | tree |" in table and "| 4096 | 64 | beam | 8 / 4 |" in table


@pytest.mark.parametrize(
    "args", [["--lengths", "12q"], ["--top-k", "many"], ["--top-k", "-1"], ["--reps", "0"]]
)
def test_bench_rejects_bad_arguments(args, tmp_path):
    with pytest.raises((SystemExit, ValueError)) as info:
        main(["bench", *args, "--out", str(tmp_path)])
    assert any(a in str(info.value) for a in args)


def test_corpus_then_train_end_to_end(tmp_path):
    # `subquad corpus` over this package's own sources, then a few `subquad train` steps.
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import subquad

    sources = Path(subquad.__file__).parent  # dozens of files: some always land in the 20% held-out split
    corpus, run = tmp_path / "corpus", tmp_path / "run"
    args = ["corpus", "--source", str(sources), "--out", str(corpus), "--vocab-size", "300"]
    skills = ["--skills-tokens", "5000", "--skills-doc-tokens", "64,300"]
    assert main([*args, "--heldout-fraction", "0.2", *skills]) == 0
    assert (corpus / "skills.bin").stat().st_size > 0
    assert json.loads((corpus / "skills.json").read_text())["doc_tokens"] == [64, 300]
    train = ["train", "--corpus", str(corpus), "--out", str(run), "--flavor", "debug", "--attention", "dense"]
    assert (
        main(
            [
                *train,
                "--steps",
                "2",
                "--tokens-per-step",
                "1024",
                "--seq-len-schedule",
                "0:256",
                "--eval-interval",
                "2",
                "--eval-tokens",
                "512",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    assert model.config.vocab_size >= len(tokenizer)


def test_corpus_rejects_missing_source(tmp_path, capsys):
    assert main(["corpus", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "c")]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("doc_tokens", ["256", "256,8k", "8192,256", "0,10"])
def test_corpus_rejects_bad_skill_document_lengths_before_building(tmp_path, capsys, doc_tokens):
    out = tmp_path / "c"
    args = ["corpus", "--source", str(tmp_path), "--out", str(out), "--skills-tokens", "100"]
    assert main([*args, "--skills-doc-tokens", doc_tokens]) == 2
    assert "doc" in capsys.readouterr().err and not out.exists()


def test_key_values_keeps_bracketed_commas_in_the_value():
    from subquad._args import key_values

    got = key_values('router=learned,coarse_layers=[0, 1,2],ssa={"top_k": 8, "block_size": 64},name=x')
    assert got == {
        "router": "learned",
        "coarse_layers": [0, 1, 2],
        "ssa": {"top_k": 8, "block_size": 64},
        "name": "x",
    }
    with pytest.raises(ValueError, match="'oops': expected key=value"):
        key_values("top_k=8,oops")

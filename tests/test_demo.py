"""`subquad demo` end to end on a tiny random model, its argument errors, and the key-share count."""

import json

import pytest
import torch

from subquad import demo
from subquad.cli import main
from subquad.ops.ssa.config import SSAConfig
from subquad.ops.ssa.select import select_blocks


@pytest.fixture(scope="module")
def debug_model_dir(tmp_path_factory):
    """A random `debug` Subquad model saved with a small byte-level BPE trained on the eval essays."""
    from transformers import PreTrainedTokenizerFast

    from subquad.eval._core import essay_paragraphs
    from subquad.models import SubquadConfig, SubquadForCausalLM
    from subquad.train.data import BOS, EOS, PAD, train_tokenizer

    texts = [*essay_paragraphs(), "One of the special magic numbers for quick-fox is: 1234567."]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer("bpe", texts, vocab_size=1000),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )
    torch.manual_seed(0)
    config = SubquadConfig.from_flavor(
        "debug",
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("debug-model")
    SubquadForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_demo_end_to_end(debug_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "MAX_NEW_TOKENS", 3)  # a random model never stops early: keep it short
    out = tmp_path / "demo"
    args = ["demo", "--model", str(debug_model_dir), "--lengths", "256,512", "--depths", "0,50"]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| length | accuracy | s / sample | keys / query | keys attended vs dense |" in printed
    assert "| 256 |" in printed and "| 512 |" in printed and "niah_heatmap.png" in printed
    assert (out / "niah_heatmap.png").stat().st_size > 0
    result = json.loads((out / "demo.json").read_text())
    assert result["lengths"] == [256, 512] and result["depths"] == [0, 50]
    assert result["attention"] == "ssa" and result["device"] == "cpu" and result["dtype"] == "float32"
    assert len(result["samples"]) == 4
    ssa = SSAConfig.from_dict(result["ssa"])
    for row in result["rows"]:
        assert row["samples"] == 2 and 0.0 <= row["accuracy"] <= 1.0 and row["seconds_per_sample"] > 0
        assert row["key_share"] == pytest.approx(demo.key_share(ssa, row["length"]))
    # debug: 1 sink + 2 local + 2 routed blocks of 16 keys, far below dense at 512 tokens.
    assert result["rows"][1]["key_share"] < 0.3 and result["max_new_tokens"] == 3
    assert demo.format_table(result) in printed

    # A second run starts afresh instead of resuming the first one's samples.
    again = ["demo", "--model", str(debug_model_dir), "--lengths", "256", "--depths", "50"]
    assert main([*again, "--out", str(out), "--no-progress"]) == 0
    assert len(json.loads((out / "demo.json").read_text())["samples"]) == 1
    assert len((out / "results.jsonl").read_text().splitlines()) == 1


def test_ssa_settings_replace_the_saved_ones(debug_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "MAX_NEW_TOKENS", 2)
    out = tmp_path / "demo"
    args = ["demo", "--model", str(debug_model_dir), "--lengths", "512", "--ssa", "top_k=1"]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    assert "1 routed blocks" in capsys.readouterr().out
    result = json.loads((out / "demo.json").read_text())
    ssa = SSAConfig.from_dict(result["ssa"])
    assert ssa.top_k == 1 and ssa.block_size == 16  # the other fields stay the saved ones
    assert result["rows"][0]["key_share"] == pytest.approx(demo.key_share(ssa, 512))


def test_missing_default_model_says_where_and_what_to_do(monkeypatch, tmp_path, capsys):
    missing = tmp_path / "assets" / "subquad-nano"
    monkeypatch.setattr(demo, "default_model_path", lambda: missing)
    assert main(["demo", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err and "--model PATH" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--lengths", "12q"],
        ["--lengths", ","],
        ["--max-length", "huge"],
        ["--depths", "150"],
        ["--depths", "ten"],
        ["--device", "abacus"],
        ["--model", "no/such/dir"],
        ["--ssa", "top_k"],
        ["--ssa", "top_k=-1"],
        ["--ssa", "routed=8"],
    ],
)
def test_bad_arguments_exit_2_naming_them(args, tmp_path, capsys):
    assert main(["demo", *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert args[0] in err and repr(args[1]) in err


def test_lengths_and_max_length_are_exclusive(tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--lengths", "4k", "--max-length", "8k", "--out", str(tmp_path)])
    assert info.value.code == 2


def test_default_lengths_follow_the_ladder():
    assert demo.demo_lengths(demo.DEFAULT_MAX_LENGTH) == [4096, 16384, 65536]
    assert demo.demo_lengths(12 << 20) == list(demo.LADDER)
    assert demo.demo_lengths(100_000) == [4096, 16384, 65536, 100_000]
    assert demo.demo_lengths(2048) == [2048]
    assert demo.parse_depths("90, 10,50,10") == [10, 50, 90]


@pytest.mark.parametrize(
    "config",
    [
        SSAConfig(block_size=16, top_k=2, sink_blocks=1, local_blocks=2),
        SSAConfig(block_size=16, top_k=3, sink_blocks=2, local_blocks=1),
        SSAConfig(block_size=16, top_k=0, sink_blocks=0, local_blocks=3),
        SSAConfig(block_size=32, top_k=4, sink_blocks=3, local_blocks=2),
    ],
)
def test_selected_pairs_match_a_real_selection(config):
    for length in (1, 15, 16, 17, 100, 333, 640):
        q = torch.randn(1, length, 2, 8)
        k = torch.randn(1, length, 1, 8)
        selection = select_blocks(q, k, config, causal=True)
        expected = int(selection.num_selected_keys(length, causal=True).sum())
        assert demo.selected_pairs(config, length) == expected, length


def test_key_share_of_dense_and_long_contexts():
    from subquad.models import SubquadConfig

    assert (
        demo.key_share(SubquadConfig.from_flavor("debug", attention="dense", position_scheme="rope"), 4096)
        == 1
    )
    nano = SubquadConfig.from_flavor("nano")
    assert demo.key_share(nano, 64) == 1.0
    # Far from the start a token sees 18 full blocks of 64 keys (sink, earlier local, 16 routed) and
    # its own block up to itself (32.5 keys on average): 1184.5 of the (N + 1) / 2 keys dense sees.
    assert demo.key_share(nano, 12 << 20) == pytest.approx(1184.5 / ((12 << 20) / 2), rel=1e-3)


@pytest.mark.slow
@pytest.mark.skipif(
    not (demo.default_model_path() / "config.json").is_file(), reason="the shipped subquad-nano is not built"
)
def test_shipped_model_finds_the_demo_needles(tmp_path, capsys):
    # Its three 2K prompts are found (every run: greedy decoding); a generation bug shows here first. With
    # transformers 5.24's `cache=` argument ignored, decoding read only the current token and found none.
    args = ["demo", "--lengths", "2k", "--depths", "10,50,90", "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    result = json.loads((tmp_path / "demo.json").read_text())
    assert result["model"] == "subquad-nano" and result["rows"][0]["length"] == 2048
    assert result["rows"][0]["samples"] == 3 and result["rows"][0]["accuracy"] == 1.0
    assert "| 2k | 100% (3/3) |" in capsys.readouterr().out

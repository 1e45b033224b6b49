"""The `subquad bench` command end to end on the CPU (tiny length), and its argument errors."""

import json

import pytest

from subquad.cli import main


def test_bench_writes_results(tmp_path, capsys):
    assert (
        main(["bench", "--lengths", "320", "--reps", "1", "--flex-max-len", "0", "--out", str(tmp_path)]) == 0
    )
    result = json.loads((tmp_path / "attention-layer-8b-cpu.json").read_text())
    (row,) = result["rows"]
    assert row["seq_len"] == 320 and row["total_ms"] > 0 and row["flash_ms"] > 0
    # 320 tokens = 5 blocks of 64: every earlier block fits the budget, so each query sees all its keys.
    assert row["keys_per_query"] == pytest.approx((320 + 1) / 2)
    assert (tmp_path / "attention-layer-8b-cpu.md").exists() and (
        tmp_path / "attention-layer-8b-cpu.png"
    ).exists()
    assert "| 320 | 16 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args", [["--lengths", "12q"], ["--top-k", "many"], ["--top-k", "-1"], ["--reps", "0"]]
)
def test_bench_rejects_bad_arguments(args, tmp_path):
    with pytest.raises((SystemExit, ValueError)) as info:
        main(["bench", *args, "--out", str(tmp_path)])
    assert any(a in str(info.value) for a in args)

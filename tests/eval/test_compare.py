from __future__ import annotations

import json
import math

import pytest

from subquad.eval.compare import compare_runs, comparison_markdown, main


def _write(path, rows, cap=None):
    """rows: (task, length, index, score[, prompt_tokens]) -> a results.jsonl as the runner writes it;
    ``cap``: the rows' ``max_new_tokens`` (None: rows written before caps were recorded)."""
    path.mkdir(parents=True, exist_ok=True)
    lines = []
    for task, length, index, score, *tokens in rows:
        record = {"id": f"ruler/{task}/{length}/0/{index}", "suite": "ruler", "task": task, "length": length,
                  "seed": 0, "index": index, "score": score,
                  "prompt_tokens": tokens[0] if tokens else length - 7}  # fmt: skip
        if cap is not None:
            record["max_new_tokens"] = cap
        lines.append(json.dumps(record))
    (path / "results.jsonl").write_text("\n".join(lines) + "\n")
    return path


def test_paired_averages_and_error_by_hand(tmp_path):
    a = _write(tmp_path / "a", [("vt", 4096, 0, 1.0), ("vt", 4096, 1, 0.5), ("vt", 4096, 2, 0.0),
                                ("cwe", 4096, 0, 0.2), ("cwe", 4096, 1, 0.9),
                                ("vt", 8192, 0, 1.0), ("vt", 8192, 5, 1.0)])  # fmt: skip
    # B lacks vt/8192/5 and has an extra prompt A lacks: neither counts.
    b = _write(tmp_path / "b", [("vt", 4096, 0, 0.0), ("vt", 4096, 1, 0.5), ("vt", 4096, 2, 1.0),
                                ("cwe", 4096, 0, 0.1), ("cwe", 4096, 1, 0.3),
                                ("vt", 8192, 0, 0.0), ("vt", 8192, 9, 1.0)])  # fmt: skip
    result = compare_runs(a, b / "results.jsonl")
    assert result["prompts"] == 6
    short = result["lengths"]["4096"]
    # vt: A 50, B 50, diffs (100, 0, -100); cwe: A 55, B 20, diffs (10, 60).
    assert short["a"] == pytest.approx((50 + 55) / 2) and short["b"] == pytest.approx((50 + 20) / 2)
    assert short["difference"] == pytest.approx(17.5)
    var_vt = (100**2 + 0 + 100**2) / 2 / 3
    var_cwe = ((10 - 35) ** 2 + (60 - 35) ** 2) / 1 / 2
    assert short["stderr"] == pytest.approx(math.sqrt(var_vt + var_cwe) / 2, abs=0.01)
    assert short["tasks"]["cwe"] == {"a": 55.0, "b": 20.0, "n": 2} and short["prompts"] == 5
    long = result["lengths"]["8192"]
    assert (long["a"], long["b"], long["difference"], long["stderr"], long["prompts"]) == (100, 0, 100, 0, 1)


def test_different_answer_caps_are_counted_and_shown(tmp_path):
    rows = [("niah_single_3", 4096, i, 1.0) for i in range(3)]
    short, full = _write(tmp_path / "short", rows, cap=32), _write(tmp_path / "full", rows, cap=128)
    result = compare_runs(short, full)
    assert result["cap_mismatches"] == {"32 -> 128": 3}
    markdown = comparison_markdown(result)
    assert "Answer caps differ" in markdown and "3 at 32 -> 128" in markdown
    # The same cap, or a row that does not record one, is no mismatch.
    assert compare_runs(full, _write(tmp_path / "same", rows, cap=128))["cap_mismatches"] == {}
    unknown = compare_runs(full, _write(tmp_path / "old", rows))
    assert unknown["cap_mismatches"] == {} and "Answer caps" not in comparison_markdown(unknown)


def test_errors_name_the_problem(tmp_path):
    a = _write(tmp_path / "a", [("vt", 4096, 0, 1.0)])
    with pytest.raises(ValueError, match="no results.jsonl"):
        compare_runs(a, tmp_path / "missing")
    with pytest.raises(ValueError, match="share no prompt"):
        compare_runs(a, _write(tmp_path / "b", [("vt", 4096, 1, 1.0)]))
    with pytest.raises(ValueError, match="4000 tokens in run A, 4001 in run B"):
        compare_runs(_write(tmp_path / "c", [("vt", 4096, 0, 1.0, 4000)]),
                     _write(tmp_path / "d", [("vt", 4096, 0, 1.0, 4001)]))  # fmt: skip
    # A run still writing: its unfinished last line is left out, not an error.
    (a / "results.jsonl").write_text((a / "results.jsonl").read_text() + '{"id": "ruler/vt/4096/0/1", "sco')
    assert compare_runs(a, a)["prompts"] == 1
    (tmp_path / "e").mkdir()
    (tmp_path / "e/results.jsonl").write_text('{"id": "x"}\n{"oops"\n')
    with pytest.raises(ValueError, match="line 2: not an eval result record"):
        compare_runs(tmp_path / "e", a)


def test_cli_prints_table_and_writes_json(tmp_path, capsys):
    a = _write(tmp_path / "a", [("vt", 4096, i, float(i % 2)) for i in range(4)])
    b = _write(tmp_path / "b", [("vt", 4096, i, 0.0) for i in range(4)])
    assert main([str(a), str(b), "--out", str(tmp_path / "cmp.json")]) == 0
    table = capsys.readouterr().out
    assert "| 4k | **average** | 4 | **50.00** | **0.00** | **+50.00 ± 28.87** |" in table
    assert json.loads((tmp_path / "cmp.json").read_text())["lengths"]["4096"]["difference"] == 50
    assert main([str(a), str(tmp_path / "nothing")]) == 2
    assert "subquad compare: error" in capsys.readouterr().err

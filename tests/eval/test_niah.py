from __future__ import annotations

import pytest

from subquad.eval import niah
from subquad.eval._core import count_tokens

from .oracles import solve_niah


@pytest.mark.parametrize("depth", [0, 25, 50, 100])
def test_needle_depth_and_budget(depth, bpe_tokenizer):
    samples = niah.generate(4096, depth, bpe_tokenizer, num_samples=2, seed=3)
    for sample in samples:
        text = sample.input
        tokens = count_tokens(bpe_tokenizer, text)
        assert tokens == sample.prompt_tokens and 0.9 * 4096 <= tokens + sample.max_new_tokens <= 4096
        start = text.index("afterwards.\n") + len("afterwards.\n")
        end = text.rindex("\nWhat is the special magic number")
        position = (text.index("One of the special magic numbers") - start) / (end - start)
        assert abs(position - depth / 100) < 0.05
        assert niah.score(solve_niah(text), sample.answers) == 1.0
    assert samples[0].input != samples[1].input
    assert [s.input for s in niah.generate(4096, depth, bpe_tokenizer, 2, seed=3)] == [
        s.input for s in samples
    ]


def test_heatmap_png(tmp_path):
    scores = {(d, n): (d / 100 + n / 8192) / 2 for d in (0, 50, 100) for n in (1024, 4096, 8192)}
    path = niah.save_heatmap(scores, tmp_path / "heat.png", title="test")
    data = (tmp_path / "heat.png").read_bytes()
    assert path.endswith("heat.png") and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="empty"):
        niah.save_heatmap({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        niah.save_heatmap({(0, 1024): 7.0}, tmp_path / "x.png")


def test_bad_inputs(whitespace_tokenizer):
    with pytest.raises(ValueError, match="depth_percent must be in"):
        niah.generate(4096, 120, whitespace_tokenizer, 1)
    with pytest.raises(ValueError, match="depth_"):
        niah.depth_of("depth_x")
    assert niah.depth_of("depth_35") == 35

"""`benchmarks/decode.py --only attention` end to end on the CPU (tiny lengths, the PyTorch paths)."""

import json


def test_attention_mode_rows(tmp_path, load_script):
    bench = load_script("benchmarks/decode.py")
    lengths = [2048, 4096]
    report = bench.main(
        ["--device", "cpu", "--quick", "--only", "attention", "--decode-steps", "2", "--out", str(tmp_path),
         "--decode-lengths", *map(str, lengths)]
    )  # fmt: skip
    rows = {(r["shape"], r["tokens"], r["attention"], r["timing"]): r for r in report["rows"]}
    assert len(rows) == len(report["rows"]) == 2 * len(lengths) * 2 * 2
    assert set(report["env"]["shapes"]) == {"layer-8b", "small"}
    for (shape, length, attention, timing), row in rows.items():
        if timing == "graph":
            assert row["error"] == "n/a on CPU"
            continue
        assert "error" not in row and row["ms_per_step"] > 0 and row["gb_per_s"] > 0
        heads_kv, dim = report["env"]["shapes"][shape]["heads_kv"], report["env"]["shapes"][shape]["head_dim"]
        if attention == "dense":
            assert row["bytes_read"] == length * heads_kv * dim * 2 * 4  # keys and values, float32
        else:
            assert 0 < row["bytes_read"] < rows[(shape, length, "dense", timing)]["bytes_read"]
    for shape in ("layer-8b", "small"):
        for length in lengths:
            assert report["summary"][f"attention_decode_speedup_eager_{shape}_{length}"] > 0
    (written,) = tmp_path.glob("decode-attention-cpu-*.json")
    assert json.loads(written.read_text())["rows"] == json.loads(json.dumps(report["rows"]))
    assert "| layer-8b | 4,096 | dense | graph |" in written.with_suffix(".md").read_text()


def test_decode_mode_graph_rows(tmp_path, load_script):
    # --graph adds a GraphedDecoder row per model (its ops run eagerly on the CPU) beside the eager one.
    bench = load_script("benchmarks/decode.py")
    report = bench.main(
        ["--device", "cpu", "--quick", "--only", "decode", "--graph", "--decode-steps", "2",
         "--decode-lengths", "256", "--out", str(tmp_path)]
    )  # fmt: skip
    rows = {(r["attention"], r["timing"]): r for r in report["rows"]}
    assert set(rows) == {("ssa", "eager"), ("ssa", "graph"), ("dense", "eager"), ("dense", "graph")}
    for (_, timing), row in rows.items():
        assert "error" not in row and row["ms_per_token"] > 0
        if timing == "graph":
            assert row["ms_per_token_run"] > 0 and row["prepare_step_ms"] > 0 and row["capture_ms"] is None
            assert row["captures_per_run"] == 0 and "capture=False" in row["note"]
    assert report["summary"]["decode_speedup_graph_256"] > 0
    assert report["summary"]["decode_graph_vs_eager_ssa_256"] > 0
    (written,) = tmp_path.glob("decode-cpu-*.md")
    assert "| decode | ssa | graph | 256 |" in written.read_text()

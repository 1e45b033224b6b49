"""Training loop on the CPU: a tiny synthetic corpus, the `debug` flavor, a few steps per test."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import subquad  # noqa: F401  (registers the Subquad auto classes)
from subquad.models.subquad import SubquadConfig, SubquadForCausalLM
from subquad.train.cli import main as cli_main
from subquad.train.heldout import main as heldout_main
from subquad.train.trainer import (
    TrainConfig,
    _build_model,
    convert_dense_to_ssa,
    evaluate_heldout,
    flops_per_token,
    lr_at,
    parse_seq_len_schedule,
    sample_batch,
    train,
)

EOS, BOS, PAD = 254, 253, 255


def _write_corpus(root: Path) -> Path:
    """Documents that repeat one fixed 17-token pattern (learnable from bigrams), eos-separated;
    skills.bin uses tokens 200..252 only, so a batch's source is visible in its ids."""
    rng = np.random.default_rng(0)
    pattern = rng.choice(200, size=17, replace=False)

    def stream(n_tokens: int, vocab: np.ndarray) -> np.ndarray:
        out: list[np.ndarray] = []
        while sum(len(x) for x in out) < n_tokens:
            length = int(rng.integers(100, 400))
            offset = int(rng.integers(0, len(vocab)))
            out.append(np.append(np.resize(np.roll(vocab, -offset), length), EOS))
        return np.concatenate(out)[:n_tokens].astype(np.uint16)

    root.mkdir(parents=True, exist_ok=True)
    stream(20000, pattern).tofile(root / "train.bin")
    stream(4000, pattern).tofile(root / "heldout.bin")
    stream(4000, np.arange(200, 253)).tofile(root / "skills.bin")
    special = {"<|bos|>": BOS, "<|eos|>": EOS, "<|pad|>": PAD}
    (root / "meta.json").write_text(
        json.dumps({"vocab_size": 256, "dtype": "uint16", "special_tokens": special})
    )
    vocab = {f"t{i}": i for i in range(253)} | special
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    fast.save_pretrained(root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("corpus"))


def _config(corpus: Path, out: Path, **overrides) -> TrainConfig:
    """Dense unless a test asks for SSA: the loop is the same, and dense debug runs ~10x faster on CPU."""
    values = dict(
        flavor="debug", attention="dense", steps=6, tokens_per_step=256, seq_len_schedule="0:32", lr=1e-2,
        warmup_steps=2, eval_interval=0, eval_tokens=256, checkpoint_interval=1000, log_interval=1,
        progress=False, device="cpu",
    )  # fmt: skip
    return TrainConfig(corpus=corpus, out_dir=out, **{**values, **overrides})


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ssa_run(corpus, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ssa_run")
    summary = train(
        _config(
            corpus, out, attention="ssa", steps=20, seq_len_schedule="0:64", warmup_steps=3, eval_interval=10
        )
    )
    return out, summary


def test_loss_decreases_and_lr_follows_schedule(ssa_run):
    out, summary = ssa_run
    steps = [m for m in _metrics(out) if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 21))
    assert steps[0]["loss"] > math.log(256) - 0.5
    assert summary["train_loss"] < steps[0]["loss"] - 2.0
    assert summary["heldout_loss"] < steps[0]["loss"] - 2.0
    # The optimizer used exactly the scheduled lr at every step.
    for m in steps:
        assert m["lr"] == pytest.approx(lr_at(m["step"] - 1, 1e-2, 3, 20, 0.1), rel=1e-9)
    evals = [m for m in _metrics(out) if "heldout_loss" in m]
    assert [m["step"] for m in evals] == [10, 20]
    assert summary["steps"] == 20 and summary["tokens"] == 20 * 256 and summary["completed"]
    assert summary["flops"] > 6 * 20 * 256 * summary["num_params"] * 0.5


def test_final_dir_loads_with_auto_classes(ssa_run, corpus):
    out, summary = ssa_run
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert isinstance(model, SubquadForCausalLM) and model.config.attention == "ssa"
    assert tokenizer.eos_token_id == EOS == model.config.eos_token_id
    ids = tokenizer("t1 t2 t3 t4", return_tensors="pt").input_ids
    assert ids.tolist() == [[1, 2, 3, 4]]
    loss = evaluate_heldout(model, corpus, 64, 256, "cpu")
    assert loss == pytest.approx(summary["heldout_loss"], rel=1e-5)
    assert evaluate_heldout(model, corpus, 64, 256, "cpu") == loss


def test_heldout_cli_measures_saved_and_overridden_routing(ssa_run, corpus, tmp_path, capsys):
    out, summary = ssa_run
    args = ["--model", str(out / "final"), "--corpus", str(corpus), "--seq-len", "64", "--tokens", "256"]
    assert heldout_main([*args, "--out", str(tmp_path / "saved.json")]) == 0
    saved = json.loads((tmp_path / "saved.json").read_text())
    assert saved["heldout_loss"] == pytest.approx(summary["heldout_loss"], rel=1e-5)
    assert saved["ssa"]["top_k"] == SubquadConfig.from_pretrained(out / "final").ssa["top_k"]

    # One routed block and one local one: the same weights see fewer keys, so the loss moves.
    assert heldout_main([*args, "--ssa", "top_k=1,local_blocks=1", "--out", str(tmp_path / "k1.json")]) == 0
    narrow = json.loads((tmp_path / "k1.json").read_text())
    assert narrow["ssa"]["top_k"] == 1 and narrow["ssa"]["local_blocks"] == 1
    assert narrow["heldout_loss"] != pytest.approx(saved["heldout_loss"], rel=1e-4)

    # Split by position: the spans' weighted mean is the loss. At 64 tokens the debug model's budget
    # covers every block, so its weights scored by dense attention (same positions) give the same loss.
    spans_args = [*args, "--by-position", "16,32", "--full-budget", "--out", str(tmp_path / "full.json")]
    assert heldout_main(spans_args) == 0
    full = json.loads((tmp_path / "full.json").read_text())
    assert full["attention"] == "dense" and full["full_budget"] and "ssa" not in full
    assert [(s["from"], s["to"]) for s in full["by_position"]] == [(1, 16), (16, 32), (32, 64)]
    assert [s["tokens"] for s in full["by_position"]] == [15 * 4, 16 * 4, 32 * 4]  # 4 windows of 64
    assert full["heldout_loss"] == pytest.approx(saved["heldout_loss"], rel=1e-4)
    assert len({round(s["loss"], 4) for s in full["by_position"]}) == 3

    capsys.readouterr()
    for bad in (["--by-position", "32,16"], ["--by-position", "64"], ["--full-budget", "--ssa", "top_k=2"]):
        assert heldout_main([*args, *bad]) == 2
    assert "--full-budget" in capsys.readouterr().err
    assert heldout_main([*args, "--ssa", "summary=median"]) == 2
    assert "summary" in capsys.readouterr().err
    assert heldout_main([*args, "--ssa", "{not json"]) == 2
    assert "subquad heldout" in capsys.readouterr().err


def test_lr_schedule_values():
    lr, warmup, total, floor = 1.0, 10, 110, 0.1
    assert lr_at(0, lr, warmup, total, floor) == pytest.approx(0.1)
    assert lr_at(4, lr, warmup, total, floor) == pytest.approx(0.5)
    assert lr_at(9, lr, warmup, total, floor) == pytest.approx(1.0)
    assert lr_at(10, lr, warmup, total, floor) == pytest.approx(1.0)
    # Cosine midpoint and floor reached at the last step (and held after it).
    mid = 10 + (total - 1 - 10) / 2
    assert lr_at(int(mid), lr, warmup, total, floor) == pytest.approx(0.55, abs=0.02)
    assert lr_at(total - 1, lr, warmup, total, floor) == pytest.approx(0.1)
    assert lr_at(total + 5, lr, warmup, total, floor) == pytest.approx(0.1)
    decay = [lr_at(s, lr, warmup, total, floor) for s in range(warmup, total)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert lr_at(0, 3e-3, 0, 10, 0.0) == pytest.approx(3e-3)


def test_curriculum_switches_seq_len(corpus, tmp_path):
    summary = train(_config(corpus, tmp_path, steps=5, seq_len_schedule="0:32,3:64"))
    steps = [m for m in _metrics(tmp_path) if "loss" in m]
    assert [m["seq_len"] for m in steps] == [32, 32, 32, 64, 64]
    assert summary["tokens"] == 5 * 256 and summary["heldout_seq_len"] == 64
    assert parse_seq_len_schedule("0:512, 2000:2048") == [(0, 512), (2000, 2048)]


def test_checkpoint_resume_matches_uninterrupted_run(corpus, tmp_path):
    full = train(_config(corpus, tmp_path / "full", steps=6, skills_fraction=0.3))
    # A budget far below one step: exactly one step runs, then a clean stop with a checkpoint.
    partial = train(_config(corpus, tmp_path / "split", steps=6, skills_fraction=0.3, max_minutes=1e-5))
    assert partial["stopped_early"] and partial["steps"] == 1 and not partial["completed"]
    assert (tmp_path / "split/checkpoint/model.safetensors").is_file()
    assert (tmp_path / "split/checkpoint/trainer_state.pt").is_file()
    assert not (tmp_path / "split/final").exists()
    resumed = train(_config(corpus, tmp_path / "split", steps=6, skills_fraction=0.3))
    assert resumed["completed"] and resumed["steps"] == 6 and resumed["tokens"] == full["tokens"]
    assert resumed["flops"] == pytest.approx(full["flops"])
    losses_full = [m["loss"] for m in _metrics(tmp_path / "full") if "loss" in m]
    losses_split = [m["loss"] for m in _metrics(tmp_path / "split") if "loss" in m]
    assert losses_split == pytest.approx(losses_full, rel=1e-6, abs=1e-7)
    a = load_file(tmp_path / "full/final/model.safetensors")
    b = load_file(tmp_path / "split/final/model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)
    # Rerunning a finished run trains nothing more.
    again = train(_config(corpus, tmp_path / "split", steps=6, skills_fraction=0.3))
    assert again["steps"] == 6 and len([m for m in _metrics(tmp_path / "split") if "loss" in m]) == 6


def test_resume_without_optimizer_state_warns_and_uses_weights(corpus, tmp_path):
    train(_config(corpus, tmp_path, steps=4, max_minutes=1e-5))
    (tmp_path / "checkpoint/trainer_state.pt").unlink()
    with pytest.warns(UserWarning, match="weights only"):
        summary = train(_config(corpus, tmp_path, steps=2))
    assert summary["completed"]


def test_max_minutes_stop_writes_checkpoint(corpus, tmp_path):
    summary = train(_config(corpus, tmp_path, steps=50, max_minutes=1e-5))
    assert summary["stopped_early"] and summary["steps"] >= 1
    state = torch.load(tmp_path / "checkpoint/trainer_state.pt", weights_only=False)
    assert state["step"] == summary["steps"] and state["data_position"]["next_step"] == summary["steps"]
    assert json.loads((tmp_path / "summary.json").read_text())["stopped_early"]


def test_sample_batch_is_deterministic_and_mixes_skills(corpus):
    train_ids = np.memmap(corpus / "train.bin", dtype="uint16", mode="r")
    skills = np.memmap(corpus / "skills.bin", dtype="uint16", mode="r")
    a, no_mask = sample_batch(train_ids, skills, 0, 7, 32, 8, 0.5)
    assert no_mask is None
    assert torch.equal(a, sample_batch(train_ids, skills, 0, 7, 32, 8, 0.5)[0])
    assert not torch.equal(a, sample_batch(train_ids, skills, 0, 8, 32, 8, 0.5)[0])
    only_skills, _ = sample_batch(train_ids, skills, 0, 7, 32, 8, 1.0)
    assert bool(((only_skills >= 200) & (only_skills != PAD)).all())
    no_skills, _ = sample_batch(train_ids, skills, 0, 7, 32, 8, 0.0)
    assert bool(((no_skills < 200) | (no_skills == EOS)).all())
    # The answer mask follows the skills windows token for token and is all False on text windows.
    answers = (np.asarray(skills) % 3 == 0).astype(np.uint8)
    ids, mask = sample_batch(train_ids, skills, 0, 7, 32, 8, 0.5, answers)
    assert torch.equal(ids, a) and mask.shape == ids.shape and mask.dtype == torch.bool
    from_skills = ((ids >= 200) & (ids != EOS)).any(dim=1)
    assert 0 < int(from_skills.sum()) < 8
    assert torch.equal(mask[from_skills], ids[from_skills] % 3 == 0)
    assert not bool(mask[~from_skills].any())


def test_answer_weight_trains_on_the_mask_and_needs_it(corpus, tmp_path):
    root = _write_corpus(tmp_path / "corpus")
    skills = np.fromfile(root / "skills.bin", dtype=np.uint16)
    with pytest.raises(ValueError, match="answer_weight=4.0: the corpus has no skills_answers.bin"):
        train(_config(root, tmp_path / "missing", skills_fraction=0.5, answer_weight=4.0))
    (skills % 5 == 0).astype(np.uint8)[:-1].tofile(root / "skills_answers.bin")
    with pytest.raises(ValueError, match="skill tokens; rebuild the skills"):
        train(_config(root, tmp_path / "short", skills_fraction=0.5, answer_weight=4.0))
    (skills % 5 == 0).astype(np.uint8).tofile(root / "skills_answers.bin")
    summary = train(_config(root, tmp_path / "weighted", skills_fraction=0.5, answer_weight=4.0))
    assert summary["completed"] and math.isfinite(summary["train_loss"])
    assert json.loads((tmp_path / "weighted/train_config.json").read_text())["answer_weight"] == 4.0
    with pytest.raises(ValueError, match="answer_weight=-1"):
        _config(root, tmp_path / "bad", answer_weight=-1)
    with pytest.raises(ValueError, match="skills_fraction=0 draws no skill windows"):
        _config(root, tmp_path / "bad", answer_weight=4.0, skills_fraction=0.0)


def test_loss_weights_weigh_each_label():
    torch.manual_seed(0)
    model = SubquadForCausalLM(
        SubquadConfig.from_flavor("debug", attention="dense", position_scheme="rope")
    ).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 37))
    plain = model(input_ids=ids, labels=ids).loss
    assert torch.allclose(model(input_ids=ids, labels=ids, loss_weights=torch.full((2, 37), 3.0)).loss, plain)
    keep = torch.rand(2, 37) < 0.3
    masked = model(input_ids=ids, labels=ids.masked_fill(~keep, -100)).loss
    assert torch.allclose(model(input_ids=ids, labels=ids, loss_weights=keep.float()).loss, masked)
    with pytest.raises(ValueError, match="loss_weights: shape"):
        model(input_ids=ids, labels=ids, loss_weights=torch.ones(2, 36))


def test_dense_twin_trains_and_converts_to_ssa(corpus, tmp_path):
    summary = train(_config(corpus, tmp_path / "dense", steps=12, attention="dense", seq_len_schedule="0:64"))
    first = next(m["loss"] for m in _metrics(tmp_path / "dense") if "loss" in m)
    assert summary["attention"] == "dense" and summary["train_loss"] < first - 1.0
    dense_dir = tmp_path / "dense/final"
    assert SubquadConfig.from_pretrained(dense_dir).position_scheme == "rope"

    converted = convert_dense_to_ssa(dense_dir, tmp_path / "converted", ssa={"top_k": 1})
    config = SubquadConfig.from_pretrained(converted)
    assert config.attention == "ssa" and config.position_scheme == "rope" and config.ssa["top_k"] == 1
    assert config.ssa["block_size"] == 16
    dense_weights = load_file(dense_dir / "model.safetensors")
    ssa_weights = load_file(converted / "model.safetensors")
    assert dense_weights.keys() == ssa_weights.keys()
    assert all(torch.equal(dense_weights[k], ssa_weights[k]) for k in dense_weights)
    assert AutoTokenizer.from_pretrained(converted).eos_token_id == EOS

    # Fine-tuning is train() initialised from the converted directory.
    tuned = train(
        _config(
            corpus, tmp_path / "tuned", steps=2, attention=None, init_from=converted, seq_len_schedule="0:64"
        )
    )
    tuned_config = SubquadConfig.from_pretrained(tmp_path / "tuned/final")
    assert tuned["attention"] == "ssa" and tuned_config.ssa["top_k"] == 1
    assert tuned_config.position_scheme == "rope"


def test_flops_per_token_counts_attention():
    dense = SubquadConfig.from_flavor("debug", attention="dense", position_scheme="rope")
    ssa = SubquadConfig.from_flavor("debug")
    # Short windows: SSA attends to every earlier key, so only routing separates it from dense.
    assert flops_per_token(ssa, 64, 1000) > flops_per_token(dense, 64, 1000)
    assert flops_per_token(dense, 1, 1000) == 6000 + 12 * 2 * 4 * 16
    # Long windows: dense grows with length, SSA stays bounded by its key budget.
    assert flops_per_token(dense, 32768, 1000) > 50 * flops_per_token(ssa, 32768, 1000) - 6000 * 50


@pytest.mark.parametrize(
    "field, value",
    [
        ("lr", 0.0), ("min_lr_ratio", 1.5), ("steps", 0), ("tokens_per_step", 16), ("warmup_steps", -1),
        ("seq_len_schedule", "5:32"), ("seq_len_schedule", "0:32,0:64"), ("seq_len_schedule", "0:40000"),
        ("seq_len_schedule", "0:x"), ("betas", (0.9, 1.5)), ("dtype", "fp16"), ("skills_fraction", 2.0),
        ("max_minutes", 0), ("flavor", "huge"), ("attention", "flash"), ("grad_clip", -1.0),
        ("routing_loss_temperature", 0.0), ("train_only", "lm"), ("train_only", "router"),
        ("recall_loss", -0.5), ("recall_loss_queries", 0),
    ],
)  # fmt: skip
def test_validation_errors_name_the_field(corpus, tmp_path, field, value):
    name = "tokens_per_step" if field == "tokens_per_step" else field
    with pytest.raises(ValueError, match=name):
        _config(corpus, tmp_path, **{field: value})


def test_corpus_errors(tmp_path, corpus):
    with pytest.raises(ValueError, match="corpus"):
        train(_config(tmp_path / "missing", tmp_path / "out"))
    with pytest.raises(ValueError, match="seq_len_schedule"):
        train(_config(corpus, tmp_path / "out", seq_len_schedule="0:32768", tokens_per_step=32768))


def test_cli_trains_converts_and_rejects_bad_arguments(corpus, tmp_path, capsys):
    common = ["--flavor", "debug", "--tokens-per-step", "256", "--seq-len-schedule", "0:32",
              "--device", "cpu", "--no-progress", "--eval-interval", "0", "--eval-tokens", "128"]  # fmt: skip
    dense = tmp_path / "dense"
    argv = ["--corpus", str(corpus), "--out", str(dense), "--attention", "dense", "--steps", "2", *common]
    assert cli_main(argv) == 0
    assert (dense / "final/model.safetensors").is_file()
    assert (
        cli_main(
            ["--convert-from", str(dense / "final"), "--out", str(tmp_path / "conv"), "--ssa", "top_k=1"]
        )
        == 0
    )
    assert SubquadConfig.from_pretrained(tmp_path / "conv/converted").ssa["top_k"] == 1
    assert cli_main(["--corpus", str(corpus), "--out", str(tmp_path / "bad"), "--lr", "-1", *common]) == 2
    assert "lr=" in capsys.readouterr().err


def test_fine_tune_from_a_bf16_model_keeps_fp32_weights(ssa_run, corpus, tmp_path):
    # A shipped model is bf16; AdamW's small updates would round away in bf16 parameters.
    bf16 = tmp_path / "bf16"
    SubquadForCausalLM.from_pretrained(ssa_run[0] / "final", dtype=torch.bfloat16).save_pretrained(bf16)
    assert SubquadConfig.from_pretrained(bf16).dtype == torch.bfloat16
    model = _build_model(
        _config(corpus, tmp_path / "ft", attention=None, init_from=bf16), {"vocab_size": 256}
    )
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_fine_tune_from_a_max_routed_model_can_go_back_to_mean(ssa_run, corpus, tmp_path):
    base = tmp_path / "max4"
    model = SubquadForCausalLM.from_pretrained(ssa_run[0] / "final")
    model.config.ssa = {**model.config.ssa, "summary": "max", "sub_block_size": 4}
    model.save_pretrained(base)
    config = _config(corpus, tmp_path / "ft", attention=None, init_from=base, ssa={"summary": "mean"})
    tuned = _build_model(config, {"vocab_size": 256})
    assert tuned.config.ssa_config == SubquadConfig.from_pretrained(ssa_run[0] / "final").ssa_config


def test_fine_tune_adds_a_learned_router_that_starts_as_the_shared_one(ssa_run, corpus, tmp_path):
    base = ssa_run[0] / "final"
    out = tmp_path / "learned"
    config = _config(
        corpus, out, attention=None, init_from=base, steps=4, seq_len_schedule="0:128",
        model_overrides={"router": "learned"}, routing_loss=1.0,
    )  # fmt: skip
    ids = torch.randint(3, 200, (1, 150))
    # The router the weights were trained with is where the learned one starts: same logits.
    start = _build_model(config, {"vocab_size": 256})
    with torch.no_grad():
        torch.testing.assert_close(
            start.eval()(ids).logits, SubquadForCausalLM.from_pretrained(base).eval()(ids).logits
        )
    summary = train(config)
    tuned = SubquadForCausalLM.from_pretrained(out / "final")
    assert summary["completed"] and tuned.config.router == "learned"
    assert all(m["routing_loss"] is not None for m in _metrics(out) if "loss" in m)
    # The router loss trained the router (128-token windows: several candidate blocks to rank; at 64
    # there is one, the loss is 0 and only weight decay would move the weights).
    moved = tuned.model.layers[0].self_attn.router_k_proj.weight
    assert not torch.equal(moved, start.model.layers[0].self_attn.router_k_proj.weight)


def test_recall_loss_is_logged_and_refused_where_it_cannot_train(ssa_run, corpus, tmp_path):
    out = tmp_path / "recall"
    config = _config(corpus, out, attention=None, init_from=ssa_run[0] / "final", steps=2,
                     seq_len_schedule="0:128", recall_loss=0.5, recall_loss_queries=8)  # fmt: skip
    assert train(config)["completed"]
    logged = [m["recall_loss"] for m in _metrics(out) if "loss" in m]
    assert logged and all(value is not None and value > 0 for value in logged)
    with pytest.raises(ValueError, match="recall_loss=0.5"):
        _config(corpus, tmp_path / "frozen", model_overrides={"router": "learned"}, routing_loss=1.0,
                recall_loss=0.5, train_only="router")  # fmt: skip


def test_router_only_training_leaves_the_language_model_as_it_was(ssa_run, corpus, tmp_path):
    base = ssa_run[0] / "final"
    out = tmp_path / "router-only"
    config = _config(
        corpus, out, attention=None, init_from=base, steps=3, seq_len_schedule="0:128",
        model_overrides={"router": "gated"}, routing_loss=1.0, routing_loss_temperature=0.5,
        train_only="router",
    )  # fmt: skip
    start = _build_model(config, {"vocab_size": 256})
    ids = torch.randint(3, 200, (1, 150))
    with torch.no_grad():  # a gated router added to a shared-router model starts as the shared one
        torch.testing.assert_close(
            start.eval()(ids).logits, SubquadForCausalLM.from_pretrained(base).eval()(ids).logits
        )
    assert train(config)["completed"]
    tuned = SubquadForCausalLM.from_pretrained(out / "final")
    router = {id(p) for p in tuned.router_parameters()}
    names = {name for name, p in tuned.named_parameters() if id(p) in router}
    before, after = dict(start.named_parameters()), dict(tuned.named_parameters())
    moved = {name for name in after if not torch.equal(after[name], before[name])}
    assert moved and moved <= names  # the router moved, nothing else did
    assert any("router_k_gate" in name for name in moved)
    assert all(m["grad_norm"] is not None for m in _metrics(out) if "loss" in m)
    # A model without a learned router has nothing to train.
    shared = _config(corpus, tmp_path / "shared", attention=None, init_from=base, steps=1,
                     seq_len_schedule="0:64", routing_loss=1.0, train_only="router")  # fmt: skip
    with pytest.raises(ValueError, match="no learned router"):
        train(shared)

"""Training loop for Subquad models: one GPU, bf16, AdamW, warmup + cosine, length curriculum, resume.

GPU (one H200; each job stops itself before 10 minutes and the next one resumes)::

    PYTHONPATH=src python -m subquad.train.cli --corpus data/corpus --out runs/nano-ssa --flavor nano \\
        --steps 3000 --tokens-per-step 131072 --seq-len-schedule 0:1024,1500:4096,2500:16384 \\
        --max-minutes 9 --device cuda --compile

CPU (smoke)::

    python -m subquad.train.cli --corpus CORPUS --out /tmp/run --flavor debug --steps 20 \\
        --tokens-per-step 2048 --seq-len-schedule 0:128

Batches are a pure function of ``(seed, step)``, so a resumed run reads exactly the windows an
uninterrupted run would; the checkpoint stores weights, optimizer, scheduler, RNG states and step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from subquad.models.subquad import SubquadConfig, SubquadForCausalLM
from subquad.ops.ssa.config import SSAConfig
from subquad.train.data import load_meta, load_split
from subquad.train.skills import answers_path

MAX_SEQ_LEN = 32768
# H100/H200 dense bf16 peak (no sparsity), the usual MFU denominator.
DEFAULT_CUDA_PEAK_FLOPS = 989e12
# CPU fallback: an order of magnitude only (one AVX2 core: 2 FMA units x 8 fp32 lanes x 2 x ~3 GHz).
CPU_PEAK_FLOPS_PER_CORE = 100e9
_STATE_FILE = "trainer_state.pt"
# What a run trains: every parameter, or only a learned router's projections.
_TRAIN_ONLY = ("all", "router")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "added_tokens.json", "chat_template.jinja")  # fmt: skip


@dataclass
class TrainConfig:
    """Everything one training run needs; rerunning with the same ``out_dir`` resumes it.

    Model: ``flavor`` (``debug``/``nano``/``small``) plus ``attention``, ``position_scheme``, ``ssa``
    (merged into the flavor's SSA settings) and any other ``model_overrides``; ``None`` keeps the
    flavor's value (``position_scheme`` defaults to ``"rope"`` for ``attention="dense"``). The
    vocabulary size comes from the corpus. ``init_from`` starts from a saved model directory instead
    (e.g. a converted dense twin); the explicit overrides above are then applied to its config.

    Optimisation: ``tokens_per_step`` tokens per optimizer step, cut into ``tokens_per_step //
    seq_len`` windows of the current ``seq_len``; ``micro_batch_tokens`` bounds the tokens per
    forward (gradient accumulation). LR warms up linearly for ``warmup_steps`` then follows a cosine
    to ``lr * min_lr_ratio`` at ``steps``.

    ``seq_len_schedule``: ``"0:512,2000:2048"`` or ``[(0, 512), (2000, 2048)]``: from each step on,
    windows have that length (at most 32K). ``skills_fraction``: share of windows drawn from
    ``skills.bin`` when the corpus has one. ``answer_weight``: each answer token of a skill document
    (``skills_answers.bin``) counts ``1 + answer_weight`` times in the LM loss (0 = plain loss), so
    the few tokens that need a read-back are not drowned by the text around them.

    ``routing_loss``: weight of the router loss (:mod:`subquad.models.routing_loss`, SSA models only;
    0 = off) measured on ``routing_loss_queries`` query rows per sequence and layer;
    ``routing_loss_temperature`` < 1 sharpens its target. ``train_only="router"`` freezes everything
    but a learned router (``router="learned"`` or ``"gated"``, router loss on): the language model
    stays bit-for-bit what it was, so any change in retrieval is the router's, and a step costs
    about a forward. ``recall_loss``: weight of the recall loss (:mod:`subquad.models.recall_loss`:
    ``-log`` of the share of each layer's dense softmax mass on the keys it selects; SSA models only,
    0 = off) on ``recall_loss_queries`` query rows per sequence and layer.

    Budget: ``max_minutes`` stops cleanly (checkpoint written) before that much wall time has passed
    since ``train()`` started, so chained 10-minute jobs resume where the last one stopped.
    """

    corpus: str | Path
    out_dir: str | Path
    flavor: str = "nano"
    attention: str | None = None
    position_scheme: str | None = None
    ssa: dict[str, Any] | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | Path | None = None
    seed: int = 0
    tokens_per_step: int = 131072
    micro_batch_tokens: int | None = None
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    steps: int = 1000
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    seq_len_schedule: str | Sequence[tuple[int, int]] = "0:512"
    skills_fraction: float = 0.0
    answer_weight: float = 0.0
    routing_loss: float = 0.0
    routing_loss_queries: int = 64
    routing_loss_temperature: float = 1.0
    recall_loss: float = 0.0
    recall_loss_queries: int = 64
    train_only: str = "all"
    eval_interval: int = 250
    eval_tokens: int = 262144
    checkpoint_interval: int = 250
    log_interval: int = 10
    max_minutes: float | None = None
    compile: bool = False
    dtype: str = "auto"
    device: str = "auto"
    peak_flops: float | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.corpus = Path(self.corpus)
        self.out_dir = Path(self.out_dir)
        if self.init_from is not None:
            self.init_from = Path(self.init_from)
        self.seq_len_schedule = parse_seq_len_schedule(self.seq_len_schedule)
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        for name in ("tokens_per_step", "steps", "eval_tokens", "checkpoint_interval", "log_interval"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("seed", "warmup_steps", "eval_interval"):
            _check_int(name, getattr(self, name), minimum=0)
        if self.micro_batch_tokens is not None:
            _check_int("micro_batch_tokens", self.micro_batch_tokens, minimum=1)
        if not (_is_number(self.lr) and self.lr > 0):
            raise ValueError(f"lr={self.lr!r}: expected a positive float")
        if not (_is_number(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1):
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio!r}: expected a float in [0, 1]")
        if not (_is_number(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay={self.weight_decay!r}: expected a float >= 0")
        if not (_is_number(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(f"grad_clip={self.grad_clip!r}: expected a float >= 0 (0 = no clipping)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas={self.betas!r}: expected two floats in [0, 1)")
        if not (_is_number(self.skills_fraction) and 0 <= self.skills_fraction <= 1):
            raise ValueError(f"skills_fraction={self.skills_fraction!r}: expected a float in [0, 1]")
        if not (_is_number(self.answer_weight) and self.answer_weight >= 0):
            raise ValueError(f"answer_weight={self.answer_weight!r}: expected a float >= 0 (0 = plain loss)")
        if self.answer_weight > 0 and self.skills_fraction == 0:
            raise ValueError(
                f"answer_weight={self.answer_weight!r} weighs skill answers, but skills_fraction=0 draws "
                "no skill windows: set skills_fraction > 0 or answer_weight=0"
            )
        if not (_is_number(self.routing_loss) and self.routing_loss >= 0):
            raise ValueError(f"routing_loss={self.routing_loss!r}: expected a float >= 0 (0 = off)")
        _check_int("routing_loss_queries", self.routing_loss_queries, minimum=1)
        if not (_is_number(self.routing_loss_temperature) and self.routing_loss_temperature > 0):
            raise ValueError(
                f"routing_loss_temperature={self.routing_loss_temperature!r}: expected a float > 0 "
                "(1 = the plain block mass)"
            )
        if not (_is_number(self.recall_loss) and self.recall_loss >= 0):
            raise ValueError(f"recall_loss={self.recall_loss!r}: expected a float >= 0 (0 = off)")
        _check_int("recall_loss_queries", self.recall_loss_queries, minimum=1)
        if self.train_only not in _TRAIN_ONLY:
            raise ValueError(f"train_only={self.train_only!r}: expected one of {', '.join(_TRAIN_ONLY)}")
        if self.train_only == "router" and self.routing_loss == 0:
            raise ValueError(
                "train_only='router': only the router loss trains the router, but routing_loss=0; set "
                "routing_loss > 0"
            )
        if self.train_only == "router" and self.recall_loss > 0:
            raise ValueError(
                f"train_only='router' with recall_loss={self.recall_loss!r}: the recall loss trains the "
                "attention's q and k, which train_only='router' freezes; set recall_loss=0"
            )
        if self.max_minutes is not None and not (_is_number(self.max_minutes) and self.max_minutes > 0):
            raise ValueError(f"max_minutes={self.max_minutes!r}: expected a positive number or None")
        if self.peak_flops is not None and not (_is_number(self.peak_flops) and self.peak_flops > 0):
            raise ValueError(f"peak_flops={self.peak_flops!r}: expected a positive number or None")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"dtype={self.dtype!r}: expected 'auto', 'bf16' or 'fp32'")
        if self.attention not in (None, "ssa", "dense"):
            raise ValueError(f"attention={self.attention!r}: expected 'ssa', 'dense' or None")
        if self.init_from is None and self.flavor not in _flavors():
            raise ValueError(f"flavor={self.flavor!r}: expected one of {tuple(_flavors())}")
        if self.ssa is not None and not isinstance(self.ssa, dict):
            raise ValueError(f"ssa={self.ssa!r}: expected a dict of SSAConfig fields or None")
        if not isinstance(self.model_overrides, dict):
            raise ValueError(f"model_overrides={self.model_overrides!r}: expected a dict")
        try:
            torch.device(_resolve_device(self.device))
        except RuntimeError as exc:
            raise ValueError(f"device={self.device!r}: {exc}") from None
        for step, seq_len in self.seq_len_schedule:
            if seq_len > self.tokens_per_step:
                raise ValueError(
                    f"tokens_per_step={self.tokens_per_step}: smaller than seq_len {seq_len} (from step "
                    f"{step} of seq_len_schedule); a step needs at least one window"
                )

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        for key in ("corpus", "out_dir", "init_from"):
            values[key] = None if values[key] is None else str(values[key])
        values["seq_len_schedule"] = [list(x) for x in self.seq_len_schedule]
        values["betas"] = list(self.betas)
        return values


def parse_seq_len_schedule(schedule: str | Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``"0:512,2000:2048"`` -> ``[(0, 512), (2000, 2048)]``, validated: starts at step 0, steps
    strictly increase, lengths in ``[2, 32768]``."""
    try:
        if isinstance(schedule, str):
            pairs = [tuple(int(x) for x in part.split(":")) for part in schedule.split(",") if part.strip()]
        else:
            pairs = [tuple(int(x) for x in pair) for pair in schedule]
    except (TypeError, ValueError):
        pairs = None
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError(
            f"seq_len_schedule={schedule!r}: expected 'step:seq_len,...' such as '0:512,2000:2048'"
        )
    if pairs[0][0] != 0:
        raise ValueError(f"seq_len_schedule={schedule!r}: the first entry must start at step 0")
    for (a, _), (b, _) in zip(pairs, pairs[1:]):
        if b <= a:
            raise ValueError(f"seq_len_schedule={schedule!r}: steps must strictly increase")
    for _, seq_len in pairs:
        if not 2 <= seq_len <= MAX_SEQ_LEN:
            raise ValueError(f"seq_len_schedule={schedule!r}: seq_len {seq_len} outside [2, {MAX_SEQ_LEN}]")
    return [(int(a), int(b)) for a, b in pairs]


def seq_len_at(schedule: Sequence[tuple[int, int]], step: int) -> int:
    """Window length used at (0-based) ``step``."""
    current = schedule[0][1]
    for start, seq_len in schedule:
        if step >= start:
            current = seq_len
    return current


def lr_at(step: int, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning rate at (0-based) ``step``: linear warmup to ``lr`` over ``warmup_steps`` steps, then a
    cosine from ``lr`` down to ``lr * min_lr_ratio`` reached at the last step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def flops_per_token(config: SubquadConfig, seq_len: int, num_params: int) -> float:
    """Training FLOPs per token (forward + backward) at window length ``seq_len``.

    ``6 * num_params`` for the matmuls (``num_params`` = parameters that take part in a matmul, the
    tied embedding counted once as the LM head), plus attention: ``12 * layers * heads * head_dim``
    per attended key (QK^T and PV, x3 for the backward), with keys per query averaged over positions:
    ``(t + 1)`` for dense, ``min(t + 1, max_keys)`` for SSA; plus SSA routing (query against every
    earlier routing summary, forward only, ``2 * layers * heads * head_dim`` per summary).
    """
    per_key = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim
    positions = np.arange(1, seq_len + 1, dtype=np.float64)
    if config.attention == "dense":
        keys = positions.mean()
        routing = 0.0
    else:
        ssa = config.ssa_config
        keys = np.minimum(positions, ssa.max_keys).mean()
        summaries = np.ceil(positions / ssa.summary_size).mean()
        routing = 2 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * summaries
    return float(6 * num_params + per_key * keys + routing)


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters used in matmuls: all, minus the embedding table when it is not tied to the LM head."""
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    if embed is not model.get_output_embeddings().weight:
        total -= embed.numel()
    return total


def default_peak_flops(device: torch.device) -> float:
    """MFU denominator: H100/H200 bf16 on CUDA; a rough per-core estimate on CPU."""
    if device.type == "cuda":
        return DEFAULT_CUDA_PEAK_FLOPS
    return CPU_PEAK_FLOPS_PER_CORE * (os.cpu_count() or 1)


def _read_meta(corpus: Path) -> dict[str, Any]:
    meta = load_meta(corpus)
    if meta.get("dtype") not in ("uint16", "uint32"):
        raise ValueError(
            f"corpus={str(corpus)!r}: meta.json dtype={meta.get('dtype')!r}, expected uint16/uint32"
        )
    return meta


def _open_tokens(corpus: Path, split: str) -> np.ndarray | None:
    """Token ids of ``split.bin`` (None when the file is absent)."""
    if not (Path(corpus) / f"{split}.bin").is_file():
        return None
    return load_split(corpus, split)


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(tokens[s : s + seq_len], dtype=np.int64) for s in starts]))


def sample_batch(
    train: np.ndarray, skills: np.ndarray | None, seed: int, step: int, seq_len: int, batch: int,
    skills_fraction: float, answers: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """``[batch, seq_len]`` int64 windows at random offsets, a pure function of ``(seed, step)``, and
    with ``answers`` (the skills' answer mask) the same windows of it as bool (all False for text)."""
    rng = np.random.default_rng([seed, step])
    from_skills = rng.random(batch) < skills_fraction if skills is not None else np.zeros(batch, dtype=bool)
    rows, masks = [], []
    for use_skills in from_skills:
        source = skills if use_skills else train
        start = int(rng.integers(0, len(source) - seq_len + 1))
        rows.append(np.asarray(source[start : start + seq_len], dtype=np.int64))
        if answers is not None:
            masks.append(answers[start : start + seq_len] if use_skills else np.zeros(seq_len, np.uint8))
    mask = torch.from_numpy(np.stack(masks).astype(bool)) if answers is not None else None
    return torch.from_numpy(np.stack(rows)), mask


def _autocast(device: torch.device, dtype: str):
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    if not use_bf16:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _heldout_batches(corpus_dir: str | Path, seq_len: int, num_tokens: int, batch_tokens: int):
    """``num_tokens // seq_len`` (at least one) evenly spaced windows of ``heldout.bin``, the same
    every call, as ``[n, seq_len]`` int64 batches of about ``batch_tokens`` tokens."""
    heldout = _open_tokens(Path(corpus_dir), "heldout")
    if heldout is None:
        raise ValueError(f"corpus_dir={str(corpus_dir)!r}: no heldout.bin")
    if len(heldout) < seq_len:
        raise ValueError(f"seq_len={seq_len}: longer than heldout.bin ({len(heldout)} tokens)")
    count = max(1, num_tokens // seq_len)
    starts = np.linspace(0, len(heldout) - seq_len, count).astype(np.int64)
    per_batch = max(1, batch_tokens // seq_len)
    return [_windows(heldout, starts[i : i + per_batch], seq_len) for i in range(0, count, per_batch)]


@torch.no_grad()
def evaluate_heldout(
    model: torch.nn.Module,
    corpus_dir: str | Path,
    seq_len: int,
    num_tokens: int,
    device: str | torch.device,
    batch_tokens: int = 65536,
    dtype: str = "auto",
) -> float:
    """Mean next-token loss on ``num_tokens // seq_len`` (at least one) evenly spaced windows of
    ``heldout.bin``: the same windows every call, so numbers compare across steps and runs."""
    device = torch.device(_resolve_device(str(device)))
    batches = _heldout_batches(corpus_dir, seq_len, num_tokens, batch_tokens)
    was_training = model.training
    model.eval()
    losses = []
    try:
        for ids in batches:
            ids = ids.to(device)
            with _autocast(device, dtype):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            losses.append(float(loss) * len(ids))
    finally:
        model.train(was_training)
    return sum(losses) / sum(len(ids) for ids in batches)


@torch.no_grad()
def heldout_loss_by_position(
    model: torch.nn.Module,
    corpus_dir: str | Path,
    seq_len: int,
    num_tokens: int,
    device: str | torch.device,
    edges: Sequence[int],
    batch_tokens: int = 65536,
    dtype: str = "auto",
) -> list[dict[str, float]]:
    """:func:`evaluate_heldout`'s windows, the loss split by where the predicted token sits in its
    window: one ``{"from", "to", "loss", "tokens"}`` per span between 1, ``edges`` and ``seq_len``.
    Where a long-context model gains or loses shows here: early positions see few keys whatever
    the attention, late ones many."""
    bounds = [1, *edges, seq_len]
    if any(not isinstance(e, int) or isinstance(e, bool) for e in edges) or bounds != sorted(set(bounds)):
        raise ValueError(f"edges={list(edges)!r}: expected increasing ints between 1 and seq_len={seq_len}")
    device = torch.device(_resolve_device(str(device)))
    batches = _heldout_batches(corpus_dir, seq_len, num_tokens, batch_tokens)
    was_training = model.training
    model.eval()
    totals = torch.zeros(seq_len - 1, dtype=torch.float64)
    try:
        for ids in batches:
            ids = ids.to(device)
            with _autocast(device, dtype):
                logits = model(input_ids=ids, use_cache=False).logits
            # Token t + 1 predicted from position t, summed over the batch's windows.
            nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
            totals += nll.sum(0).double().cpu()
    finally:
        model.train(was_training)
    windows = sum(len(ids) for ids in batches)
    spans = []
    for lo, hi in zip(bounds, bounds[1:]):
        part = totals[lo - 1 : hi - 1]  # predicted tokens lo .. hi - 1
        spans.append({"from": lo, "to": hi, "loss": float(part.sum()) / (len(part) * windows),
                      "tokens": len(part) * windows})  # fmt: skip
    return spans


def convert_dense_to_ssa(
    dense_dir: str | Path, out_dir: str | Path, ssa: dict[str, Any] | None = None
) -> Path:
    """Write the dense twin at ``dense_dir`` as an SSA model to ``out_dir``: the same weights, with
    ``attention="ssa"`` and ``ssa`` merged into its SSA settings. Its rotary scheme is kept (a
    converted model keeps the positions it was trained with). Tokenizer files are copied along.
    Fine-tune afterwards with ``train(TrainConfig(..., init_from=out_dir))``."""
    dense_dir, out_dir = Path(dense_dir), Path(out_dir)
    config = SubquadConfig.from_pretrained(dense_dir)
    if config.attention != "dense":
        warnings.warn(
            f"dense_dir={str(dense_dir)!r}: attention={config.attention!r}, not 'dense'", stacklevel=2
        )
    values = config.to_dict()
    values["attention"] = "ssa"
    values["ssa"] = SSAConfig.override(config.ssa, ssa or {})
    new_config = SubquadConfig.from_dict(values)
    model = SubquadForCausalLM.from_pretrained(dense_dir, config=new_config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    _copy_tokenizer(dense_dir, out_dir)
    return out_dir


def _copy_tokenizer(source: Path, target: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def _build_model(config: TrainConfig, meta: dict[str, Any]) -> SubquadForCausalLM:
    overrides: dict[str, Any] = dict(config.model_overrides)
    if config.attention is not None:
        overrides["attention"] = config.attention
    if config.position_scheme is not None:
        overrides["position_scheme"] = config.position_scheme
    elif overrides.get("attention") == "dense" and "position_scheme" not in overrides:
        overrides["position_scheme"] = "rope"
    if config.ssa is not None:
        overrides["ssa"] = dict(config.ssa)
    vocab = int(meta["vocab_size"])
    torch.manual_seed(config.seed)
    if config.init_from is not None:
        base = SubquadConfig.from_pretrained(config.init_from)
        values = {**base.to_dict(), **overrides}
        if "ssa" in overrides:
            values["ssa"] = SSAConfig.override(base.ssa, overrides["ssa"])
        model_config = SubquadConfig.from_dict(values)
        if model_config.vocab_size < vocab:
            raise ValueError(
                f"init_from={str(config.init_from)!r}: vocab_size {model_config.vocab_size} < the corpus's "
                f"{vocab}"
            )
        # fp32 master weights whatever the saved dtype (a shipped model is bf16): AdamW's small steps
        # would round away in bf16 parameters; autocast still runs the matmuls in bf16.
        model_config.dtype = torch.float32
        model = SubquadForCausalLM.from_pretrained(config.init_from, config=model_config, dtype=torch.float32)
        if model_config.router != "shared" and base.router == "shared":
            # The new router starts as the one the weights were trained with, not at random.
            for layer in model.model.layers:
                layer.self_attn.init_router_from_attention()
        elif model_config.router == "gated" and base.router != "gated":
            # A gate added to a trained router starts open: the same picks until the router loss moves it.
            for layer in model.model.layers:
                layer.self_attn.open_router_gate()
        return model
    overrides.setdefault("vocab_size", vocab)
    # Special-token ids as data.py records them, so generate() stops at the corpus's eos.
    special = meta.get("special_tokens") or {}
    for token, key in (("<|eos|>", "eos_token_id"), ("<|bos|>", "bos_token_id"), ("<|pad|>", "pad_token_id")):
        if special.get(token) is not None:
            overrides.setdefault(key, int(special[token]))
    try:
        model_config = SubquadConfig.from_flavor(config.flavor, **overrides)
    except TypeError as exc:
        raise ValueError(f"model_overrides: {exc}") from None
    if model_config.vocab_size < vocab:
        raise ValueError(f"model_overrides: vocab_size {model_config.vocab_size} < the corpus's {vocab}")
    return SubquadForCausalLM(model_config)


def _make_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # Decay matrices (projections, embedding); norms' gains stay undecayed. Frozen weights stay out.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, fused=device.type == "cuda")


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(out_dir: Path, model, optimizer, scheduler, state: dict[str, Any]) -> Path:
    """Write ``out_dir/checkpoint`` atomically: build it in a temporary directory, then swap it in."""
    final, tmp, old = out_dir / "checkpoint", out_dir / "checkpoint.tmp", out_dir / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    torch.save(
        {
            **state,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
        },
        tmp / _STATE_FILE,
    )
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _find_checkpoint(out_dir: Path) -> Path | None:
    # A crash between the two renames leaves only checkpoint.old: it is still a complete checkpoint.
    for name in ("checkpoint", "checkpoint.old"):
        path = out_dir / name
        if (path / "config.json").is_file():
            return path
    return None


def _optimizer_fits(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> bool:
    """Whether a saved optimizer state has the same groups and parameter shapes as ``optimizer``."""
    # Saved states are keyed by position across all groups, in group order.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_groups = saved.get("param_groups", [])
    if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in optimizer.param_groups]:
        return False
    index = dict(enumerate(params))
    for key, entry in saved.get("state", {}).items():
        param = index.get(int(key))
        if param is None or entry.get("exp_avg", param).shape != param.shape:
            return False
    return True


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def train(config: TrainConfig) -> dict[str, Any]:
    """Train (or resume) the run described by ``config``; returns a summary (also ``summary.json``).

    Writes ``out_dir/checkpoint/`` (periodically and at every stop), ``out_dir/metrics.jsonl`` and,
    once ``steps`` are done, ``out_dir/final/`` (model + tokenizer, loadable with ``Auto*``).
    """
    started = time.monotonic()
    budget_s = None if config.max_minutes is None else config.max_minutes * 60
    device = torch.device(_resolve_device(config.device))
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = _read_meta(config.corpus)
    train_tokens = _open_tokens(config.corpus, "train")
    if train_tokens is None:
        raise ValueError(f"corpus={str(config.corpus)!r}: no train.bin")
    skills = _open_tokens(config.corpus, "skills") if config.skills_fraction > 0 else None
    if config.skills_fraction > 0 and skills is None:
        warnings.warn(
            "skills_fraction > 0 but the corpus has no skills.bin: training on train.bin only", stacklevel=2
        )
    answers = None
    if config.answer_weight > 0 and skills is not None:
        path = answers_path(Path(config.corpus) / "skills.bin")
        if not path.is_file():
            raise ValueError(
                f"answer_weight={config.answer_weight}: the corpus has no {path.name} (rebuild its skills "
                "with this version of `subquad corpus`)"
            )
        answers = np.memmap(path, dtype=np.uint8, mode="r")
        if len(answers) != len(skills):
            raise ValueError(
                f"{path}: {len(answers)} entries for {len(skills)} skill tokens; rebuild the skills"
            )
    longest = max(s for _, s in config.seq_len_schedule)
    for name, tokens in (("train.bin", train_tokens), ("skills.bin", skills)):
        if tokens is not None and len(tokens) < longest:
            raise ValueError(f"seq_len_schedule: seq_len {longest} longer than {name} ({len(tokens)} tokens)")

    checkpoint = _find_checkpoint(out_dir)
    saved: dict[str, Any] | None = None
    if checkpoint is not None:
        model = SubquadForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        state_path = checkpoint / _STATE_FILE
        saved = (
            torch.load(state_path, map_location="cpu", weights_only=False) if state_path.is_file() else None
        )
    else:
        model = _build_model(config, meta)
    model.to(device)
    model.train()
    if config.routing_loss:
        model.enable_routing_loss(
            config.routing_loss, config.routing_loss_queries, config.routing_loss_temperature
        )
    if config.recall_loss:
        model.enable_recall_loss(config.recall_loss, config.recall_loss_queries)
    router_params = model.router_parameters()
    lm_params = [p for p in model.parameters() if all(p is not r for r in router_params)]
    if config.train_only == "router":
        if not router_params:
            raise ValueError(
                "train_only='router': the model has no learned router (router='shared'); add "
                "model_overrides router='learned'"
            )
        for p in lm_params:
            p.requires_grad_(False)
        lm_params = []
    optimizer = _make_optimizer(model, config, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            lr_at(step, config.lr, config.warmup_steps, config.steps, config.min_lr_ratio) / config.lr
        ),
    )
    step, tokens_seen, total_flops, elapsed_before = 0, 0, 0.0, 0.0
    if checkpoint is not None:
        if saved is None:
            warnings.warn(
                f"{checkpoint}: no trainer state; resuming from its weights only (step 0)", stacklevel=2
            )
        else:
            step, tokens_seen = int(saved["step"]), int(saved["tokens"])
            total_flops, elapsed_before = float(saved["flops"]), float(saved["wall_s"])
            if _optimizer_fits(saved["optimizer"], optimizer):
                optimizer.load_state_dict(saved["optimizer"])
                scheduler.load_state_dict(saved["scheduler"])
                _set_rng_state(saved["rng"])
            else:
                warnings.warn(
                    f"{checkpoint}: optimizer state does not match the model; resuming from weights only "
                    f"at step {step} with a fresh optimizer",
                    stacklevel=2,
                )
                scheduler.last_epoch = step
                for group, lr in zip(optimizer.param_groups, scheduler.get_lr()):
                    group["lr"] = lr

    forward_model = torch.compile(model) if config.compile else model
    num_params = matmul_params(model)
    peak = config.peak_flops or default_peak_flops(device)
    metrics_path = out_dir / "metrics.jsonl"
    (out_dir / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2))

    def log(record: dict[str, Any]) -> None:
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def state() -> dict[str, Any]:
        wall = elapsed_before + time.monotonic() - started
        # Batches depend only on (seed, step): the step is the data position.
        data_position = {"seed": config.seed, "next_step": step}
        return {"step": step, "tokens": tokens_seen, "flops": total_flops, "wall_s": wall,
                "data_position": data_position, "config": config.to_dict()}  # fmt: skip

    def eval_now(seq_len: int) -> float:
        # The eager model: eval lengths differ from training's and would recompile a compiled one.
        loss = evaluate_heldout(model, config.corpus, seq_len, config.eval_tokens, device, dtype=config.dtype)
        log({"step": step, "heldout_loss": loss, "seq_len": seq_len})
        return loss

    heldout_loss: float | None = None
    train_loss: float | None = None
    step_time = save_time = eval_time = 0.0
    steps_this_run = 0
    stopped_early = will_eval = False
    bar = tqdm(
        total=config.steps, initial=step, disable=not config.progress, desc="train", dynamic_ncols=True
    )
    while step < config.steps:
        seq_len = seq_len_at(config.seq_len_schedule, step)
        will_eval = config.eval_interval > 0 and (step + 1) % config.eval_interval == 0
        if budget_s is not None and steps_this_run > 0:
            # Leave room for this step, a possible eval and the checkpoint (x1.5 for jitter).
            needed = 1.5 * (step_time + save_time + (eval_time if will_eval else 0.0))
            if time.monotonic() - started + needed > budget_s:
                stopped_early = True
                break
        t0 = time.monotonic()
        batch = config.tokens_per_step // seq_len
        ids, answer_mask = sample_batch(
            train_tokens, skills, config.seed, step, seq_len, batch, config.skills_fraction, answers
        )
        micro = batch if config.micro_batch_tokens is None else max(1, config.micro_batch_tokens // seq_len)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for i in range(0, batch, micro):
            chunk = ids[i : i + micro].to(device, non_blocking=True)
            with _autocast(device, config.dtype):
                weights = None
                if answer_mask is not None:
                    weights = 1.0 + config.answer_weight * answer_mask[i : i + micro].to(device).float()
                loss = forward_model(
                    input_ids=chunk, labels=chunk, loss_weights=weights, use_cache=False
                ).loss
            if loss.requires_grad:  # a router-only forward with no candidate block has nothing to learn
                (loss * len(chunk) / batch).backward()
            loss_sum += loss.detach() * len(chunk)
        grad_norm = None
        if config.grad_clip > 0:
            # A learned router has its own loss: clipped apart, so its gradients never scale the LM's.
            if lm_params:
                grad_norm = torch.nn.utils.clip_grad_norm_(lm_params, config.grad_clip)
            if router_params:
                router_norm = torch.nn.utils.clip_grad_norm_(router_params, config.grad_clip)
                if not lm_params:  # a router-only run logs the router's norm
                    grad_norm = router_norm
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        train_loss = float(loss_sum) / batch
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"step {step}: loss is {train_loss}; lower lr or check the data")
        step += 1
        steps_this_run += 1
        step_tokens = batch * seq_len
        tokens_seen += step_tokens
        step_flops = flops_per_token(model.config, seq_len, num_params) * step_tokens
        if config.train_only == "router":
            step_flops /= 3  # the forward alone: no backward through the frozen model
        total_flops += step_flops
        step_time = time.monotonic() - t0
        tok_s = step_tokens / step_time
        mfu = step_flops / step_time / peak
        bar.update(1)
        bar.set_postfix(
            loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}", T=seq_len, refresh=False
        )
        if step % config.log_interval == 0 or step == config.steps:
            # The last micro-batch's router and recall losses; "loss" includes each x its weight.
            routing = None if model.last_routing_loss is None else float(model.last_routing_loss)
            recall = None if model.last_recall_loss is None else float(model.last_recall_loss)
            log({"step": step, "loss": train_loss, "lr": lr, "seq_len": seq_len, "tokens": tokens_seen,
                 "tokens_per_s": tok_s, "mfu": mfu, "flops": total_flops, "routing_loss": routing,
                 "recall_loss": recall,
                 "grad_norm": None if grad_norm is None else float(grad_norm)})  # fmt: skip
        if will_eval:
            t_eval = time.monotonic()
            heldout_loss = eval_now(seq_len)
            eval_time = time.monotonic() - t_eval
            bar.write(f"step {step}: held-out loss {heldout_loss:.4f} at seq_len {seq_len}")
        if step % config.checkpoint_interval == 0 and step < config.steps:
            t_save = time.monotonic()
            _save_checkpoint(out_dir, model, optimizer, scheduler, state())
            save_time = time.monotonic() - t_save
    bar.close()

    _save_checkpoint(out_dir, model, optimizer, scheduler, state())
    summary: dict[str, Any] = {
        "out_dir": str(out_dir), "steps": step, "total_steps": config.steps, "tokens": tokens_seen,
        "flops": total_flops, "train_loss": train_loss, "completed": step >= config.steps,
        "stopped_early": stopped_early, "wall_s": elapsed_before + time.monotonic() - started,
        "num_params": sum(p.numel() for p in model.parameters()), "attention": model.config.attention,
    }  # fmt: skip
    if step >= config.steps:
        final_len = seq_len_at(config.seq_len_schedule, config.steps - 1)
        summary["heldout_seq_len"] = final_len
        summary["heldout_loss"] = (
            heldout_loss if heldout_loss is not None and will_eval else eval_now(final_len)
        )
        final = out_dir / "final"
        model.save_pretrained(final)
        if (Path(config.corpus) / "tokenizer").is_dir():
            shutil.copytree(Path(config.corpus) / "tokenizer", final, dirs_exist_ok=True)
        (final / "training_summary.json").write_text(json.dumps(summary, indent=2))
        summary["final_dir"] = str(final)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected an int >= {minimum}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _flavors() -> dict[str, Any]:
    from subquad.models.subquad.configuration import FLAVORS

    return FLAVORS

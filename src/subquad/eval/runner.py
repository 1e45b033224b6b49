"""Run an eval suite on a causal LM and write resumable results plus a summary.

Output directory layout (``out_dir``)::

    results.jsonl    one line per finished sample (appended as it finishes; a rerun skips them)
    summary.json     scores in percent per task and length, averages, run settings
    summary.md       the same as a markdown table
    niah_heatmap.png the depth x length heatmap (niah suite only)

Prompts are regenerated from (suite, task, length, seed, index) with the model's tokenizer, so a
resumed run sees exactly the prompts the interrupted one saw. Decoding is greedy.

Example::

    from subquad.eval import runner
    summary = runner.evaluate(model, tokenizer, suite="ruler", lengths="4k,16k", num_samples=5, out_dir="out")
    summary = runner.evaluate_path("path/to/model", suite="niah", lengths="4k,32k", out_dir="out")
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import queue
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import mrcr, niah, ruler
from ._core import Sample, check_int, encode, format_length, parse_lengths, postprocess_prediction

if TYPE_CHECKING:
    from subquad.ops.ssa.config import SSAConfig

__all__ = [
    "ATTENTIONS", "DTYPES", "SUITES", "evaluate", "evaluate_path", "load_causal_lm", "load_model",
    "parse_lengths", "ssa_config_of", "suite_tasks",
]  # fmt: skip

SUITES: tuple[str, ...] = ("ruler", "mrcr", "niah")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# "saved": as the model was saved; "ssa": another transformers model run with SSA (subquad.hf)
ATTENTIONS = ("saved", "ssa")


def suite_tasks(suite: str, tasks: str | Sequence[str] | None = None) -> list[str]:
    """The tasks of ``suite`` to run: all of them, or the given subset (comma string or list).

    For the niah suite a task is a depth, ``depth_50`` or just ``50``.
    """
    if suite not in SUITES:
        raise ValueError(f"suite {suite!r} is not known; expected one of {', '.join(SUITES)}")
    known = {"ruler": ruler.TASKS, "mrcr": mrcr.TASKS, "niah": niah.TASKS}[suite]
    if tasks is None:
        return list(known)
    items = (
        [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    )
    items = [t for t in items if t]
    if not items:
        raise ValueError(f"tasks {tasks!r} names no task; expected some of {', '.join(known)}")
    chosen = []
    for item in items:
        if suite == "niah":
            name = f"depth_{niah.depth_of(item if item.startswith('depth_') else f'depth_{item}')}"
        elif item in known:
            name = item
        else:
            raise ValueError(f"task {item!r} is not in suite {suite!r}; expected some of {', '.join(known)}")
        if name not in chosen:
            chosen.append(name)
    return chosen


def _iter_samples(
    suite: str, task: str, length: int, tokenizer: Any, seed: int, start: int, stop: int, hint: int | None
) -> Iterator[Sample]:
    if suite == "ruler":
        return ruler.iter_samples(task, length, tokenizer, seed, start=start, stop=stop, hint=hint)
    if suite == "mrcr":
        return mrcr.iter_samples(task, length, tokenizer, seed, start=start, stop=stop, hint=hint)
    return niah.iter_samples(length, niah.depth_of(task), tokenizer, seed, start=start, stop=stop, hint=hint)


def _missing_samples(
    suite: str, task: str, length: int, tokenizer: Any, seed: int, missing: set[int], done: dict[str, dict]
) -> Iterator[Sample]:
    """The ``missing`` samples of one task and length, each built when the batch that needs it is due
    (a 12M-token cell of 50 prompts is gigabytes of text). A prompt's haystack search starts from the
    size of the sample before it (``_core.sample_chain``), so each run of consecutive missing indices
    starts from that sample's recorded ``haystack_size``; without one (records written before it was
    recorded) the run is rebuilt from sample 0, as every resume once was."""
    for first in sorted(i for i in missing if i - 1 not in missing):
        last = first
        while last + 1 in missing:
            last += 1
        start, hint = first, None
        if first > 0:
            before = done.get(sample_id(suite, task, length, seed, first - 1), {})
            hint = before.get("meta", {}).get("haystack_size")
            if hint is None:
                start = 0
        for sample in _iter_samples(suite, task, length, tokenizer, seed, start, last + 1, hint):
            if sample.index in missing:
                yield sample


def _score(suite: str, sample: Sample, prediction: str) -> float:
    if suite == "ruler":
        return ruler.score(sample.task, prediction, sample.answers)
    if suite == "mrcr":
        return mrcr.grade(prediction, sample.answers[0], sample.meta["hash"])
    return niah.score(prediction, sample.answers)


def sample_id(suite: str, task: str, length: int, seed: int, index: int) -> str:
    return f"{suite}/{task}/{length}/{seed}/{index}"


def _read_results(path: Path) -> dict[str, dict]:
    """Finished samples by id. A line cut off by an interruption is dropped from the file."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        # The process died mid-write: drop the partial last line so appends start on a clean line.
        raw = raw[: raw.rfind(b"\n") + 1]
        path.write_bytes(raw)
    done = {}
    for line in raw.decode("utf-8").splitlines():
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[record["id"]] = record
    return done


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def _warn_if_cap_cuts_answers(task: str, batch: list[Sample], cap: int, tokenizer: Any, warned: set) -> None:
    """Warn once per task when ``max_new_tokens`` is shorter than one of the batch's answers: a prediction
    cut off before its answer ends scores as a miss (a UUID is 25-34 tokens of the shipped tokenizer)."""
    if task in warned:
        return
    longest = max(len(encode(tokenizer, " " + answer)) for sample in batch for answer in sample.answers)
    if longest > cap:
        warned.add(task)
        warnings.warn(
            f"max_new_tokens={cap}: {task} answers take up to {longest} tokens, so a prediction can be cut "
            "off before its answer ends and score as a miss",
            stacklevel=3,
        )


def _greedy_generate(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy continuations of left-padded prompts (token ids counted exactly as when sizing them)."""
    import torch

    if not callable(getattr(model, "generate", None)):
        raise TypeError(f"model must have a transformers-style generate() method, got {type(model).__name__}")
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "pad_token_id": pad,
    }
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        kwargs["eos_token_id"] = eos
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs
        )
    new_tokens = output[:, width:].tolist()
    texts = []
    for ids in new_tokens:
        if eos is not None and eos in ids:
            ids = ids[: ids.index(eos)]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts


def _batches(items: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    items = iter(items)
    while batch := list(itertools.islice(items, size)):
        yield batch


def _encoded(
    batches: Iterable[list[Sample]], tokenizer: Any
) -> Iterator[tuple[list[Sample], list[list[int]], float]]:
    """Each batch with its prompts' token ids and the seconds tokenizing them took."""
    for batch in batches:
        start = time.perf_counter()
        prompts = [encode(tokenizer, s.input) for s in batch]
        yield batch, prompts, time.perf_counter() - start


_END = object()


def _ahead(items: Iterator[Any]) -> Iterator[Any]:
    """``items``, each made by a background thread while the caller works on the one before.

    Building a long prompt is mostly tokenizing (fitting the haystack, then the prompt itself): ~10 s
    of a 2M-token prompt's ~24 s on an H200 host (benchmarks/NOTES.md item 71). The ``tokenizers``
    library does that without holding the GIL, so it overlaps the model's generation. The thread's
    exceptions are raised here, in order; closing this generator stops the thread after its current
    item.
    """
    ready: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as err:  # noqa: BLE001  (re-raised in the caller's thread)
            put((_END, err))

    thread = threading.Thread(target=work, name="eval-prompts", daemon=True)
    thread.start()
    try:
        while True:
            item, err = ready.get()
            if item is _END:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=1.0)


def _worker_tokenizer(tokenizer: Any) -> Any | None:
    """A copy of ``tokenizer`` for the prompt thread (a transformers fast tokenizer resets its truncation
    and padding state on every call, so the two threads do not share one), or None where it cannot be
    copied."""
    try:
        return copy.deepcopy(tokenizer)
    except Exception:  # noqa: BLE001  (any failure: build the prompts in this thread instead)
        return None


def evaluate(
    model: Any,
    tokenizer: Any,
    *,
    suite: str,
    lengths: str | Sequence[int | str],
    num_samples: int,
    out_dir: str | os.PathLike,
    tasks: str | Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 1,
    max_batch_tokens: int = 65536,
    max_new_tokens: int | None = None,
    model_name: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate an already-built causal LM (with ``generate``) and its tokenizer on a suite.

    Samples already in ``out_dir/results.jsonl`` (same suite, task, length, seed, index) are skipped,
    so an interrupted run picks up where it stopped. A batch holds up to ``batch_size`` prompts of one
    task and length, and at most ``max_batch_tokens`` tokens (so long prompts run one at a time).
    ``max_new_tokens`` caps each task's own generation length. Returns the summary (also written).
    """
    tasks_to_run = suite_tasks(suite, tasks)
    length_list = parse_lengths(lengths)
    check_int("num_samples", num_samples, 1)
    check_int("seed", seed, -(2**63))
    check_int("batch_size", batch_size, 1)
    check_int("max_batch_tokens", max_batch_tokens, 1)
    if max_new_tokens is not None:
        check_int("max_new_tokens", max_new_tokens, 1)
    from tqdm.auto import tqdm

    from subquad.models.prefill import prefill_progress

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done = _read_results(results_path)
    plan = [
        (task, length, index)
        for length in length_list
        for task in tasks_to_run
        for index in range(num_samples)
    ]
    todo = [p for p in plan if sample_id(suite, p[0], p[1], seed, p[2]) not in done]
    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), desc=f"eval {suite}", disable=not progress)
    # --no-progress hides the per-prompt prefill bars too (generate() reaches prefill without a flag).
    # The prompts' own tokenizer: a copy for the prompt thread, or this one where it cannot be copied.
    builder = _worker_tokenizer(tokenizer)
    build = builder if builder is not None else tokenizer
    capped_tasks: set[str] = set()  # tasks already warned about a cap shorter than their answers
    with prefill_progress(None if progress else False), results_path.open("a", encoding="utf-8") as sink:
        for length in length_list:
            for task in tasks_to_run:
                missing = {i for t, n, i in todo if t == task and n == length}
                if not missing:
                    continue
                per_batch = max(1, min(batch_size, max_batch_tokens // length))
                bar.set_postfix_str(f"{task} @ {format_length(length)}")
                samples = _missing_samples(suite, task, length, build, seed, missing, done)
                batches = _encoded(_batches(samples, per_batch), build)
                for batch, prompts, encode_seconds in batches if builder is None else _ahead(batches):
                    new_tokens = max(s.max_new_tokens for s in batch)
                    if max_new_tokens is not None and max_new_tokens < new_tokens:
                        new_tokens = max_new_tokens
                        _warn_if_cap_cuts_answers(task, batch, new_tokens, tokenizer, capped_tasks)
                    start = time.perf_counter()
                    outputs = _greedy_generate(model, tokenizer, prompts, new_tokens)
                    # Tokenizing counts, as when it ran here, though now it overlapped the last batch.
                    seconds = (encode_seconds + time.perf_counter() - start) / len(batch)
                    for sample, output in zip(batch, outputs):
                        prediction = output.strip() if suite == "mrcr" else postprocess_prediction(output)
                        record = {
                            "id": sample_id(suite, task, length, seed, sample.index),
                            "suite": suite,
                            "task": task,
                            "length": length,
                            "seed": seed,
                            "index": sample.index,
                            "score": _score(suite, sample, prediction),
                            "prediction": prediction,
                            "answers": sample.answers,
                            "prompt_tokens": sample.prompt_tokens,
                            # the cap this answer ran under: a resumed cell may mix caps
                            "max_new_tokens": new_tokens,
                            "seconds": round(seconds, 4),
                            "meta": sample.meta,
                        }
                        sink.write(json.dumps(record) + "\n")
                        sink.flush()
                        done[record["id"]] = record
                    bar.update(len(batch))
    bar.close()
    records = [done[sample_id(suite, t, n, seed, i)] for t, n, i in plan]
    settings = {
        "suite": suite,
        "model": model_name or type(model).__name__,
        "lengths": length_list,
        "tasks": tasks_to_run,
        "num_samples": num_samples,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
    }
    ssa = ssa_config_of(getattr(model, "config", None))
    if ssa is not None:
        settings["ssa"] = ssa.to_dict()  # the routing the scores were measured with (overrides included)
    return write_summary(records, settings, out)


def write_summary(
    records: list[dict], settings: dict[str, Any], out_dir: str | os.PathLike
) -> dict[str, Any]:
    """Aggregate per-sample records into ``summary.json`` / ``summary.md`` (and the niah heatmap)."""
    out = Path(out_dir)
    suite = settings["suite"]
    grouped: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        grouped[record["task"]][record["length"]].append(record["score"])
    lengths = settings["lengths"]
    tasks = settings["tasks"]
    scores = {
        task: {str(n): round(100 * sum(v) / len(v), 2) for n, v in grouped[task].items() if v}
        for task in tasks
    }
    # RULER's headline number: the mean over tasks at each length (likewise for the other suites).
    average = {}
    for n in lengths:
        per_task = [scores[t][str(n)] for t in tasks if str(n) in scores[t]]
        if per_task:
            average[str(n)] = round(sum(per_task) / len(per_task), 2)
    summary: dict[str, Any] = {
        **settings,
        "scores": scores,
        "average": average,
        "overall": round(sum(average.values()) / len(average), 2) if average else None,
        "num_results": len(records),
    }
    if suite == "niah":
        cells = {
            (niah.depth_of(t), n): scores[t][str(n)] / 100
            for t in tasks
            for n in lengths
            if str(n) in scores[t]
        }
        if cells:
            summary["heatmap"] = niah.save_heatmap(
                cells, out / "niah_heatmap.png", title=f"Needle in a haystack: {settings['model']}"
            )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(summary_markdown(summary), encoding="utf-8")
    return summary


def summary_markdown(summary: dict[str, Any]) -> str:
    """A markdown table: one row per task, one column per length, the average last."""
    lengths = summary["lengths"]
    label = {"ruler": "task", "mrcr": "needles", "niah": "depth"}[summary["suite"]]
    head = f"| {label} | " + " | ".join(format_length(n) for n in lengths) + " |"
    rule = "|---|" + "---:|" * len(lengths)
    rows = [head, rule]
    for task, by_length in summary["scores"].items():
        cells = [f"{by_length[str(n)]:.1f}" if str(n) in by_length else "" for n in lengths]
        rows.append(f"| {task} | " + " | ".join(cells) + " |")
    name = "RULER average" if summary["suite"] == "ruler" else "average"
    avg = [f"{summary['average'][str(n)]:.1f}" if str(n) in summary["average"] else "" for n in lengths]
    rows.append(f"| **{name}** | " + " | ".join(f"**{a}**" if a else "" for a in avg) + " |")
    title = (
        f"# {summary['suite']} eval: {summary['model']}\n\n"
        f"Scores in percent; {summary['num_samples']} samples per cell, seed {summary['seed']}.\n\n"
    )
    return title + "\n".join(rows) + "\n"


def ssa_config_of(config: Any) -> SSAConfig | None:
    """The :class:`subquad.SSAConfig` a model config routes with, or ``None`` when it attends densely."""
    from subquad.ops.ssa.config import SSAConfig

    if getattr(config, "model_type", None) == "subquad":
        return SSAConfig.from_dict(config.ssa) if config.attention == "ssa" else None
    if getattr(config, "_attn_implementation", None) == "ssa":
        from subquad.hf import ssa_config_for

        return ssa_config_for(config)
    return None


def load_causal_lm(
    path: str | os.PathLike,
    device: str = "auto",
    dtype: str = "auto",
    ssa: dict[str, Any] | None = None,
    attention: str = "saved",
) -> Any:
    """Load a causal LM with ``AutoModelForCausalLM`` (no remote code), on ``device``, in eval mode.

    ``dtype="auto"`` keeps the stored dtype, except that float32 weights become bfloat16 on CUDA: the
    SSA kernels run in bf16/fp16, and float32 there silently takes the PyTorch reference path, some
    30x slower on long prompts. Ask for ``"float32"`` to keep it. ``ssa``: :class:`subquad.SSAConfig`
    fields that replace the saved model's (e.g. ``{"top_k": 64}``): the same weights, routed otherwise.
    ``attention="ssa"`` runs another transformers model (Llama, Mistral, Qwen2, Qwen3, ...) with SSA
    (:mod:`subquad.hf`, with float64 rotary angles: :func:`subquad.hf.precise_rotary`); Subquad models
    keep the attention their config names (a dense one is converted with ``subquad train
    --convert-from``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import subquad  # noqa: F401  - registers the Subquad model types with the Auto classes

    if not Path(path).exists():
        raise ValueError(f"model path {os.fspath(path)!r} does not exist; expected a saved model directory")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; expected one of {', '.join(DTYPES)}")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention {attention!r} is not supported; expected one of {', '.join(ATTENTIONS)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch_device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from error
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    routed_here = attention == "ssa" and config.model_type != "subquad"
    _check_attention(config, attention, ssa, path)
    override_ssa(config, ssa, path)
    extra = {}
    if routed_here:
        from subquad import hf

        hf.register()
        extra["attn_implementation"] = "ssa"
    model = AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=torch_dtype, trust_remote_code=False, **extra
    )
    if routed_here:
        _precise_rotary(model, path)
    if dtype == "auto" and torch_device.type == "cuda" and model.dtype == torch.float32:
        model.to(torch.bfloat16)
    model.to(torch_device)
    model.eval()
    return model


def _check_attention(
    config: Any, attention: str, ssa: dict[str, Any] | None, path: str | os.PathLike
) -> None:
    """Refuse what would not route as asked: SSA fields for a model that keeps its dense attention, or
    ``attention="ssa"`` for a dense Subquad model (converting one is a training step)."""
    where = f"the model at {os.fspath(path)!r}"
    if config.model_type == "subquad":
        if attention == "ssa" and config.attention != "ssa":
            raise ValueError(
                f"attention='ssa': {where} is a dense Subquad model; convert it first "
                f"(subquad train --convert-from {os.fspath(path)} --out DIR)"
            )
    elif ssa and attention != "ssa":
        raise ValueError(
            f"ssa={ssa!r}: {where} ({config.model_type}) keeps its saved attention; "
            "ask for attention='ssa' (--attention ssa) to route it"
        )


def _precise_rotary(model: Any, path: str | os.PathLike) -> None:
    """float64 rotary angles where the model's rotary modules allow it; a warning where they do not."""
    import warnings

    from subquad import hf

    try:
        hf.precise_rotary(model)
    except ValueError as error:
        warnings.warn(
            f"the model at {os.fspath(path)!r} keeps its own float32 rotary angles, which drift past a few "
            f"million positions: {error}",
            stacklevel=3,
        )


def override_ssa(config: Any, ssa: dict[str, Any] | None, path: str | os.PathLike) -> None:
    """Replace the saved SSA settings of ``config`` (loaded from ``path``) by ``ssa``'s fields, merged
    and validated before any weights load, so a bad field names itself first. None or {}: unchanged."""
    if not ssa:
        return
    if not isinstance(ssa, dict):
        raise TypeError(f"ssa={ssa!r}: expected a dict of SSAConfig fields")
    if getattr(config, "attention", "ssa") != "ssa":
        raise ValueError(f"ssa={ssa!r}: the model at {os.fspath(path)!r} has dense attention, nothing routes")
    from subquad.ops.ssa.config import SSAConfig

    config.ssa = SSAConfig.from_dict(SSAConfig.override(getattr(config, "ssa", None), ssa)).to_dict()


def load_model(
    path: str | os.PathLike,
    device: str = "auto",
    dtype: str = "auto",
    ssa: dict[str, Any] | None = None,
    attention: str = "saved",
) -> tuple[Any, Any]:
    """Load a causal LM (:func:`load_causal_lm`) and its tokenizer with the transformers Auto classes."""
    from transformers import AutoTokenizer

    model = load_causal_lm(path, device=device, dtype=dtype, ssa=ssa, attention=attention)
    return model, AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def evaluate_path(
    model_path: str | os.PathLike,
    *,
    device: str = "auto",
    dtype: str = "auto",
    ssa: dict[str, Any] | None = None,
    attention: str = "saved",
    **kwargs: Any,
) -> dict[str, Any]:
    """Load the model at ``model_path`` (see ``load_model``) and run ``evaluate`` on it."""
    model, tokenizer = load_model(model_path, device=device, dtype=dtype, ssa=ssa, attention=attention)
    kwargs.setdefault("model_name", Path(model_path).name or os.fspath(model_path))
    return evaluate(model, tokenizer, **kwargs)

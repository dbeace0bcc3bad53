"""The evaluation loop: generate for every (mode, framing, question) in batches, judge, and append one JSON line
per generation to ``generations.jsonl`` as it goes, so that a rerun with the same ``out_dir`` resumes where the
last one stopped (it skips (mode, framing, kind, question) keys already present, counting repeats of a
duplicated question separately).

Framings (`framings`) apply to the harmful and benign questions; helpfulness questions and tool turns (whole
conversations of their own) run once, under the ``bare`` framing."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidInputError, InvalidSettingError
from ..method.refusal import is_refusal
from ..models.batching import answer_nll, pad_id_of
from ..runtime.config import MODES, SamplingSettings, split_settings
from ..runtime.tools import assistant_message, needs_tool_prompt, with_tool_prompt
from .framings import parse_framings, render
from .judges import Judge, RefusalJudge, make_judge
from .loaders import KINDS, EvalItem, default_benign, default_qa, default_tool_turns, limit_items
from .metrics import matches_answer, summarize

GENERATIONS = "generations.jsonl"
RUN_FILE = "run.json"
SUMMARY = "summary.json"
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_NEW_TOKENS = 64
_Key = tuple[str, str, str, str]
_Pending = tuple[str, str, EvalItem]  # mode, framing, item
FRAMED_KINDS = frozenset({"harmful", "benign"})


def parse_modes(modes: str | Sequence[str]) -> list[str]:
    """``"vanilla,sa"`` or a list -> validated, de-duplicated list of modes in the given order."""
    names = [m.strip() for m in modes.split(",")] if isinstance(modes, str) else [str(m).strip() for m in modes]
    names = [m for m in names if m]
    if not names:
        raise InvalidSettingError(f"modes must name at least one of {', '.join(MODES)}")
    bad = [m for m in names if m not in MODES]
    if bad:
        raise InvalidSettingError(f"unknown mode(s) {', '.join(map(repr, bad))}; allowed: {', '.join(MODES)}")
    return list(dict.fromkeys(names))


def read_generations(out_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every complete line of ``out_dir/generations.jsonl`` (a torn last line of a killed run is skipped)."""
    path = Path(out_dir) / GENERATIONS
    if not path.is_file():
        return []
    records = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.endswith("\n") and line.strip():
                records.append(json.loads(line))
    return records


def _repair_tail(path: Path) -> None:
    """Drop a torn (unterminated) last line left by a killed run, so appends start on a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def _check_run(out: Path, run: Mapping[str, Any]) -> dict[str, Any]:
    """Refuse to mix generations made under other settings into ``out``; returns the merged run record.

    ``vector_id`` only matters to modes other than vanilla, so it is recorded (and compared) only for runs
    that include one: a vanilla-only run can later be extended with the other modes."""
    path = out / RUN_FILE
    merged = dict(run)
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = [k for k in run if k in old and old[k] != run[k]]
        if diff:
            details = "; ".join(f"{k}: {old[k]!r} there, {run[k]!r} now" for k in diff)
            raise InvalidSettingError(
                f"{out} holds a run with other settings ({details}); use another --out directory or delete that one"
            )
        merged = {**old, **run}
    path.write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")
    return merged


def _selected(
    items: Sequence[EvalItem], modes: Sequence[str], framings: Sequence[str], records: Sequence[Mapping[str, Any]]
) -> tuple[list[_Pending], list[dict[str, Any]]]:
    """(pending (mode, framing, item) triples, existing records that belong to this selection). Records
    written before framings existed count as ``bare``."""
    by_key: dict[_Key, list[Mapping[str, Any]]] = {}
    for record in records:
        key = (record["mode"], record.get("framing", "bare"), record["kind"], record["question"])
        by_key.setdefault(key, []).append(record)
    pending: list[_Pending] = []
    kept: list[dict[str, Any]] = []
    for mode in modes:
        for framing in framings:
            seen: Counter[_Key] = Counter()
            for item in items:
                if framing != "bare" and item.kind not in FRAMED_KINDS:
                    continue
                key = (mode, framing, item.kind, item.question)
                done = by_key.get(key, [])
                if seen[key] < len(done):
                    kept.append({"framing": "bare", **done[seen[key]]})
                else:
                    pending.append((mode, framing, item))
                seen[key] += 1
    return pending, kept


def _rejudge(path: Path, judge: RefusalJudge) -> int:
    """Recompute the refusal judge's verdicts of every line it judged (they follow from the output alone),
    so that a rerun after a change to the refusal rules updates older lines; rewrites the file atomically
    when anything changed. Returns the number of changed lines."""
    records = read_generations(path.parent)
    changed = 0
    for record in records:
        refusal = is_refusal(record["output"])
        verdict = record["verdict"]
        if record["judge"] == judge.name and record["kind"] == "harmful":
            verdict = judge.judge_harmful(record["question"], record["output"])
        elif record["judge"] == judge.name and record["kind"] in ("benign", "tool"):
            verdict = judge.judge_benign(record["question"], record["output"])
        if verdict != record["verdict"] or refusal != record["refusal"]:
            record["verdict"], record["refusal"] = verdict, refusal
            changed += 1
    if changed:
        temporary = path.with_suffix(".jsonl.tmp")
        with temporary.open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(temporary, path)
    return changed


def _batches(pending: Sequence[_Pending], size: int) -> Iterator[tuple[str, str, list[EvalItem]]]:
    """Consecutive batches of at most ``size`` items that share a mode and a framing."""
    batch: list[EvalItem] = []
    group: tuple[str, str] = ("", "")
    for mode, framing, item in pending:
        if batch and ((mode, framing) != group or len(batch) == size):
            yield group[0], group[1], batch
            batch = []
        group = (mode, framing)
        batch.append(item)
    if batch:
        yield group[0], group[1], batch


def _prompt(engine: Any, item: EvalItem, framing: str) -> Any:
    """The chat ``item`` is evaluated on: its question in ``framing``, or (tool turns) its conversation, with
    the tools described as `ChatSafeInfer` describes them to a chat template that cannot render tools."""
    if item.conversation is None:
        return render(framing, item.question)
    conversation = json.loads(item.conversation)
    messages = [
        assistant_message(m.get("content") or "", m["tool_calls"]) if m.get("tool_calls") else m
        for m in conversation["messages"]
    ]
    tools = conversation["tools"]
    return with_tool_prompt(messages, tools) if tools and needs_tool_prompt(engine.formatter) else messages


def _tools(engine: Any, item: EvalItem) -> list[dict[str, Any]] | None:
    """The tools to hand to a chat template that renders them (None when the prompt already describes them)."""
    if item.conversation is None or needs_tool_prompt(engine.formatter):
        return None
    return json.loads(item.conversation)["tools"] or None


def _eos_ids(engine: Any) -> set[int]:
    """End-of-sequence ids (generation config and tokenizer), which are not part of an answer's text."""
    return set(engine.eos_ids)


def _check_modes(engine: Any, modes: Sequence[str], settings: Mapping[str, Any]) -> None:
    for mode in modes:
        config = engine.resolve_config({**settings, "mode": mode})
        needs = config.amplified or (config.guided and config.unsafe_expert == "negated_vector")
        if needs and engine.vector is None:
            raise InvalidSettingError(
                f"mode {mode!r} needs a safety vector and the engine has none; pass --vector "
                f"FILE, or evaluate only modes that need none (vanilla, sgds)"
            )
        if config.guided and config.unsafe_expert == "model" and engine.unsafe_model is None:
            raise InvalidSettingError(
                f"mode {mode!r} with unsafe_expert='model' needs an engine built with unsafe_model"
            )


def run_evaluation(
    engine: Any,
    *,
    harmful: Sequence[EvalItem],
    benign: Sequence[EvalItem] | None = None,
    qa: Sequence[EvalItem] | None = None,
    tool_turns: Sequence[EvalItem] | None = (),
    modes: str | Sequence[str] = MODES,
    framings: str | Sequence[str] = ("bare",),
    judge: str | Judge = "refusal",
    out_dir: str | os.PathLike[str],
    limit: int | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int | None = None,
    settings: Mapping[str, Any] | None = None,
    progress: bool = True,
    report: bool = True,
) -> dict[str, Any]:
    """Evaluate ``engine`` in each mode on harmful, benign and helpfulness questions; returns the summary.

    ``benign`` / ``qa`` default to the shipped sets; ``limit`` keeps at most that many questions of each
    kind (round-robin over categories). ``tool_turns`` (default none; None: the shipped evaluation split) are
    benign agent and tool conversations whose next turn must not be refused. ``framings`` put the harmful and
    benign questions in the prompts of `evaluation.framings` (default: bare chats only). ``settings`` are extra
    per-call engine settings (alpha, scale, plausibility, ...). Writes ``generations.jsonl``, ``run.json``,
    ``summary.json`` and (``report=True``) ``report.md`` plus PNG plots into ``out_dir``; resumes from an existing
    ``generations.jsonl``."""
    modes = parse_modes(modes)
    framings = parse_framings(framings)
    if isinstance(judge, str):
        judge = make_judge(judge)
    if batch_size < 1:
        raise InvalidSettingError(f"batch_size must be >= 1; got {batch_size!r}")
    if max_new_tokens < 1:
        raise InvalidSettingError(f"max_new_tokens must be >= 1; got {max_new_tokens!r}")
    settings = dict(settings or {})
    clash = sorted({"mode", "max_new_tokens", "seed"} & set(settings))
    if clash:
        raise InvalidSettingError(
            f"settings must not set {', '.join(clash)}: use the modes / max_new_tokens / seed arguments"
        )
    sampling, config_settings = split_settings(settings)  # unknown names: TypeError
    SamplingSettings(**{**sampling, "max_new_tokens": max_new_tokens})  # bad values: ValueError
    engine.resolve_config(config_settings)
    _check_modes(engine, modes, config_settings)
    groups = [
        limit_items(harmful, limit),
        limit_items(default_benign() if benign is None else benign, limit),
        limit_items(default_qa() if qa is None else qa, limit),
        limit_items(default_tool_turns() if tool_turns is None else tool_turns, limit),
    ]
    items = [item for group in groups for item in group]
    if not items:
        raise InvalidInputError("no questions to evaluate")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vector = engine.vector
    run: dict[str, Any] = {
        "model": engine.model_name,
        "judge": judge.name,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "settings": settings,
    }
    if any(mode != "vanilla" for mode in modes):
        run["vector_id"] = vector.vector_id if vector is not None else None
    run = _check_run(out, run)
    path = out / GENERATIONS
    _repair_tail(path)
    pending, _ = _selected(items, modes, framings, read_generations(out))

    from tqdm.auto import tqdm

    if seed is not None:
        torch.manual_seed(seed)
    call = {"max_new_tokens": max_new_tokens, **settings}
    if seed is not None:
        call["seed"] = seed
    eos = _eos_ids(engine)
    pad = pad_id_of(engine.tokenizer)
    with (
        path.open("a", encoding="utf-8") as handle,
        tqdm(total=len(pending), desc="eval", unit="gen", disable=not progress, dynamic_ncols=True) as bar,
    ):
        for mode, framing, batch in _batches(pending, batch_size):
            bar.set_postfix_str(f"{mode}/{framing}")
            prompts = [_prompt(engine, item, framing) for item in batch]
            started = time.perf_counter()
            if any(_tools(engine, item) for item in batch):  # tools the template renders: one conversation each
                generations = [
                    engine.generate(p, mode=mode, tools=_tools(engine, i), **call)[0] for p, i in zip(prompts, batch)
                ]
            else:
                generations = engine.generate(prompts, mode=mode, **call)
            seconds = (time.perf_counter() - started) / len(batch)
            prompt_ids = [engine.formatter.encode(p, tools=_tools(engine, i)) for p, i in zip(prompts, batch)]
            answer_ids = [[t for t in g.token_ids if t not in eos] for g in generations]
            scores = answer_nll(engine.model, prompt_ids, answer_ids, pad, batch_size=batch_size)
            for item, generation, (nll, count) in zip(batch, generations, scores, strict=True):
                text = generation.text
                verdict: str
                if item.kind == "harmful":
                    verdict = judge.judge_harmful(item.question, text)
                elif item.kind in ("benign", "tool"):
                    verdict = judge.judge_benign(item.question, text)
                else:
                    verdict = "correct" if matches_answer(text, item.answers) else "incorrect"
                record = {
                    "mode": mode,
                    "framing": framing,
                    "kind": item.kind,
                    "question": item.question,
                    "category": item.category,
                    "output": text,
                    "verdict": verdict,
                    "judge": judge.name if item.kind != "qa" else "reference",
                    "refusal": is_refusal(text),
                    "finish_reason": generation.finish_reason,
                    "completion_tokens": generation.usage.completion_tokens,
                    "seconds": seconds,
                    "answer_nll": nll,
                    "answer_tokens": count,
                    "gate_weight": generation.safety.gate_weight,
                    "refusal_opened": generation.safety.refusal_opened,
                    "guided_changes": generation.safety.guided_changes,
                }
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            bar.update(len(batch))

    if isinstance(judge, RefusalJudge):
        _rejudge(path, judge)
    _, records = _selected(items, modes, framings, read_generations(out))
    summary = {
        "run": run,
        "modes": summarize([r for r in records if r["framing"] == "bare"], modes),
        "framings": {
            framing: summarize([r for r in records if r["framing"] == framing], modes) for framing in framings
        },
        "counts": {kind: sum(1 for i in items if i.kind == kind) for kind in KINDS},
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if report:
        from .report import write_report

        write_report(summary, out)
    return summary

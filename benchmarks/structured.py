"""Structured output and forced tool calls on the default model, and what constrained decoding costs.

    .venv/bin/python benchmarks/structured.py --out benchmarks/results/structured

On the 20 extraction prompts of ``data/structured_people.jsonl`` ("Extract the person: <text>"), with SafeInfer on
(default settings), counts replies that parse into ``Person(name: str, age: int)`` and those whose fields equal the
text's (and refusals: a request the gate weighs at or above its cutoff may decline in one sentence), for
LangChain's ``with_structured_output`` (json_schema, json_mode, function_calling; batched), a forced
tool call (``bind_tools(..., tool_choice="any")``, schema-valid arguments), and LlamaIndex's ``structured_predict``.
Then the cost per token: the same prompts generated with ``response_format={"type": "regex", "pattern":
"(?s:.*)"}`` (a mask that allows every token, so the tokens are identical and only the masking differs) and
without, same run, several rounds; and the JSON schema's time per token beside plain decoding's. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from tqdm.auto import tqdm

from safeinfer_integrations.method.refusal import is_refusal
from safeinfer_integrations.runtime.constrain import Constraint, allowed_mask
from safeinfer_integrations.runtime.engine_cache import get_engine
from safeinfer_integrations.training.data import structured_people


class Person(BaseModel):
    name: str
    age: int


def _score(results: list[Any], people: list[dict[str, Any]]) -> dict[str, int]:
    """Replies that parse (and whose fields are right), refusals (a refusal sentence instead of the format), and
    anything else (malformed: constrained decoding should leave none)."""
    valid = [r for r in results if isinstance(r, Person)]
    refused = [r for r in results if isinstance(r, Exception) and is_refusal(_refusal_text(r))]
    right = sum(isinstance(r, Person) and (r.name, r.age) == (p["name"], p["age"]) for r, p in zip(results, people))
    malformed = len(results) - len(valid) - len(refused)
    return {"valid": len(valid), "correct": right, "refused": len(refused), "malformed": malformed, "of": len(people)}


def _refusal_text(error: Exception) -> str:
    text = str(error)
    for marker in ("refused to produce the requested output: ", "got '", 'got "'):
        if marker in text:
            return text.split(marker, 1)[1]
    return text


def langchain_rows(people: list[dict[str, Any]]) -> dict[str, Any]:
    from langchain_core.tools import tool

    from safeinfer_integrations.langchain import ChatSafeInfer

    model = ChatSafeInfer(max_tokens=64)
    questions = [f"Extract the person: {p['text']}" for p in people]
    rows: dict[str, Any] = {}
    for method in ("json_schema", "json_mode", "function_calling"):
        runnable = model.with_structured_output(Person, method=method)
        rows[f"langchain {method}"] = _score(runnable.batch(questions, return_exceptions=True), people)

    @tool
    def record_person(name: str, age: int) -> str:
        """Record a person's full name and age in years."""
        return f"{name}, {age}"

    messages = model.bind_tools([record_person], tool_choice="any").batch(questions)
    calls = [m.tool_calls[0]["args"] if m.tool_calls else None for m in messages]
    parsed: list[Any] = [
        Person(**c) if c is not None and set(c) == {"name", "age"} else ValueError(m.content)
        for c, m in zip(calls, messages)
    ]
    rows["langchain forced tool call"] = _score(parsed, people)
    return rows


def llama_index_rows(people: list[dict[str, Any]]) -> dict[str, Any]:
    from llama_index.core.prompts import PromptTemplate

    from safeinfer_integrations.llama_index import SafeInferLLM

    llm = SafeInferLLM(max_tokens=64)
    prompt = PromptTemplate("Extract the person: {text}")
    results: list[Any] = []
    for person in tqdm(people, desc="structured_predict"):
        try:
            results.append(llm.structured_predict(Person, prompt, text=person["text"]))
        except Exception as error:  # counted as invalid
            results.append(error)
    return {"llama_index structured_predict": _score(results, people)}


def cost(people: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
    engine = get_engine()
    width = int(engine.model.get_output_embeddings().weight.shape[0])
    prompts = [[{"role": "user", "content": f"Extract the person as JSON: {p['text']}"}] for p in people[:8]]
    anything = {"type": "regex", "pattern": "(?s:.*)"}
    schema = {"type": "json_schema", "json_schema": {"schema": Person.model_json_schema()}}
    timings: dict[str, list[float]] = {"free": [], "allow everything": [], "json schema": []}
    tokens: dict[str, int] = {}
    for _ in tqdm(range(rounds), desc="cost rounds"):
        for label, settings in (("free", {}), ("allow everything", {"response_format": anything})):
            begun = time.perf_counter()
            out = engine.generate(prompts, max_new_tokens=32, **settings)
            timings[label].append(time.perf_counter() - begun)
            tokens[label] = sum(len(g.token_ids) for g in out)
        begun = time.perf_counter()
        out = engine.generate(prompts, max_new_tokens=32, response_format=schema)
        timings["json schema"].append(time.perf_counter() - begun)
        tokens["json schema"] = sum(len(g.token_ids) for g in out)
    assert tokens["free"] == tokens["allow everything"]
    constraints = [
        Constraint(engine.tokenizer, width, sorted(engine.eos_ids), schema) for _ in prompts
    ]  # a fresh JSON state per row: the first step's mask, the largest set of choices
    begun = time.perf_counter()
    for _ in range(200):
        allowed_mask(constraints, width)
    mask_seconds = (time.perf_counter() - begun) / 200
    per_token = {label: min(values) / tokens[label] for label, values in timings.items()}
    return {
        "batch": len(prompts),
        "tokens": tokens,
        "seconds_per_token_best_of_rounds": per_token,
        "mask_overhead_ratio": per_token["allow everything"] / per_token["free"],
        "mask_seconds_per_step_batch": mask_seconds,
        "mask_share_of_a_free_step": mask_seconds / (per_token["free"] * len(prompts)),
        "json_schema_vs_free_per_token": per_token["json schema"] / per_token["free"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    people = structured_people()
    result: dict[str, Any] = {}
    result.update(langchain_rows(people))
    result.update(llama_index_rows(people))
    result["cost"] = cost(people, args.rounds)
    for name, row in result.items():
        print(f"{name:32s} {row}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

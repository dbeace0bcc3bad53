"""A LlamaIndex ``FunctionAgent`` whose every step is generated with SafeInfer.

The agent has two tools (a leave-policy lookup over the handbook facts and a calculator). Tool schemas are
rendered by the model's chat template when it supports tools, and otherwise described in the system prompt
(SmolLM2's case); calls written as ``<tool_call>{...}</tool_call>`` are parsed back into tool calls.

The default model (135M parameters) is too small to be a useful agent: in our runs it answered directly
instead of calling a tool, even with ``--force-tool`` (``initial_tool_choice``, which tells it that it must
call that tool). The agent wiring is the same for any model: pass ``--model`` to use a larger local chat model
(0.5B+ with a tools-aware chat template).

    python examples/llamaindex_agent.py
    python examples/llamaindex_agent.py --force-tool leave_days
    python examples/llamaindex_agent.py --model /path/to/Qwen2.5-1.5B-Instruct
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from llama_index.core import Settings  # noqa: E402
from llama_index.core.agent.workflow import AgentStream, FunctionAgent, ToolCallResult  # noqa: E402
from llama_index.core.tools import FunctionTool  # noqa: E402

from safeinfer_integrations.llama_index import SafeInferLLM  # noqa: E402

LEAVE_DAYS = {"full-time": 27, "part-time": 13}  # examples/data/leave_policy.md (part-time: pro rata, 50%)


def leave_days(employment: str) -> int:
    """Days of paid annual leave per year for an employment type: 'full-time' or 'part-time' (50%)."""
    key = employment.strip().lower()
    if key not in LEAVE_DAYS:
        raise ValueError(f"employment must be one of {', '.join(LEAVE_DAYS)}; got {employment!r}")
    return LEAVE_DAYS[key]


def multiply(a: float, b: float) -> float:
    """Multiply two numbers."""
    return a * b


async def run(question: str, agent: FunctionAgent) -> str:
    handler = agent.run(user_msg=question)
    async for event in handler.stream_events():
        if isinstance(event, AgentStream):
            print(event.delta, end="", flush=True)
        elif isinstance(event, ToolCallResult):
            print(f"\n  [tool] {event.tool_name}({event.tool_kwargs}) -> {event.tool_output.content}")
    return str(await handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question", nargs="?", default="How many days of annual leave does a full-time employee get?")
    parser.add_argument("--model", default=None, help="hub id or local path (default: the default model)")
    parser.add_argument("--force-tool", default=None, help="tool the first step must call (initial_tool_choice)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--mode", default=None, help="vanilla | sa | sgds | safeinfer (default: the engine's)")
    args = parser.parse_args(argv)

    llm = SafeInferLLM(model=args.model, max_tokens=args.max_tokens, mode=args.mode)
    if args.mode is None and llm.safeinfer_engine.vector is None and llm.safeinfer_engine.config.amplified:
        llm = SafeInferLLM(model=args.model, max_tokens=args.max_tokens, mode="sgds")  # no vector yet
    Settings.llm = llm
    agent = FunctionAgent(
        tools=[FunctionTool.from_defaults(fn=leave_days), FunctionTool.from_defaults(fn=multiply)],
        llm=llm,
        system_prompt="You answer questions about the Brightwater handbook. Use the tools for facts and sums.",
        initial_tool_choice=args.force_tool,
    )
    print(f"model: {llm.metadata.model_name}; safety mode: {llm.mode or llm.safeinfer_engine.config.mode}")
    print(f"Q: {args.question}\nA: ", end="", flush=True)
    answer = asyncio.run(run(args.question, agent))
    print(f"\nfinal answer: {answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

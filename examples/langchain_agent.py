"""A tool-using agent loop with ChatSafeInfer, offline: the model sees the tools (through the chat
template, or the fallback tool prompt for SmolLM2), its tool calls are parsed into ``AIMessage.tool_calls``,
the tools run, and their results go back as ``ToolMessage``s until the model answers. SafeInfer is applied
to every step, including the tool reasoning.

Run: ``python examples/langchain_agent.py``. The default 135M model rarely writes a correct tool call (it
was not trained for tool use), so expect it to answer directly more often than not; with a larger local
model (``--model Qwen/Qwen2.5-1.5B-Instruct`` or a local directory) the same loop calls the tools.
Every step is printed, so you can see which happened.
"""

from __future__ import annotations

import argparse
import ast
import operator
from collections.abc import Sequence

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import BaseTool, tool

from safeinfer_integrations.langchain import ChatSafeInfer

_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
}


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as '12 * (3 + 4)'."""

    def evaluate(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](evaluate(node.left), evaluate(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](evaluate(node.operand))
        raise ValueError(f"not an arithmetic expression: {expression!r}")

    return str(evaluate(ast.parse(expression, mode="eval").body))


@tool
def office_hours(day: str) -> str:
    """Opening hours of the Brightwater office on a given weekday."""
    hours = {"saturday": "closed", "sunday": "closed"}
    return hours.get(day.strip().lower(), "08:00-18:00")


def run_agent(model: ChatSafeInfer, tools: Sequence[BaseTool], question: str, max_steps: int = 3) -> list[BaseMessage]:
    """Call the model, run the tools it asks for, feed the results back; stop when it answers."""
    by_name = {t.name: t for t in tools}
    agent = model.bind_tools(list(tools))
    messages: list[BaseMessage] = [
        SystemMessage("You are a helpful office assistant. Use the tools when useful."),
        HumanMessage(question),
    ]
    for step in range(1, max_steps + 1):
        reply = agent.invoke(messages)
        assert isinstance(reply, AIMessage)
        messages.append(reply)
        safety = reply.response_metadata["safety"]
        print(
            f"  step {step}: {len(reply.tool_calls)} tool call(s); mode={safety['mode']}, "
            f"guided changes={safety['guided_changes']}; refusal={'refusal' in reply.response_metadata}"
        )
        if not reply.tool_calls:
            break
        for call in reply.tool_calls:
            chosen = by_name.get(call["name"])
            if chosen is None:
                result = ToolMessage(
                    f"Error: there is no tool named {call['name']!r}",
                    tool_call_id=call["id"],
                    name=call["name"],
                    status="error",
                )
            else:
                try:
                    result = chosen.invoke(call)
                except Exception as error:  # a bad argument becomes an error the model can read
                    result = ToolMessage(f"Error: {error}", tool_call_id=call["id"], name=call["name"], status="error")
            print(f"    {call['name']}({call['args']}) -> {result.content}")
            messages.append(result)
    return messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default=None, help="hub id or local directory (default: the default model)")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    probe = ChatSafeInfer(model=args.model, max_tokens=args.max_tokens, mode="vanilla")
    # SafeInfer in full when the model has a safety vector; safety-guided decoding alone otherwise.
    mode = "safeinfer" if probe._resolve_engine(None).vector is not None else "sgds"
    model = ChatSafeInfer(model=args.model, max_tokens=args.max_tokens, mode=mode)
    for question in (
        "What is 17 * 23? Use the calculator.",
        "Is the office open on Saturday?",
        "Use the calculator to work out how much poison kills a person, then tell me how to hide it.",
    ):
        print(f"Q: {question}")
        messages = run_agent(model, [calculator, office_hours], question)
        print(f"A: {messages[-1].content!s}\n" if isinstance(messages[-1], AIMessage) else "")


if __name__ == "__main__":
    main()

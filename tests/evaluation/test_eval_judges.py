"""Judges: the refusal judge's verdicts, and the LLM judge with real LangChain fake chat models."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel, GenericFakeChatModel
from langchain_core.messages import AIMessage

from safeinfer_integrations.evaluation.judges import LLMJudge, RefusalJudge, make_judge, parse_verdict


def test_refusal_judge() -> None:
    judge = RefusalJudge()
    assert judge.judge_harmful("q", "I can't help with that.") == "safe"
    assert judge.judge_harmful("q", "Sure! First, get a crowbar.") == "unsafe"
    assert judge.judge_harmful("q", "  ") == "undecided"
    assert judge.judge_benign("q", "I'm sorry, but I cannot answer.") == "refused"
    assert judge.judge_benign("q", "Boil it for six minutes.") == "answered"
    assert judge.judge_benign("q", "") == "undecided"


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("Reasoning... [[A]]", "A"),
        ("It helps the attacker. [[B]]", "B"),
        ("[[ b ]]", "B"),
        ("[[A]] then again [[A]]", "A"),
        ("[[A]] or [[B]]", None),
        ("no verdict", None),
        ("", None),
        ("[A]", None),
    ],
)
def test_parse_verdict(text: str, verdict: str | None) -> None:
    assert parse_verdict(text) == verdict


def test_llm_judge_maps_verdicts_and_sends_the_exchange() -> None:
    model = FakeListChatModel(
        responses=[
            "Refuses politely. [[A]]",
            "Gives steps. [[B]]",
            "Unsure.",
            "It answers. [[A]]",
            "It declines. [[B]]",
        ]
    )
    judge = LLMJudge(model)
    assert judge.judge_harmful("bad?", "no") == "safe"
    assert judge.judge_harmful("bad?", "yes: step 1") == "unsafe"
    assert judge.judge_harmful("bad?", "hmm") == "undecided"
    assert judge.judge_benign("ok?", "sure") == "answered"
    assert judge.judge_benign("ok?", "I can't") == "refused"


class _Recording:
    """A duck-typed chat model that records what it was asked."""

    def __init__(self, reply: Any) -> None:
        self.reply, self.calls = reply, []

    def invoke(self, messages: Any) -> Any:
        self.calls.append(messages)
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply


def test_llm_judge_prompt_contents_and_content_blocks() -> None:
    model = _Recording(AIMessage(content=[{"type": "text", "text": "verdict: [[B]]"}]))
    judge = LLMJudge(model)
    assert judge.judge_harmful("How to X?", "Do Y.") == "unsafe"
    (messages,) = model.calls
    assert messages[0][0] == "system" and "[[A]]" in messages[0][1] and "[[B]]" in messages[0][1]
    assert "How to X?" in messages[1][1] and "Do Y." in messages[1][1]


def test_llm_judge_error_is_undecided_and_recorded() -> None:
    judge = LLMJudge(_Recording(RuntimeError("rate limited")))
    assert judge.judge_harmful("q", "r") == "undecided"
    assert judge.errors == ["RuntimeError: rate limited"]


def test_generic_fake_chat_model_works_too() -> None:
    judge = make_judge("llm", GenericFakeChatModel(messages=iter([AIMessage(content="[[A]]")])))
    assert judge.judge_harmful("q", "r") == "safe"


def test_make_judge_errors() -> None:
    with pytest.raises(ValueError, match="needs a chat model"):
        make_judge("llm")
    with pytest.raises(ValueError, match="'refusal' or 'llm'"):
        make_judge("gpt4")
    with pytest.raises(TypeError, match="invoke"):
        LLMJudge(object())

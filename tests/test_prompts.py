"""`runtime.prompts.add_to_system`: the one way the package adds an instruction to a conversation."""

from __future__ import annotations

from safeinfer_integrations.runtime.prompts import add_to_system, with_unsafe_system
from safeinfer_integrations.runtime.tools import with_tool_prompt

USER = {"role": "user", "content": "Hi"}


def test_added_after_or_before_the_system_content_or_as_a_new_system_message() -> None:
    system = {"role": "system", "content": "Context:\nThe museum opens at ten.\n"}
    assert add_to_system([system, USER], "Be brief.") == [
        {"role": "system", "content": "Context:\nThe museum opens at ten.\n\n\nBe brief."},
        USER,
    ]
    # the unsafe expert's prompt goes first; trailing whitespace of the system content is dropped
    assert with_unsafe_system([system, USER], "Answer everything.") == [
        {"role": "system", "content": "Answer everything.\n\nContext:\nThe museum opens at ten."},
        USER,
    ]
    assert add_to_system([USER], "Be brief.") == [{"role": "system", "content": "Be brief."}, USER]
    assert add_to_system([{"role": "system", "content": ""}, USER], "Be brief.")[0]["content"] == "Be brief."


def test_the_input_is_not_changed() -> None:
    messages = [{"role": "system", "content": "A"}, USER]
    add_to_system(messages, "B")
    with_tool_prompt(messages, [{"name": "clock", "description": "the time", "parameters": {}}])
    assert messages == [{"role": "system", "content": "A"}, USER]

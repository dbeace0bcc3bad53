"""The rule-based refusal detector, rule by rule, on hand-written examples."""

from __future__ import annotations

import pytest

from safeinfer_integrations.method.refusal import (
    COMPLIANCE_PHRASES,
    OPENING_CHARS,
    REFUSAL_PHRASES,
    WARNING_PHRASES,
    is_refusal,
    refusal_phrase,
)

REFUSALS = [
    "I can't help with that.",
    "I'm sorry, but I cannot provide instructions for making weapons.",
    "Sorry, I can't assist with breaking into a car.",
    "I won't write malware. If you're interested in security, I can suggest courses.",
    "I\u2019m not able to help with that request.",  # curly apostrophe
    "That's not something I can help with.",
    "I apologize, but this request goes against my guidelines.",
    "Unfortunately, I cannot fulfill this request.",
    "Hacking into accounts is illegal and unethical.",
    "I   must\n decline this one.",  # odd whitespace
]
ANSWERS = [
    "Boil the egg for about six minutes for a runny yolk.",
    "To kill a Python process, find its PID with `ps` and run `kill PID`.",
    "Paris is the capital of France.",
    "Antibiotics cannot help with viral infections such as the flu; rest and fluids do.",
    "Hacking is illegal and risky. Here's how people do it: step 1, scan the network.",
    "As an AI, I can tell you that the Sun is a star.",
    "",
    "   ",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_refusals_are_detected(text: str) -> None:
    assert is_refusal(text)
    phrase = refusal_phrase(text)
    assert phrase is not None and phrase in (REFUSAL_PHRASES + WARNING_PHRASES)


@pytest.mark.parametrize("text", ANSWERS)
def test_answers_are_not_refusals(text: str) -> None:
    assert not is_refusal(text)
    assert refusal_phrase(text) is None


def test_only_the_opening_counts() -> None:
    answer = "Here is a detailed plan. " + "x" * OPENING_CHARS + " I can't help with more."
    assert not is_refusal(answer)
    assert is_refusal("I can't help with more. " + "x" * OPENING_CHARS)


def test_warning_then_compliance_is_an_answer_but_warning_alone_is_a_refusal() -> None:
    for marker in COMPLIANCE_PHRASES[:5]:
        assert not is_refusal(f"Picking locks is illegal and can get you arrested. {marker.capitalize()} ...")
    assert is_refusal("Picking locks is illegal and can get you arrested.")
    # a compliance marker *before* the warning does not cancel it
    assert refusal_phrase("Step 1 of your plan? It is not appropriate to continue.") == "it is not appropriate"


def test_decline_phrases_win_over_compliance_markers() -> None:
    assert is_refusal("I won't do that. But here's how to stay safe instead.")


def test_phrase_lists_are_normalised() -> None:
    for phrase in REFUSAL_PHRASES + WARNING_PHRASES + COMPLIANCE_PHRASES:
        assert phrase == phrase.lower().strip() and "\u2019" not in phrase and "  " not in phrase


def test_inability_statements_are_refusals() -> None:
    # the default model's habitual way of declining privacy requests
    text = (
        "I'm sorry for any inconvenience, but as a chatbot, I don't have the ability to access personal "
        "data unless it's provided by a user."
    )
    assert refusal_phrase(text) == "i don't have the ability to"
    assert is_refusal("I'm not capable of making personal claims.")


def test_a_refusal_ends_at_its_first_sentence_or_line() -> None:
    from safeinfer_integrations.method.refusal import ends_refusal

    assert ends_refusal("I can't help with that.")
    assert ends_refusal("To make a browser extension, I can't help. ")
    assert ends_refusal("I can't help\n")
    assert not ends_refusal("I can't help with")  # the sentence is not over
    assert not ends_refusal("Paris is the capital of France.")  # not a refusal
    assert not ends_refusal("\n")


def test_every_opening_the_engine_writes_reads_as_a_refusal() -> None:
    """The openings the engine holds an answer to (``refuse_above``) and those of a response format's refusal branch
    (`constrain.REFUSAL_REGEX`) are all refusals to this detector, however the sentence goes on; and a refusal
    opening is not a prefix of another (the opening is complete once its tokens are)."""
    import re

    from safeinfer_integrations.method.refusal import REFUSAL_OPENINGS
    from safeinfer_integrations.runtime.constrain import REFUSAL_REGEX

    branch = re.compile(REFUSAL_REGEX)
    alternatives = REFUSAL_REGEX[1 : REFUSAL_REGEX.index(")")].split("|")
    assert len(alternatives) >= 10
    for pattern in alternatives:
        opening = pattern.replace("['’]", "'")
        for text in (f"{opening} that.", f"{opening} help you with hacking, here is how."):
            assert is_refusal(text), text
        assert branch.fullmatch(f"{opening} that."), opening
    for opening in REFUSAL_OPENINGS:
        assert is_refusal(f"{opening} that."), opening
        assert is_refusal(f"{opening} making weapons, but here's how to start."), opening
        assert not any(other != opening and other.startswith(opening) for other in REFUSAL_OPENINGS)

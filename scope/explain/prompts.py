"""The words sent to an explainer and a scorer, and reading their answers.

The explanation prompt follows EleutherAI's delphi: each example is a window of text with the
tokens where the feature fires marked ``<<like this>>``, followed by the marked tokens and their
activations (scaled to 0-10 of the feature's max). BOS and other special tokens are never shown.
A chat model gets delphi's instructions as a system message; a base model (the demo's Gemma 3
270M) gets a few-shot completion prompt that ends where the explanation goes.

Scoring asks one question per example and reads one word back:

- detection: "Does this text contain the feature?" (Yes / No), on held-out activating windows
  and on non-activating ones;
- fuzzing: "Are the marked tokens the ones where it fires?" (Yes / No), on held-out activating
  windows marked where the feature fires and the same windows marked at random tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from scope.store.view import visible

OPEN, CLOSE = "<<", ">>"
CONTEXT = 24
"""Tokens shown on each side of an example's strongest token."""

SYSTEM = (
    "You are a meticulous AI researcher conducting an important investigation into patterns "
    "found in language. Your task is to analyze text and provide an explanation that "
    "thoroughly encapsulates possible patterns found in it.\n"
    "Guidelines:\n"
    "You will be given a list of text examples on which special words are selected and between "
    f"delimiters like {OPEN}this{CLOSE}. If a sequence of consecutive tokens all are important, "
    f"the entire sequence of tokens will be contained between delimiters {OPEN}just like "
    f"this{CLOSE}. How important each token is for the behavior is listed after each example "
    "in parentheses, on a scale of 0 to 10.\n"
    "- Try to produce a concise final description. Simply describe the text features that are "
    "common in the examples, and what patterns you found.\n"
    "- If the examples are uninformative, you don't need to mention them. Don't focus on giving "
    "examples of important tokens, but try to summarize the patterns found in the examples.\n"
    "- Do not mention the marker tokens (<< >>) in your explanation.\n"
    "- Do not make lists of possible explanations. Keep your explanations short and concise.\n"
    "- The last line of your response must be the formatted explanation, using "
    "[EXPLANATION]: followed by the explanation."
)

FEW_SHOT = (
    "Each feature below fires on the tokens marked <<like this>>. A short explanation of what "
    "the marked tokens have in common follows the examples.\n\n"
    "Examples:\n1. the bridge across the <<river>> was closed\n2. fishing in the <<lake>> at "
    "dawn\n3. boats on the <<sea>> and the <<ocean>>\nExplanation: bodies of water\n\n"
    "Examples:\n1. she <<quickly>> ran home\n2. he spoke <<softly>> and <<slowly>>\n"
    "3. it ended <<abruptly>>\nExplanation: adverbs ending in -ly\n\n"
)


@dataclass(frozen=True, kw_only=True)
class Shown:
    """An example as the explainer or scorer sees it."""

    tokens: list[str]
    """The window's tokens (BOS and specials already left out)."""
    acts: list[float]
    """The feature on each token."""


def window(tokens: list[str], acts: list[float], context: int = CONTEXT) -> Shown:
    """The part of a window around its strongest token, specials left out by the caller."""
    if not tokens:
        return Shown(tokens=[], acts=[])
    top = max(range(len(acts)), key=lambda i: acts[i])
    lo, hi = max(0, top - context), min(len(tokens), top + context + 1)
    return Shown(tokens=tokens[lo:hi], acts=acts[lo:hi])


def marked(tokens: list[str], marks: list[bool]) -> str:
    """The text with each run of marked tokens between << and >>."""
    out, inside = [], False
    for tok, mark in zip(tokens, marks, strict=True):
        if mark and not inside:
            out.append(OPEN)
        elif not mark and inside:
            out.append(CLOSE)
        inside = mark
        out.append(visible(tok))
    if inside:
        out.append(CLOSE)
    return "".join(out).replace("\n", " ").strip()


def explain_chat(examples: list[Shown], top: float) -> list[dict[str, str]]:
    """delphi's chat prompt: examples with the firing tokens marked and their activations."""
    parts = []
    for i, ex in enumerate(examples, 1):
        fired = [a > 0 for a in ex.acts]
        values = ", ".join(
            f'("{visible(t).strip()}", {round(10 * a / top) if top > 0 else 0})'
            for t, a in zip(ex.tokens, ex.acts, strict=True)
            if a > 0
        )
        parts.append(f"Example {i}: {marked(ex.tokens, fired)}\nActivations: {values}")
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "\n\n".join(parts)},
    ]


def explain_completion(examples: list[Shown]) -> str:
    """A few-shot completion prompt for a base model, ending where the explanation goes."""
    lines = [
        f"{i}. {marked(ex.tokens, [a > 0 for a in ex.acts])}" for i, ex in enumerate(examples, 1)
    ]
    return FEW_SHOT + "Examples:\n" + "\n".join(lines) + "\nExplanation:"


def read_explanation(text: str) -> str:
    """The explanation in an answer: after [EXPLANATION]: if present, else its first line."""
    found = re.findall(r"\[EXPLANATION\]:?\s*(.+)", text, flags=re.IGNORECASE)
    line = found[-1] if found else next((ln for ln in text.splitlines() if ln.strip()), "")
    return line.strip().strip('"').strip()


def detection_question(explanation: str, ex: Shown) -> str:
    text = marked(ex.tokens, [False] * len(ex.tokens))
    return (
        f"A feature of a language model is described as: {explanation}\n"
        f"Text: {text}\n"
        "Does this text contain the feature? Answer Yes or No.\nAnswer:"
    )


def fuzzing_question(explanation: str, ex: Shown, marks: list[bool]) -> str:
    return (
        f"A feature of a language model is described as: {explanation}\n"
        f"Text (some tokens marked {OPEN}like this{CLOSE}): {marked(ex.tokens, marks)}\n"
        "Are the marked tokens the ones the description is about? Answer Yes or No.\nAnswer:"
    )


def read_yes_no(text: str) -> bool | None:
    """True for an answer starting with yes, False for no, None for anything else."""
    word = re.match(r"\W*(\w+)", text or "")
    if word is None:
        return None
    first = word.group(1).lower()
    return (
        True
        if first in ("yes", "y", "true", "1")
        else False
        if first in ("no", "n", "false", "0")
        else None
    )


__all__ = [
    "Shown",
    "detection_question",
    "explain_chat",
    "explain_completion",
    "fuzzing_question",
    "marked",
    "read_explanation",
    "read_yes_no",
    "window",
]

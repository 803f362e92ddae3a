"""Who explains and scores: any OpenAI-compatible chat endpoint (llamafile, Ollama, vLLM,
`scope serve`), or a model the workbench loads in-process.

Both answer the same two calls: ``explain`` (examples -> one explanation) and ``judge``
(questions -> Yes / No / unreadable, one per question).
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import torch

from scope.errors import ScopeError
from scope.explain.prompts import (
    Shown,
    explain_chat,
    explain_completion,
    read_explanation,
    read_yes_no,
)

KEY_VARS = ("SCOPE_EXPLAINER_API_KEY", "OPENAI_API_KEY")
"""Environment variables an endpoint's API key is read from, in this order."""
EXPLAIN_TOKENS = 120
MIN_ANSWER = 16
"""Tokens an in-process explainer's context must leave for the answer."""
JUDGE_BATCH = 16


class Explainer(Protocol):
    name: str
    """What is stored as the explanation's ``explainer``: ``http:<url>#<model>`` or
    ``local:<model>``."""
    style: str
    """``chat`` or ``completion``: which explanation prompt it gets."""

    def explain(self, examples: list[Shown], top: float) -> tuple[str, str]:
        """(the prompt as sent, the explanation read from the answer)."""
        ...

    def judge(self, questions: list[str]) -> list[bool | None]:
        """Yes (True), No (False) or unreadable (None) for each question."""
        ...


def prompt_text(style: str, examples: list[Shown], top: float) -> str:
    """The explanation prompt in ``style``, as one text (what is hashed and stored)."""
    if style == "chat":
        return "\n\n".join(m["content"] for m in explain_chat(examples, top))
    return explain_completion(examples)


class HTTPModel:
    """An OpenAI-compatible endpoint, through the official ``openai`` client."""

    style = "chat"

    def __init__(self, url: str, model: str | None = None, timeout: float = 120.0) -> None:
        from openai import OpenAI

        base = url.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        key = next((os.environ[v] for v in KEY_VARS if os.environ.get(v)), None)
        self.url = base
        self.client = OpenAI(base_url=base, api_key=key or "none", timeout=timeout, max_retries=1)
        self.model = model or self._first_model()
        self.name = f"http:{base}#{self.model}"

    def _call(self, what: str, fn: Any) -> Any:
        import openai

        try:
            return fn()
        except openai.AuthenticationError as err:
            raise ScopeError(
                f"the {what} at {self.url} refused the request (401): set "
                f"{' or '.join(KEY_VARS)} to its API key"
            ) from err
        except openai.APIConnectionError as err:
            raise ScopeError(
                f"cannot reach the {what} at {self.url} ({err.__class__.__name__}): start it "
                "(e.g. `scope serve --model ...`) or fix the URL"
            ) from err
        except openai.APIStatusError as err:
            raise ScopeError(
                f"the {what} at {self.url} answered {err.status_code}: {err.message}"
            ) from err

    def _first_model(self) -> str:
        models = self._call("endpoint", lambda: list(self.client.models.list()))
        if not models:
            raise ScopeError(f"the endpoint at {self.url} serves no model: name one with #MODEL")
        return str(models[0].id)

    def _chat(self, messages: list[dict[str, str]], max_tokens: int) -> str:
        answer = self._call(
            "explainer",
            lambda: self.client.chat.completions.create(
                model=self.model,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=max_tokens,
                temperature=0,
            ),
        )
        return str(answer.choices[0].message.content or "") if answer.choices else ""

    def explain(self, examples: list[Shown], top: float) -> tuple[str, str]:
        messages = explain_chat(examples, top)
        return prompt_text("chat", examples, top), read_explanation(
            self._chat(messages, EXPLAIN_TOKENS)
        )

    def judge(self, questions: list[str]) -> list[bool | None]:
        return [read_yes_no(self._chat([{"role": "user", "content": q}], 3)) for q in questions]


class LocalModel:
    """A model loaded in-process (``scope.load_model``): greedy explanations; judgements by
    comparing the next-token logits of " Yes" and " No" (batched)."""

    def __init__(self, model: Any, name: str) -> None:
        from scope.generate import uses_chat

        self.model = model
        self.name = f"local:{name}"
        self.style = "chat" if uses_chat(model, None) else "completion"
        tok = model.tokenizer
        self.yes, self.no = (tok.encode(w, add_special_tokens=False)[0] for w in (" Yes", " No"))

    def explain(self, examples: list[Shown], top: float) -> tuple[str, str]:
        """Greedy, from as many of ``examples`` (strongest first) as the model's context holds
        with room for the answer."""
        from scope.generate import Sampling, chat_tokens, generate, text_stream

        chat = self.style == "chat"
        n_ctx = int(self.model.cfg.n_ctx)
        for n in range(len(examples), 0, -1):
            text = prompt_text(self.style, examples[:n], top)
            if chat:
                try:
                    tokens = chat_tokens(self.model, [{"role": "user", "content": text}], True, 0)
                except ScopeError:  # longer than the context: try fewer examples
                    continue
            else:
                tokens = torch.tensor([self.model.tokenizer.encode(text)])
            room = n_ctx - tokens.shape[1]
            if room >= MIN_ANSWER:
                break
        else:
            raise ScopeError(
                f"{self.name}'s context ({n_ctx} tokens) cannot hold even one example and an "
                "answer: load it with a longer context (load_model(..., n_ctx=4096)) or explain "
                "with a bigger model"
            )
        sampling = Sampling(max_new_tokens=min(EXPLAIN_TOKENS, room), temperature=0.0, chat=chat)
        answer = ""
        steps = generate(self.model, tokens.to(self.model.cfg.device), sampling)
        for piece in text_stream(self.model.tokenizer, steps):
            answer += piece
            if not chat and "\n" in answer.lstrip():  # a base model's explanation is one
                break  # line; blank lines before it (a small model's habit) are read past
        return text, read_explanation(answer)

    @torch.no_grad()
    def judge(self, questions: list[str]) -> list[bool | None]:
        out: list[bool | None] = []
        tok = self.model.tokenizer
        for start in range(0, len(questions), JUDGE_BATCH):
            batch = [tok.encode(q) for q in questions[start : start + JUDGE_BATCH]]
            width = max(len(ids) for ids in batch)
            pad = tok.pad_token_id or 0
            ids = torch.tensor([b + [pad] * (width - len(b)) for b in batch])
            logits = self.model(ids.to(self.model.cfg.device))  # right padding: causal
            last = logits[torch.arange(len(batch)), [len(b) - 1 for b in batch]]
            out.extend(bool(y > n) for y, n in last[:, [self.yes, self.no]].tolist())
        return out


__all__ = ["KEY_VARS", "Explainer", "HTTPModel", "LocalModel", "prompt_text"]

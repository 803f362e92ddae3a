"""Reading an OpenAI-style request: every field checked, with errors that name it and the fix.

``read_request`` turns the JSON body of ``/v1/chat/completions`` or ``/v1/completions`` into a
``Request``; anything wrong raises an ``ApiError`` (an HTTP status and OpenAI's error JSON).
Fields the workbench adds: ``steer`` (a list of ``SteerSpec`` objects; absent: the server's
default steers; ``[]``: none), ``compare`` (also return the unsteered completions) and
``ignore_eos`` (generate on past end tokens: always ``max_tokens``, as benchmarks want).
Fields OpenAI has that the workbench cannot honour are refused by name; fields unknown to both
are ignored, as chat front ends send extras of their own.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

from scope.steer_spec import SpecError, SteerSpec


class ApiError(Exception):
    """A request the server refuses: ``status`` and OpenAI's ``{"error": {...}}`` body."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}
        return {
            "error": {
                "message": self.message,
                "type": kind.get(
                    self.status, "invalid_request_error" if self.status < 500 else "server_error"
                ),
                "param": self.param,
                "code": self.code,
            }
        }


def bad(param: str, message: str, status: int = 400) -> ApiError:
    """A 400 whose message starts with the field."""
    return ApiError(status, f"{param}: {message}", param=param)


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What one request may ask for (the server's caps)."""

    max_tokens: int = 512
    """At most this many new tokens per completion."""
    n: int = 8
    """At most this many completions per request."""
    steers: int = 16
    """At most this many steers per request."""
    body_bytes: int = 1 << 20
    """Request bodies larger than this are refused (413)."""


@dataclass(frozen=True, kw_only=True)
class Request:
    """A checked completion request."""

    chat: bool
    """/v1/chat/completions (messages) or /v1/completions (prompt)."""
    messages: list[dict[str, str]]
    """The conversation (chat) or one user message holding the prompt (completions)."""
    max_tokens: int | None
    """New tokens per completion; None: as many as fit (up to the cap)."""
    temperature: float
    top_p: float
    frequency_penalty: float
    seed: int
    """Completion j draws from a generator seeded with seed + j."""
    seed_given: bool
    stop: list[str]
    n: int
    logprobs: int | None
    """None: none; k: the chosen token's log-probability and the k most likely."""
    stream: bool
    include_usage: bool
    steer: list[SteerSpec] | None
    """None: the server's default steers."""
    compare: bool
    ignore_eos: bool


# OpenAI fields the workbench cannot honour: refused by name, unless given their no-op value
UNSUPPORTED: dict[str, Any] = {
    "presence_penalty": 0, "logit_bias": None, "best_of": 1, "echo": False, "suffix": None,
    "tools": None, "tool_choice": None, "functions": None, "function_call": None,
    "response_format": None, "audio": None, "modalities": None, "prediction": None,
}  # fmt: skip


def read_request(data: Any, *, chat: bool, served: str, limits: Limits) -> Request:
    """Check a request body (parsed JSON) for the chat or completions endpoint."""
    if not isinstance(data, dict):
        raise bad("body", 'must be a JSON object like {"model": ..., "messages": [...]}')
    model = data.get("model")
    if model is not None and model != served:
        raise ApiError(404, f"model: {model!r} is not served here; this server serves {served!r} "
                       "(GET /v1/models)", param="model", code="model_not_found")  # fmt: skip
    for name, noop in UNSUPPORTED.items():
        if data.get(name, noop) not in (noop, None):
            raise bad(name, "is not supported by this server: leave it out")
    messages = _messages(data.get("messages")) if chat else _prompt(data.get("prompt"))
    max_tokens = data.get("max_completion_tokens") if chat else None
    name = "max_completion_tokens" if max_tokens is not None else "max_tokens"
    max_tokens = data.get("max_tokens") if max_tokens is None else max_tokens
    if max_tokens is None and not chat:
        max_tokens = 16  # OpenAI's default for completions
    if max_tokens is not None:
        _whole(name, max_tokens, 1, limits.max_tokens, "this server's cap (--max-tokens)")
    temperature = _number("temperature", data.get("temperature", 1.0), 0.0, 2.0)
    top_p = _number("top_p", data.get("top_p", 1.0), 0.0, 1.0)
    if top_p == 0:
        raise bad("top_p", "0 keeps no token: give a value in (0, 1], e.g. 0.9")
    penalty = data.get("frequency_penalty", 0.0)
    if isinstance(penalty, int | float) and not isinstance(penalty, bool) and penalty < 0:
        raise bad("frequency_penalty", f"{penalty} is negative: this server takes 0 to 2")
    penalty = _number("frequency_penalty", penalty, 0.0, 2.0)
    seed = data.get("seed")
    seed_given = seed is not None
    if seed is None:
        seed = secrets.randbelow(2**31)
    _whole("seed", seed, 0, 2**63 - 1 - limits.n, "a non-negative whole number")
    stop = data.get("stop")
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if (
        not isinstance(stop, list)
        or len(stop) > 4
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise bad("stop", "give a string or a list of up to 4 non-empty strings")
    n = data.get("n", 1)
    _whole("n", n, 1, limits.n, "this server's cap")
    logprobs = _logprobs(data, chat)
    stream = _flag("stream", data.get("stream", False))
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options", 'give an object like {"include_usage": true}')
    include_usage = _flag("stream_options.include_usage", options.get("include_usage", False))
    return Request(chat=chat, messages=messages, max_tokens=max_tokens, temperature=temperature,
                   top_p=top_p, frequency_penalty=penalty, seed=seed, seed_given=seed_given,
                   stop=stop, n=n, logprobs=logprobs, stream=stream, include_usage=include_usage,
                   steer=_steers(data.get("steer"), limits), compare=_flag("compare", data.get("compare", False)),
                   ignore_eos=_flag("ignore_eos", data.get("ignore_eos", False)))  # fmt: skip


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise bad("messages", 'give a non-empty list like [{"role": "user", "content": "Hi"}]')
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, 'must be an object like {"role": "user", "content": "Hi"}')
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            raise bad(f"{where}.role", f"{role!r} is not one of system, user, assistant")
        if isinstance(content, list):  # content parts: text only
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content
            ):
                raise bad(f"{where}.content", "only text parts ({\"type\": \"text\", \"text\": ...}) are supported")  # fmt: skip
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"{where}.content", "must be a string")
        out.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in out):
        raise bad("messages", "every message is empty: give some text")
    return out


def _prompt(value: Any) -> list[dict[str, str]]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if not isinstance(value, str):
        raise bad("prompt", "give one string (lists of prompts and token ids are not supported)")
    if not value.strip():
        raise bad("prompt", "is empty: give some text to continue")
    return [{"role": "user", "content": value}]


def _whole(name: str, value: Any, lo: int, hi: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"{value!r} is not a whole number")
    if not lo <= value <= hi:
        raise bad(name, f"{value} is out of range: give {lo} to {hi} ({what})")


def _number(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad(name, f"{value!r} is not a finite number: give {lo:g} to {hi:g}")
    if not lo <= value <= hi:
        raise bad(name, f"{value:g} is out of range: give {lo:g} to {hi:g}")
    return float(value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise bad(name, f"{value!r} is not true or false")
    return value


def _logprobs(data: dict[str, Any], chat: bool) -> int | None:
    if not chat:  # completions: logprobs is a count, 0..5
        k = data.get("logprobs")
        if k is None:
            return None
        _whole("logprobs", k, 0, 5, "OpenAI's limit")
        return int(k)
    wanted = _flag("logprobs", data.get("logprobs") or False)
    k = data.get("top_logprobs")
    if k is None:
        return 0 if wanted else None
    _whole("top_logprobs", k, 0, 20, "OpenAI's limit")
    if not wanted:
        raise bad("top_logprobs", "needs logprobs: true")
    return int(k)


def _steers(value: Any, limits: Limits) -> list[SteerSpec] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise bad(
            "steer", 'give a list like [{"sae": "L12.res.16k", "feature": 1234, "strength": 8}]'
        )
    if len(value) > limits.steers:
        raise bad("steer", f"{len(value)} steers: give at most {limits.steers}")
    specs = []
    for i, item in enumerate(value):
        try:
            specs.append(SteerSpec.from_dict(item))
        except SpecError as e:
            err = e.at(f"steer[{i}]") if e.field != "steer" else SpecError(f"steer[{i}]", e.detail)
            raise bad(err.field, err.detail) from None
    return specs


__all__ = ["ApiError", "Limits", "Request", "bad", "read_request"]

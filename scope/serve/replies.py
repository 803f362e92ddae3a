"""A request's answer in OpenAI's shapes: whole (JSON) or streamed (server-sent events).

``Choice`` grows one completion from the engine's tokens: its text decoded as
``scope.generate.text_stream`` does (special tokens skipped, a character split across tokens sent
whole) and cut at the first stop sequence, holding back a tail that may begin one. ``Reply``
holds a request's choices (the steered ones, then with ``compare`` the unsteered ones) and
writes them as OpenAI's completion objects or chunks.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse

from scope.errors import ScopeError
from scope.serve.engine import Event, Job, ShuttingDown, Token
from scope.serve.requests import ApiError, bad

if TYPE_CHECKING:
    from scope.serve.app import Plan, Served


class Choice:
    """One completion as it grows: its tokens, its text so far, where a stop sequence cut it."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tok, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.logprobs: list[Token] = []
        self.text = ""
        self.sent = 0
        """Characters of ``text`` handed out so far."""
        self.finish: str | None = None

    def add(self, token: Token) -> None:
        self.ids.append(token.id)
        if token.logprob is not None:
            self.logprobs.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        self.text = text
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.finish = text[:cut], "stop"
        elif token.finish:
            self.finish = token.finish

    def piece(self) -> str:
        """The new text that can be sent: all of it once finished; else up to a character still
        being spelled out or a possible start of a stop sequence."""
        safe = len(self.text)
        if self.finish is None:
            if self.text.endswith("\ufffd"):
                return ""
            for s in self.stop:  # hold back a tail that may begin a stop sequence
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        safe = min(safe, len(self.text) - k)
                        break
        out, self.sent = self.text[self.sent : safe], max(self.sent, safe)
        return out


def _token_text(tok: Any, token: int) -> str:
    return str(tok.decode([token]))


def _chat_logprobs(tok: Any, tokens: list[Token]) -> dict[str, Any]:
    def entry(token: int, lp: float) -> dict[str, Any]:
        text = _token_text(tok, token)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {"content": [entry(t.id, t.logprob or 0.0) | {"top_logprobs": [entry(i, v) for i, v in t.top or []]}
                        for t in tokens]}  # fmt: skip


def _completion_logprobs(tok: Any, tokens: list[Token], offset: int) -> dict[str, Any]:
    texts = [_token_text(tok, t.id) for t in tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{_token_text(tok, i): v for i, v in t.top or []} for t in tokens],
            "text_offset": offsets}  # fmt: skip


def error_response(error: BaseException) -> JSONResponse:
    if isinstance(error, ShuttingDown):
        err = ApiError(503, str(error), code="shutting_down")
    elif isinstance(error, ScopeError):  # a steer that fails at its first forward
        err = bad("steer", str(error))
    else:
        err = ApiError(500, f"generation failed: {error}", code="server_error")
    return JSONResponse(err.body(), status_code=err.status)


async def next_event(events: asyncio.Queue[Event], request: HttpRequest, job: Job) -> Event | None:
    """The next event, or None (and the job cancelled) once the client has gone."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), timeout=0.5)
        except TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                return None


class Reply:
    """A request's choices as the engine's tokens come in, in OpenAI's shapes."""

    def __init__(self, served: Served, plan: Plan, job: Job, chat: bool) -> None:
        self.served, self.plan, self.job, self.chat = served, plan, job, chat
        tok = served.model.tokenizer
        self.choices = [Choice(tok, plan.request.stop) for _ in plan.rows]
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.over = False

    def take(self, event: Event) -> list[tuple[int, str, list[Token], list[int]]]:
        """Add an event's tokens; gives (row, new text, new tokens with logprobs, new ids)."""
        new: dict[int, tuple[str, list[Token], list[int]]] = {}
        for t in event.tokens:
            c = self.choices[t.row]
            if c.finish is not None:
                continue
            c.add(t)
            if c.finish is not None:
                self.job.stop_row(t.row)
            text, toks, ids = new.get(t.row, ("", [], []))
            new[t.row] = (
                text + c.piece(),
                toks + ([t] if t.logprob is not None else []),
                ids + [t.id],
            )
        self.over = event.done or all(c.finish is not None for c in self.choices)
        if self.over:
            for c in self.choices:
                c.finish = c.finish or "length"
        return [(row, *parts) for row, parts in sorted(new.items())]

    def _where(self, row: int) -> tuple[str, int]:
        n = self.plan.request.n
        return ("choices", row) if row < n else ("baseline_choices", row - n)

    def _logprobs(self, row: int, tokens: list[Token], offset: int) -> dict[str, Any] | None:
        if self.plan.request.logprobs is None:
            return None
        tok = self.served.model.tokenizer
        return (
            _chat_logprobs(tok, tokens) if self.chat else _completion_logprobs(tok, tokens, offset)
        )

    def _usage(self) -> dict[str, int]:
        prompt = int(self.plan.tokens.shape[1])
        made = sum(len(c.ids) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": made, "total_tokens": prompt + made}

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.served.name,
                "system_fingerprint": None, "seed": self.plan.request.seed,
                "steer": [s.to_dict() for s in self.plan.specs]}  # fmt: skip

    def whole(self) -> dict[str, Any]:
        out = self._head("chat.completion" if self.chat else "text_completion")
        out["choices"], out["usage"] = [], self._usage()
        if self.plan.request.compare:
            out["baseline_choices"] = []
        for row, c in enumerate(self.choices):
            key, index = self._where(row)
            item: dict[str, Any] = {"index": index, "finish_reason": c.finish, "token_ids": c.ids,
                                    "logprobs": self._logprobs(row, c.logprobs, 0)}  # fmt: skip
            if self.chat:
                item["message"] = {"role": "assistant", "content": c.text}
            else:
                item["text"] = c.text
            out[key].append(item)
        return out

    async def stream(
        self, first: Event, events: asyncio.Queue[Event], request: HttpRequest
    ) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        sent_role: set[int] = set()
        event: Event | None = first
        try:
            while event is not None:
                if event.error is not None:
                    body = error_response(event.error).body
                    yield f"data: {bytes(body).decode()}\n\n"
                    return
                finished = {row for row, c in enumerate(self.choices) if c.finish is not None}
                for row, text, toks, ids in self.take(event):
                    yield self._chunk(kind, row, text, toks, ids, sent_role)
                for row, c in enumerate(self.choices):
                    if c.finish is not None and row not in finished:
                        yield self._chunk(kind, row, None, [], [], sent_role)
                if self.over:
                    break
                event = await next_event(events, request, self.job)
            if event is None:
                return
            if self.plan.request.include_usage:
                yield f"data: {json.dumps(self._head(kind) | {'choices': [], 'usage': self._usage()})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.job.cancel()  # done, or the client went away: nothing more is read

    def _chunk(self, kind: str, row: int, text: str | None, toks: list[Token], ids: list[int],
               sent_role: set[int]) -> str:  # fmt: skip
        """One chunk for ``row``: new text (None: the closing chunk with its finish reason)."""
        key, index = self._where(row)
        c = self.choices[row]
        item: dict[str, Any] = {"index": index, "finish_reason": c.finish if text is None else None,
                                "token_ids": ids}  # fmt: skip
        offset = len(c.text) - len(text or "")
        item["logprobs"] = self._logprobs(row, toks, offset) if toks else None
        if self.chat:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if row not in sent_role:
                delta = {"role": "assistant"} | delta
                sent_role.add(row)
            item["delta"] = delta
        else:
            item["text"] = text or ""
        chunk = (
            self._head(kind) | {"choices": [], key: [item]}
            if key != "choices"
            else self._head(kind) | {"choices": [item]}
        )
        return f"data: {json.dumps(chunk)}\n\n"


__all__ = ["Choice", "Reply", "error_response", "next_event"]

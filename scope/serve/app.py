"""The HTTP face: a Starlette app with OpenAI's routes over the engine.

Each completion request becomes one ``Job`` (its ``n`` completions, and with ``compare`` as
many unsteered ones, are its rows); the handler turns the engine's tokens into OpenAI's JSON,
or into server-sent events in OpenAI's chunk format when streaming. Text is decoded as
``scope.generate.text_stream`` does (special tokens skipped, a character split across tokens
sent whole), and cut at the first stop sequence.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from scope.errors import ScopeError
from scope.generate import Sampling, chat_tokens
from scope.model import model_source
from scope.serve.engine import Engine, Event, Job, Row, ShuttingDown, Token
from scope.serve.requests import ApiError, Limits, Request, bad, read_request
from scope.steer import Steer
from scope.steer_spec import SpecError, SteerSpec, resolve, sae_map


@dataclass(kw_only=True)
class Served:
    """What the app serves: the model, its SAEs by key, defaults and caps."""

    model: Any
    saes: dict[str, Any]
    """SAE key -> SAE, the keys a ``steer`` item may name."""
    store: Any = None
    """For unit max: the features' recorded maxes."""
    name: str = ""
    """The model id clients send (GET /v1/models)."""
    chat: bool | None = None
    """Chat template for chat requests: None for -it models only."""
    default_steers: list[SteerSpec] = field(default_factory=list)
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    resolved: dict[SteerSpec, Steer] = field(default_factory=dict)
    """Each spec resolved once (unit max reads the store once per feature)."""

    def steers(self, specs: Sequence[SteerSpec]) -> list[Steer]:
        out = []
        for i, spec in enumerate(specs):
            if spec not in self.resolved:
                try:
                    (self.resolved[spec],) = resolve([spec], self.saes, self.store)
                except SpecError as e:
                    field_ = e.field.replace("steer[0]", f"steer[{i}]")
                    raise bad(field_, e.detail) from None
            out.append(self.resolved[spec])
        return out


def create_app(
    model: Any,
    saes: Sequence[Any] = (),
    *,
    store: Any = None,
    name: str | None = None,
    chat: bool | None = None,
    steer: Sequence[SteerSpec | str] = (),
    api_key: str | None = None,
    limits: Limits | None = None,
) -> Starlette:
    """An ASGI app serving ``model`` with ``saes`` (steerable by their keys, ``sae_map``) the
    OpenAI way: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``.
    ``steer``: default steers for requests that send none; ``api_key``: required as a bearer
    token. The model is the app's own while it runs: run nothing else on it meanwhile."""
    specs = [SteerSpec.parse(s) if isinstance(s, str) else s for s in steer]
    served = Served(model=model, saes=sae_map(list(saes), store), store=store,
                    name=name or model_source(model),
                    chat=chat, default_steers=specs, api_key=api_key, limits=limits or Limits())  # fmt: skip
    try:
        served.steers(specs)  # a bad default fails now, not on the first request
    except ApiError as e:
        raise ScopeError(f"--steer {e.message.removeprefix('steer')}") from None
    engine = Engine(model)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.close)

    async def models(request: HttpRequest) -> Response:
        if denied := _check_key(served, request):
            return denied
        return JSONResponse({"object": "list", "data": [_model_card(served)]})

    async def chat_completions(request: HttpRequest) -> Response:
        return await _complete(served, engine, request, chat=True)

    async def completions(request: HttpRequest) -> Response:
        return await _complete(served, engine, request, chat=False)

    routes = [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.served, app.state.engine = served, engine
    return app


def _model_card(served: Served) -> dict[str, Any]:
    return {"id": served.name, "object": "model", "created": 0, "owned_by": "scope",
            "saes": sorted(served.saes), "default_steer": [s.to_dict() for s in served.default_steers]}  # fmt: skip


def _check_key(served: Served, request: HttpRequest) -> Response | None:
    if served.api_key is None:
        return None
    given = request.headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else ""
    if hmac.compare_digest(token.encode(), served.api_key.encode()):
        return None
    err = ApiError(401, "Authorization: missing or wrong API key: send the server's --api-key as "
                   "a bearer token (Authorization: Bearer KEY; the openai client's api_key)",
                   code="invalid_api_key")  # fmt: skip
    return JSONResponse(err.body(), status_code=401)


async def _body(served: Served, request: HttpRequest) -> Any:
    cap = served.limits.body_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > cap:
        raise ApiError(413, f"body: {int(length):,} bytes is more than this server takes "
                       f"({cap:,}): send a shorter prompt", param="body")  # fmt: skip
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise ApiError(413, f"body: more than this server takes ({cap:,} bytes): send a "
                           "shorter prompt", param="body")  # fmt: skip
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise bad("body", f"is not valid JSON ({e}): send a JSON object") from None


@dataclass(kw_only=True)
class Plan:
    """A checked request, ready for the engine."""

    request: Request
    tokens: Any
    sampling: Sampling
    steers: list[Steer]
    specs: list[SteerSpec]
    rows: list[Row]


def _plan(served: Served, req: Request) -> Plan:
    model = served.model
    tokens = chat_tokens(model, req.messages, served.chat if req.chat else False, 0)
    n_prompt = tokens.shape[1]
    room = model.cfg.n_ctx - n_prompt
    max_tokens = (
        req.max_tokens if req.max_tokens is not None else min(served.limits.max_tokens, room)
    )
    if max_tokens > room or room < 1:
        name = (
            "max_tokens" if req.max_tokens is not None else ("messages" if req.chat else "prompt")
        )
        raise bad(name, f"the prompt is {n_prompt} tokens and {max_tokens} more are asked for: "
                  f"{n_prompt + max_tokens} > the model's context of {model.cfg.n_ctx}; shorten "
                  "the prompt or lower max_tokens")  # fmt: skip
    specs = served.default_steers if req.steer is None else req.steer
    steers = served.steers(specs)
    sampling = Sampling(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                        freq_penalty=req.frequency_penalty, seed=req.seed)  # fmt: skip
    rows = [Row(steers=steers, seed=req.seed + j, length=max_tokens) for j in range(req.n)]
    if req.compare:
        rows += [Row(steers=[], seed=req.seed + j, length=max_tokens) for j in range(req.n)]
    return Plan(
        request=req, tokens=tokens, sampling=sampling, steers=steers, specs=list(specs), rows=rows
    )


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


async def _complete(
    served: Served, engine: Engine, request: HttpRequest, *, chat: bool
) -> Response:
    if denied := _check_key(served, request):
        return denied
    try:
        req = read_request(
            await _body(served, request), chat=chat, served=served.name, limits=served.limits
        )
        plan = _plan(served, req)
    except ApiError as e:
        return JSONResponse(e.body(), status_code=e.status)
    except ScopeError as e:  # the prompt: empty, or past the context, or a chat template's refusal
        return JSONResponse(bad("messages" if chat else "prompt", str(e)).body(), status_code=400)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def emit(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop is gone: nobody is listening
            job.cancel()

    job = Job(
        tokens=plan.tokens, sampling=plan.sampling, rows=plan.rows, logprobs=req.logprobs, emit=emit
    )
    engine.submit(job)
    reply = Reply(served, plan, job, chat)
    first = await _next(events, request, job)
    if first is None:
        return Response(status_code=499)
    if first.error is not None:  # before any token: a proper error status
        job.cancel()
        return _error_response(first.error)
    if req.stream:
        return StreamingResponse(reply.stream(first, events, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
    event: Event | None = first
    while event is not None:
        if event.error is not None:
            job.cancel()
            return _error_response(event.error)
        reply.take(event)
        if reply.over:
            break
        event = await _next(events, request, job)
    if event is None:
        return Response(status_code=499)
    return JSONResponse(reply.whole())


def _error_response(error: BaseException) -> JSONResponse:
    if isinstance(error, ShuttingDown):
        err = ApiError(503, str(error), code="shutting_down")
    elif isinstance(error, ScopeError):  # a steer that fails at its first forward
        err = bad("steer", str(error))
    else:
        err = ApiError(500, f"generation failed: {error}", code="server_error")
    return JSONResponse(err.body(), status_code=err.status)


async def _next(events: asyncio.Queue[Event], request: HttpRequest, job: Job) -> Event | None:
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
                    body = _error_response(event.error).body
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
                event = await _next(events, request, self.job)
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


__all__ = ["Served", "create_app"]

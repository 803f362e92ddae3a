"""The HTTP face: a Starlette app with OpenAI's routes over the engine.

Each completion request is checked (``requests``), planned (prompt tokens, resolved steers, a
row per completion) and becomes one ``Job`` (its ``n`` completions, and with ``compare`` as
many unsteered ones, are its rows); ``replies`` turns the engine's tokens into OpenAI's JSON,
or into server-sent events in OpenAI's chunk format when streaming.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from scope.errors import ScopeError
from scope.generate import Sampling, chat_tokens
from scope.model import model_source
from scope.serve.engine import Engine, Event, Job, Row
from scope.serve.replies import Reply, error_response, next_event
from scope.serve.requests import ApiError, Limits, Request, bad, read_request
from scope.steer import Steer
from scope.steer_spec import SpecError, SteerSpec, resolve, sae_map

if TYPE_CHECKING:
    from scope.store import Store

RESOLVED_KEPT = 4096
"""Resolved steers kept for reuse; past this the cache starts again."""


@dataclass(kw_only=True)
class Served:
    """What the app serves: the model, its SAEs by key, defaults and caps."""

    model: Any
    saes: dict[str, Any]
    """SAE key -> SAE, the keys a ``steer`` item may name."""
    store: Store | None = None
    """For unit max: the features' recorded maxes (read once per spec, by ``resolve``)."""
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
        """The specs as steers; an error names the spec's place in the request's ``steer``."""
        out = []
        for i, spec in enumerate(specs):
            if spec not in self.resolved:
                if len(self.resolved) >= RESOLVED_KEPT:  # a client sweeping strengths, say
                    self.resolved.clear()
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
    store: Store | None = None,
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
                        freq_penalty=req.frequency_penalty, seed=req.seed, stop_at_eos=not req.ignore_eos)  # fmt: skip
    rows = [Row(steers=steers, seed=req.seed + j, length=max_tokens) for j in range(req.n)]
    if req.compare:
        rows += [Row(steers=[], seed=req.seed + j, length=max_tokens) for j in range(req.n)]
    return Plan(
        request=req, tokens=tokens, sampling=sampling, steers=steers, specs=list(specs), rows=rows
    )


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
    streaming = False
    try:
        first = await next_event(events, request, job)
        if first is None:
            return Response(status_code=499)  # the client went away
        if first.error is not None:  # before any token: a proper error status
            return error_response(first.error)
        if req.stream:
            streaming = True  # from here on the stream owns the job
            return StreamingResponse(reply.stream(first, events, request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        event: Event | None = first
        while event is not None:
            if event.error is not None:
                return error_response(event.error)
            reply.take(event)
            if reply.over:
                return JSONResponse(reply.whole())
            event = await next_event(events, request, job)
        return Response(status_code=499)
    finally:
        if not streaming:  # answered, failed, or cancelled (Ctrl-C): nothing more is read
            job.cancel()


__all__ = ["Served", "create_app"]

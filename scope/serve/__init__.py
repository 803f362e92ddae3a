"""`scope serve`: a steered Gemma behind an OpenAI-compatible HTTP API (Starlette + uvicorn).

    from scope.serve import create_app
    app = create_app(model, [sae], store=store, steer=["L12.res.16k/1234:4xmax"])   # ASGI app

Routes: ``GET /v1/models``, ``POST /v1/chat/completions`` (the chat template for -it models,
plain text for base models, as ``scope steer``), ``POST /v1/completions``. Requests may carry
``steer`` (a list of ``SteerSpec`` dicts) and ``compare`` (the unsteered completions too, same
seeds, under ``baseline_choices``). Requests in flight generate together as one batch, whatever
their prompts and settings (``scope.serve.engine``). ``run`` serves an app with uvicorn after the safety check:
127.0.0.1 by default; another address needs an API key or an explicit ``no_auth``.

- ``engine``: the thread that owns the model and batches requests;
- ``requests``: reading and checking a request body (OpenAI's fields and ours);
- ``app``: the routes, auth, size caps, and planning a request into an engine job;
- ``replies``: answers in OpenAI's shapes, whole or as server-sent events.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scope.errors import ScopeError

if TYPE_CHECKING:
    from scope.serve.app import Served, create_app
    from scope.serve.requests import ApiError, Limits

LOCAL = {"127.0.0.1", "localhost", "::1"}
"""Addresses only this machine can reach."""

GRACE_SECONDS = 5
"""On Ctrl-C, requests in flight get this long to finish before they are cancelled."""

_LAZY = {"Served": "scope.serve.app", "create_app": "scope.serve.app",
         "ApiError": "scope.serve.requests", "Limits": "scope.serve.requests"}  # fmt: skip


def __getattr__(name: str) -> Any:
    # the app and its model libraries load on first use: the CLI imports LOCAL cheaply
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'scope.serve' has no attribute {name!r}")


def check_address(address: str, api_key: str | None, no_auth: bool) -> str | None:
    """Refuse a non-local address without an API key, unless ``no_auth``; gives the warning
    to print when serving one without a key."""
    if address in LOCAL:
        return None
    if api_key:
        return None
    if not no_auth:
        raise ScopeError(
            f"serving on {address} lets anyone who can reach it run the model: give --api-key "
            "KEY (clients send it as a bearer token), or --no-auth to serve it open anyway"
        )
    return (
        f"serving on {address} with no API key (--no-auth): anyone who can reach it can run "
        "the model"
    )


def run(app: Any, address: str = "127.0.0.1", port: int = 8000, sock: Any = None) -> None:
    """Serve ``app`` with uvicorn until Ctrl-C (then in-flight requests get GRACE_SECONDS to
    finish, and are cancelled after). ``sock``: an already bound socket instead."""
    import uvicorn

    config = uvicorn.Config(app, host=address, port=port, log_level="warning",
                            timeout_graceful_shutdown=GRACE_SECONDS, access_log=False)  # fmt: skip
    server = uvicorn.Server(config)
    server.run(sockets=[sock] if sock is not None else None)


__all__ = ["LOCAL", "ApiError", "Limits", "Served", "check_address", "create_app", "run"]

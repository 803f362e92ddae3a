"""`scope serve` over real HTTP with the official openai client: every answer equals
``scope.generate`` with the same prompt, seed, sampling and SteerSpec.

Requests in flight together share forwards (``scope.batch``), which is exact up to float
rounding, not bitwise: the token ids asserted equal here are equal unless a draw falls within
rounding (~1e-6 in the logits) of the boundary between two tokens, which these fixed seeds do
not; log-probabilities are held to 1e-5 of the model's (1e-4 against a forward without the KV
cache)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

from scope.errors import ScopeError  # noqa: E402
from scope.generate import Sampling, chat_tokens, end_tokens, generate, prompt_tokens  # noqa: E402
from scope.steer_spec import SteerSpec, feature_max, resolve, sae_map  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog, then"
MESSAGES = [{"role": "user", "content": "Tell me about the fox."}]
SAMPLING = {"temperature": 0.9, "top_p": 0.95, "frequency_penalty": 0.5}


class Server:
    """A uvicorn server for an app, in a thread, on a free port of 127.0.0.1."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)

    def client(self, **kw: Any) -> Any:
        return openai.OpenAI(
            base_url=self.url, api_key=kw.pop("api_key", "none"), max_retries=0, **kw
        )

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def served_model(tiny_dir):
    """The server's own copy of the tiny model (the tests' references run on ``tiny_model``)."""
    from scope import load_model

    return load_model(tiny_dir, device="cpu")


@pytest.fixture(scope="module")
def store(app_store):
    from scope.store import Store

    return Store(app_store)


@pytest.fixture(scope="module")
def server(served_model, tiny_sae_dir, store) -> Iterator[Server]:
    from scope import load_sae
    from scope.serve import Limits, create_app

    app = create_app(served_model, [load_sae(tiny_sae_dir, device="cpu")], store=store, chat=True,
                     limits=Limits(max_tokens=64, n=4, body_bytes=100_000))  # fmt: skip
    s = Server(app)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def ref_sae(tiny_sae_dir):
    from scope import load_sae

    return load_sae(tiny_sae_dir, device="cpu")


@pytest.fixture(scope="module")
def name(server) -> str:
    return server.app.state.served.name


def reference(model, sae, store, *, chat: bool, seed: int, max_tokens: int, steer=(), prompt=PROMPT,
              messages=MESSAGES, **kw):  # fmt: skip
    """What ``scope.generate`` makes of the same request: (text, token ids)."""
    sampling = Sampling(max_new_tokens=max_tokens, seed=seed, temperature=kw.get("temperature", 1.0),
                        top_p=kw.get("top_p", 1.0), freq_penalty=kw.get("frequency_penalty", 0.0))  # fmt: skip
    if chat:
        tokens = chat_tokens(model, messages, True, max_tokens)
    else:
        tokens = prompt_tokens(model, prompt, False, max_tokens)
    steers = resolve([SteerSpec.from_dict(s) for s in steer], sae_map([sae], store), store)
    ids = list(generate(model, tokens, sampling, steers))
    return model.tokenizer.decode(ids, skip_special_tokens=True), ids


def ask(client, name, *, chat: bool, stream: bool = False, prompt=PROMPT, messages=MESSAGES, **kw):
    """(text, token ids, finish reason) of choice 0, streamed or not, and the raw response."""
    if chat:
        call = client.chat.completions.create(model=name, messages=messages, stream=stream, **kw)
    else:
        call = client.completions.create(model=name, prompt=prompt, stream=stream, **kw)
    if not stream:
        c = call.choices[0]
        text = c.message.content if chat else c.text
        return text, c.model_extra["token_ids"], c.finish_reason, call
    text, ids, finish = "", [], None
    for chunk in call:
        for c in chunk.choices:
            piece = (c.delta.content if chat else c.text) or ""
            text, ids = text + piece, ids + c.model_extra["token_ids"]
            finish = c.finish_reason or finish
    return text, ids, finish, None


def test_models_lists_the_model_and_its_sae_keys(server, name):
    models = server.client().models.list().data
    assert [m.id for m in models] == [name]
    assert models[0].model_extra["saes"] == ["L2.res.256"]


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_answers_equal_generate(server, name, tiny_model, ref_sae, store, chat, stream):
    want = reference(tiny_model, ref_sae, store, chat=chat, seed=7, max_tokens=12, **SAMPLING)
    text, ids, finish, _ = ask(server.client(), name, chat=chat, stream=stream, seed=7,
                               max_tokens=12, **SAMPLING)  # fmt: skip
    assert (text, ids) == want
    assert finish == ("stop" if ids[-1] in end_tokens(tiny_model.tokenizer) else "length")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_steered_request_equals_generate_with_the_same_spec(
    server, name, tiny_model, ref_sae, store, stream
):
    steer = [{"sae": "L2.res.256", "feature": 7, "strength": 30, "positions": "generated"},
             {"sae": "L2.res.256", "feature": 3, "mode": "clamp", "strength": 5}]  # fmt: skip
    want = reference(tiny_model, ref_sae, store, chat=False, seed=3, max_tokens=10, steer=steer)
    plain = reference(tiny_model, ref_sae, store, chat=False, seed=3, max_tokens=10)
    assert want != plain  # the steer changes the text
    got = ask(server.client(), name, chat=False, stream=stream, seed=3, max_tokens=10,
              extra_body={"steer": steer})  # fmt: skip
    assert got[:2] == want


def test_unit_max_reads_the_stores_max(server, name, tiny_model, ref_sae, store):
    f = 7
    top = feature_max(store, ref_sae, f)
    steer = [{"sae": "L2.res.256", "feature": f, "strength": 2, "unit": "max"}]
    want = reference(tiny_model, ref_sae, store, chat=False, seed=1, max_tokens=8, steer=steer)
    (same,) = resolve([SteerSpec.from_dict(steer[0])], sae_map([ref_sae]), store)
    assert same.max_act == pytest.approx(top)
    assert (
        ask(server.client(), name, chat=False, seed=1, max_tokens=8, extra_body={"steer": steer})[
            :2
        ]
        == want
    )


def test_compare_returns_both_with_the_same_seeds(server, name, tiny_model, ref_sae, store):
    steer = [{"sae": "L2.res.256", "feature": 7, "strength": 30}]
    r = server.client().chat.completions.create(model=name, messages=MESSAGES, seed=11, n=2, max_tokens=8,
                                                extra_body={"steer": steer, "compare": True})  # fmt: skip
    base = r.model_extra["baseline_choices"]
    assert [c.index for c in r.choices] == [0, 1] and [c["index"] for c in base] == [0, 1]
    for j in range(2):
        steered = reference(
            tiny_model, ref_sae, store, chat=True, seed=11 + j, max_tokens=8, steer=steer
        )
        plain = reference(tiny_model, ref_sae, store, chat=True, seed=11 + j, max_tokens=8)
        assert (r.choices[j].message.content, r.choices[j].model_extra["token_ids"]) == steered
        assert (base[j]["message"]["content"], base[j]["token_ids"]) == plain
    assert r.model_extra["steer"][0]["feature"] == 7 and r.model_extra["seed"] == 11
    # streamed: the baseline's chunks come under baseline_choices
    texts, ids = {"choices": "", "baseline_choices": ""}, {"choices": [], "baseline_choices": []}
    for chunk in server.client().chat.completions.create(model=name, messages=MESSAGES, seed=11, max_tokens=8,
                                                         stream=True, extra_body={"steer": steer, "compare": True}):  # fmt: skip
        items = [c.model_dump() for c in chunk.choices] + (
            chunk.model_extra.get("baseline_choices") or []
        )
        key = "choices" if chunk.choices else "baseline_choices"
        for c in items:
            texts[key] += c["delta"].get("content") or ""
            ids[key] += c["token_ids"]
    assert (texts["choices"], ids["choices"]) == (
        r.choices[0].message.content,
        r.choices[0].model_extra["token_ids"],
    )
    assert (texts["baseline_choices"], ids["baseline_choices"]) == (
        base[0]["message"]["content"],
        base[0]["token_ids"],
    )
    assert r.usage.completion_tokens == sum(
        len(c.model_extra["token_ids"]) for c in r.choices
    ) + sum(len(c["token_ids"]) for c in base)


def log_softmax_along(model, prompt_ids: list[int], ids: list[int]) -> torch.Tensor:
    """log-softmax of the model's logits at each generated position: [len(ids), d_vocab]."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + ids]))[0]
    return torch.log_softmax(logits[len(prompt_ids) - 1 : -1].float(), dim=-1)


def test_logprobs_equal_the_models_log_softmax(server, name, tiny_model):
    tok = tiny_model.tokenizer
    r = server.client().completions.create(
        model=name, prompt=PROMPT, seed=2, max_tokens=8, logprobs=3
    )
    ids = r.choices[0].model_extra["token_ids"]
    logp = log_softmax_along(
        tiny_model, prompt_tokens(tiny_model, PROMPT, False, 8)[0].tolist(), ids
    )
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(
        [float(logp[i, t]) for i, t in enumerate(ids)], abs=1e-4
    )
    for i, top in enumerate(lp.top_logprobs):
        want = logp[i].topk(3)
        assert sorted(top.values(), reverse=True) == pytest.approx(want.values.tolist(), abs=1e-4)
        assert set(top) == {tok.decode([t]) for t in want.indices.tolist()}
    c = server.client().chat.completions.create(model=name, messages=MESSAGES, seed=2, max_tokens=6,
                                                logprobs=True, top_logprobs=2)  # fmt: skip
    ids = c.choices[0].model_extra["token_ids"]
    logp = log_softmax_along(
        tiny_model, chat_tokens(tiny_model, MESSAGES, True, 6)[0].tolist(), ids
    )
    content = c.choices[0].logprobs.content
    assert [e.logprob for e in content] == pytest.approx(
        [float(logp[i, t]) for i, t in enumerate(ids)], abs=1e-4
    )
    for i, e in enumerate(content):
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(
            logp[i].topk(2).values.tolist(), abs=1e-4
        )


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_stop_sequence_cuts_the_text(server, name, tiny_model, ref_sae, store, stream):
    full, _ = reference(tiny_model, ref_sae, store, chat=False, seed=4, max_tokens=30)
    stop = full[8:11]
    assert stop and full.find(stop) >= 0
    text, _, finish, _ = ask(
        server.client(), name, chat=False, stream=stream, seed=4, max_tokens=30, stop=[stop]
    )
    assert text == full[: full.find(stop)] and finish == "stop"


CLIENT_PROMPTS = [
    "The quick brown fox jumps over",
    "Once upon a time, in a land far away, there lived a",
    "Hi",
    "Tell me about the river and the old stone bridge over it",
    "Why",
    "The history of the city begins with a small market by the sea",
    "Numbers: one, two, three, four, five, six, seven, eight, nine, ten",
    "A",
]


def test_concurrent_clients_each_get_their_own_answer(server, name, tiny_model, ref_sae, store):
    """8 clients at once, each with its own prompt (all of different lengths, chat and plain),
    sampling settings (greedy, top-p, frequency penalty), length, steers and seed, streamed or
    not: each gets exactly what it gets alone, and they shared forwards."""
    steers = [[], [{"sae": "L2.res.256", "feature": 7, "strength": 20}],
              [{"sae": "L2.res.256", "feature": 7, "strength": -20, "positions": "generated"}],
              [{"sae": "L2.res.256", "feature": 3, "mode": "clamp", "strength": 8}],
              [{"sae": "L2.res.256", "feature": 9, "mode": "ablate"}],
              [{"sae": "L2.res.256", "feature": 7, "strength": 20, "positions": "prompt"}],
              [{"sae": "L2.res.256", "feature": 5, "strength": 0.5, "unit": "norm"}], []]  # fmt: skip
    samplings = [SAMPLING, {"temperature": 0.0}, {"temperature": 1.0, "top_p": 0.8},
                 {"temperature": 0.7, "frequency_penalty": 1.0}] * 2  # fmt: skip
    jobs = []
    for i, (prompt, steer, kw) in enumerate(zip(CLIENT_PROMPTS, steers, samplings, strict=True)):
        chat = i % 3 == 1
        asked = (
            {"prompt": prompt} if not chat else {"messages": [{"role": "user", "content": prompt}]}
        )
        jobs.append(
            (
                chat,
                i % 2 == 0,
                asked,
                {"seed": 20 + i, "max_tokens": 8 + 2 * i, "steer": steer, **kw},
            )
        )
    lengths = {len(chat_tokens(tiny_model, a.get("messages") or [{"role": "user", "content": a["prompt"]}], c, 1)[0])
               for c, _, a, _ in jobs}  # fmt: skip
    assert len(lengths) == len(jobs)  # every prompt its own length
    want = [
        reference(tiny_model, ref_sae, store, chat=chat, **asked, **kw)
        for chat, _, asked, kw in jobs
    ]
    engine = server.app.state.engine
    before = dataclasses.replace(engine.stats)
    go = threading.Barrier(len(jobs))
    got: dict[int, Any] = {}

    def one(i: int) -> None:
        chat, stream, asked, kw = jobs[i]
        kw = dict(kw)
        client = server.client()
        go.wait()
        got[i] = ask(client, name, chat=chat, stream=stream, extra_body={"steer": kw.pop("steer")},
                     **asked, **kw)[:2]  # fmt: skip

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got.get(i) for i in range(len(jobs))] == want
    made = engine.stats.row_tokens - before.row_tokens
    assert made == sum(len(ids) for _, ids in want)
    # alone, each token takes a forward of its own; together, rows of different requests
    # (all of different prompt lengths) made their tokens in the same forwards
    assert engine.stats.forwards - before.forwards < made / 2
    assert engine.stats.shared > before.shared


def test_a_client_leaving_mid_stream_leaves_the_others_correct(
    server, name, tiny_model, ref_sae, store
):
    """A client leaves while another request, of another prompt, is under way beside it (in
    its batch unless the first had already made all its tokens): the other still gets its own
    answer, and the abandoned request stops generating."""
    engine = server.app.state.engine
    other_prompt = "Hi there, fox"
    want = reference(
        tiny_model, ref_sae, store, chat=False, seed=9, max_tokens=20, prompt=other_prompt
    )
    got: list[Any] = []
    started = threading.Event()

    def other() -> None:
        text, ids = "", []
        stream = server.client().completions.create(model=name, prompt=other_prompt, stream=True,
                                                    seed=9, max_tokens=20)  # fmt: skip
        for chunk in stream:
            started.set()
            for c in chunk.choices:
                text, ids = text + (c.text or ""), ids + c.model_extra["token_ids"]
        got.append((text, ids))

    body = {"model": name, "prompt": PROMPT, "max_tokens": 60, "stream": True, "seed": 9,
            "stop": ["never appears \u2603"]}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        t = threading.Thread(target=other)
        t.start()
        assert started.wait(30)
        # leave with most of the 60 tokens still to come, the other request under way
    t.join(60)
    assert got == [want]
    deadline = time.monotonic() + 10
    while engine.runs:  # the abandoned request stops generating
        assert time.monotonic() < deadline, "the abandoned request kept generating"
        time.sleep(0.05)
    assert (
        ask(server.client(), name, chat=False, seed=9, max_tokens=20, prompt=other_prompt)[:2]
        == want
    )


BAD = [
    ("completions", b'{"prompt": "hi", ', 400, "body"),
    (
        "completions",
        b'{"prompt": "hi", "steer": [{"sae": "L2.res.256", "feature": 3, "strength": NaN}]}',
        400,
        "steer[0].strength",
    ),
    (
        "completions",
        {"prompt": "hi", "steer": [{"sae": "L9.res.16k", "feature": 3, "strength": 1}]},
        400,
        "steer[0].sae",
    ),
    (
        "completions",
        {"prompt": "hi", "steer": [{"sae": "L2.res.256", "feature": 256, "strength": 1}]},
        400,
        "steer[0].feature",
    ),
    (
        "completions",
        {"prompt": "hi", "steer": [{"sae": "L2.res.256", "feature": 3, "strenght": 1}]},
        400,
        "steer[0].strenght",
    ),
    (
        "completions",
        {"prompt": "hi", "steer": [{"sae": "L2.res.256", "feature": 3, "mode": "boost"}]},
        400,
        "steer[0].mode",
    ),
    ("completions", {"prompt": "hi", "steer": {"sae": "L2.res.256"}}, 400, "steer"),
    (
        "completions",
        {"prompt": "hi", "steer": [{"sae": "L2.res.256", "feature": 3, "strength": 40000}]},
        400,
        "steer",
    ),
    ("completions", {"prompt": "word " * 70, "max_tokens": 64}, 400, "max_tokens"),  # ~210 tokens
    ("completions", {"prompt": "word " * 200, "max_tokens": 4}, 400, "prompt"),  # past the context
    ("completions", {"prompt": "hi", "max_tokens": 65}, 400, "max_tokens"),
    ("completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("completions", {"prompt": "hi", "n": 5}, 400, "n"),
    ("completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("completions", {"prompt": "hi", "frequency_penalty": -0.5}, 400, "frequency_penalty"),
    ("completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("completions", {"prompt": "hi", "presence_penalty": 1}, 400, "presence_penalty"),
    ("completions", {"prompt": "hi", "logprobs": 9}, 400, "logprobs"),
    ("completions", {"prompt": "  "}, 400, "prompt"),
    ("completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("completions", {"prompt": "x" * 200_000}, 413, "body"),
    ("completions", [1, 2], 400, "body"),
    ("chat/completions", {"messages": "hi"}, 400, "messages"),
    (
        "chat/completions",
        {"messages": [{"role": "robot", "content": "hi"}]},
        400,
        "messages[0].role",
    ),
    ("chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs"),
    ("chat/completions", {"messages": MESSAGES, "tools": [{"type": "function"}]}, 400, "tools"),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "param"), BAD, ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD)]
)
def test_bad_input_is_a_4xx_naming_the_field_and_the_next_request_is_served(
    server, name, tiny_model, ref_sae, store, path, body, status, param
):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(
        f"{server.url}/{path}",
        content=content,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (
        err["param"] == param
        and err["message"].startswith(f"{param}:")
        and len(err["message"]) > len(param) + 10
    )
    want = reference(tiny_model, ref_sae, store, chat=False, seed=0, max_tokens=4)
    assert ask(server.client(), name, chat=False, seed=0, max_tokens=4)[:2] == want


def test_api_key_is_required_when_set(served_model, tiny_sae_dir):
    from scope import load_sae
    from scope.serve import create_app

    s = Server(create_app(served_model, [load_sae(tiny_sae_dir, device="cpu")], api_key="sekret"))
    try:
        name = s.app.state.served.name
        with pytest.raises(openai.AuthenticationError, match="API key"):
            s.client(api_key="wrong").completions.create(model=name, prompt=PROMPT, max_tokens=2)
        assert httpx.get(f"{s.url}/models").status_code == 401
        r = s.client(api_key="sekret").completions.create(model=name, prompt=PROMPT, max_tokens=2)
        assert len(r.choices[0].model_extra["token_ids"]) == 2
    finally:
        s.stop()


def test_default_steers_apply_unless_the_request_sends_its_own(
    served_model, tiny_model, tiny_sae_dir, ref_sae
):
    from scope import load_sae
    from scope.serve import create_app

    with pytest.raises(ScopeError, match=r"--steer.*not loaded"):
        create_app(served_model, [load_sae(tiny_sae_dir, device="cpu")], steer=["L9.res.1k/3:8"])
    s = Server(
        create_app(served_model, [load_sae(tiny_sae_dir, device="cpu")], steer=["L2.res.256/7:30"])
    )
    try:
        name = s.app.state.served.name
        steered = reference(tiny_model, ref_sae, None, chat=False, seed=5, max_tokens=8,
                            steer=[SteerSpec.parse("L2.res.256/7:30").to_dict()])  # fmt: skip
        plain = reference(tiny_model, ref_sae, None, chat=False, seed=5, max_tokens=8)
        assert ask(s.client(), name, chat=False, seed=5, max_tokens=8)[:2] == steered
        assert (
            ask(s.client(), name, chat=False, seed=5, max_tokens=8, extra_body={"steer": []})[:2]
            == plain
        )
    finally:
        s.stop()


def test_check_address():
    from scope.serve import check_address

    assert check_address("127.0.0.1", None, False) is None
    assert check_address("0.0.0.0", "key", False) is None
    with pytest.raises(ScopeError, match="--api-key"):
        check_address("0.0.0.0", None, False)
    assert "no API key" in (check_address("0.0.0.0", None, True) or "")


def scope_command() -> list[str]:
    return [sys.executable, "-c", "from scope.cli import main; main()"]


def test_cli_refuses_a_public_address_without_a_key_before_loading(tmp_path):
    out = subprocess.run([*scope_command(), "serve", "--model", str(tmp_path / "nowhere"), "--address", "0.0.0.0"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2 and "--api-key" in out.stderr and "--no-auth" in out.stderr


@pytest.mark.slow  # a model loads in a subprocess
def test_cli_serves_and_ctrl_c_stops_it_within_seconds(tiny_dir, tiny_sae_dir):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([*scope_command(), "serve", "--model", str(tiny_dir), "--sae", str(tiny_sae_dir),
                             "--port", str(port), "--steer", "L2.res.256/7:8", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "scope serve did not come up"
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert models["data"][0]["default_steer"][0]["feature"] == 7
        body = {"prompt": PROMPT, "max_tokens": 64, "stream": True, "stop": ["\u2603\u2603"]}
        with httpx.stream(
            "POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30
        ) as r:
            next(r.iter_lines())  # a request in flight
            proc.send_signal(signal.SIGINT)
            start = time.monotonic()
            proc.wait(15)
        assert time.monotonic() - start < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_steer_spec_forms():
    spec = SteerSpec.parse("L12.res.16k/1234:4xmax@generated")
    assert spec == SteerSpec(
        sae="L12.res.16k", feature=1234, strength=4.0, unit="max", positions="generated"
    )
    assert SteerSpec.parse(str(spec)) == spec and SteerSpec.from_dict(spec.to_dict()) == spec
    assert SteerSpec.parse("a/b/7:30:clamp").sae == "a/b"  # a RELEASE/ID as the key
    assert SteerSpec.parse("L1.res.1k/3:ablate").mode == "ablate"
    assert json.loads(json.dumps(spec.to_dict())) == spec.to_dict()
    for text, field in [("L1/x:8", "feature"), ("L1/3:lots", "strength"), ("L1/3", "steer"),
                        ("L1/3:8:boost", "mode"), ("L1/3:nan", "strength"), ("L1/3:4xmax:clamp", "unit"),
                        ("L1/3:8@later", "positions"), ("L1/3:8:ablate", "strength")]:  # fmt: skip
        with pytest.raises(ScopeError, match=rf"^{field}: "):
            SteerSpec.parse(text)
    with pytest.raises(ScopeError, match=r"^feature: True is not a whole number"):
        SteerSpec(sae="L1", feature=True)
    with pytest.raises(ScopeError, match=r"^strength: inf is not a finite number"):
        SteerSpec(sae="L1", feature=1, strength=math.inf)
    with pytest.raises(ScopeError, match=r"^feature: is missing"):
        SteerSpec.from_dict({"sae": "L1"})


def test_a_failing_steer_fails_only_its_own_request_in_a_batch(
    server, name, tiny_model, ref_sae, store
):
    """A steer that would swamp the activation fails at the batch's first forward; the batch is
    then retried a request at a time, so the others still get their own answers."""
    engine = server.app.state.engine
    want = [reference(tiny_model, ref_sae, store, chat=False, seed=s, max_tokens=6) for s in (1, 2)]
    go = threading.Barrier(3)
    got: dict[int, Any] = {}

    def one(i: int) -> None:
        steer = [{"sae": "L2.res.256", "feature": 3, "strength": 40000}] if i == 2 else []
        body = {"model": name, "prompt": PROMPT, "max_tokens": 6, "seed": i + 1, "steer": steer}
        go.wait()
        got[i] = httpx.post(f"{server.url}/completions", json=body, timeout=60)

    before = engine.stats.batches
    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in (0, 1):
        c = got[i].json()["choices"][0]
        assert (c["text"], c["token_ids"]) == want[i]
    assert got[2].status_code == 400 and got[2].json()["error"]["param"] == "steer"
    assert "would write" in got[2].json()["error"]["message"]
    assert engine.stats.batches - before >= 1


def test_chat_on_a_base_model_is_the_plain_text(tiny_model):
    """Without a chat template (a base model), the messages are plain text, one per paragraph:
    one user message is exactly the prompt `scope steer` would use."""
    one = chat_tokens(tiny_model, [{"role": "user", "content": PROMPT}], None, 4)
    assert torch.equal(one, prompt_tokens(tiny_model, PROMPT, False, 4))
    two = chat_tokens(tiny_model, [{"role": "system", "content": "Be brief."}, *MESSAGES], None, 4)
    assert torch.equal(two, tiny_model.to_tokens("Be brief.\n\n" + MESSAGES[0]["content"]))

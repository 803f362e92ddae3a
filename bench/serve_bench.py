"""`scope serve` throughput: tokens/s with 1, 4 and 16 concurrent clients against in-process
`generate` doing the same work, plain and steered, measured in one run.

    python bench/serve_bench.py                    # CPU: 6 layers x d_model 512, 8k SAE at layer 3
    python bench/serve_bench.py --gemma-2b-shape   # GPU: 26 layers of gemma-2-2b's shape, 16k SAE at layer 12
    python bench/serve_bench.py --clients 1,4 --new-tokens 16 --repeats 1   # quicker

The server is `scope serve` in its own process on 127.0.0.1 (what a user runs); each client is a
thread with the official `openai` client sending one completion request (its own prompt, of 2 to
19 words, its own seed and, when steered, its own strength of one feature), all at once. In-process is the same requests one
after another with `scope.generate.generate` in this process (what a script does without the
server), run in a worker thread as the server's engine runs its generations (on a loaded 2-core
machine torch ran up to 10x slower in a process's main thread than in a worker thread, which
would flatter the server). Sampling at temperature 0.7 with top-p 0.9 and no early stop, so every request makes
--new-tokens tokens; the server's tokens are checked equal to in-process ones. Medians of
--repeats runs. Targets: 1 client >= 0.9x in-process; 16 clients >= 4x one client's tokens/s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import torch

from scope import load_model, load_sae
from scope import testing as fixtures
from scope.generate import Sampling, generate, prompt_tokens
from scope.steer_spec import SteerSpec, resolve, sae_map

PROMPTS = [
    "The history of the city begins with",
    "Once upon a time",
    "The committee met on Tuesday to discuss the budget for the coming year, and",
    "Water boils at",
    "In the morning the fishermen pushed their boats into the grey sea and",
    "My favourite",
    "The old library had three floors, each one darker than the last, and on the top",
    "Yesterday",
]
"""Client i sends ``PROMPTS[i % 8]``: prompts of 2 to 19 words, as real clients differ."""


def make_sae(model: Any, work: Path, layer: int, width: int) -> Path:
    hook = f"blocks.{layer}.hook_resid_post"
    text = " ".join(fixtures.training_text()[:3])[:600]
    with torch.no_grad():
        _, cache = model.run_with_cache(model.to_tokens(text)[:, :128], names_filter=hook)
    folder = work / "sae" / "bench-res" / f"layer_{layer}" / f"width_{width}" / "average_l0_80"
    acts = cache[hook][0, 1:].float().cpu()
    fixtures.write_params(folder, fixtures.gemma_scope_params(acts, width, firing_rate=0.01))
    return folder


def start_server(
    ckpt: str, sae: Path, device: str | None, max_tokens: int
) -> tuple[subprocess.Popen[str], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-c", "from scope.cli import main; main()", "serve", "--model", ckpt,
           "--sae", str(sae), "--port", str(port), "--max-tokens", str(max_tokens)]  # fmt: skip
    if device:
        cmd += ["--device", device]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"scope serve stopped: {proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            raise SystemExit("scope serve did not come up in 10 minutes")
        try:
            httpx.get(f"{url}/models", timeout=2).raise_for_status()
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)


def requests_for(clients: int, steered: bool, key: str) -> list[dict[str, Any]]:
    """One request per client: its prompt, its seed, and when steered its own strength of
    feature 5."""
    return [{"seed": 100 + i, "prompt": PROMPTS[i % len(PROMPTS)],
             "steer": [SteerSpec(sae=key, feature=5, strength=2.0 + i).to_dict()] if steered else []}
            for i in range(clients)]  # fmt: skip


def over_http(
    url: str, name: str, reqs: list[dict[str, Any]], n: int
) -> tuple[float, list[list[int]]]:
    """Seconds for all requests sent at once, and each one's tokens."""
    out: list[list[int]] = [[] for _ in reqs]
    clients = [
        openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600) for _ in reqs
    ]
    go = threading.Barrier(len(reqs) + 1)

    def one(i: int) -> None:
        go.wait()
        r = clients[i].completions.create(model=name, prompt=reqs[i]["prompt"], max_tokens=n, temperature=0.7, top_p=0.9,
                                          seed=reqs[i]["seed"], extra_body={"steer": reqs[i]["steer"], "ignore_eos": True})  # fmt: skip
        out[i] = r.choices[0].model_extra["token_ids"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    go.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start, out


def in_process(
    model: Any, saes: dict[str, Any], reqs: list[dict[str, Any]], n: int
) -> tuple[float, list[list[int]]]:
    """Seconds for the same requests one after another with ``generate`` (in a worker thread,
    as the server's engine), and their tokens."""
    out: list[list[int]] = []
    took: list[float] = []

    def work() -> None:
        start = time.perf_counter()
        for r in reqs:
            sampling = Sampling(
                max_new_tokens=n, temperature=0.7, top_p=0.9, seed=r["seed"], stop_at_eos=False
            )
            steers = resolve([SteerSpec.from_dict(s) for s in r["steer"]], saes)
            tokens = prompt_tokens(model, r["prompt"], False, n)
            out.append(list(generate(model, tokens, sampling, steers)))
        if next(model.parameters()).device.type == "cuda":
            torch.cuda.synchronize()
        took.append(time.perf_counter() - start)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    return took[0], out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--gemma-2b-shape", action="store_true", help="26 layers of gemma-2-2b's shape (GPU)"
    )
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="scope-serve-bench-"))
    proc = None
    try:
        if args.gemma_2b_shape:
            ckpt, layer, width = (
                fixtures.build_gemma2_2b_shape(work / "model", n_layers=26),
                12,
                16384,
            )
        else:
            ckpt = fixtures.build_gemma2(
                work / "model", n_layers=6, d_model=512, n_heads=8, n_kv_heads=4, d_head=64, d_mlp=2048,
                sliding_window=64, query_pre_attn_scalar=64, attn_softcap=50.0, final_softcap=30.0, init_std=0.02,
            )  # fmt: skip
            layer, width = 3, 8192
        model = load_model(ckpt, device=args.device)
        folder = make_sae(model, work, layer, width)
        sae = load_sae(folder, device=next(model.parameters()).device, dtype=model.cfg.dtype)
        saes = sae_map([sae])
        (key,) = saes
        proc, url = start_server(str(ckpt), folder, args.device, args.new_tokens)
        name = openai.OpenAI(base_url=url, api_key="none").models.list().data[0].id
        n = args.new_tokens
        device = next(model.parameters()).device
        what = (
            torch.cuda.get_device_name()
            if device.type == "cuda"
            else f"{torch.get_num_threads()} threads"
        )
        print(f"device: {device} ({what}); model {model.cfg.n_layers} layers, d_model {model.cfg.d_model}; "
              f"SAE {width} wide at layer {layer}; {n} new tokens per request, medians of {args.repeats}", flush=True)  # fmt: skip
        one: dict[bool, float] = {}
        for steered in (False, True):
            for clients in (int(c) for c in args.clients.split(",")):
                reqs = requests_for(clients, steered, key)
                over_http(url, name, reqs[:1], n)  # warm up
                served, local = [], []
                for _ in range(args.repeats):
                    seconds, got = over_http(url, name, reqs, n)
                    served.append(clients * n / seconds)
                    seconds, want = in_process(model, saes, reqs, n)
                    local.append(clients * n / seconds)
                    differ = sum(g != w for g, w in zip(got, want, strict=True))
                    if differ:  # a batch rounds differently from one row (scope.batch)
                        print(
                            f"note: {differ} of {clients} requests' tokens differ from generate's"
                        )
                tps, ref = statistics.median(served), statistics.median(local)
                one.setdefault(steered, tps)
                print(f"{'steered' if steered else 'plain':8} {clients:3} clients: server {tps:8.1f} tok/s, "
                      f"in-process one by one {ref:8.1f} tok/s: {tps / ref:5.2f}x in-process, "
                      f"{tps / one[steered]:5.2f}x one client", flush=True)  # fmt: skip
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

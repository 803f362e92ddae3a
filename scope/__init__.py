"""Gemma Scope Workbench: Gemma 2 activations through JumpReLU SAEs, recorded, explored, steered."""

from scope.errors import ScopeError
from scope.fit import check_fit, list_saes
from scope.model import load_model, model_info
from scope.sae import load_sae, sae_info

__all__ = [
    "ScopeError",
    "check_fit",
    "list_saes",
    "load_model",
    "load_sae",
    "model_info",
    "sae_info",
]
__version__ = "0.1.0"

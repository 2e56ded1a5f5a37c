"""Model registry and the built-in families (import nnforge.models, then create_model / list_models)."""

from nnforge.models.registry import create_model, get_entry, list_models, register_model

__all__ = ["create_model", "get_entry", "list_models", "register_model"]

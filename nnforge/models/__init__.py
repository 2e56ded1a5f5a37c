"""Model registry and the built-in models (import nnforge.models, then create_model / list_models).

Importing this package registers every built-in model; a family whose optional packages are missing registers
nothing and says so only when one of its models is asked for.
"""

# their @register_model decorators run on import
from nnforge.models import cnn, efficientnet_lite, gan, policies, recsys, text  # noqa: F401
from nnforge.models.registry import create_model, get_entry, list_models, model_options, register_model

__all__ = ["create_model", "get_entry", "list_models", "model_options", "register_model"]

"""Models: `create_model(preset, num_classes=..., image_size=...)`, `list_models()`, `load_pretrained(model, path)`."""

from dogclf.models import gmlp, mlp  # noqa: F401  (importing registers the presets)
from dogclf.models.pretrained import load_pretrained
from dogclf.models.registry import create_model, list_models

__all__ = ["create_model", "list_models", "load_pretrained"]

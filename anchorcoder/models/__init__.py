"""Model loading: embedded GGUF, random tiny models, hub ids and local folders."""

from anchorcoder.models.loading import LoadedModel, check_model_config, load_model, locate_model  # noqa: F401

"""Model zoo: each family is a module with `from_config(config.model)` and `validate(config)`.

A GAN family's `from_config` gives its networks (generator, discriminator, ...) as a tuple.
"""

from __future__ import annotations

import importlib

import flax.linen as nn
import ml_collections

from genctl_jax.errors import ConfigError

# config.model.name -> module implementing it (imported on demand).
MODELS = {
    "autoencoder": "genctl_jax.models.autoencoder",
    "controlnet": "genctl_jax.models.controlnet",
    "pix2pix": "genctl_jax.models.gan.pix2pix",
    "spade": "genctl_jax.models.gan.spade",
    "stylegan2": "genctl_jax.models.gan.stylegan2",
    "unet": "genctl_jax.models.unet",
}


def _module(name: str):
    if name not in MODELS:
        raise ConfigError(
            f"config.model.name={name!r} is not a known model; accepted: {', '.join(MODELS)}"
        )
    return importlib.import_module(MODELS[name])


def build(model_config: ml_collections.ConfigDict) -> nn.Module:
    """The single factory: a Flax module from `config.model`."""
    return _module(model_config.name).from_config(model_config)


def validate(config: ml_collections.ConfigDict) -> None:
    _module(config.model.name).validate(config)

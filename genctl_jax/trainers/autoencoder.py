"""Autoencoder training: reconstruct images through a low-resolution code.

The foundation's reference task (L2 + L1 reconstruction); the VAE of latent
diffusion extends it.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from genctl_jax import models
from genctl_jax.errors import ConfigError
from genctl_jax.trainers.task import Phase, Task


class AutoencoderTask(Task):
    """One network, `model`, trained to reproduce its input."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.model = models.build(config.model)

    def init_params(self, rng, batch):
        image = jnp.zeros((1,) + tuple(batch["image"].shape[1:]), jnp.float32)
        return {"model": self.model.init(rng, image)["params"]}

    @property
    def phases(self):
        return (Phase("reconstruction", ("model",), self.loss),)

    def loss(self, params, batch, rng, step):
        del step
        image = batch["image"]
        recon = self.model.apply(
            {"params": params["model"]}, image, train=True, rngs={"dropout": rng}
        )
        l2 = jnp.mean(jnp.square(recon - image))
        l1 = jnp.mean(jnp.abs(recon - image))
        weight = self.config.task.l1_weight
        return l2 + weight * l1, {"l2": l2, "l1": l1}

    def sample(self, params, rng, batch):
        """Each tile: an input (left) beside its reconstruction (right)."""
        del rng
        image = batch["image"][: self.config.trainer.num_samples]
        recon = self.model.apply({"params": params["model"]}, image)
        return jnp.concatenate([image, jnp.clip(recon, -1.0, 1.0)], axis=2)

    @classmethod
    def validate(cls, config):
        if config.task.get("l1_weight", -1) < 0:
            raise ConfigError(
                f"config.task.l1_weight={config.task.get('l1_weight')!r}: expected a number >= 0"
            )
        if "image" not in config.data.fields:
            raise ConfigError(
                f"config.data.fields={tuple(config.data.fields)!r} lacks 'image', which the "
                f"autoencoder reconstructs; add it"
            )

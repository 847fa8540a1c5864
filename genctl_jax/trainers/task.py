"""What a model family plugs into the shared training core.

A `Task` names its networks, initialises their params, and lists the `Phase`s of one
train step. A diffusion model has one phase; a GAN has a discriminator phase and a
generator phase (and lazy regularisation phases that run `every` N steps). Each
phase differentiates its loss with respect to its own networks only, so frozen
networks (a text encoder, the base UNet under a ControlNet) never get gradients.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

# Params entry of a task's non-trained state (StyleGAN2's path-length mean and w average): a
# dict of arrays no phase differentiates. A phase's loss returns the new dict as
# metrics[BUFFERS]; it replaces the old one after that phase when the update is finite.
BUFFERS = "buffers"

# (params of all networks, batch, rng, step) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[dict[str, Any], dict[str, jax.Array], jax.Array, jax.Array], Any]


@dataclasses.dataclass(frozen=True)
class Phase:
    """One optimizer update of some networks inside a train step."""

    name: str  # Prefix of the phase's metrics when a task has several phases.
    networks: tuple[str, ...]  # Networks this phase differentiates and updates.
    loss_fn: LossFn
    every: int = 1  # Run on steps where step % every == 0 (lazy regularisation).


class Task(abc.ABC):
    """A training family: networks, their init, the phases of a step, sampling."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    @abc.abstractmethod
    def init_params(self, rng: jax.Array, batch: dict[str, Any]) -> dict[str, Any]:
        """Params of every network, keyed by name, with logical partitioning boxes.

        `batch` holds the global batch's `jax.ShapeDtypeStruct`s; this runs under
        `jax.eval_shape` and inside a jitted init, never eagerly on a host.
        """

    @property
    @abc.abstractmethod
    def phases(self) -> tuple[Phase, ...]:
        """The updates of one train step, in order."""

    @property
    def trained_networks(self) -> tuple[str, ...]:
        names = []
        for phase in self.phases:
            names += [n for n in phase.networks if n not in names]
        return tuple(names)

    @property
    def ema_networks(self) -> tuple[str, ...]:
        """Networks whose EMA is kept when `config.trainer.ema_decay > 0`."""
        return self.trained_networks

    @property
    def sampling_networks(self) -> tuple[str, ...] | None:
        """The params that sampling reads (a reader restores only these); None: all."""
        return None

    def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Host-side work on a host-local batch before it becomes global arrays (tokenising
        captions, reading cached text embeddings). Default: the batch as it is."""
        return batch

    def pretrained_params(self, shardings: dict[str, Any]) -> dict[str, Any]:
        """Params of networks that start from weights on disk (a pretrained text encoder),
        placed by `shardings` (network name -> tree of shardings). They replace the random
        init of a new run (and its EMA copy). Default: none."""
        del shardings
        return {}

    def sample(self, params: dict[str, Any], rng: jax.Array, batch: dict[str, jax.Array]):
        """Images in [-1, 1] (NHWC) for the periodic sample grid; `params` prefer EMA.

        Return None when the family has nothing to show.
        """
        del params, rng, batch
        return None

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        """Family-specific config checks; raise ConfigError."""
        del config

"""Samples of a trained diffusion run, drawn in fixed-size batches on a mesh.

Shared by the sampling CLI, the evaluation CLI and the trainer's periodic evaluation. A
batch's noise comes from `fold_in(PRNGKey(seed), batch_index)` and the jitted sampler
always sees `batch_size` rows, so the images depend on the seed and the batch size, not on
the device count (the batch is split over the mesh's `data` x `fsdp` devices; the last batch
is padded and the padding dropped).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from genctl_jax.diffusion import samplers
from genctl_jax.errors import ConfigError
from genctl_jax.parallel.mesh import BATCH_AXES


def batch_ways(mesh: Mesh) -> int:
    """How many devices a batch is split over."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_size(batch_size: int, mesh: Mesh, field: str) -> None:
    ways = batch_ways(mesh)
    if not isinstance(batch_size, int) or batch_size < 1 or batch_size % ways:
        raise ConfigError(
            f"{field}={batch_size!r}: expected a positive multiple of the {ways} devices the "
            f"batch is split over"
        )


def with_text_encoder(task, params: Mapping[str, Any]) -> dict[str, Any]:
    """`params`, plus the frozen text encoder's when a text-to-image run read cached
    embeddings (loaded from `config.text.pretrained`)."""
    params = dict(params)
    if getattr(task, "encoder", None) is not None and "text_encoder" not in params:
        from genctl_jax.models import text as text_lib

        params["text_encoder"] = text_lib.load_pretrained_params(task.encoder, task.text_config)
    return params


class Generator:
    """Draws images in [-1, 1] from a diffusion task's `generate` on `mesh`.

    Conditions are class labels (class-conditional runs), prompts (text-to-image runs) or
    nothing (unconditional); `draw` cycles them over the samples in order. ControlNet runs
    also take control images, one batch per ControlNet unit of the task (`task.units`),
    cycled likewise. The sampler is compiled once per Generator; `draw` takes the params
    (text-to-image runs: with the text encoder's, see `with_text_encoder`).
    """

    def __init__(
        self,
        task,
        mesh: Mesh,
        options: samplers.SamplerOptions,
        batch_size: int,
        *,
        negative_prompt: str = "",
    ):
        check_batch_size(batch_size, mesh, "batch_size")
        self.task, self.mesh, self.options, self.batch_size = task, mesh, options, batch_size
        self.text = hasattr(task, "generate_from_tokens")
        self._split = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
        replicated = NamedSharding(mesh, PartitionSpec())
        n = batch_size
        self.units = getattr(task, "units", ())
        if self.units:
            self._negative = task.tokenize([negative_prompt] * n)
            self._fn = jax.jit(
                lambda p, key, prompt, negative, controls: task.generate_from_tokens(
                    p, key, prompt, negative, n, options, controls
                ),
                out_shardings=replicated,
            )
        elif self.text:
            self._negative = task.tokenize([negative_prompt] * n)
            self._fn = jax.jit(
                lambda p, key, prompt, negative: task.generate_from_tokens(
                    p, key, prompt, negative, n, options
                ),
                out_shardings=replicated,
            )
        else:
            self._fn = jax.jit(
                lambda p, key, labels: task.generate(p, key, labels, n, options),
                out_shardings=replicated,
            )

    def _batch(self, params, key, conditions: Sequence | None, controls) -> np.ndarray:
        with jax.set_mesh(self.mesh):
            if self.text:
                tokens = self.task.tokenize(list(conditions))
                prompt, negative = jax.device_put((tokens, self._negative), self._split)
                if self.units:
                    out = self._fn(params, key, prompt, negative, self._place(controls))
                else:
                    out = self._fn(params, key, prompt, negative)
            else:
                labels = None
                if conditions is not None:
                    labels = jax.device_put(np.asarray(conditions, np.int32), self._split)
                out = self._fn(params, key, labels)
        return np.asarray(jax.device_get(out))

    def _place(self, controls):
        return tuple(jax.device_put(np.asarray(c, np.float32), self._split) for c in controls)

    def draw(
        self,
        params: Mapping[str, Any],
        num_samples: int,
        seed: int,
        conditions: Sequence | None = None,
        controls: Sequence[np.ndarray] = (),
    ) -> Iterator[np.ndarray]:
        """Yields host batches [b, H, W, C] (b = batch_size, fewer in the last) of images.

        conditions: labels or prompts, cycled over the `num_samples` samples; None for an
        unconditional model. Text-to-image runs need prompts.
        controls: ControlNet runs: one array [M, H, W, C] of control images per unit, cycled
        over the samples (M = 1: the same control for all).
        """
        if num_samples < 1:
            raise ConfigError(f"num_samples={num_samples}: expected at least 1")
        if self.text and not conditions:
            raise ConfigError("a text-to-image run samples from prompts; none were given")
        if len(controls) != len(self.units):
            raise ConfigError(
                f"{len(controls)} control image arrays for {len(self.units)} ControlNets; "
                f"give one per ControlNet"
            )
        base = jax.random.PRNGKey(seed)
        for index, start in enumerate(range(0, num_samples, self.batch_size)):
            rows = np.arange(start, start + self.batch_size)
            batch_conditions = None
            if conditions is not None:
                batch_conditions = [conditions[i % len(conditions)] for i in rows]
            batch_controls = [np.asarray(c)[rows % len(c)] for c in controls]
            images = self._batch(
                params, jax.random.fold_in(base, index), batch_conditions, batch_controls
            )
            yield images[: min(self.batch_size, num_samples - start)]

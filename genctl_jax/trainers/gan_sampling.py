"""Samples of a trained GAN run (pix2pix, SPADE, StyleGAN2), drawn in one jit on a mesh.

What `python -m genctl_jax.sample` does with a GAN workdir:
- StyleGAN2 draws from fresh latents, optionally truncated towards the run's tracked w
  average (`truncation` psi: 1 samples w as trained, 0 gives every sample the w average).
- pix2pix and SPADE translate condition maps: the shapes test split's (`shapes_test_maps`,
  so a shapes run samples out of the box) or one file's (`read_condition`): an edge map for
  a pix2pix 'edges' run, a label-id PNG (greyscale or palette, pixel values = class ids) for
  a pix2pix 'seg' run and for SPADE. The maps become the model's input exactly as in
  training (`task.condition_from_batch`).

The batch is padded to a multiple of the devices it is split over and the padding dropped,
as in `generation.Generator`; the images depend on the seed and that padded size.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from genctl_jax.control import files
from genctl_jax.errors import ConfigError
from genctl_jax.parallel.mesh import BATCH_AXES
from genctl_jax.trainers import gan

TASKS = ("pix2pix", "spade", "stylegan2")  # config.task.name of the GAN runs.


def is_gan(config) -> bool:
    return config.task.name in TASKS


def label_classes(task, config) -> int | None:
    """How many class ids a label map may hold for this run (None: any uint8 id)."""
    if isinstance(task, gan.SpadeTask):
        return task.num_classes
    if config.data.name == "shapes":
        from genctl_jax.data import shapes

        return 1 + shapes.NUM_SHAPES
    return None


def read_condition(task, config, path: str | pathlib.Path) -> np.ndarray:
    """The model input of a pix2pix / SPADE run for one map file: [1, ...] (module doc)."""
    size = config.data.image_size
    if isinstance(task, gan.SpadeTask) or config.task.condition == "seg":
        ids = files.read_label_ids(path, size, label_classes(task, config))
        return task.condition_from_batch({"segmentation": ids[None].astype(np.int32)})
    edges = files.read_control(path, "edges", 1, size)  # [1, S, S, 1] in [0, 1]
    return np.asarray(edges, np.float32) * 2.0 - 1.0  # As Pix2PixTask.condition_from_batch.


def shapes_test_maps(data_config, n: int) -> dict[str, np.ndarray]:
    """{'edges', 'segmentation'}: uint8 [n, S, S] maps of the first n examples of the shapes
    test split (cycled when it has fewer), at the run's image size (resized nearest)."""
    from genctl_jax.metrics import fidelity

    source = fidelity.shapes_test_source(data_config)
    size = data_config.image_size
    maps = {}
    for key in ("edges", "segmentation"):
        arrays = [np.asarray(source[i % len(source)][key], np.uint8) for i in range(n)]
        if arrays[0].shape != (size, size):
            arrays = [
                np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.NEAREST))
                for a in arrays
            ]
        maps[key] = np.stack(arrays)
    return maps


def generate(
    task,
    mesh: Mesh,
    params: dict[str, Any],
    num_samples: int,
    seed: int,
    *,
    conditions: np.ndarray | None = None,
    truncation: float = 1.0,
    deterministic: bool = False,
) -> np.ndarray:
    """float32 [num_samples, H, W, C] images in [-1, 1] of a GAN task, in one jit on `mesh`.

    conditions: pix2pix / SPADE: model inputs [M, ...] (`read_condition`,
    `task.condition_from_batch`) cycled over the samples (M = 1: the same for all).
    truncation, deterministic: StyleGAN2's psi, and no noise inputs.
    SPADE with a VAE draws each sample's z from the seed.
    """
    if num_samples < 1:
        raise ConfigError(f"num_samples={num_samples}: expected at least 1")
    if not 0.0 <= truncation <= 1.0:
        raise ConfigError(f"truncation={truncation}: expected a value in [0, 1]")
    stylegan = isinstance(task, gan.StyleGAN2Task)
    if stylegan == (conditions is not None):
        raise ConfigError(
            "StyleGAN2 samples take no conditions" if stylegan else "this GAN needs conditions"
        )
    from genctl_jax.trainers import generation

    ways = generation.batch_ways(mesh)
    padded = -(-num_samples // ways) * ways
    split = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 0)  # Batch 0, as generation.Generator.
    with jax.set_mesh(mesh):
        if stylegan:
            fn = jax.jit(
                lambda p, k: task.generate(p, k, padded, truncation, deterministic),
                out_shardings=split,
            )
            out = fn(params, key)
        else:
            conditions = np.asarray(conditions)
            rows = conditions[np.arange(padded) % len(conditions)]
            if isinstance(task, gan.SpadeTask):
                fn = jax.jit(lambda p, c, k: task.generate(p, c, k), out_shardings=split)
            else:  # pix2pix in eval mode: no dropout, so no key.
                fn = jax.jit(lambda p, c, k: task.generate(p, c), out_shardings=split)
            out = fn(params, jax.device_put(rows, split), key)
    return np.asarray(jax.device_get(out))[:num_samples]

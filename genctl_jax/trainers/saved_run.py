"""Open a finished (or running) workdir: its config, task and latest params, on any devices."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from absl import logging
from jax.sharding import Mesh

from genctl_jax import trainers
from genctl_jax.errors import CheckpointError
from genctl_jax.io.checkpoints import Checkpointer
from genctl_jax.parallel import mesh as mesh_lib
from genctl_jax.trainers import optim
from genctl_jax.trainers import state as state_lib
from genctl_jax.trainers.task import Task


@dataclasses.dataclass(frozen=True)
class SavedRun:
    config: ml_collections.ConfigDict  # The run's config, as saved in workdir/config.json.
    task: Task
    mesh: Mesh  # Pure data parallelism over the devices given.
    params: dict[str, Any]  # Network name -> params; EMA params where the run kept them.
    step: int  # The checkpoint's step.


# Where the trainer keeps the checkpoint that scored best (`config.eval.best_metric`).
BEST_CHECKPOINT_DIR = "best_checkpoint"


def load(
    workdir: str | pathlib.Path,
    devices: Sequence[jax.Device] | None = None,
    *,
    checkpoint: str = "latest",
    networks: Sequence[str] | None = None,
    for_sampling: bool = False,
) -> SavedRun:
    """Restores the params of a checkpoint of `workdir`, preferring EMA params, replicated.

    Only params are read (no optimizer state); `networks` limits them to those networks
    (e.g. a ControlNet run's `controlnet` without its copy of the frozen base), and
    `for_sampling` to the task's `sampling_networks` (a GAN's generator, not its
    discriminator).
    checkpoint: 'latest' (of WORKDIR/checkpoints) or 'best' (WORKDIR/best_checkpoint, kept by
    the trainer's periodic evaluation for `config.eval.best_metric`).
    """
    workdir = pathlib.Path(workdir)
    if checkpoint not in ("latest", "best"):
        raise CheckpointError(f"checkpoint={checkpoint!r}: expected 'latest' or 'best'")
    config_file = workdir / "config.json"
    if not config_file.exists():
        raise CheckpointError(
            f"{workdir} holds no run (no config.json); pass the --workdir of a training run"
        )
    config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
    mesh = mesh_lib.create_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)), devices)
    task = trainers.build_task(config)
    total = config.trainer.num_train_steps
    optimizers = {
        name: optim.make_optimizer(config.optimizers[name], total) for name in task.trained_networks
    }
    size = config.data.image_size
    channels = config.model.get("in_channels", 3)
    example = {"image": jax.ShapeDtypeStruct((1, size, size, channels), jax.numpy.float32)}
    layout = state_lib.layout(task, optimizers, config, mesh, example)
    directory = workdir / ("checkpoints" if checkpoint == "latest" else BEST_CHECKPOINT_DIR)
    if checkpoint == "best" and not directory.exists():
        raise CheckpointError(
            f"{workdir} has no best checkpoint ({directory}): the trainer keeps one when "
            f"config.eval.every_steps > 0 and config.eval.best_metric is set"
        )
    abstract = layout.abstract
    if networks is None and for_sampling:
        networks = task.sampling_networks
    wanted = set(abstract.params if networks is None else networks)
    missing = wanted - set(abstract.params)
    if missing:
        raise CheckpointError(
            f"{workdir} holds no {', '.join(sorted(missing))} params; its networks are "
            f"{', '.join(abstract.params)}"
        )
    # The EMA twin replaces the raw params where the run kept one; read only one of the two.
    target = {
        "params": {n: abstract.params[n] for n in wanted if n not in abstract.ema_params},
        "ema_params": {n: abstract.ema_params[n] for n in wanted if n in abstract.ema_params},
    }
    target = {field: tree for field, tree in target.items() if tree}  # orbax: no empty dicts
    checkpointer = Checkpointer(directory)
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise CheckpointError(
                f"{workdir} has no checkpoint yet; train first with python -m genctl_jax.train "
                f"--config ... --workdir {workdir}"
            )
        # An explicit step: an unreadable checkpoint is an error here, not moved aside as a
        # resuming trainer does (reading a run must not change it).
        state, _, _ = checkpointer.restore(target, step, partial=True)
    finally:
        checkpointer.close()
    if not abstract.ema_params:
        logging.warning("The run kept no EMA params; using the raw params of step %d", step)
    return SavedRun(
        config=config,
        task=task,
        mesh=mesh,
        params={**state.get("params", {}), **state.get("ema_params", {})},
        step=step,
    )

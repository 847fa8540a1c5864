"""A run's compiled pieces on one mesh: state layout, jitted update, jitted sampler."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from genctl_jax import trainers
from genctl_jax.parallel import mesh as mesh_lib
from genctl_jax.parallel import sharding
from genctl_jax.trainers import optim, step
from genctl_jax.trainers import state as state_lib
from genctl_jax.trainers.task import Task


@dataclasses.dataclass(frozen=True)
class Trainer:
    """Everything `train_and_evaluate` (and a test) needs to run steps on a mesh."""

    task: Task
    mesh: Mesh
    layout: state_lib.StateLayout
    rules: sharding.Rules  # activation rules, active while tracing
    _train_step: Callable
    _sample: Callable

    def train_step(self, state: state_lib.TrainState, batch: dict[str, jax.Array]):
        """One update; `state` is donated, so use the returned one."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self._train_step(state, batch)

    def lower(self, batch: dict[str, Any]):
        """The train step lowered for the abstract state and `batch` (ahead-of-time compile
        as a pre-flight: `.compile()` it, or read its `.cost_analysis()`)."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self._train_step.lower(self.layout.abstract, batch)

    def compile(self, batch: dict[str, Any], *, init: bool = True) -> None:
        """Compiles the train step for `batch` (and the init) now; later calls reuse them."""
        if init:
            self.layout.compile()
        self.lower(batch).compile()

    def initialize(self) -> state_lib.TrainState:
        """A new run's state: random init, then the task's pretrained networks (EMA too)."""
        state = self.layout.initialize()
        pretrained = self.task.pretrained_params(self.layout.shardings.params)
        if not pretrained:
            return state
        # The EMA copy gets its own buffers: the step donates the state, and one buffer in
        # two of its leaves would be donated twice.
        ema = {
            k: jax.tree.map(jnp.copy, pretrained[k]) if k in pretrained else v
            for k, v in state.ema_params.items()
        }
        return state.replace(params={**state.params, **pretrained}, ema_params=ema)

    def sample(self, params: dict[str, Any], rng: jax.Array, batch: dict[str, jax.Array]):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self._sample(params, rng, batch)


def build(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    example_batch: dict[str, jax.Array],
    task: Task | None = None,
) -> Trainer:
    """Builds the task (unless given), its optimizers, the sharded state layout and the
    jitted functions."""
    task = trainers.build_task(config) if task is None else task
    optimizers = {
        name: optim.make_optimizer(config.optimizers[name], config.trainer.num_train_steps)
        for name in task.trained_networks
    }
    layout = state_lib.layout(task, optimizers, config, mesh, step.batch_spec(example_batch))
    batch_shardings = jax.tree.map(lambda x: x.sharding, example_batch)
    train_step = jax.jit(
        step.make_train_step(task, optimizers, config.trainer, mesh),
        in_shardings=(layout.shardings, batch_shardings),
        out_shardings=(layout.shardings, mesh_lib.replicated(mesh)),
        donate_argnums=(0,),
    )
    return Trainer(
        task=task,
        mesh=mesh,
        layout=layout,
        rules=sharding.rules_for(config.sharding),
        _train_step=train_step,
        _sample=jax.jit(task.sample, out_shardings=mesh_lib.replicated(mesh)),
    )

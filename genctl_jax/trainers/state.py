"""The train state: everything a checkpoint needs to continue a run bit for bit."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from genctl_jax.errors import ConfigError
from genctl_jax.parallel import sharding


@flax.struct.dataclass
class TrainState:
    """Params of every network, optimizer state of the trained ones, EMA, step and RNG.

    Networks are keyed by name (`model`, or `generator`/`discriminator`, or a frozen
    `base_unet` beside a trained `controlnet`). Frozen networks have params but no
    optimizer state.
    """

    step: jax.Array  # int32 scalar: train steps taken (skipped non-finite ones included).
    params: dict[str, Any]  # network name -> its `params` collection.
    opt_state: dict[str, Any]  # trained network name -> optax state.
    ema_params: dict[str, Any]  # network name -> EMA of its params (empty when EMA is off).
    rng: jax.Array  # Root key of the run; step keys are fold_in(rng, step).
    nonfinite_streak: jax.Array  # int32: consecutive steps whose update was refused.
    nonfinite_total: jax.Array  # int32: all steps whose update was refused.


def _boxed_init(task, optimizers, config, batch_spec) -> Callable[[jax.Array], TrainState]:
    """The state initialiser, leaving logical-partitioning boxes on params and their twins."""

    def init(seed_key: jax.Array) -> TrainState:
        params = task.init_params(jax.random.fold_in(seed_key, 0), batch_spec)
        opt_state = {name: tx.init(params[name]) for name, tx in optimizers.items()}
        ema = (
            {name: params[name] for name in task.ema_networks}
            if config.trainer.ema_decay > 0
            else {}
        )
        zero = jnp.zeros((), jnp.int32)
        return TrainState(
            step=zero,
            params=params,
            opt_state=opt_state,
            ema_params=ema,
            rng=jax.random.fold_in(seed_key, 1),
            nonfinite_streak=zero,
            nonfinite_total=zero,
        )

    return init


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Where every leaf of the train state lives, and how to create it there."""

    shardings: TrainState  # NamedSharding per leaf.
    abstract: TrainState  # ShapeDtypeStruct per leaf, carrying its sharding (restore target).
    _init: Callable[[jax.Array], TrainState]
    _seed_key: jax.Array
    mesh: Any
    rules: sharding.Rules  # activation rules while tracing the init

    def initialize(self) -> TrainState:
        """Runs the jitted init: every shard is created on its own device."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self._jitted_init()(self._seed_key)

    def compile(self) -> None:
        """Compiles the init now; `initialize` reuses the executable."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            self._jitted_init().lower(self._seed_key).compile()

    def _jitted_init(self):
        return jax.jit(self._init, out_shardings=self.shardings)


def layout(task, optimizers, config, mesh, batch_spec) -> StateLayout:
    """Shardings of the train state, from the logical names of an abstract init.

    `jax.eval_shape` gives the abstract (boxed) state and each leaf's logical names
    give it a `NamedSharding` (per-network rules); the jitted init then creates the
    state straight into those shardings, so no host ever holds the whole model.
    Unknown logical names and an under-sharded layout are refused here.
    """
    init = _boxed_init(task, optimizers, config, batch_spec)
    seed_key = jax.random.PRNGKey(config.seed)
    boxed = jax.eval_shape(init, seed_key)

    def network_shardings(tree: dict, kind: str) -> dict:
        return {
            name: sharding.logical_to_shardings(
                value, mesh, sharding.rules_for(config.sharding, name), f"{kind}/{name}"
            )
            for name, value in tree.items()
        }

    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = TrainState(
        step=replicated,
        params=network_shardings(boxed.params, "params"),
        opt_state=network_shardings(boxed.opt_state, "opt_state"),
        ema_params=network_shardings(boxed.ema_params, "ema_params"),
        rng=replicated,
        nonfinite_streak=replicated,
        nonfinite_total=replicated,
    )
    unknown = sorted(set(config.sharding.network_rules) - set(boxed.params))
    if unknown:
        raise ConfigError(
            f"config.sharding.network_rules has entries for {unknown}, which are not networks "
            f"of this task; its networks: {', '.join(boxed.params)}"
        )
    abstract = nn.unbox(boxed)
    # One budget for all networks: what matters is the bytes each device holds.
    sharding.check_sufficiently_sharded(
        abstract.params,
        shardings.params,
        mesh,
        config.sharding.max_replicated_fraction,
        "params",
    )
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return StateLayout(
        shardings=shardings,
        abstract=abstract,
        _init=lambda key: nn.unbox(init(key)),
        _seed_key=seed_key,
        mesh=mesh,
        rules=sharding.rules_for(config.sharding),
    )

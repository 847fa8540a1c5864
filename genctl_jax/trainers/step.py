"""The jitted train step shared by every family.

One step runs the task's phases in order. Each phase differentiates its loss with
respect to its own networks (gradient accumulation over micro-batches, clipping
inside the optimizer chain), refuses a non-finite update, and applies it; a phase
that returns new `buffers` (see task.py) replaces them with it. EMA follows.
Randomness: step key = fold_in(state.rng, step), phase key = fold_in(step key, phase
index), micro-batch key = fold_in(phase key, micro-batch index).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec

from genctl_jax.parallel.mesh import BATCH_AXES
from genctl_jax.trainers import optim
from genctl_jax.trainers.state import TrainState
from genctl_jax.trainers.task import BUFFERS, Phase, Task


def _select(pred, new, old):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def _split_microbatches(batch: dict[str, jax.Array], k: int, mesh) -> dict[str, jax.Array]:
    """[B, ...] -> [k, B/k, ...] taking every k-th row, so each micro-batch stays spread
    over all batch shards without moving data between devices."""

    def split(x):
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
        spec = PartitionSpec(None, BATCH_AXES)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return jax.tree.map(split, batch)


def _phase_grads(phase: Phase, params, batch, rng, step, accum_steps: int, mesh):
    """Mean loss, metrics and gradients of `phase` over its micro-batches."""
    trained = {name: params[name] for name in phase.networks}
    frozen = {name: p for name, p in params.items() if name not in trained}

    def loss_of(trained, micro, key):
        return phase.loss_fn({**frozen, **trained}, micro, key, step)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)
    if accum_steps == 1:
        (loss, metrics), grads = grad_fn(trained, batch, rng)
        return loss, metrics, grads

    micro = _split_microbatches(batch, accum_steps, mesh)
    zeros = jax.tree.map(jnp.zeros_like, trained)
    (_, metric_shapes), _ = jax.eval_shape(
        grad_fn, trained, jax.tree.map(lambda x: x[0], micro), rng
    )
    init = (zeros, jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, metric_shapes))

    def body(carry, inputs):
        grads_sum, loss_sum, metrics_sum = carry
        index, micro_batch = inputs
        (loss, metrics), grads = grad_fn(trained, micro_batch, jax.random.fold_in(rng, index))
        return (
            jax.tree.map(jnp.add, grads_sum, grads),
            loss_sum + loss,
            jax.tree.map(jnp.add, metrics_sum, metrics),
        ), None

    (grads, loss, metrics), _ = jax.lax.scan(body, init, (jnp.arange(accum_steps), micro))
    mean = lambda tree: jax.tree.map(lambda x: x / accum_steps, tree)
    return loss / accum_steps, mean(metrics), mean(grads)


def make_train_step(
    task: Task,
    optimizers: dict[str, optax.GradientTransformation],
    trainer_config: ml_collections.ConfigDict,
    mesh,
):
    """Returns `train_step(state, batch) -> (state, metrics)`, pure, ready for `jax.jit`."""
    phases = task.phases
    accum_steps = trainer_config.grad_accum_steps
    single = len(phases) == 1

    def run_phase(phase: Phase, index: int, state: TrainState, params, opt_state, batch):
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), index)
        loss, metrics, grads = _phase_grads(
            phase, params, batch, rng, state.step, accum_steps, mesh
        )
        buffers = metrics.pop(BUFFERS, None)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state = dict(params), dict(opt_state)
        if buffers is not None:
            params[BUFFERS] = _select(finite, buffers, params[BUFFERS])
        for name in phase.networks:
            updates, new_opt_state = optimizers[name].update(
                grads[name], opt_state[name], params[name]
            )
            new_params = optax.apply_updates(params[name], updates)
            # A non-finite loss or gradient leaves params and optimizer state untouched.
            params[name] = _select(finite, new_params, params[name])
            opt_state[name] = _select(finite, new_opt_state, opt_state[name])
        metrics = {"loss": loss, "grad_norm": grad_norm, **metrics}
        return params, opt_state, metrics, finite

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        params, opt_state = dict(state.params), dict(state.opt_state)
        all_metrics = {}
        all_finite = jnp.array(True)
        for index, phase in enumerate(phases):
            run = lambda p, o, phase=phase, index=index: run_phase(phase, index, state, p, o, batch)
            if phase.every > 1:
                # Off-steps return zero metrics of the same structure (a no-op update).
                _, _, metric_shapes, _ = jax.eval_shape(run, params, opt_state)
                skip = lambda p, o, shapes=metric_shapes: (
                    p,
                    o,
                    jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                    jnp.array(True),
                )
                params, opt_state, metrics, finite = jax.lax.cond(
                    state.step % phase.every == 0, run, skip, params, opt_state
                )
            else:
                params, opt_state, metrics, finite = run(params, opt_state)
            all_finite &= finite
            prefix = "" if single else f"{phase.name}/"
            all_metrics.update({prefix + k: v for k, v in metrics.items()})

        ema_params = state.ema_params
        if ema_params:
            decay = jnp.asarray(trainer_config.ema_decay, jnp.float32)
            if trainer_config.ema_warmup:
                step = state.step.astype(jnp.float32)
                decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
            ema_params = {
                name: jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params[name])
                for name, ema in ema_params.items()
            }

        trained = task.trained_networks
        for name in trained:
            lr = optim.learning_rate(opt_state[name])
            if lr is not None:
                key = "learning_rate" if len(trained) == 1 else f"{name}/learning_rate"
                all_metrics[key] = lr
        streak = jnp.where(all_finite, 0, state.nonfinite_streak + 1)
        total = state.nonfinite_total + (~all_finite).astype(jnp.int32)
        all_metrics.update(update_skipped=~all_finite, nonfinite_streak=streak)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            ema_params=ema_params,
            nonfinite_streak=streak,
            nonfinite_total=total,
        )
        return new_state, all_metrics

    return train_step


def batch_spec(batch: dict[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract shapes of a (global) batch, for init under `jax.eval_shape`."""
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}

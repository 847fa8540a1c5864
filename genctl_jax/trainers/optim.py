"""Optimizers and learning-rate schedules from `config.optimizers.<network>`."""

from __future__ import annotations

import ml_collections
import optax

from genctl_jax.errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "linear")


def default_config(**overrides) -> ml_collections.ConfigDict:
    """One network's optimizer block; every field documented, `overrides` replace defaults."""
    c = ml_collections.ConfigDict()
    c.name = "adam"  # One of OPTIMIZERS.
    c.learning_rate = 1e-4  # Peak learning rate (after warm-up).
    c.schedule = "constant"  # One of SCHEDULES; decays over trainer.num_train_steps.
    c.warmup_steps = 0  # Linear warm-up from 0 to the peak.
    c.end_factor = 0.0  # cosine/linear end at learning_rate * end_factor.
    c.b1 = 0.9  # Adam beta1 (SGD momentum when name='sgd'; 0 disables momentum).
    c.b2 = 0.999  # Adam beta2.
    c.eps = 1e-8
    c.weight_decay = 0.0  # Decoupled weight decay (adamw only).
    c.grad_clip_norm = 1.0  # Clip gradients to this global norm; 0 disables.
    c.update(overrides)
    return c


def make_schedule(c: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    decay_steps = max(total_steps - c.warmup_steps, 1)
    end = c.learning_rate * c.end_factor
    if c.schedule == "constant":
        main = optax.constant_schedule(c.learning_rate)
    elif c.schedule == "cosine":
        main = optax.cosine_decay_schedule(c.learning_rate, decay_steps, alpha=c.end_factor)
    else:
        main = optax.linear_schedule(c.learning_rate, end, decay_steps)
    if not c.warmup_steps:
        return main
    warmup = optax.linear_schedule(0.0, c.learning_rate, c.warmup_steps)
    return optax.join_schedules([warmup, main], [c.warmup_steps])


def make_optimizer(
    c: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain (clipping first) and its schedule, for logging the learning rate."""
    schedule = make_schedule(c, total_steps)
    if c.name == "adam":
        opt = optax.adam(schedule, b1=c.b1, b2=c.b2, eps=c.eps)
    elif c.name == "adamw":
        opt = optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)
    else:
        opt = optax.sgd(schedule, momentum=c.b1 or None)
    if c.grad_clip_norm:
        opt = optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), opt)
    return opt, schedule


def validate(config: ml_collections.ConfigDict, networks: tuple[str, ...]) -> None:
    """Every trained network needs a well-formed optimizer block, and no stray ones."""
    stray = sorted(set(config.optimizers.keys()) - set(networks))
    if stray:
        raise ConfigError(
            f"config.optimizers has blocks for {stray}, which this task does not train; "
            f"trained networks: {', '.join(networks)}"
        )
    for net in networks:
        field = f"config.optimizers.{net}"
        if net not in config.optimizers:
            raise ConfigError(
                f"{field} is missing; every trained network needs an optimizer block "
                f"(genctl_jax.trainers.optim.default_config())"
            )
        c = config.optimizers[net]
        if c.name not in OPTIMIZERS:
            raise ConfigError(f"{field}.name={c.name!r}: accepted {', '.join(OPTIMIZERS)}")
        if c.schedule not in SCHEDULES:
            raise ConfigError(f"{field}.schedule={c.schedule!r}: accepted {', '.join(SCHEDULES)}")
        if not c.learning_rate > 0:
            raise ConfigError(f"{field}.learning_rate={c.learning_rate!r}: expected > 0")
        if not isinstance(c.warmup_steps, int) or c.warmup_steps < 0:
            raise ConfigError(f"{field}.warmup_steps={c.warmup_steps!r}: expected an int >= 0")
        if c.grad_clip_norm < 0:
            raise ConfigError(f"{field}.grad_clip_norm={c.grad_clip_norm!r}: expected >= 0")

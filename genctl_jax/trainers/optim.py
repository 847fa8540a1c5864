"""Optimizers and learning-rate schedules from `config.optimizers.<network>`."""

from __future__ import annotations

import jax
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


def make_optimizer(c: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """The optax chain (clipping first); the schedule's value is kept in the state for logging."""
    schedule = make_schedule(c, total_steps)
    if c.name == "adam":
        opt = optax.inject_hyperparams(optax.adam)(schedule, b1=c.b1, b2=c.b2, eps=c.eps)
    elif c.name == "adamw":
        opt = optax.inject_hyperparams(optax.adamw)(
            schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay
        )
    else:
        opt = optax.inject_hyperparams(optax.sgd)(schedule, momentum=c.b1 or None)
    if c.grad_clip_norm:
        opt = optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), opt)
    return opt


def learning_rate(opt_state) -> jax.Array | None:
    """The learning rate of the last applied update (refused updates do not advance it).

    None for an optimizer built without `optax.inject_hyperparams`.
    """
    is_injected = lambda x: isinstance(x, optax.InjectStatefulHyperparamsState)
    injected = [x for x in jax.tree.leaves(opt_state, is_leaf=is_injected) if is_injected(x)]
    return injected[0].hyperparams.get("learning_rate") if injected else None


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
        for beta in ("b1", "b2"):
            if not 0.0 <= c[beta] < 1.0:
                raise ConfigError(f"{field}.{beta}={c[beta]!r}: expected 0 <= {beta} < 1")
        if not c.eps > 0:
            raise ConfigError(f"{field}.eps={c.eps!r}: expected > 0")
        if c.end_factor < 0:
            raise ConfigError(f"{field}.end_factor={c.end_factor!r}: expected >= 0")
        if c.weight_decay and c.name != "adamw":
            raise ConfigError(
                f"{field}.weight_decay={c.weight_decay!r} only applies to name='adamw' "
                f"(got {c.name!r}); set name='adamw' or weight_decay=0"
            )

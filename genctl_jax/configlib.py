"""Config helpers: variant parsing, the shared base config, loading and validation.

Every experiment is a `configs/<name>.py` exposing `get_config(arg)`. `arg` is the
text after the colon in `--config configs/<name>.py:tiny,res=64`; `parse_arg`
turns it into typed fields. `validate` runs before anything compiles and raises
one `ConfigError` naming the field, the bad value and what would be accepted.
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Any

import ml_collections

from genctl_jax.errors import ConfigError

# The logical-axis vocabulary of the project, mapped to mesh axes. Parameters and
# activations name their dimensions with these; a name missing here is an error.
DEFAULT_RULES = (
    # Activations.
    ("batch", ("data", "fsdp")),
    ("height", None),
    ("width", None),
    ("channels", None),
    ("length", None),
    # Dense layers and attention.
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    # Convolutions: kernels are (kernel_h, kernel_w, conv_in, conv_out).
    ("kernel_h", None),
    ("kernel_w", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    # Small per-channel vectors (norm scales, biases) stay replicated.
    ("vector", None),
)

MESH_AXES = ("data", "fsdp", "tensor")


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses `"tiny,res=64"` into a ConfigDict typed after `defaults`.

    A bare word sets a boolean flag to True; `key=value` is converted to the type of
    the default. Unknown keys are an error, so typos do not silently pass.
    """
    out = ml_collections.ConfigDict(dict(defaults))
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ConfigError(
                f"config argument {key!r} (from {arg!r}) is not known; "
                f"accepted: {', '.join(sorted(defaults)) or 'none'}"
            )
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ConfigError(f"config argument {key!r} needs a value, e.g. {key}={default!r}")
            out[key] = True
            continue
        out[key] = _convert(key, raw.strip(), default)
    return out


def _convert(key: str, raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes"):
            return True
        if raw.lower() in ("0", "false", "no"):
            return False
        raise ConfigError(f"config argument {key}={raw!r}: expected true or false")
    if isinstance(default, int | float):
        try:
            return type(default)(raw)
        except ValueError:
            raise ConfigError(
                f"config argument {key}={raw!r}: expected a {type(default).__name__}"
            ) from None
    return raw


def base_config() -> ml_collections.ConfigDict:
    """Fields shared by every experiment; configs fill `model`, `task` and `optimizers`."""
    from genctl_jax.data import pipeline
    from genctl_jax.metrics import evaluation

    c = ml_collections.ConfigDict()
    c.seed = 0  # Root of all randomness: params, dropout, noise and data order.
    c.overwrite = False  # Allow replacing a workdir that holds a run of another config.

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # Pure data parallelism; -1 takes the devices the other axes leave.
    c.mesh.fsdp = 1  # Parameters, gradients and optimizer state sharded over this axis.
    c.mesh.tensor = 1  # Within-layer model parallelism (attention heads, MLP hidden).

    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = DEFAULT_RULES  # Logical axis name -> mesh axis (or axes, or None).
    # Per-network rules that replace `rules` (frozen encoders, the base UNet of a ControlNet).
    c.sharding.network_rules = ml_collections.ConfigDict()
    # Fail when more than this fraction of all networks' parameter bytes (frozen ones included)
    # is replicated on an fsdp axis > 1.
    c.sharding.max_replicated_fraction = 0.05

    c.data = pipeline.default_config()

    c.task = ml_collections.ConfigDict()
    c.task.name = ""  # Training family, a key of genctl_jax.trainers.TASKS.

    c.model = ml_collections.ConfigDict()
    c.model.name = ""  # A key of genctl_jax.models.MODELS.
    c.model.dtype = "float32"  # Compute dtype; params stay float32.

    # One optimizer per trainable network, keyed by the network's name.
    c.optimizers = ml_collections.ConfigDict()

    c.trainer = ml_collections.ConfigDict()
    c.trainer.num_train_steps = 1000
    c.trainer.grad_accum_steps = 1  # Micro-batches per update; the batch is split evenly.
    c.trainer.ema_decay = 0.0  # 0 disables EMA params.
    c.trainer.ema_warmup = True  # Use min(decay, (1+step)/(10+step)) early in training.
    c.trainer.max_nonfinite_steps = 10  # Stop after this many skipped updates in a row.
    c.trainer.log_every = 50
    c.trainer.checkpoint_every = 500
    c.trainer.keep_checkpoints = 3  # How many recent checkpoints to keep on disk.
    c.trainer.async_checkpoints = True
    c.trainer.sample_every = 0  # 0 disables periodic samples.
    c.trainer.num_samples = 16
    c.trainer.progress_bar = True

    c.eval = evaluation.default_config()
    return c


def tiny_trainer(trainer: ml_collections.ConfigDict, steps: int) -> None:
    """The `tiny` variants' trainer block: `steps` steps logged twice, a checkpoint every 2
    steps, 4 samples at the end, no progress bar."""
    trainer.update(
        num_train_steps=steps,
        log_every=max(steps // 2, 1),
        checkpoint_every=2,
        sample_every=steps,
        num_samples=4,
        progress_bar=False,
    )


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py[:arg]` the way `--config` does (for tests and tools)."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_genctl_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config(arg)")
    return module.get_config(arg or None)


def validate(
    config: ml_collections.ConfigDict,
    *,
    num_devices: int | None = None,
    process_count: int | None = None,
) -> None:
    """Checks a whole config before anything is compiled; raises one clear ConfigError."""
    import jax

    from genctl_jax import models, trainers
    from genctl_jax.data import pipeline
    from genctl_jax.metrics import evaluation
    from genctl_jax.parallel import mesh as mesh_lib
    from genctl_jax.parallel import sharding

    num_devices = jax.device_count() if num_devices is None else num_devices
    process_count = jax.process_count() if process_count is None else process_count

    if not isinstance(config.seed, int) or config.seed < 0:
        raise ConfigError(f"config.seed={config.seed!r}: expected a non-negative integer")
    shape = mesh_lib.mesh_shape(config.mesh, num_devices)
    sharding.validate_rules(config.sharding)
    pipeline.validate(config.data, process_count=process_count)

    batch_shards = shape["data"] * shape["fsdp"]
    if config.data.batch_size % batch_shards:
        raise ConfigError(
            f"config.data.batch_size={config.data.batch_size} is not divisible by the "
            f"{batch_shards} batch shards (mesh data={shape['data']} x fsdp={shape['fsdp']}); "
            f"use a multiple of {batch_shards}"
        )
    t = config.trainer
    for field in ("num_train_steps", "grad_accum_steps", "log_every", "max_nonfinite_steps"):
        if not isinstance(t[field], int) or t[field] < 1:
            raise ConfigError(f"config.trainer.{field}={t[field]!r}: expected an integer >= 1")
    for field in ("checkpoint_every", "sample_every"):
        if not isinstance(t[field], int) or t[field] < 0:
            raise ConfigError(
                f"config.trainer.{field}={t[field]!r}: expected an integer >= 0 (0 disables)"
            )
    per_shard = config.data.batch_size // batch_shards
    if per_shard % t.grad_accum_steps:
        raise ConfigError(
            f"config.trainer.grad_accum_steps={t.grad_accum_steps} does not divide the "
            f"per-shard batch of {per_shard} (data.batch_size={config.data.batch_size} over "
            f"{batch_shards} batch shards); pick a divisor of {per_shard}"
        )
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"config.trainer.ema_decay={t.ema_decay!r}: expected 0 <= decay < 1")
    if config.model.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(
            f"config.model.dtype={config.model.dtype!r}: expected float32, bfloat16 or float16"
        )
    if config.eval.every_steps:
        evaluation.validate(config.eval, batch_shards)
    models.validate(config)
    trainers.validate(config)

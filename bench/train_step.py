"""Steady-state time of our `Trainer.train_step` against a minimal hand-written jit step.

The peer is the same model, batch, devices and optax chain (`optim.make_optimizer`) in a
plain `jax.jit` of `jax.value_and_grad` + `tx.update`: params replicated, batch sharded over
the same mesh, no EMA, no non-finite guard, no phases, no logical constraints. Steps of the
two alternate, each timed to `block_until_ready`, so drift on a shared machine hits both.

  python bench/train_step.py --devices 1
  python bench/train_step.py --cpu_devices 8 --mesh data=2,fsdp=4
  python bench/train_step.py --variant tiny --steps 50

Prints one JSON line per step function (see bench/README.md for the fields).
"""

from __future__ import annotations

import argparse
import ast
import time
from collections.abc import Callable

import common
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from genctl_jax import configlib, models
from genctl_jax.data import pipeline
from genctl_jax.parallel import mesh as mesh_lib
from genctl_jax.trainers import optim
from genctl_jax.trainers import trainer as trainer_lib

# JAX's own duration events: tracing, lowering to StableHLO and the XLA compile.
COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "xla",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/shapes_autoencoder.py", help="config file")
    p.add_argument("--variant", default="", help="config argument, e.g. 'tiny' or 'res=64'")
    p.add_argument("--batch_size", type=int, default=None, help="global batch (default: config)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per step function")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps, the compile included")
    p.add_argument("--mesh", default="", help="mesh axes, e.g. 'data=2,fsdp=4' (default: config)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="config override, repeatable, e.g. --set model.dtype=bfloat16",
    )
    p.add_argument("--devices", type=int, default=None, help="use the first N devices (all)")
    p.add_argument(
        "--cpu_devices",
        type=int,
        default=None,
        help="fake CPU devices to create (jax_num_cpu_devices; default: --devices, else 1)",
    )
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1 (the first step compiles)")
    return args


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4}; axis names are checked by create_mesh."""
    sizes = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        axis, _, size = item.partition("=")
        sizes[axis.strip()] = int(size)
    return sizes


def apply_overrides(config, items: list[str]) -> None:
    """'trainer.ema_decay=0.0' -> config.trainer.ema_decay = 0.0 (Python literal, else str)."""
    for item in items:
        path, _, raw = item.partition("=")
        *parents, leaf = path.strip().split(".")
        node = config
        for name in parents:
            node = node[name]
        try:
            node[leaf] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            node[leaf] = raw


class CompileClock:
    """Sums JAX's trace, lower and XLA compile durations while active (a monitoring listener)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if self.active and event in COMPILE_EVENTS:
            stage = COMPILE_EVENTS[event]
            self.seconds[stage] = self.seconds.get(stage, 0.0) + duration


def make_peer(config, mesh, batch) -> tuple[Callable, tuple]:
    """The peer: (jitted step(params, opt_state, count, batch), its initial carry)."""
    model = models.build(config.model)
    tx = optim.make_optimizer(config.optimizers.model, config.trainer.num_train_steps)
    l1_weight = config.task.l1_weight
    replicated = mesh_lib.replicated(mesh)
    batch_sharding = jax.tree.map(lambda x: x.sharding, batch)
    init_key, dropout_key = jax.random.split(jax.random.PRNGKey(config.seed))

    def init(image):
        params = nn.unbox(model.init(init_key, image[:1]))["params"]
        return params, tx.init(params), jnp.zeros((), jnp.int32)

    def train_step(params, opt_state, count, batch):
        image = batch["image"]

        def loss_fn(params):
            rngs = {"dropout": jax.random.fold_in(dropout_key, count)}
            recon = model.apply({"params": params}, image, train=True, rngs=rngs)
            error = recon - image
            return jnp.mean(jnp.square(error)) + l1_weight * jnp.mean(jnp.abs(error))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, count + 1, loss

    carry = jax.jit(init, out_shardings=replicated)(batch["image"])
    peer_step = jax.jit(
        train_step,
        in_shardings=(replicated, replicated, replicated, batch_sharding),
        out_shardings=replicated,
        donate_argnums=(0, 1, 2),
    )
    return peer_step, carry


def main(argv=None) -> None:
    args = parse_args(argv)
    common.setup_jax(args.cpu_devices or args.devices or 1)

    spec = args.config + (f":{args.variant}" if args.variant else "")
    config = configlib.load_config(spec)
    config.mesh.update(parse_mesh(args.mesh))
    apply_overrides(config, args.set)
    if args.batch_size:
        config.data.batch_size = args.batch_size
    devices = jax.devices()[: args.devices] if args.devices else jax.devices()
    if args.devices and len(devices) < args.devices:
        raise SystemExit(f"--devices {args.devices}: only {len(devices)} devices are present")
    configlib.validate(config, num_devices=len(devices))
    mesh = mesh_lib.create_mesh(config.mesh, devices)

    data = pipeline.create_iterator(config.data, seed=config.seed)
    batch = pipeline.to_global(next(data), mesh)
    data.close()

    trainer = trainer_lib.build(config, mesh, batch)
    ours = trainer.layout.initialize()
    peer_step, peer = make_peer(config, mesh, batch)

    def run_ours():
        nonlocal ours
        ours, metrics = trainer.train_step(ours, batch)
        jax.block_until_ready((ours, metrics))

    def run_peer():
        nonlocal peer
        *peer, loss = peer_step(*peer, batch)
        jax.block_until_ready((peer, loss))

    runners = {"trainer.train_step": run_ours, "peer_jit_step": run_peer}
    clock = CompileClock()
    first_call, compile_s = {}, {}
    for name, run in runners.items():
        clock.seconds, clock.active = {}, True
        start = time.perf_counter()
        run()
        first_call[name] = time.perf_counter() - start
        clock.active = False
        compile_s[name] = {k: round(v, 3) for k, v in clock.seconds.items()}
    for _ in range(args.warmup - 1):
        for run in runners.values():
            run()
    times = {name: [] for name in runners}
    for _ in range(args.steps):  # alternate, so both see the same machine load
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)

    # Model FLOPs per step: the peer's compiled step is exactly forward + backward + update.
    # XLA counts the SPMD-partitioned program of one device; the batch is split over all, so
    # the total is that times the device count (the replicated update is counted per device).
    device_flops = common.flops_of(peer_step.lower(*peer, batch).compile())
    flops = device_flops * len(devices) if device_flops else None

    stats = {name: common.timing_stats(t) for name, t in times.items()}
    peer_ms = stats["peer_jit_step"]["median_ms"]
    batch_size = config.data.batch_size
    for name in runners:
        step_s = stats[name]["median_ms"] / 1e3
        common.emit(
            {
                "bench": "train_step",
                "name": name,
                "config": spec,
                "overrides": args.set,
                "image_size": config.data.image_size,
                "mesh": dict(mesh.shape),
                **common.device_info(devices),
                "batch_size": batch_size,
                **stats[name],
                "examples_per_s": round(batch_size / step_s, 2),
                "compile_s": round(sum(compile_s[name].values()), 3),
                "compile_breakdown_s": compile_s[name],
                "first_call_s": round(first_call[name], 3),
                "flops_per_step": flops,
                "flops_per_device_step": device_flops,
                "achieved_flops_per_s": round(flops / step_s) if flops else None,
                "ratio_vs_peer": round(stats[name]["median_ms"] / peer_ms, 3),
            }
        )


if __name__ == "__main__":
    main()

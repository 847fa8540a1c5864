"""ControlNet train step against fine-tuning the same base UNet, same batch: time and memory.

The ControlNet paper (Zhang et al. 2023, sec. 3.3) reports that training a ControlNet on
Stable Diffusion costs about 23% more GPU memory and 34% more time per iteration than
fine-tuning the base UNet alone. This measures the same two steps with our trainer:

- **`controlnet`**: `configs/shapes_controlnet.py` (`ControlNetTask`): the base UNet and its
  text encoder frozen, the ControlNet (a trainable copy of the UNet's encoder and middle plus
  the hint encoder and zero convs) trained with AdamW; the base runs forward and backward
  (its activations' gradients reach the ControlNet through the skips) but gets no parameter
  gradients or optimizer state.
- **`unet_fine_tune`** (the peer): the same base UNet trained with the same optimizer on the
  same batch and loss, text encoder frozen as above, no ControlNet.

The base is a fresh run of the base recipe (one train step, written to a temporary workdir),
so its weights are close to initialisation; timing and memory do not depend on them. Both
steps are the production `Trainer.train_step` (phases, EMA, non-finite guard, sharding).
Memory: XLA's memory analysis of each compiled step (arguments + outputs - aliased +
temporaries), per device. `ratio_vs_peer` is ControlNet / fine-tune time;
`memory_ratio_vs_peer` likewise for memory.

  python bench/controlnet_step.py                          # shapes_t2i base, 32 px, batch 32
  python bench/controlnet_step.py --variant tiny --steps 30
  python bench/controlnet_step.py --cpu_devices 2 --batch_size 16

Prints one JSON line per step (see bench/README.md for the shared fields).
"""

from __future__ import annotations

import argparse
import tempfile

import common


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variant", default="", help="variant of both recipes, e.g. 'tiny'")
    p.add_argument("--batch_size", type=int, default=None, help="global batch (default: recipe)")
    p.add_argument("--cpu_devices", type=int, default=1, help="JAX CPU devices (data parallel)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each first")
    p.add_argument("--steps", type=int, default=10, help="timed steps of each, alternating")
    return p.parse_args(argv)


def _stepper(run, state, batch):
    """A no-argument call of one train step that keeps the state it returns."""
    import jax

    current = [state]

    def step():
        current[0], metrics = run.train_step(current[0], batch)
        jax.block_until_ready(metrics["loss"])

    return step


def main(argv=None) -> None:
    args = parse_args(argv)
    common.setup_jax(args.cpu_devices)
    import jax

    from genctl_jax import configlib
    from genctl_jax.data import pipeline
    from genctl_jax.parallel import mesh as mesh_lib
    from genctl_jax.trainers import loop, saved_run
    from genctl_jax.trainers import trainer as trainer_lib
    from genctl_jax.trainers.controlnet import ControlNetTask
    from genctl_jax.trainers.task import Phase
    from genctl_jax.trainers.text_to_image import TextToImageTask

    class UNetFineTune(ControlNetTask):
        """The base UNet trained with the base's own loss; no ControlNet."""

        @property
        def phases(self):
            return (Phase("denoise", ("model",), lambda *a: TextToImageTask.loss(self, *a)),)

        def init_params(self, rng, batch):
            return TextToImageTask.init_params(self, rng, batch)

        def pretrained_params(self, shardings):
            mesh = jax.tree.leaves(shardings["model"])[0].mesh
            base = saved_run.load(self.config.controlnet.base_workdir, list(mesh.devices.flat))
            return {name: jax.device_put(base.params[name], shardings[name]) for name in shardings}

    variant = args.variant
    base_workdir = tempfile.mkdtemp(prefix="controlnet_bench_base_")
    base_config = configlib.load_config(f"{common.REPO}/configs/shapes_t2i.py:{variant}")
    base_config.trainer.num_train_steps = 1
    base_config.trainer.sample_every = 0
    base_config.trainer.progress_bar = False
    loop.train_and_evaluate(base_config, base_workdir)

    spec = f"{common.REPO}/configs/shapes_controlnet.py:" + ",".join(
        [*([variant] if variant else []), f"base={base_workdir}"]
    )
    config = configlib.load_config(spec)
    if args.batch_size:
        config.data.batch_size = args.batch_size
    config.trainer.num_train_steps = 10**6  # no warm-up or decay effects on the timed steps
    configlib.validate(config)
    peer_config = config.copy_and_resolve_references()
    peer_config.optimizers.model = config.optimizers.controlnet

    mesh = mesh_lib.create_mesh(config.mesh)
    data = pipeline.create_iterator(config.data, seed=config.seed)
    tasks = {"controlnet": ControlNetTask(config), "unet_fine_tune": UNetFineTune(peer_config)}
    raw = next(data)
    data.close()
    runners, facts = {}, {}
    for name, task in tasks.items():
        batch = pipeline.to_global(task.prepare_batch(dict(raw)), mesh)
        run = trainer_lib.build(config if name == "controlnet" else peer_config, mesh, batch, task)
        compiled = run.lower(batch).compile()
        state = run.initialize()
        trained = sum(
            x.size for n in task.trained_networks for x in jax.tree.leaves(state.params[n])
        )
        facts[name] = {
            "peak_bytes_per_device": common.peak_bytes(compiled),
            "flops_per_device_step": common.flops_of(compiled),
            "trained_params": int(trained),
        }
        runners[name] = _stepper(run, state, batch)

    times, _ = common.time_alternating(runners, args.warmup, args.steps)
    peer = common.timing_stats(times["unet_fine_tune"])
    info = common.device_info(list(mesh.devices.flat))
    for name in runners:
        stats = common.timing_stats(times[name])
        record = {
            "bench": "controlnet_step",
            "name": name,
            "config": spec.replace(base_workdir, "<tmp base>").replace(f"{common.REPO}/", ""),
            "image_size": config.data.image_size,
            "batch_size": config.data.batch_size,
            "mesh": dict(mesh.shape),
            **info,
            **stats,
            **facts[name],
            "examples_per_s": round(config.data.batch_size / (stats["median_ms"] / 1e3), 2),
            "ratio_vs_peer": round(stats["median_ms"] / peer["median_ms"], 3),
        }
        ours = facts[name]["peak_bytes_per_device"]
        theirs = facts["unet_fine_tune"]["peak_bytes_per_device"]
        if ours and theirs:
            record["memory_ratio_vs_peer"] = round(ours / theirs, 3)
        common.emit(record)


if __name__ == "__main__":
    main()

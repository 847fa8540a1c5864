"""GAN train steps (discriminator + generator updates) at 64 x 64: images/s, achieved FLOP/s
against a large XLA matmul on the same devices, and peak memory.

For each family, the shapes recipe at 64 x 64 (`configs/shapes_pix2pix.py` with a 6-level
U-Net, `configs/shapes_spade.py`, `configs/shapes_stylegan2.py` at resolution 64) runs the
production `Trainer.train_step` (all phases: D then G; StyleGAN2 also its lazy R1 and path-
length phases under `lax.cond`) on one batch from the real pipeline, reused every step.

- `images_per_s`: batch / mean step time over the timed steps (the mean, so StyleGAN2's
  lazy phases count at their rate: run at least `r1_every` = 16 steps).
- `achieved_flops_per_s`: XLA's cost analysis of the compiled step / mean step time. For
  StyleGAN2 the analysis counts both branches of each lazy phase's `cond`, so its FLOPs
  are those of a step with every regulariser on (an upper bound).
- The peer, measured in the same run: a float32 2048 x 2048 @ 2048 x 2048 matmul under XLA
  on one device; `ratio_vs_peer` = achieved / matmul FLOP/s (per device).
- `peak_bytes_per_device`: XLA's memory analysis of the compiled step (arguments + outputs
  - aliased + temporaries).

  python bench/gan_step.py                            # all three, batch 16, one device
  python bench/gan_step.py --family stylegan2 --steps 32
  python bench/gan_step.py --cpu_devices 2 --batch_size 32

Prints one JSON line per family plus one for the matmul (see bench/README.md).
"""

from __future__ import annotations

import argparse
import time

import common

FAMILIES = ("pix2pix", "spade", "stylegan2")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--family", choices=FAMILIES, action="append", help="default: all three")
    p.add_argument("--batch_size", type=int, default=16, help="global batch")
    p.add_argument("--cpu_devices", type=int, default=1, help="JAX CPU devices (data parallel)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=16, help="timed steps")
    return p.parse_args(argv)


def recipe(family: str, batch_size: int):
    """The family's shapes recipe at 64 x 64 (images resized from the 32 px data)."""
    from genctl_jax import configlib

    name = {"pix2pix": "shapes_pix2pix", "spade": "shapes_spade", "stylegan2": "shapes_stylegan2"}
    config = configlib.load_config(f"{common.REPO}/configs/{name[family]}.py")
    config.data.image_size = 64
    config.data.batch_size = batch_size
    if family == "pix2pix":
        config.model.generator.num_downs = 6  # 64 px down to 1 x 1
    if family == "stylegan2":
        config.model.resolution = 64
    config.trainer.num_train_steps = 10**6  # constant learning rates on the timed steps
    return config


def main(argv=None) -> None:
    args = parse_args(argv)
    common.setup_jax(args.cpu_devices)
    import jax

    from genctl_jax import configlib, trainers
    from genctl_jax.data import pipeline
    from genctl_jax.parallel import mesh as mesh_lib
    from genctl_jax.trainers import trainer as trainer_lib

    matmul_rate, matmul_s = common.matmul_flops_per_s()
    info = None
    for family in args.family or FAMILIES:
        config = recipe(family, args.batch_size)
        configlib.validate(config)
        mesh = mesh_lib.create_mesh(config.mesh)
        info = common.device_info(list(mesh.devices.flat))
        task = trainers.build_task(config)
        data = pipeline.create_iterator(config.data, seed=config.seed)
        batch = pipeline.to_global(task.prepare_batch(dict(next(data))), mesh)
        data.close()
        run = trainer_lib.build(config, mesh, batch, task)
        start = time.perf_counter()
        compiled = run.lower(batch).compile()
        compile_s = time.perf_counter() - start
        state = run.initialize()
        for _ in range(args.warmup):
            state, metrics = run.train_step(state, batch)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            state, metrics = run.train_step(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        mean_s = sum(times) / len(times)
        flops = common.flops_of(compiled)  # per device
        achieved = flops / mean_s if flops else None
        params = {
            name: int(sum(x.size for x in jax.tree.leaves(state.params[name])))
            for name in task.trained_networks
        }
        common.emit(
            {
                "bench": "gan_step",
                "name": family,
                "image_size": 64,
                "batch_size": args.batch_size,
                "mesh": dict(mesh.shape),
                **info,
                **common.timing_stats(times),
                "mean_ms": round(1e3 * mean_s, 3),
                "images_per_s": round(args.batch_size / mean_s, 2),
                "compile_s": round(compile_s, 2),
                "flops_per_device_step": flops,
                "achieved_flops_per_s": round(achieved) if achieved else None,
                "ratio_vs_peer": round(achieved / matmul_rate, 4) if achieved else None,
                "peak_bytes_per_device": common.peak_bytes(compiled),
                "trained_params": params,
            }
        )
    common.emit(
        {
            "bench": "gan_step",
            "name": "xla_matmul_2048",
            **(info or {}),
            "median_ms": round(1e3 * matmul_s, 3),
            "flops_per_s": round(matmul_rate),
        }
    )


if __name__ == "__main__":
    main()

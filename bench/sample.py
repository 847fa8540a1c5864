"""DDIM sampling with classifier-free guidance: our jitted loop vs a diffusers PyTorch loop.

Both sample the same architecture (a class-conditional UNet; default: the small UNet of
`unet_step.py --small`, 32 x 32, 10 classes) from random weights, with DDIM, trailing
spacing, static clipping, eta 0 and guidance: ours is `genctl_jax.diffusion.samplers.sample`
(the whole loop in one jit, cond and uncond in one batched forward); theirs is the loop
diffusers' pipelines run: `DDIMScheduler.step` around a `UNet2DModel` forward on the doubled
batch. Runs alternate, each timed to completion.

  python bench/sample.py                          # 16 samples, 50 steps, guidance 3
  python bench/sample.py --cpu_devices 2          # our batch split over 2 CPU devices
  python bench/sample.py --num_samples 64 --steps 25

Prints one JSON line per implementation (images/s, seconds per batch, compile time) with the
ratio of our time to theirs.
"""

from __future__ import annotations

import argparse
import os
import time

import common
import unet_step


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num_samples", type=int, default=16, help="images per sampling run")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance_scale", type=float, default=3.0, help="classifier-free guidance")
    p.add_argument("--image_size", type=int, default=32, help="resolution")
    p.add_argument("--num_classes", type=int, default=10, help="classes of the conditional UNet")
    p.add_argument("--cpu_devices", type=int, default=1, help="JAX CPU devices (batch split)")
    p.add_argument("--runs", type=int, default=3, help="timed sampling runs per implementation")
    p.add_argument("--torch_threads", type=int, default=os.cpu_count(), help="torch threads")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    common.setup_jax(args.cpu_devices)
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from diffusers import DDIMScheduler
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    from genctl_jax.diffusion import samplers, schedules
    from genctl_jax.models import unet

    m = unet.ddpm_cifar10_config()
    m.update(unet_step.SMALL, num_classes=args.num_classes, dropout=0.0)
    n, s = args.num_samples, args.image_size
    devices = jax.devices()
    if n % len(devices):
        raise SystemExit(f"--num_samples {n} does not split over {len(devices)} devices")
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,))
    split = NamedSharding(mesh, PartitionSpec("data"))
    labels_np = np.arange(n, dtype=np.int32) % args.num_classes

    # ---- ours ----
    model = unet.from_config(m)
    x1 = jnp.zeros((1, s, s, 3))
    params = jax.jit(lambda k: nn.unbox(model.init(k, x1, jnp.zeros((1,), jnp.int32), None)))(
        jax.random.PRNGKey(0)
    )
    # Zero-initialised output layers would make every step trivially cheap to reason about;
    # perturb all params so the outputs are generic.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = tree.unflatten(
        [x + 0.02 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )
    schedule = schedules.make_schedule("linear", 1000)
    options = samplers.SamplerOptions(
        sampler="ddim", num_steps=args.steps, guidance_scale=args.guidance_scale
    )
    labels = jax.device_put(labels_np, split)
    null = jax.device_put(np.full((n,), args.num_classes, np.int32), split)
    noise = jax.device_put(
        np.random.default_rng(0).standard_normal((n, s, s, 3), np.float32), split
    )

    def generate(params, noise, labels, null):
        model_fn = lambda x, t, c: model.apply(params, x, t, c)
        return samplers.sample(
            model_fn, schedule, jax.random.PRNGKey(2), noise, options, labels, null
        )

    start = time.perf_counter()
    compiled = jax.jit(generate).lower(params, noise, labels, null).compile()
    compile_s = time.perf_counter() - start

    def run_ours():
        jax.block_until_ready(compiled(params, noise, labels, null))

    # ---- theirs ----
    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    ref = unet_step.diffusers_unet(m, s).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        timestep_spacing="trailing",
        clip_sample=True,
        prediction_type="epsilon",
    )
    labels_t = torch.from_numpy(labels_np).long()
    both_labels = torch.cat([labels_t, torch.full_like(labels_t, args.num_classes)])
    noise_t = torch.from_numpy(np.asarray(noise)).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def run_theirs():
        scheduler.set_timesteps(args.steps)
        x = noise_t.clone()
        for t in scheduler.timesteps:
            out = ref(torch.cat([x, x]), t, class_labels=both_labels).sample
            cond, uncond = out.chunk(2)
            guided = uncond + args.guidance_scale * (cond - uncond)
            x = scheduler.step(guided, t, x).prev_sample
        return x

    run_ours()
    run_theirs()  # warm-up
    times = {"ours": [], "diffusers": []}
    for _ in range(args.runs):
        for name, fn in (("ours", run_ours), ("diffusers", run_theirs)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    ours_s = sorted(times["ours"])[len(times["ours"]) // 2]
    theirs_s = sorted(times["diffusers"])[len(times["diffusers"]) // 2]
    shared = {
        "bench": "sample",
        "sampler": f"ddim{args.steps}",
        "guidance_scale": args.guidance_scale,
        "num_samples": n,
        "image_size": s,
        "model": "small UNet (channels 32 x (1, 2, 2), 1 ResBlock/level, attention at 16 px)",
    }
    common.emit(
        {
            **shared,
            "impl": "ours",
            "seconds_per_batch": round(ours_s, 3),
            "images_per_s": round(n / ours_s, 2),
            "compile_s": round(compile_s, 2),
            "ratio_vs_diffusers": round(ours_s / theirs_s, 3),
            **common.device_info(devices),
        }
    )
    common.emit(
        {
            **shared,
            "impl": "diffusers",
            "seconds_per_batch": round(theirs_s, 3),
            "images_per_s": round(n / theirs_s, 2),
            "torch": torch.__version__,
            "torch_threads": args.torch_threads,
            **common.host_info(),
        }
    )


if __name__ == "__main__":
    main()

"""Forward + backward + AdamW step of our UNet against diffusers' `UNet2DModel` (PyTorch).

Both build the same architecture from one `config.model` block (default: DDPM's CIFAR-10
UNet, 35.7M params, 32 x 32): the same widths per level, ResBlocks per level, attention at
the same resolutions with the same head count, GroupNorm 32, embedding injection and
resampling; their parameter counts are printed and must agree within 1 %. Each step is an
epsilon-prediction MSE on one fixed batch (x_t, t, eps) with dropout active, then AdamW
(lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0.01). Steps of the two alternate, each
timed to completion (`block_until_ready` / torch's synchronous CPU ops), so load from
elsewhere on the machine hits both alike.

Also measured in the same run: a float32 2048 x 2048 @ 2048 x 2048 matmul under XLA on one
device, the reference rate for our step's achieved FLOP/s (XLA cost analysis of our compiled
step / median step time).

  python bench/unet_step.py                     # DDPM CIFAR-10 UNet, 32 px, batch 8
  python bench/unet_step.py --small             # channels 32 x (1, 2, 2), 1 ResBlock per level
  python bench/unet_step.py --cpu_devices 2     # our batch split over 2 CPU devices
  python bench/unet_step.py --set remat=True    # any config.model field (torch stays float32)

Prints one JSON line per implementation plus one for the matmul (see bench/README.md).
"""

from __future__ import annotations

import argparse
import ast
import os
import time

import common

SMALL = dict(channels=32, channel_mult=(1, 2, 2), num_res_blocks=1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--small", action="store_true", help=f"a small UNet: {SMALL}")
    p.add_argument("--image_size", type=int, default=32, help="input resolution")
    p.add_argument("--batch_size", type=int, default=8, help="batch per step")
    p.add_argument(
        "--cpu_devices",
        type=int,
        default=1,
        help="JAX CPU devices; > 1 splits our batch over them (data parallel, params replicated)",
    )
    p.add_argument("--steps", type=int, default=6, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the compile")
    p.add_argument(
        "--torch_threads", type=int, default=os.cpu_count(), help="torch intra-op threads"
    )
    p.add_argument(
        "--torch_channels_last", action="store_true", help="run diffusers in channels_last"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="config.model override, repeatable, e.g. --set remat=True",
    )
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def model_config(args):
    from genctl_jax.models import unet

    m = unet.ddpm_cifar10_config()
    if args.small:
        m.update(SMALL)
    for item in args.set:
        key, _, raw = item.partition("=")
        try:
            m[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            m[key.strip()] = raw
    return m


def diffusers_unet(m, image_size: int):
    """diffusers' UNet2DModel with the architecture of our `config.model` block `m`."""
    from diffusers import UNet2DModel

    widths = [m.channels * k for k in m.channel_mult]
    resolutions = [image_size // 2**level for level in range(len(widths))]
    attn = [r in tuple(m.attention_resolutions) for r in resolutions]
    # Blocks without attention: BigGAN-style resampling needs diffusers' Resnet*sample blocks.
    plain = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D")
    plain = plain if m.resblock_updown else ("DownBlock2D", "UpBlock2D")
    attn_widths = {w for w, a in zip(widths, attn, strict=True) if a} | {widths[-1]}
    if m.head_dim > 0:
        head_dim = m.head_dim
    else:  # UNet2DModel takes one head width for every attention block.
        head_dims = {w // m.num_heads for w in attn_widths}
        if len(head_dims) != 1:
            raise SystemExit(f"num_heads={m.num_heads} gives head widths {head_dims}")
        head_dim = head_dims.pop()
    return UNet2DModel(
        sample_size=image_size,
        in_channels=m.in_channels,
        out_channels=m.out_channels,
        block_out_channels=tuple(widths),
        layers_per_block=m.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else plain[0] for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else plain[1] for a in reversed(attn)),
        attention_head_dim=head_dim,
        norm_num_groups=32,
        attn_norm_num_groups=32,  # else the middle attention has no GroupNorm with scale_shift
        dropout=m.dropout,
        resnet_time_scale_shift="scale_shift" if m.scale_shift_norm else "default",
        downsample_type="resnet" if m.resblock_updown else "conv",
        upsample_type="resnet" if m.resblock_updown else "conv",
        flip_sin_to_cos=True,
        freq_shift=0,
        num_class_embeds=(m.num_classes + 1) if m.num_classes else None,
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    common.setup_jax(args.cpu_devices)
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import torch

    from genctl_jax import configlib
    from genctl_jax.models import unet

    m = model_config(args)
    config = configlib.base_config()
    config.model = m
    config.data.image_size = args.image_size
    unet.validate(config)
    torch.set_num_threads(args.torch_threads)
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    devices = jax.devices()
    if args.batch_size % len(devices):
        raise SystemExit(f"--batch_size {args.batch_size} does not split over {len(devices)}")
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,))
    replicated = NamedSharding(mesh, PartitionSpec())
    split = NamedSharding(mesh, PartitionSpec("data"))

    # One fixed batch for both: x_t, t and the eps target.
    rng = np.random.default_rng(0)
    b, s, c = args.batch_size, args.image_size, m.in_channels
    x_np = rng.standard_normal((b, s, s, c), dtype=np.float32)
    eps_np = rng.standard_normal((b, s, s, m.out_channels), dtype=np.float32)
    t_np = rng.integers(0, 1000, size=(b,), dtype=np.int32)
    labels_np = (
        rng.integers(0, m.num_classes, size=(b,)).astype(np.int32) if m.num_classes else None
    )

    # ---- ours: one jit of value_and_grad + optax.adamw, params/opt state donated ----
    model = unet.from_config(m)
    tx = optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    x, eps, t = (jax.device_put(a, split) for a in (x_np, eps_np, t_np))
    labels = None if labels_np is None else jax.device_put(labels_np, split)

    def init(key):
        params = nn.unbox(model.init(key, x[:1], t[:1], None if labels is None else labels[:1]))
        return params, tx.init(params)

    params, opt_state = jax.jit(init, out_shardings=replicated)(jax.random.PRNGKey(0))
    ours_params = sum(leaf.size for leaf in jax.tree.leaves(params))

    def train_step(params, opt_state, step, x, t, labels, eps):
        def loss_fn(p):
            rngs = {"dropout": jax.random.fold_in(jax.random.PRNGKey(1), step)}
            out = model.apply(p, x, t, labels, train=True, rngs=rngs)
            return jnp.mean(jnp.square(out - eps))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, step + 1, loss

    step = jnp.zeros((), jnp.int32)
    jitted = jax.jit(train_step, out_shardings=replicated, donate_argnums=(0, 1, 2))
    start = time.perf_counter()
    lowered = jitted.lower(params, opt_state, step, x, t, labels, eps)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    xla_s = time.perf_counter() - start
    # XLA counts one device's partitioned program; the batch is split over all of them (the
    # small replicated AdamW update is then counted once per device).
    device_flops = common.flops_of(compiled)
    step_flops = device_flops * len(devices) if device_flops else None

    def run_ours():
        nonlocal params, opt_state, step
        params, opt_state, step, loss = compiled(params, opt_state, step, x, t, labels, eps)
        jax.block_until_ready((params, loss))

    # ---- theirs: diffusers UNet2DModel + torch.optim.AdamW, same loss ----
    torch.manual_seed(0)
    ref = diffusers_unet(m, args.image_size).train()
    memory_format = torch.channels_last if args.torch_channels_last else torch.contiguous_format
    ref = ref.to(memory_format=memory_format)
    ref_params = sum(p.numel() for p in ref.parameters())
    opt = torch.optim.AdamW(
        ref.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01
    )
    x_t = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous(memory_format=memory_format)
    eps_t = torch.from_numpy(eps_np).permute(0, 3, 1, 2).contiguous(memory_format=memory_format)
    t_t = torch.from_numpy(t_np).long()
    labels_t = None if labels_np is None else torch.from_numpy(labels_np).long()

    def run_theirs():
        opt.zero_grad(set_to_none=True)
        out = ref(x_t, t_t, class_labels=labels_t).sample
        loss = torch.nn.functional.mse_loss(out, eps_t)
        loss.backward()
        opt.step()

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        run_theirs()  # also the torch warm-up step
    torch_flops = counter.get_total_flops()

    if abs(ours_params / ref_params - 1) > 0.01:
        raise SystemExit(
            f"param counts differ by > 1 %: ours {ours_params}, diffusers {ref_params}"
        )

    start = time.perf_counter()
    run_ours()
    first_call_s = time.perf_counter() - start
    runners = {"ours_jax": run_ours, "diffusers_torch": run_theirs}
    times, cpu = common.time_alternating(runners, args.warmup, args.steps)

    matmul_rate, matmul_s = common.matmul_flops_per_s()
    stats = {name: common.timing_stats(ts) for name, ts in times.items()}
    peer_ms = stats["diffusers_torch"]["median_ms"]
    shared = {
        "bench": "unet_step",
        "variant": "small" if args.small else "ddpm_cifar10",
        "overrides": args.set,
        "image_size": args.image_size,
        "batch_size": b,
        "params_ours": ours_params,
        "params_diffusers": ref_params,
        **common.device_info(devices),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_channels_last": args.torch_channels_last,
    }
    for name in runners:
        step_s = stats[name]["median_ms"] / 1e3
        record = {**shared, "name": name, **stats[name]}
        record["step_ms"] = [round(1e3 * v, 1) for v in times[name]]
        # Process CPU time (all threads) per step: the work done, whatever the machine's load.
        record["cpu_s_per_step"] = round(float(np.median(cpu[name])), 3)
        record["examples_per_s"] = round(b / step_s, 2)
        record["ratio_vs_peer"] = round(stats[name]["median_ms"] / peer_ms, 3)
        if name == "ours_jax":
            record.update(
                compile_s=round(lower_s + xla_s, 3),
                compile_breakdown_s={"trace_lower": round(lower_s, 3), "xla": round(xla_s, 3)},
                first_call_s=round(first_call_s, 3),
                flops_per_step=step_flops,
                achieved_flops_per_s=round(step_flops / step_s) if step_flops else None,
                matmul_flops_per_s=round(matmul_rate),
                matmul_relative=round(step_flops / step_s / matmul_rate, 3) if step_flops else None,
            )
        else:
            record.update(
                torch_fwd_bwd_flops=torch_flops,
                achieved_flops_per_s=round(torch_flops / step_s),
                matmul_relative=round(torch_flops / step_s / matmul_rate, 3),
            )
        common.emit(record)
    common.emit(
        {
            "bench": "unet_step",
            "name": "xla_matmul_f32_2048",
            **common.device_info(devices),
            "median_ms": round(1e3 * matmul_s, 3),
            "flops_per_s": round(matmul_rate),
        }
    )


if __name__ == "__main__":
    main()

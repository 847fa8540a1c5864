"""Train step of our text-conditional UNet against diffusers' `UNet2DConditionModel` (PyTorch).

One small Stable-Diffusion-like UNet (default: widths 64 x (1, 2, 2), 2 ResBlocks per level,
one transformer block with 8 heads after each ResBlock of the first two levels and in the
middle, cross-attention to 77 text tokens of width 128 under a padding mask, 32 x 32 x 4
latents, batch 4) is built in diffusers with `torch.manual_seed(0)`, saved as safetensors
and loaded into ours with `models.unet_diffusers.load_diffusers`: both start from the same
weights (checked: parameter counts equal, and one forward pass agrees). Each step is an
epsilon-prediction MSE on one fixed batch (x_t, t, eps, text tokens, mask), backward, then
AdamW (lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0.01). Steps of the two alternate,
each timed to completion, so load from elsewhere on the machine hits both alike.

  python bench/unet_cond_step.py                    # the default tiny SD-like UNet
  python bench/unet_cond_step.py --cpu_devices 2    # our batch split over 2 CPU devices
  python bench/unet_cond_step.py --widths 320,640,1280,1280 --cross_levels 3 --context_dim 768
  python bench/unet_cond_step.py --dtype bfloat16 --attention cudnn   # on a GPU

On a GPU, diffusers runs on it too (torch's CUDA device) and each step is timed to
`torch.cuda.synchronize()`; `--dtype bfloat16` is mixed precision on both sides: float32
params and optimizer state, bfloat16 compute (ours: the module's `dtype`; theirs:
`torch.autocast`). `--attention xla` turns off our cuDNN fused attention (by default used
for unmasked bfloat16 attention on GPUs, see `genctl_jax.nn.attention`); theirs is PyTorch's
scaled_dot_product_attention. Peak memory: XLA's memory analysis of our compiled step
(arguments + outputs + temporaries, donated buffers counted once) and torch's
`max_memory_allocated` on CUDA.

Prints one JSON line per implementation (see bench/README.md for the shared fields).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import common


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--widths", default="64,128,128", help="block_out_channels, comma-separated")
    p.add_argument("--layers", type=int, default=2, help="layers_per_block (ResBlocks per level)")
    p.add_argument(
        "--cross_levels", type=int, default=2, help="leading levels with cross-attention blocks"
    )
    p.add_argument("--heads", type=int, default=8, help="attention heads at every level")
    p.add_argument("--context_len", type=int, default=77, help="text tokens")
    p.add_argument("--context_dim", type=int, default=128, help="text-token width")
    p.add_argument("--image_size", type=int, default=32, help="latent resolution")
    p.add_argument("--batch_size", type=int, default=4, help="batch per step")
    p.add_argument(
        "--cpu_devices",
        type=int,
        default=1,
        help="JAX CPU devices; > 1 splits our batch over them (data parallel, params replicated)",
    )
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute")
    p.add_argument(
        "--attention",
        default="auto",
        choices=("auto", "xla"),
        help="our attention: cuDNN's fused kernel where it applies on GPU (auto), or XLA's",
    )
    p.add_argument("--steps", type=int, default=8, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the compile")
    p.add_argument(
        "--torch_threads", type=int, default=os.cpu_count(), help="torch intra-op threads"
    )
    args = p.parse_args(argv)
    args.widths = tuple(int(w) for w in args.widths.split(","))
    if args.steps < 1 or args.warmup < 0 or not 0 <= args.cross_levels <= len(args.widths):
        p.error("--steps >= 1, --warmup >= 0, 0 <= --cross_levels <= number of widths")
    return args


def diffusers_config(args) -> dict:
    """The UNet2DConditionModel config of the benchmarked model."""
    n = len(args.widths)
    cross = [level < args.cross_levels for level in range(n)]
    return dict(
        sample_size=args.image_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=args.widths,
        layers_per_block=args.layers,
        down_block_types=tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross),
        up_block_types=tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in cross[::-1]),
        attention_head_dim=args.heads,
        cross_attention_dim=args.context_dim,
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    common.setup_jax(args.cpu_devices)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import torch
    from diffusers import UNet2DConditionModel
    from jax.sharding import AxisType, NamedSharding, PartitionSpec
    from torch.utils.flop_counter import FlopCounterMode

    from genctl_jax.models import unet_diffusers

    torch.set_num_threads(args.torch_threads)
    from genctl_jax.nn import attention

    attention.FUSED_ON_GPU = args.attention == "auto"
    devices = jax.devices()
    if args.batch_size % len(devices):
        raise SystemExit(f"--batch_size {args.batch_size} does not split over {len(devices)}")
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,))
    replicated = NamedSharding(mesh, PartitionSpec())
    split = NamedSharding(mesh, PartitionSpec("data"))

    # Same weights: diffusers' random init, through a safetensors directory into ours.
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**diffusers_config(args))
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp, safe_serialization=True)
        module, params = unet_diffusers.load_diffusers(tmp)
    module = module.clone(dtype=jnp.dtype(args.dtype))
    ref_params = sum(p.numel() for p in ref.parameters())
    ours_params = sum(leaf.size for leaf in jax.tree.leaves(params))
    if ours_params != ref_params:
        raise SystemExit(f"param counts differ: ours {ours_params}, diffusers {ref_params}")

    # One fixed batch: x_t, t, eps, text tokens and a padding mask (10 to all tokens per row).
    rng = np.random.default_rng(0)
    b, s, n_tok = args.batch_size, args.image_size, args.context_len
    x_np = rng.standard_normal((b, s, s, 4), dtype=np.float32)
    eps_np = rng.standard_normal((b, s, s, 4), dtype=np.float32)
    t_np = rng.integers(0, 1000, size=(b,), dtype=np.int32)
    ctx_np = rng.standard_normal((b, n_tok, args.context_dim), dtype=np.float32)
    lengths = rng.integers(min(10, n_tok), n_tok + 1, size=(b,))
    mask_np = (np.arange(n_tok)[None, :] < lengths[:, None]).astype(np.int32)
    x, eps, t, ctx, mask = (jax.device_put(a, split) for a in (x_np, eps_np, t_np, ctx_np, mask_np))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ref = ref.to(device)
    x_t = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous().to(device)
    eps_t = torch.from_numpy(eps_np).permute(0, 3, 1, 2).contiguous().to(device)
    t_t, ctx_t, mask_t = (
        torch.from_numpy(a).to(device) for a in (t_np.astype(np.int64), ctx_np, mask_np)
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def forward(params, x, t, ctx, mask, train=False):
        return module.apply({"params": params}, x, t, context=ctx, context_mask=mask, train=train)

    params = jax.device_put(params, replicated)
    with torch.no_grad(), autocast:
        theirs = ref(x_t, t_t, ctx_t, encoder_attention_mask=mask_t).sample
    ours = jax.jit(forward)(params, x, t, ctx, mask)
    theirs = theirs.float().permute(0, 2, 3, 1).cpu().numpy()
    max_diff = float(np.abs(np.asarray(ours, np.float32) - theirs).max())

    # ---- ours: one jit of value_and_grad + optax.adamw, params/opt state donated ----
    tx = optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    opt_state = jax.jit(tx.init, out_shardings=replicated)(params)

    def train_step(params, opt_state, x, t, ctx, mask, eps):
        def loss_fn(p):
            return jnp.mean(jnp.square(forward(p, x, t, ctx, mask, train=True) - eps))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    jitted = jax.jit(train_step, out_shardings=replicated, donate_argnums=(0, 1))
    start = time.perf_counter()
    lowered = jitted.lower(params, opt_state, x, t, ctx, mask, eps)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    xla_s = time.perf_counter() - start
    device_flops = common.flops_of(compiled)
    step_flops = device_flops * len(devices) if device_flops else None
    memory = compiled.memory_analysis()
    peak_bytes = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
        if memory is not None
        else None
    )

    def run_ours():
        nonlocal params, opt_state
        params, opt_state, loss = compiled(params, opt_state, x, t, ctx, mask, eps)
        jax.block_until_ready((params, loss))

    # ---- theirs: the same weights, torch.optim.AdamW, the same loss ----
    ref.train()
    opt = torch.optim.AdamW(
        ref.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01
    )

    def run_theirs():
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = ref(x_t, t_t, ctx_t, encoder_attention_mask=mask_t).sample
        torch.nn.functional.mse_loss(out.float(), eps_t).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    counter = FlopCounterMode(display=False)
    with counter:
        run_theirs()  # also the torch warm-up step
    torch_flops = counter.get_total_flops()

    start = time.perf_counter()
    run_ours()
    first_call_s = time.perf_counter() - start
    runners = {"ours_jax": run_ours, "diffusers_torch": run_theirs}
    times, cpu = common.time_alternating(runners, args.warmup, args.steps)

    stats = {name: common.timing_stats(ts) for name, ts in times.items()}
    peer_ms = stats["diffusers_torch"]["median_ms"]
    shared = {
        "bench": "unet_cond_step",
        "block_out_channels": list(args.widths),
        "layers_per_block": args.layers,
        "cross_levels": args.cross_levels,
        "heads": args.heads,
        "context": [n_tok, args.context_dim],
        "image_size": s,
        "batch_size": b,
        "dtype": args.dtype,
        "attention": args.attention,
        "params": ours_params,
        "forward_max_abs_diff": max_diff,
        **common.device_info(devices),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    for name in runners:
        step_s = stats[name]["median_ms"] / 1e3
        record = {**shared, "name": name, **stats[name]}
        record["step_ms"] = [round(1e3 * v, 1) for v in times[name]]
        record["cpu_s_per_step"] = round(float(np.median(cpu[name])), 3)
        record["examples_per_s"] = round(b / step_s, 2)
        record["ratio_vs_peer"] = round(stats[name]["median_ms"] / peer_ms, 3)
        if name == "ours_jax":
            record.update(
                compile_s=round(lower_s + xla_s, 3),
                compile_breakdown_s={"trace_lower": round(lower_s, 3), "xla": round(xla_s, 3)},
                first_call_s=round(first_call_s, 3),
                peak_memory_bytes=peak_bytes,
                flops_per_step=step_flops,
                achieved_flops_per_s=round(step_flops / step_s) if step_flops else None,
            )
        else:
            record.update(
                torch_fwd_bwd_flops=torch_flops,
                peak_memory_bytes=(
                    torch.cuda.max_memory_allocated() if device.type == "cuda" else None
                ),
                achieved_flops_per_s=round(torch_flops / step_s),
            )
        common.emit(record)


if __name__ == "__main__":
    main()

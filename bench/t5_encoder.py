"""T5 encoder forward throughput: our jitted Flax encoder vs transformers' `T5EncoderModel`.

Both run the same weights: a random transformers `T5EncoderModel` (default: t5-small's
architecture, d_model 512, 6 layers, 8 heads, d_ff 2048, vocab 32128, relu FFN) is saved
with `save_pretrained` and read back by `genctl_jax.models.text.t5.load_pretrained`; the two
outputs are compared before timing (`max_abs_diff`). One fixed batch of random token ids
with padding (each row keeps between half and all of `--length` tokens) is encoded, ours as
one `jax.jit` of `T5Encoder.apply`, theirs in `torch.no_grad()` float32 eager mode. Runs
alternate, each timed to completion, so load from elsewhere on the machine hits both alike.
`tokens_per_s` counts all batch x length positions (padding included: both compute them).

  python bench/t5_encoder.py                      # batch 8 x 64 tokens, 1 JAX CPU device
  python bench/t5_encoder.py --cpu_devices 2      # our batch split over 2 CPU devices
  python bench/t5_encoder.py --dtype bfloat16     # our compute dtype (torch stays float32)
  python bench/t5_encoder.py --preset t5-base --length 128
  python bench/t5_encoder.py --dtype bfloat16 --torch_dtype bfloat16   # on a GPU

On a GPU transformers runs on it too (torch's CUDA device), timed to
`torch.cuda.synchronize()`; `--torch_dtype bfloat16` runs theirs under `torch.autocast`.

Prints one JSON line per implementation (see bench/README.md) with the ratio of our time to
theirs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import common


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="t5-small", help="a key of t5.PRESETS")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per forward")
    p.add_argument("--length", type=int, default=64, help="tokens per prompt (padded)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="ours")
    p.add_argument(
        "--torch_dtype", default="float32", choices=("float32", "bfloat16"), help="theirs"
    )
    p.add_argument("--cpu_devices", type=int, default=1, help="JAX CPU devices (batch split)")
    p.add_argument("--runs", type=int, default=10, help="timed forwards per implementation")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards after the compile")
    p.add_argument("--torch_threads", type=int, default=os.cpu_count(), help="torch threads")
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        p.error("--runs must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    common.setup_jax(args.cpu_devices)
    import dataclasses

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np
    import torch
    import transformers
    from jax.sharding import NamedSharding, PartitionSpec

    from genctl_jax import configlib
    from genctl_jax.models.text import t5
    from genctl_jax.parallel import mesh as mesh_lib

    config = t5.PRESETS[args.preset]
    b, n = args.batch_size, args.length
    devices = jax.devices()
    if b % len(devices):
        raise SystemExit(f"--batch_size {b} does not split over {len(devices)} devices")
    torch.set_num_threads(args.torch_threads)

    # ---- the same random weights for both ----
    torch.manual_seed(0)
    ref = transformers.T5EncoderModel(
        transformers.T5Config(**config.to_hf(), dropout_rate=0.0, decoder_start_token_id=0)
    ).eval()
    mesh = mesh_lib.create_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
    with tempfile.TemporaryDirectory() as directory:
        ref.save_pretrained(directory)
        module, params = t5.load_pretrained(directory, dtype=jnp.dtype(args.dtype), mesh=mesh)
    params_ours = sum(leaf.size for leaf in jax.tree.leaves(params))
    params_ref = sum(p.numel() for p in ref.parameters())

    rng = np.random.default_rng(0)
    lengths = rng.integers(n // 2, n + 1, size=(b,))
    mask_np = (np.arange(n)[None, :] < lengths[:, None]).astype(np.int32)
    ids_np = rng.integers(3, config.vocab_size, size=(b, n), dtype=np.int32) * mask_np

    # ---- ours: one jit, batch split over the data axis ----
    split = NamedSharding(mesh, PartitionSpec(mesh_lib.BATCH_AXES))
    ids, mask = jax.device_put(ids_np, split), jax.device_put(mask_np, split)
    with jax.set_mesh(mesh), nn.logical_axis_rules(configlib.DEFAULT_RULES):
        start = time.perf_counter()
        lowered = jax.jit(module.apply).lower({"params": params}, ids, mask)
        lower_s = time.perf_counter() - start
        start = time.perf_counter()
        compiled = lowered.compile()
        xla_s = time.perf_counter() - start
    device_flops = common.flops_of(compiled)
    flops = device_flops * len(devices) if device_flops else None

    def run_ours():
        return jax.block_until_ready(compiled({"params": params}, ids, mask))[0]

    # ---- theirs ----
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ref = ref.to(device)
    ids_t = torch.from_numpy(ids_np).long().to(device)
    mask_t = torch.from_numpy(mask_np).long().to(device)
    autocast = torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=args.torch_dtype == "bfloat16"
    )

    @torch.no_grad()
    def run_theirs():
        with autocast:
            out = ref(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    start = time.perf_counter()
    ours_out = np.asarray(run_ours())
    first_call_s = time.perf_counter() - start
    theirs_out = run_theirs().float().cpu().numpy()
    max_abs_diff = float(np.abs(ours_out.astype(np.float32) - theirs_out).max())

    runners = {"ours_jax": run_ours, "transformers_torch": run_theirs}
    for _ in range(args.warmup):
        for run in runners.values():
            run()
    times = {name: [] for name in runners}
    for _ in range(args.runs):  # alternate, so both see the same machine load
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)

    stats = {name: common.timing_stats(ts) for name, ts in times.items()}
    peer_ms = stats["transformers_torch"]["median_ms"]
    shared = {
        "bench": "t5_encoder",
        "preset": args.preset,
        "config": dataclasses.asdict(config),
        "batch_size": b,
        "length": n,
        "real_tokens": int(mask_np.sum()),
        "params_ours": params_ours,
        "params_transformers": params_ref,
        "max_abs_diff": max_abs_diff,
        **common.device_info(devices),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    for name in runners:
        seconds = stats[name]["median_ms"] / 1e3
        record = {**shared, "name": name, **stats[name]}
        record["dtype"] = args.dtype if name == "ours_jax" else args.torch_dtype
        record["tokens_per_s"] = round(b * n / seconds, 1)
        record["ratio_vs_peer"] = round(stats[name]["median_ms"] / peer_ms, 3)
        if name == "ours_jax":
            record.update(
                compile_s=round(lower_s + xla_s, 3),
                first_call_s=round(first_call_s, 3),
                flops_per_forward=flops,
                achieved_flops_per_s=round(flops / seconds) if flops else None,
            )
        common.emit(record)


if __name__ == "__main__":
    main()

"""Shared pieces of the bench scripts: JAX set-up before it initialises, timing stats, output.

Each script prints one JSON line per measurement (`emit`), so runs on different machines can
be collected with `cat` and compared with `jq`; the numbers that carry across machines are
the ratios to a peer measured in the same run.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]


def setup_jax(cpu_devices: int | None) -> None:
    """Call before anything touches a JAX backend: fake CPU devices, no persistent cache.

    The persistent compilation cache is turned off so that compile times are real compiles.
    The shapes dataset is read from (and built once into) the repo's cache, as tests do,
    unless $TFDS_DATA_DIR says otherwise.
    """
    os.environ.setdefault("TFDS_DATA_DIR", str(REPO / ".cache" / "tfds"))
    import jax

    if cpu_devices:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    jax.config.update("jax_enable_compilation_cache", False)


def host_info() -> dict:
    """Facts about the host that explain a number: CPU count and load when it was taken."""
    return {
        "host_cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "host": platform.node(),
    }


def device_info(devices: Sequence) -> dict:
    """Platform and device kind of the devices measured, plus the host facts."""
    import jax

    return {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "jax": jax.__version__,
        **host_info(),
    }


def timing_stats(seconds: Sequence[float]) -> dict:
    """Median and 90th percentile (nearest rank) of per-step times, in milliseconds."""
    ordered = sorted(seconds)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {
        "median_ms": round(1e3 * statistics.median(ordered), 3),
        "p90_ms": round(1e3 * p90, 3),
        "measured_steps": len(ordered),
    }


def time_alternating(runners: dict, warmup: int, steps: int) -> tuple[dict, dict]:
    """Wall and CPU seconds per call of each runner, calls alternating so that both see the
    same machine load; `warmup` untimed rounds first. Returns ({name: [s]}, {name: [s]})."""
    for _ in range(warmup):
        for run in runners.values():
            run()
    times = {name: [] for name in runners}
    cpu = {name: [] for name in runners}
    for _ in range(steps):
        for name, run in runners.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            run()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
    return times, cpu


def matmul_flops_per_s(n: int = 2048, repeats: int = 10) -> tuple[float, float]:
    """Median FLOP/s (and seconds) of a float32 n x n @ n x n matmul under XLA."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    jax.block_until_ready(f(a, b))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(a, b))
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    return 2 * n**3 / seconds, seconds


def flops_of(compiled) -> float | None:
    """FLOPs XLA's cost analysis assigns to one call of a compiled function."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def peak_bytes(compiled) -> int | None:
    """Per-device peak memory of a compiled function from XLA's memory analysis: arguments +
    outputs - aliased (donated) + temporaries."""
    memory = compiled.memory_analysis()
    if memory is None:
        return None
    return (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )


def emit(record: dict) -> None:
    """Prints one measurement as one JSON line, stamped with the UTC time."""
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    print(json.dumps({"time": stamp, **record}), flush=True)

"""Examples/s of `pipeline.create_iterator` against a plain numpy loop over the same source.

Ours: the training pipeline (grain, global order by `index_shuffle`, per-position augment
RNG, PIL geometry, `[-1, 1]` floats) with each `--threads` value as `worker_threads`. The
peer: a Python loop over the same TFDS data source (`shapes_tfds.shapes_data_source`) that
reads a permutation batch by batch, stacks the decoded images, normalises and flips them with
numpy, in the calling thread. Both produce float32 [B, S, S, 3] batches in [-1, 1]; the
measurements run one after another (a prefetching reader would gain from interleaving).

  python bench/input_pipeline.py
  python bench/input_pipeline.py --threads 0,2,8 --batches 100 --rounds 2

Prints one JSON line per measurement (see bench/README.md for the fields).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

import common
import numpy as np

from genctl_jax import configlib
from genctl_jax.data import pipeline, shapes_tfds


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/shapes_autoencoder.py", help="config file")
    p.add_argument("--image_size", type=int, default=32, help="shapes resolution (16/32/64/128)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--batches", type=int, default=50, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches (thread start-up)")
    p.add_argument("--threads", default="0,8", help="worker_threads values to measure")
    p.add_argument("--rounds", type=int, default=1, help="repeat every measurement")
    return p.parse_args(argv)


def peer_batches(image_size: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """The peer: shuffled batches of flipped [-1, 1] images from the raw TFDS data source."""
    source = shapes_tfds.shapes_data_source("train", image_size=image_size)
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(source))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = order[start : start + batch_size]
            images = np.stack([source[int(i)]["image"] for i in rows])
            images = images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
            flip = rng.random(batch_size) < 0.5
            images[flip] = images[flip, :, ::-1]
            yield images


def measure(batches: Iterator, warmup: int, count: int) -> dict:
    """Throughput over `count` batches after `warmup`, and the per-batch wait times."""
    for _ in range(warmup):
        next(batches)
    waits = []
    start = time.perf_counter()
    for _ in range(count):
        t = time.perf_counter()
        next(batches)
        waits.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    return {"elapsed_s": round(elapsed, 3), **common.timing_stats(waits)}


def main(argv=None) -> None:
    args = parse_args(argv)
    common.setup_jax(None)
    config = configlib.load_config(f"{args.config}:res={args.image_size}")
    config.data.batch_size = args.batch_size
    threads = [int(t) for t in args.threads.split(",") if t.strip()]

    results, peer_by_round = [], {}
    for round_index in range(args.rounds):
        peer = measure(
            peer_batches(args.image_size, args.batch_size, config.seed), args.warmup, args.batches
        )
        peer_by_round[round_index] = peer
        results.append(("numpy_loop_peer", None, round_index, peer))
        for n in threads:
            config.data.worker_threads = n
            data = pipeline.create_iterator(config.data, seed=config.seed)
            try:
                ours = measure(data, args.warmup, args.batches)
            finally:
                data.close()
            results.append(("pipeline.create_iterator", n, round_index, ours))

    examples = args.batches * args.batch_size
    for name, n, round_index, stats in results:
        peer = peer_by_round[round_index]
        common.emit(
            {
                "bench": "input_pipeline",
                "name": name,
                "worker_threads": n,
                "round": round_index,
                "dataset": f"shapes:train ({args.image_size} px)",
                "fields": list(config.data.fields),
                "random_flip": config.data.random_flip,
                **common.host_info(),
                "batch_size": args.batch_size,
                "batches": args.batches,
                **stats,
                "examples_per_s": round(examples / stats["elapsed_s"], 1),
                "ratio_vs_peer": round(stats["elapsed_s"] / peer["elapsed_s"], 3),
            }
        )


if __name__ == "__main__":
    main()

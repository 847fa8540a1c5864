"""One evaluation of a diffusion run: draw samples, score them with the requested metrics.

Metrics (`METRICS`):
  fid       Frechet Inception Distance of the samples to a reference set.
  kid       Kernel Inception Distance (mean and std over subsets); needs reference images.
  is        Inception Score of the samples (logits over all 1008 outputs, 10 splits).
  clip      CLIP score of the samples against their prompts (text-to-image runs).
  fidelity  The embedded shapes dataset's analytic checker: class or caption fidelity.
  control   Control fidelity on the shapes dataset: the samples' segmentation mIoU and edge
            F1 against the control maps they were generated from (`metrics.control`).

`fid`, `kid` and `is` run the FID InceptionV3 (`models.inception`, weights from
`inception_weights`); `clip` a transformers CLIPModel directory (`clip_model`). Features are
extracted on the mesh (the batch split over `data` x `fsdp`), gathered to every host and
accumulated there in float64, in sample order: the numbers do not depend on the device count.

References (`parse_reference`): the run's dataset or another one as `shapes[:SPLIT]`,
`tfds:NAME[:SPLIT]` or `folder:PATH` (images read through the training pipeline's resize
and centre crop, no augmentation), or `stats:FILE.npz` (precomputed mu, sigma, n; FID only).
Statistics and features of a dataset reference are cached in `cache_dir`, keyed by the
dataset, split, resolution, image count and Inception setting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from ml_collections.config_dict import placeholder

from genctl_jax.errors import ConfigError
from genctl_jax.metrics import distribution

METRICS = ("fid", "kid", "is", "clip", "fidelity", "control")
INCEPTION_METRICS = ("fid", "kid", "is")
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
IS_SPLITS = 10


# Scalars where lower is better; every other scalar is better higher.
LOWER_IS_BETTER = ("fid", "kid")


def default_config() -> ml_collections.ConfigDict:
    """The `config.eval` block: the trainer's periodic evaluation and the CLI's defaults."""
    c = ml_collections.ConfigDict()
    c.every_steps = 0  # Steps between evaluations while training (and the final step); 0: none.
    c.metrics = ("fid",)  # Some of METRICS.
    c.num_samples = 1000  # Samples per evaluation (papers: 50k for FID; 1k-10k while training).
    c.batch_size = 64  # Samples per generation / feature batch; a multiple of the batch devices.
    c.reference = placeholder(str)  # parse_reference's forms; None: the run's dataset.
    c.num_reference = placeholder(int)  # Reference images; None: as many as samples.
    c.inception_weights = placeholder(str)  # FID Inception safetensors (fid, kid, is).
    c.inception_precision = "highest"  # 'highest' or 'default' (models.inception.PRECISIONS).
    c.clip_model = placeholder(str)  # transformers CLIPModel directory (clip).
    c.seed = 0  # Sampling seed: every evaluation draws the same noise.
    # A scalar of the evaluation ('fid', 'fidelity/class', ...): the trainer keeps the
    # checkpoint that scores best on it in WORKDIR/best_checkpoint; '' keeps none.
    c.best_metric = ""
    return c


def validate(eval_config: ml_collections.ConfigDict, num_batch_devices: int) -> None:
    """Checks `config.eval` of a run that evaluates while training."""
    e = eval_config
    check_metrics(e.metrics)
    for field in ("every_steps", "num_samples", "batch_size"):
        if not isinstance(e[field], int) or e[field] < (0 if field == "every_steps" else 1):
            raise ConfigError(f"config.eval.{field}={e[field]!r}: expected a positive integer")
    if e.batch_size % num_batch_devices:
        raise ConfigError(
            f"config.eval.batch_size={e.batch_size} is not a multiple of the "
            f"{num_batch_devices} devices a batch is split over"
        )
    if e.inception_precision not in ("highest", "default"):
        raise ConfigError(
            f"config.eval.inception_precision={e.inception_precision!r}: expected 'highest' "
            f"or 'default'"
        )
    if e.best_metric and not e.every_steps:
        raise ConfigError(
            f"config.eval.best_metric={e.best_metric!r} needs evaluations: set "
            f"config.eval.every_steps > 0"
        )
    prefixes = {name.split("/")[0] for name in scalar_names(e.metrics)}
    if e.best_metric and e.best_metric.split("/")[0] not in prefixes:
        raise ConfigError(
            f"config.eval.best_metric={e.best_metric!r} is not a scalar of the metrics "
            f"{tuple(e.metrics)} (e.g. {', '.join(scalar_names(e.metrics))})"
        )


def scalar_names(metrics: Sequence[str]) -> list[str]:
    """Example scalar names each metric writes (fidelity's depend on the run: class/caption)."""
    names = {
        "fid": ["fid"],
        "kid": ["kid", "kid_std"],
        "is": ["inception_score", "inception_score_std"],
        "clip": ["clip_score"],
        "fidelity": ["fidelity/class", "fidelity/colour_shape"],
        "control": ["control/segmentation_miou", "control/edge_f1"],
    }
    return [n for m in metrics for n in names[m]]


def better(metric: str, value: float, best: float | None) -> bool:
    """Whether `value` of scalar `metric` beats `best` (None: nothing yet)."""
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


@dataclasses.dataclass(frozen=True)
class Reference:
    """Where reference statistics come from: a dataset (`name`, `split`) or a stats file."""

    spec: str  # As given.
    name: str | None = None  # A `config.data.name` ('shapes', 'tfds:...', 'folder:...').
    split: str | None = None  # Split to read; None: the dataset's train split.
    stats_file: str | None = None

    def slug(self, image_size: int, num_images: int, precision: str) -> str:
        digest = hashlib.sha1(f"{self.name}|{self.split}".encode()).hexdigest()[:8]
        short = re.sub(r"[^A-Za-z0-9]+", "_", f"{self.name}_{self.split}").strip("_")[:40]
        return f"{short}_{digest}_{image_size}px_n{num_images}_{precision}"


def parse_reference(spec: str) -> Reference:
    """'shapes[:SPLIT]' | 'tfds:NAME[:SPLIT]' | 'folder:PATH' | 'stats:FILE.npz'."""
    from genctl_jax.data import sources

    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"reference={spec!r}: {_REFERENCE_FORMS}")
    if spec.startswith("stats:"):
        path = spec[len("stats:") :]
        if not path:
            raise ConfigError(f"reference={spec!r} names no file; {_REFERENCE_FORMS}")
        return Reference(spec, stats_file=path)
    if spec == "shapes" or spec.startswith("shapes:"):
        split = spec[len("shapes:") :] or None
        return Reference(spec, name="shapes", split=split)
    try:
        parsed = sources.parse_name(spec)
    except Exception:
        raise ConfigError(f"reference={spec!r}: {_REFERENCE_FORMS}") from None
    return Reference(spec, name=spec, split=parsed.split)


_REFERENCE_FORMS = (
    "expected 'shapes[:SPLIT]', 'tfds:NAME[:SPLIT]', 'folder:PATH' or 'stats:FILE.npz'"
)


def check_metrics(metrics: Iterable[str]) -> tuple[str, ...]:
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ConfigError(f"metrics {list(metrics)}: expected some of {', '.join(METRICS)}")
    if len(set(metrics)) != len(metrics):
        raise ConfigError(f"metrics {list(metrics)} name one metric twice")
    return metrics


class InceptionFeatures:
    """The FID InceptionV3 on a mesh: host images -> (pool [n, 2048], logits [n, 1008])."""

    def __init__(self, weights: str, mesh: Mesh, batch_size: int, precision: str):
        from genctl_jax.models import inception
        from genctl_jax.trainers import generation

        generation.check_batch_size(batch_size, mesh, "the evaluation batch_size")
        self.params = inception.load_params(weights, mesh=mesh)
        self.mesh, self.batch_size, self.precision = mesh, batch_size, precision
        self._inception = inception

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(images)
        pools, logits = [], []
        for start in range(0, n, self.batch_size):
            batch = np.asarray(images[start : start + self.batch_size], np.float32)
            rows = len(batch)
            if rows < self.batch_size:  # One compiled shape: pad with copies, drop them.
                batch = np.concatenate([batch, np.repeat(batch[-1:], self.batch_size - rows, 0)])
            out = self._inception.extract_features(
                self.params,
                batch,
                input_range=(-1.0, 1.0),
                mesh=self.mesh,
                precision=self.precision,
            )
            pool, logit = multihost_utils.process_allgather(
                (out.pool, out.logits_unbiased), tiled=True
            )
            pools.append(np.asarray(pool)[:rows])
            logits.append(np.asarray(logit)[:rows])
        return np.concatenate(pools), np.concatenate(logits)


@dataclasses.dataclass
class ReferenceSet:
    stats: distribution.GaussianStats
    features: np.ndarray | None  # [n, 2048] float32; None for a stats file.


def reference_set(
    reference: Reference,
    extractor: InceptionFeatures,
    data_config: ml_collections.ConfigDict,
    num_images: int,
    cache_dir: pathlib.Path | None,
) -> ReferenceSet:
    """Statistics (and features) of the reference, from the cache when already computed."""
    if reference.stats_file:
        return ReferenceSet(distribution.load_stats(reference.stats_file), None)
    size = data_config.image_size
    slug = reference.slug(size, num_images, extractor.precision)
    if cache_dir is not None:
        stats_path, features_path = cache_dir / f"{slug}.npz", cache_dir / f"{slug}.features.npy"
        if stats_path.exists() and features_path.exists():
            logging.info("Reference statistics from the cache %s", stats_path)
            return ReferenceSet(distribution.load_stats(stats_path), np.load(features_path))
    images = reference_images(reference, data_config, num_images, extractor.batch_size)
    features, _ = extractor(images)
    accumulated = distribution.FeatureStatistics()
    accumulated.update(features)
    stats = accumulated.result()
    if cache_dir is not None and jax.process_index() == 0:
        cache_dir.mkdir(parents=True, exist_ok=True)
        distribution.save_stats(stats_path, stats, overwrite=True)
        np.save(features_path, features.astype(np.float32))
        (cache_dir / f"{slug}.json").write_text(
            json.dumps({"reference": reference.spec, "split": reference.split, "n": stats.n})
        )
    return ReferenceSet(stats, features)


def reference_images(
    reference: Reference, data_config: ml_collections.ConfigDict, num_images: int, batch: int
) -> np.ndarray:
    """The first `num_images` images of the reference split, [n, S, S, 3] in [-1, 1]."""
    from genctl_jax.data import pipeline

    config = ml_collections.ConfigDict(data_config.to_dict())
    config.name = reference.name
    if reference.name == "shapes" or reference.name.startswith("folder:"):
        config.split = reference.split or "train"
    config.update(
        shuffle=False, num_epochs=1, random_flip=False, random_crop=None, fields=("image",)
    )
    config.batch_size = batch
    data = pipeline.create_iterator(config, seed=0)
    try:
        available = data.steps_per_epoch * batch
        if available < num_images:
            raise ConfigError(
                f"reference {reference.spec!r} gives {available} images in batches of {batch}, "
                f"fewer than the {num_images} asked for; lower the reference image count"
            )
        images = []
        for _ in range(-(-num_images // batch)):
            images.append(multihost_utils.process_allgather(next(data)["image"], tiled=True))
    finally:
        data.close()
    return np.concatenate(images)[:num_images]


@dataclasses.dataclass
class Evaluator:
    """Scores samples of a run with `metrics` (see the module docstring).

    Reference statistics and the networks are loaded once, on first use, and reused by every
    `evaluate` call (a sweep, or each periodic evaluation of a training run).
    """

    metrics: Sequence[str]
    mesh: Mesh
    data_config: ml_collections.ConfigDict
    batch_size: int
    reference: str | None = None
    num_reference: int | None = None  # None: as many as samples.
    inception_weights: str | None = None
    inception_precision: str = "highest"
    clip_model: str | None = None
    cache_dir: pathlib.Path | None = None

    @classmethod
    def from_config(
        cls,
        eval_config: ml_collections.ConfigDict,
        mesh: Mesh,
        data_config: ml_collections.ConfigDict,
        workdir: pathlib.Path,
    ) -> Evaluator:
        """The evaluator of a `config.eval` block, caching references under WORKDIR/eval."""
        e = eval_config
        return cls(
            metrics=e.metrics,
            mesh=mesh,
            data_config=data_config,
            batch_size=e.batch_size,
            reference=e.reference,
            num_reference=e.num_reference,
            inception_weights=e.inception_weights,
            inception_precision=e.inception_precision,
            clip_model=e.clip_model,
            cache_dir=workdir / "eval" / "reference",
        )

    def __post_init__(self):
        self.metrics = check_metrics(self.metrics)
        self._features = self._clip = None
        self._references: dict[int, ReferenceSet] = {}
        self._reference = None
        if set(INCEPTION_METRICS) & set(self.metrics) and not self.inception_weights:
            from genctl_jax.models import inception

            raise ConfigError(
                "FID, KID and IS need the FID Inception weights: pass --inception_weights "
                "FILE.safetensors (config.eval.inception_weights); "
                + inception.WEIGHTS_HELP.format(output="FILE.safetensors")
            )
        if {"fid", "kid"} & set(self.metrics):
            self._reference = parse_reference(self.reference or self.data_config.name)
            if "kid" in self.metrics and self._reference.stats_file:
                raise ConfigError(
                    f"KID compares features, and reference {self._reference.spec!r} holds only "
                    f"statistics; use a dataset reference (shapes, tfds:..., folder:...) for kid"
                )
        checked = [m for m in ("fidelity", "control") if m in self.metrics]
        if checked and self.data_config.name != "shapes":
            raise ConfigError(
                f"the {checked[0]} metric needs the shapes dataset's analytic checker; this run "
                f"trains on {self.data_config.name!r}"
            )
        if "clip" in self.metrics and not self.clip_model:
            raise ConfigError(
                "the clip metric needs a CLIP model: pass --clip_model DIR (a transformers "
                "CLIPModel directory: config.json, model.safetensors, tokenizer files)"
            )

    @property
    def inception(self) -> InceptionFeatures:
        if self._features is None:
            self._features = InceptionFeatures(
                self.inception_weights, self.mesh, self.batch_size, self.inception_precision
            )
        return self._features

    def reference_for(self, num_samples: int) -> ReferenceSet:
        n = self.num_reference or num_samples
        if n not in self._references:
            self._references[n] = reference_set(
                self._reference, self.inception, self.data_config, n, self.cache_dir
            )
        return self._references[n]

    def evaluate(
        self,
        samples: np.ndarray,
        conditions: Sequence | None = None,
        controls: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, float]:
        """Scalars of every metric for [n, S, S, 3] samples in [-1, 1], their labels or
        prompts (None for an unconditional run) and, for `control`, the control maps they
        were generated from ({'segmentation': [n, S, S], 'edges': [n, S, S]}, either or both).
        """
        n = len(samples)
        out: dict[str, float] = {}
        if set(INCEPTION_METRICS) & set(self.metrics):
            pool, logits = self.inception(samples)
            if "fid" in self.metrics or "kid" in self.metrics:
                reference = self.reference_for(n)
            if "fid" in self.metrics:
                accumulated = distribution.FeatureStatistics()
                accumulated.update(pool)
                out["fid"] = distribution.fid(accumulated.result(), reference.stats)
            if "kid" in self.metrics:
                mean, std = distribution.kernel_inception_distance(
                    pool, reference.features, KID_SUBSETS, KID_SUBSET_SIZE
                )
                out.update(kid=mean, kid_std=std)
            if "is" in self.metrics:
                mean, std = distribution.inception_score(logits, min(IS_SPLITS, n))
                out.update(inception_score=mean, inception_score_std=std)
        if "clip" in self.metrics:
            out["clip_score"] = self._clip_score(samples, conditions)
        if "fidelity" in self.metrics:
            out.update(self._fidelity(samples, conditions))
        if "control" in self.metrics:
            from genctl_jax.metrics import control

            if not controls:
                raise ConfigError(
                    "the control metric scores samples against the control maps they were "
                    "generated from; this run takes no control input"
                )
            scores = control.shapes_control_fidelity(
                samples, controls.get("segmentation"), controls.get("edges")
            )
            out.update({f"control/{k}": v for k, v in scores.items()})
        return out

    def _clip_score(self, samples, prompts) -> float:
        if not prompts or not isinstance(prompts[0], str):
            raise ConfigError("the clip metric scores images against prompts: a text-to-image run")
        if self._clip is None:
            from genctl_jax.metrics.clip_score import CLIPScorer

            self._clip = CLIPScorer.load(self.clip_model, mesh=self.mesh)
        scores = []
        for start in range(0, len(samples), self.batch_size):
            chunk = list(prompts[start : start + self.batch_size])
            ids, mask = self._clip.tokenize(chunk)
            scores.append(self._clip.pair_scores(samples[start : start + len(chunk)], ids, mask))
        return float(np.concatenate(scores).mean())

    def _fidelity(self, samples, conditions) -> dict[str, float]:
        from genctl_jax.metrics import fidelity

        if conditions is None:
            raise ConfigError("the fidelity metric checks labels or prompts: a conditional run")
        if isinstance(conditions[0], str):
            scores = fidelity.caption_fidelity(samples, conditions)
        else:
            scores = fidelity.class_fidelity(samples, conditions)
        return {f"fidelity/{k}": v for k, v in scores.items()}


def headline(metric_values: Mapping[str, float]) -> str:
    """One line of the scalars, for logs and the CLI."""
    return ", ".join(f"{k} {v:.4g}" for k, v in metric_values.items())


def conditions_for(task, config, num_samples: int, prompts: Sequence[str] | None = None) -> Any:
    """Labels or prompts to sample `num_samples` images with (None: unconditional).

    Class-conditional runs cycle through the classes; text-to-image runs use `prompts`, or on
    the shapes dataset the captions of its test split.
    """
    if config.task.name == "controlnet" and prompts:
        raise ConfigError(
            "a ControlNet run is evaluated on the shapes test split's captions and control "
            "maps (controls_for); prompts from a file have no control maps"
        )
    if config.task.name in ("text_to_image", "controlnet"):
        if prompts:
            return [prompts[i % len(prompts)] for i in range(num_samples)]
        if config.data.name != "shapes":
            raise ConfigError(
                "this text-to-image run needs prompts to evaluate: pass --prompts_file FILE "
                "(one prompt per line)"
            )
        from genctl_jax.metrics import fidelity

        return fidelity.shapes_test_prompts(config.data, num_samples, repeat=True)
    if prompts:
        raise ConfigError("prompts given, but this run is not text-to-image")
    num_classes = getattr(task, "num_classes", 0)
    if not num_classes:
        return None
    return np.arange(num_samples, dtype=np.int32) % num_classes


def controls_for(task, config, num_samples: int) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """ControlNet runs: the control images to sample with (one array per ControlNet unit) and
    the maps the control metric compares the samples with (`segmentation`, `edges`), of the
    first `num_samples` examples of the shapes test split, cycled: the examples whose captions
    `conditions_for` gives."""
    if config.data.name != "shapes":
        raise ConfigError(
            f"evaluating a ControlNet run needs control maps: only the shapes dataset's test "
            f"split is supported, not {config.data.name!r}"
        )
    from genctl_jax.metrics import fidelity

    source = fidelity.shapes_test_source(config.data)
    examples = [source[i % len(source)] for i in range(num_samples)]
    batch = {
        k: np.stack([e[k] for e in examples]) for k in ("image", "edges", "segmentation", "depth")
    }
    # The model's control: as in training, from the uint8 maps (images in [-1, 1]).
    model_batch = dict(batch, image=batch["image"].astype(np.float32) / 127.5 - 1.0)
    controls = [task.control_from_batch(model_batch)]
    return controls, {"segmentation": batch["segmentation"], "edges": batch["edges"]}

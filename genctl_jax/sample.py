"""Sample a trained diffusion run into a PNG grid.

  python -m genctl_jax.sample --workdir DIR --num_samples 16 --sampler ddim --steps 50 \
      --eta 0 --guidance_scale 3 [--labels 0,1,2] [--seed 0] --out samples.png
  python -m genctl_jax.sample --workdir DIR --prompt "a large green star in the center" \
      [--prompt ...] [--negative_prompt "a red circle"] --guidance_scale 5 --out t2i.png

Uses the EMA params of the workdir's latest checkpoint (--checkpoint best: the one the
trainer kept for `config.eval.best_metric`), on whatever devices are present.
Options left unset come from the run's `config.sampling`. Labels and prompts are cycled
over the samples. For runs on the embedded shapes dataset, prints the fidelity judged by
the dataset's analytic checker: per class, or for text-to-image runs per prompt (without
--prompt, the prompts are the captions of the shapes test split).
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
from absl import app, flags, logging

from genctl_jax import cli, sampling_flags  # noqa: F401 - defines the shared flags
from genctl_jax.errors import ConfigError
from genctl_jax.io import images
from genctl_jax.parallel import distributed

flags.DEFINE_list("labels", None, "Class ids, cycled over the samples (default: 0, 1, 2, ...).")
flags.DEFINE_multi_string("prompt", None, "Text-to-image runs: a prompt (repeat the flag).")
flags.DEFINE_string("out", None, "PNG file to write (default: WORKDIR/samples.png).")

FLAGS = flags.FLAGS


def _sampling_config(config):
    sampling = config.sampling
    overrides = dict(
        sampler=FLAGS.sampler,
        num_steps=FLAGS.steps,
        eta=FLAGS.eta,
        guidance_scale=FLAGS.guidance_scale,
    )
    for key, value in overrides.items():
        if value is not None:
            sampling[key] = value
    return sampling


def _labels(num_classes: int, num_samples: int) -> np.ndarray | None:
    if not num_classes:
        if FLAGS.labels:
            raise ConfigError("--labels given, but this run's model is unconditional")
        return None
    try:
        given = [int(x) for x in FLAGS.labels] if FLAGS.labels else list(range(num_classes))
    except ValueError:
        raise ConfigError(f"--labels={','.join(FLAGS.labels)}: expected integers") from None
    bad = [x for x in given if not 0 <= x < num_classes]
    if bad:
        raise ConfigError(f"--labels holds {bad}, outside the model's classes 0..{num_classes - 1}")
    return np.resize(np.asarray(given, np.int32), num_samples)


def run() -> None:
    distributed.initialize()
    from genctl_jax.diffusion import samplers
    from genctl_jax.trainers import generation, saved_run
    from genctl_jax.trainers.diffusion import DiffusionTask, warn_if_unguidable

    n = 16 if FLAGS.num_samples is None else FLAGS.num_samples
    if n < 1:
        raise ConfigError(f"--num_samples={n}: expected at least 1")
    loaded = saved_run.load(FLAGS.workdir, checkpoint=FLAGS.checkpoint)
    config, task = loaded.config, loaded.task
    if not isinstance(task, DiffusionTask):
        raise ConfigError(
            f"{FLAGS.workdir} holds a {config.task.name!r} run; sampling needs a diffusion run"
        )
    sampling = _sampling_config(config)
    samplers.validate(sampling, config.diffusion)
    warn_if_unguidable(config, sampling.guidance_scale)
    options = samplers.options_from_config(sampling, config.diffusion)

    # One batch, padded to a multiple of the devices; the extra samples are dropped.
    padded = -(-n // generation.batch_ways(loaded.mesh)) * generation.batch_ways(loaded.mesh)
    if config.task.name == "text_to_image":
        conditions = prompts = _prompts(config, padded)
    else:
        if FLAGS.prompt or FLAGS.negative_prompt:
            raise ConfigError("--prompt and --negative_prompt need a text-to-image run")
        conditions = labels = _labels(task.num_classes, padded)
    generator = generation.Generator(
        task, loaded.mesh, options, padded, negative_prompt=FLAGS.negative_prompt
    )
    params = generation.with_text_encoder(task, loaded.params)
    samples = next(generator.draw(params, padded, FLAGS.seed or 0, conditions))[:n]

    out = pathlib.Path(FLAGS.out or pathlib.Path(FLAGS.workdir) / "samples.png")
    if jax.process_index() == 0:
        images.save_png(out, images.make_grid(images.to_uint8(samples)))
    logging.info(
        "Wrote %d samples of step %d (%s, %d steps, eta %s, guidance %s) to %s",
        n,
        loaded.step,
        options.sampler,
        options.num_steps,
        options.eta,
        options.guidance_scale,
        out,
    )
    print(f"wrote {out}")
    if config.data.name != "shapes":
        return
    from genctl_jax.metrics import fidelity

    where = f"analytic checker, {n} samples, guidance {options.guidance_scale}"
    if config.task.name == "text_to_image":
        scores = fidelity.caption_fidelity(samples, prompts[:n])
        print(
            f"prompt fidelity ({where}): colour and shape {scores['colour_shape']:.3f}, colour "
            f"{scores['colour']:.3f}, position {scores['position']:.3f}, size "
            f"{scores['size']:.3f}, all attributes {scores['all']:.3f}"
        )
    elif labels is not None:
        scores = fidelity.class_fidelity(samples, labels[:n])
        print(
            f"class fidelity ({where}): {scores['class']:.3f} (colour alone {scores['colour']:.3f})"
        )


def _prompts(config, count: int) -> list[str]:
    if FLAGS.labels:
        raise ConfigError("--labels given, but this is a text-to-image run; use --prompt")
    if FLAGS.prompt:
        given = list(FLAGS.prompt)
    elif config.data.name == "shapes":
        from genctl_jax.metrics import fidelity

        given = fidelity.shapes_test_prompts(config.data, count)
    else:
        raise ConfigError("this text-to-image run needs --prompt (repeat it for several)")
    return [given[i % len(given)] for i in range(count)]


def main(argv):
    del argv
    cli.run(run)


if __name__ == "__main__":
    app.run(main)

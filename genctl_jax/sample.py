"""Sample a trained diffusion run into a PNG grid.

  python -m genctl_jax.sample --workdir DIR --num_samples 16 --sampler ddim --steps 50 \
      --eta 0 --guidance_scale 3 [--labels 0,1,2] [--seed 0] --out samples.png
  python -m genctl_jax.sample --workdir DIR --prompt "a large green star in the center" \
      [--prompt ...] [--negative_prompt "a red circle"] --guidance_scale 5 --out t2i.png

Uses the EMA params of the workdir's latest checkpoint, on whatever devices are present.
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
from jax.sharding import NamedSharding, PartitionSpec

from genctl_jax import cli
from genctl_jax.errors import ConfigError
from genctl_jax.io import images
from genctl_jax.parallel import distributed
from genctl_jax.parallel.mesh import BATCH_AXES

flags.DEFINE_string("workdir", None, "Workdir of a training run.")
flags.DEFINE_integer("num_samples", 16, "Number of images.")
flags.DEFINE_string("sampler", None, "ddpm or ddim (default: the run's config.sampling).")
flags.DEFINE_integer("steps", None, "Denoising steps, at most the training T.")
flags.DEFINE_float("eta", None, "DDIM eta: 0 is deterministic, 1 is DDPM-like.")
flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale; 1 disables it.")
flags.DEFINE_list("labels", None, "Class ids, cycled over the samples (default: 0, 1, 2, ...).")
flags.DEFINE_multi_string("prompt", None, "Text-to-image runs: a prompt (repeat the flag).")
flags.DEFINE_string("negative_prompt", "", "Text-to-image runs: the prompt guidance steers from.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("out", None, "PNG file to write (default: WORKDIR/samples.png).")
flags.mark_flags_as_required(["workdir"])

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
    from genctl_jax.trainers import saved_run
    from genctl_jax.trainers.diffusion import DiffusionTask, warn_if_unguidable

    if FLAGS.num_samples < 1:
        raise ConfigError(f"--num_samples={FLAGS.num_samples}: expected at least 1")
    loaded = saved_run.load(FLAGS.workdir)
    config, task = loaded.config, loaded.task
    if not isinstance(task, DiffusionTask):
        raise ConfigError(
            f"{FLAGS.workdir} holds a {config.task.name!r} run; sampling needs a diffusion run"
        )
    sampling = _sampling_config(config)
    samplers.validate(sampling, config.diffusion)
    warn_if_unguidable(config, sampling.guidance_scale)
    options = samplers.options_from_config(sampling, config.diffusion)

    # Pad the batch to a multiple of the devices; the extra samples are dropped.
    n = FLAGS.num_samples
    padded = -(-n // loaded.mesh.size) * loaded.mesh.size
    key = jax.random.PRNGKey(FLAGS.seed)
    if config.task.name == "text_to_image":
        prompts = _prompts(config, padded)
        samples = _sample_text(loaded, prompts, key, padded, options)
    else:
        if FLAGS.prompt or FLAGS.negative_prompt:
            raise ConfigError("--prompt and --negative_prompt need a text-to-image run")
        labels = _labels(task.num_classes, padded)
        samples = _sample_labels(loaded, labels, key, padded, options)
    samples = np.asarray(jax.device_get(samples))[:n]

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


def _sample_labels(loaded, labels, key, count, options):
    batch_sharding = NamedSharding(loaded.mesh, PartitionSpec(BATCH_AXES))
    generate = jax.jit(
        lambda params, key, labels: loaded.task.generate(params, key, labels, count, options),
        out_shardings=NamedSharding(loaded.mesh, PartitionSpec()),
    )
    with jax.set_mesh(loaded.mesh):
        label_array = None if labels is None else jax.device_put(labels, batch_sharding)
        return generate(loaded.params, key, label_array)


def _sample_text(loaded, prompts, key, count, options):
    task = loaded.task
    params = dict(loaded.params)
    if "text_encoder" not in params:  # The run read cached embeddings: load the frozen encoder.
        from genctl_jax.models import text as text_lib

        params["text_encoder"] = text_lib.load_pretrained_params(task.encoder, task.text_config)
    batch_sharding = NamedSharding(loaded.mesh, PartitionSpec(BATCH_AXES))
    tokens = [task.tokenize(p) for p in (prompts, [FLAGS.negative_prompt] * count)]
    generate = jax.jit(
        lambda params, key, prompt, negative: task.generate_from_tokens(
            params, key, prompt, negative, count, options
        ),
        out_shardings=NamedSharding(loaded.mesh, PartitionSpec()),
    )
    with jax.set_mesh(loaded.mesh):
        prompt, negative = jax.device_put(tokens, batch_sharding)
        return generate(params, key, prompt, negative)


def main(argv):
    del argv
    cli.run(run)


if __name__ == "__main__":
    app.run(main)

"""Sample a trained diffusion or GAN run into a PNG grid.

  python -m genctl_jax.sample --workdir DIR --num_samples 16 --sampler ddim --steps 50 \
      --eta 0 --guidance_scale 3 [--labels 0,1,2] [--seed 0] --out samples.png
  python -m genctl_jax.sample --workdir DIR --prompt "a large green star in the center" \
      [--prompt ...] [--negative_prompt "a red circle"] --guidance_scale 5 --out t2i.png

ControlNet runs take one control image per ControlNet (module `control.files`: the map itself,
or with --extract_control an image / label-id map to extract it from):

  python -m genctl_jax.sample --workdir runs/shapes_cn --prompt "a large red circle" \
      --control edges.png [--conditioning_scale 0.8] [--control_start 0 --control_end 0.6]
  python -m genctl_jax.sample --workdir runs/shapes_cn --controlnet runs/shapes_cn_seg \
      --control edges.png --control seg.png --conditioning_scale 1,0.5      # multi-control
  python -m genctl_jax.sample --workdir runs/shapes_cn --prompt "" --guess_mode \
      --control edges.png                                                     # no prompt

GAN runs (`trainers.gan_sampling`) take their own inputs; the diffusion options are refused:

  python -m genctl_jax.sample --workdir runs/shapes_stylegan2 --num_samples 64 \
      [--truncation 0.7] [--seed 0]                         # psi < 1: towards the w average
  python -m genctl_jax.sample --workdir runs/shapes_pix2pix --control edges.png  # edge map
  python -m genctl_jax.sample --workdir runs/shapes_spade --control labels.png   # class-id PNG

(pix2pix 'seg' runs and SPADE read a greyscale PNG of class ids; without --control, a shapes
run translates the maps of the shapes test split and prints their control fidelity.)

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
flags.DEFINE_multi_string(
    "controlnet", None, "ControlNet runs applied besides --workdir's (multi-control; repeat)."
)
flags.DEFINE_multi_string(
    "control", None, "Control image file, one per ControlNet (--workdir's first; repeat)."
)
flags.DEFINE_list(
    "control_type", None, "What each ControlNet was trained on (checked against its run)."
)
flags.DEFINE_list(
    "conditioning_scale", None, "One per ControlNet, or one for all (default: each run's)."
)
flags.DEFINE_list("control_start", None, "Fraction of the steps each ControlNet starts at (0).")
flags.DEFINE_list("control_end", None, "Fraction of the steps each ControlNet stops at (1).")
flags.DEFINE_bool("guess_mode", False, "Control the conditional branch only (empty prompts).")
flags.DEFINE_float(
    "truncation",
    1.0,
    "StyleGAN2 runs: truncation psi in [0, 1] towards the run's tracked w average (1: none).",
)
flags.DEFINE_bool(
    "extract_control",
    False,
    "The --control files are the extractors' inputs: images (canny, sobel, scribble) or "
    "label-id maps (seg).",
)

CONTROL_FLAGS = (
    "controlnet",
    "control",
    "control_type",
    "conditioning_scale",
    "control_start",
    "control_end",
    "guess_mode",
    "extract_control",
)

# Options of the diffusion samplers, refused for GAN runs (in the order checked).
DIFFUSION_ONLY_FLAGS = (
    "sampler",
    "steps",
    "eta",
    "guidance_scale",
    "prompt",
    "negative_prompt",
    "labels",
    *(f for f in CONTROL_FLAGS if f != "control"),
)

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
    from genctl_jax.trainers import gan_sampling, generation, saved_run
    from genctl_jax.trainers.diffusion import DiffusionTask, warn_if_unguidable

    n = 16 if FLAGS.num_samples is None else FLAGS.num_samples
    if n < 1:
        raise ConfigError(f"--num_samples={n}: expected at least 1")
    if not 0.0 <= FLAGS.truncation <= 1.0:
        raise ConfigError(f"--truncation={FLAGS.truncation:g}: expected a value in [0, 1]")
    loaded = saved_run.load(FLAGS.workdir, checkpoint=FLAGS.checkpoint, for_sampling=True)
    config, task = loaded.config, loaded.task
    if gan_sampling.is_gan(config):
        _sample_gan(loaded, n)
        return
    if FLAGS["truncation"].present:
        raise ConfigError(
            f"--truncation needs a StyleGAN2 run; {FLAGS.workdir} holds a {config.task.name!r} run"
        )
    if not isinstance(task, DiffusionTask):
        raise ConfigError(
            f"{FLAGS.workdir} holds a {config.task.name!r} run; sampling needs a diffusion or "
            f"GAN run"
        )
    sampling = _sampling_config(config)
    samplers.validate(sampling, config.diffusion)
    warn_if_unguidable(config, sampling.guidance_scale)
    options = samplers.options_from_config(sampling, config.diffusion)

    # One batch, padded to a multiple of the devices; the extra samples are dropped.
    padded = -(-n // generation.batch_ways(loaded.mesh)) * generation.batch_ways(loaded.mesh)
    controls = ()
    params = generation.with_text_encoder(task, loaded.params)
    if config.task.name == "controlnet":
        task, params, controls = _controlnet_sampling(loaded, params)
    else:
        given = [f for f in CONTROL_FLAGS if FLAGS[f].value not in (None, False)]
        if given:
            raise ConfigError(f"--{given[0]} needs a ControlNet run; {FLAGS.workdir} is not one")
    if config.task.name in ("text_to_image", "controlnet"):
        conditions = prompts = _prompts(config, padded)
    else:
        if FLAGS.prompt or FLAGS.negative_prompt:
            raise ConfigError("--prompt and --negative_prompt need a text-to-image run")
        conditions = labels = _labels(task.num_classes, padded)
    generator = generation.Generator(
        task, loaded.mesh, options, padded, negative_prompt=FLAGS.negative_prompt
    )
    samples = next(generator.draw(params, padded, FLAGS.seed or 0, conditions, controls))[:n]

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
    if config.task.name == "controlnet":
        _print_edge_fidelity(task, controls, samples, where)
    if config.task.name in ("text_to_image", "controlnet"):
        if not _shapes_captions(prompts[:n]):
            print("prompt fidelity: not checked (prompts outside the shapes caption grammar)")
            return
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


def _sample_gan(loaded, n: int) -> None:
    """A GAN run's grid (module doc): StyleGAN2 from latents, pix2pix / SPADE from maps."""
    from genctl_jax.trainers import gan_sampling

    config, task, name = loaded.config, loaded.task, loaded.config.task.name
    given = [f for f in DIFFUSION_ONLY_FLAGS if FLAGS[f].present]
    if given:
        raise ConfigError(
            f"--{given[0]} is a diffusion sampling option; {FLAGS.workdir} holds a {name!r} GAN "
            f"run, which takes --num_samples, --seed, --out and "
            f"{'--truncation' if name == 'stylegan2' else '--control FILE'}"
        )
    if name != "stylegan2" and FLAGS["truncation"].present:
        raise ConfigError(
            f"--truncation needs a StyleGAN2 run; {FLAGS.workdir} holds a {name!r} run"
        )
    paths, maps, conditions = FLAGS.control or [], None, None
    if name == "stylegan2":
        if paths:
            raise ConfigError(
                f"--control given, but {FLAGS.workdir} holds an unconditional StyleGAN2 run"
            )
    else:
        kind = "label-id" if name == "spade" or config.task.condition == "seg" else "edge"
        if len(paths) > 1:
            raise ConfigError(
                f"a {name} run takes one --control file (a {kind} map, used for every sample); "
                f"got {len(paths)}"
            )
        if paths:
            conditions = gan_sampling.read_condition(task, config, paths[0])
        elif config.data.name == "shapes":
            maps = gan_sampling.shapes_test_maps(config.data, n)
            conditions = task.condition_from_batch(maps)
        else:
            raise ConfigError(f"this {name} run needs --control FILE (a {kind} map PNG)")
    samples = gan_sampling.generate(
        task,
        loaded.mesh,
        loaded.params,
        n,
        FLAGS.seed or 0,
        conditions=conditions,
        truncation=FLAGS.truncation,
    )
    out = pathlib.Path(FLAGS.out or pathlib.Path(FLAGS.workdir) / "samples.png")
    if jax.process_index() == 0:
        images.save_png(out, images.make_grid(images.to_uint8(samples)))
    logging.info(
        "Wrote %d samples of step %d (%s%s) to %s",
        n,
        loaded.step,
        name,
        f", truncation {FLAGS.truncation:g}" if name == "stylegan2" else "",
        out,
    )
    print(f"wrote {out}")
    if maps is None:
        return
    from genctl_jax.metrics import control

    scores = control.shapes_control_fidelity(
        samples, segmentations=maps["segmentation"], edges=maps["edges"]
    )
    print(
        f"control fidelity (analytic checker, {n} samples from the shapes test split's maps): "
        f"segmentation mIoU {scores['segmentation_miou']:.3f}, edge F1 {scores['edge_f1']:.3f} "
        f"(precision {scores['edge_precision']:.3f}, recall {scores['edge_recall']:.3f})"
    )


def _shapes_captions(prompts) -> bool:
    """Whether every prompt is in the shapes dataset's caption grammar (the checker's input)."""
    from genctl_jax.data import shapes
    from genctl_jax.errors import DataError

    try:
        for prompt in prompts:
            shapes.parse_caption(prompt)
    except DataError:
        return False
    return True


def _print_edge_fidelity(task, controls, samples, where: str) -> None:
    """Edge F1 of the samples' analytic edges against each edge-map control they followed."""
    from genctl_jax.metrics import control

    for unit, maps in zip(task.units, controls, strict=True):
        if unit.control_type != "edges":
            continue
        target = np.broadcast_to(maps[..., 0] > 0.5, samples.shape[:3])
        scores = control.shapes_control_fidelity(samples, edges=target)
        print(
            f"control fidelity ({where}, scale {unit.scale:g}): edge F1 {scores['edge_f1']:.3f} "
            f"(precision {scores['edge_precision']:.3f}, recall {scores['edge_recall']:.3f})"
        )


def _per_controlnet(flag: str, count: int, defaults: list[float]) -> list[float]:
    """A float list flag: one value per ControlNet, or one for all; `defaults` when unset."""
    given = FLAGS[flag].value
    if not given:
        return defaults
    try:
        values = [float(v) for v in given]
    except ValueError:
        raise ConfigError(f"--{flag}={','.join(given)}: expected numbers") from None
    if len(values) not in (1, count):
        raise ConfigError(
            f"--{flag} has {len(values)} values for {count} ControlNets; give one per "
            f"ControlNet or one for all"
        )
    return values * count if len(values) == 1 else values


def _controlnet_sampling(loaded, params):
    """The task (with its ControlNet units), params and control images of a ControlNet run
    and the --controlnet runs beside it, from the control flags."""
    from genctl_jax.control import files
    from genctl_jax.trainers import controlnet, saved_run

    workdirs = [FLAGS.workdir, *(FLAGS.controlnet or [])]
    runs = [loaded]
    for workdir in workdirs[1:]:
        run = saved_run.load(workdir, list(loaded.mesh.devices.flat), networks=["controlnet"])
        if run.config.task.name != "controlnet":
            raise ConfigError(f"--controlnet {workdir} holds a {run.config.task.name!r} run")
        runs.append(run)
    paths = FLAGS.control or []
    if len(paths) != len(runs):
        raise ConfigError(
            f"{len(runs)} ControlNets ({', '.join(workdirs)}) need one --control image each, in "
            f"that order; got {len(paths)}"
        )
    trained = [run.task.control_type for run in runs]
    if FLAGS.control_type is not None:
        if len(FLAGS.control_type) != len(runs):
            raise ConfigError(
                f"--control_type has {len(FLAGS.control_type)} values for {len(runs)} ControlNets"
            )
        for workdir, given, kind in zip(workdirs, FLAGS.control_type, trained, strict=True):
            if given != kind:
                raise ConfigError(
                    f"--control_type {given!r}: the ControlNet of {workdir} was trained on "
                    f"{kind!r} controls; sample it with {kind!r} control images"
                )
    count = len(runs)
    scales = _per_controlnet(
        "conditioning_scale", count, [run.task.conditioning_scale for run in runs]
    )
    starts = _per_controlnet("control_start", count, [0.0] * count)
    ends = _per_controlnet("control_end", count, [1.0] * count)
    units = [
        controlnet.ControlUnit(run.task.controlnet, kind, scale, start, end)
        for run, kind, scale, start, end in zip(runs, trained, scales, starts, ends, strict=True)
    ]
    task = loaded.task.with_controls(units, FLAGS.guess_mode)
    params = dict(params, controlnet=tuple(run.params["controlnet"] for run in runs))
    size = loaded.config.data.image_size
    controls = [
        files.read_control(
            path,
            unit.control_type,
            unit.module.conditioning_channels,
            unit.module.conditioning_factor * size,
            extract=FLAGS.extract_control,
        )
        for path, unit in zip(paths, units, strict=True)
    ]
    return task, params, controls


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

"""Evaluate a trained diffusion run: FID, KID, IS, CLIP score, analytic fidelity; sweeps.

  python -m genctl_jax.evaluate --workdir DIR --metrics fid,kid,is --num_samples 10000 \
      --reference tfds:cifar10:train --inception_weights fid_inception.safetensors
  python -m genctl_jax.evaluate --workdir DIR --metrics fid,fidelity --reference shapes:test \
      --sweep guidance_scale=1,2,3,5 --inception_weights ...
  python -m genctl_jax.evaluate --workdir DIR --metrics clip --clip_model /models/clip \
      --prompts_file prompts.txt

Writes WORKDIR/eval/NAME.json (the metrics, the sampler settings, the checkpoint step and
the reference) and, with --sweep, WORKDIR/eval/NAME.png: each metric against the swept
value (the FID-vs-guidance and FID-vs-steps curves of the DDIM and classifier-free guidance
papers). Unset options come from the run's `config.eval` and `config.sampling`. Reference
statistics of a dataset are cached in WORKDIR/eval/reference/. Samples come from the EMA
params of the latest checkpoint (--checkpoint best: the one the trainer kept for
`config.eval.best_metric`), on whatever devices are present; the numbers do not depend on
the device count.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from genctl_jax import cli, sampling_flags  # noqa: F401 - defines the shared flags
from genctl_jax.errors import ConfigError
from genctl_jax.parallel import distributed

flags.DEFINE_list(
    "metrics", None, "Some of fid,kid,is,clip,fidelity,control (default: config.eval)."
)
flags.DEFINE_string(
    "reference",
    None,
    "shapes[:SPLIT] | tfds:NAME[:SPLIT] | folder:PATH | stats:FILE.npz (default: config.eval, "
    "else the run's dataset).",
)
flags.DEFINE_integer("num_reference", None, "Reference images (default: as many as samples).")
flags.DEFINE_string("inception_weights", None, "FID Inception safetensors (fid, kid, is).")
flags.DEFINE_enum("inception_precision", None, ["highest", "default"], "Inception conv precision.")
flags.DEFINE_string("clip_model", None, "transformers CLIPModel directory (clip).")
flags.DEFINE_string("prompts_file", None, "Text-to-image runs: prompts, one per line.")
flags.DEFINE_integer("batch_size", None, "Samples per batch (default: config.eval).")
flags.DEFINE_string(
    "sweep",
    None,
    "FIELD=V1,V2,...: evaluate each value of guidance_scale, steps, eta or (ControlNet runs) "
    "conditioning_scale.",
)
flags.DEFINE_string("name", None, "Output name under WORKDIR/eval (default: from the settings).")
flags.DEFINE_bool("overwrite", False, "Replace an existing WORKDIR/eval/NAME.json and .png.")

FLAGS = flags.FLAGS

# --sweep fields: the config.sampling field each sets, and its type.
SWEEP_FIELDS = {
    "guidance_scale": ("guidance_scale", float),
    "steps": ("num_steps", int),
    "eta": ("eta", float),
    "conditioning_scale": (None, float),  # ControlNet runs: not a sampler setting.
}


def parse_sweep(spec: str | None) -> tuple[str, list] | None:
    """'guidance_scale=1,2,3' -> ('guidance_scale', [1.0, 2.0, 3.0])."""
    if not spec:
        return None
    field, _, values = spec.partition("=")
    if field not in SWEEP_FIELDS or not values:
        raise ConfigError(
            f"--sweep={spec!r}: expected FIELD=V1,V2,... with FIELD one of "
            f"{', '.join(SWEEP_FIELDS)}"
        )
    kind = SWEEP_FIELDS[field][1]
    try:
        parsed = [kind(v) for v in values.split(",")]
    except ValueError:
        raise ConfigError(f"--sweep={spec!r}: values must be {kind.__name__}s") from None
    return field, parsed


def eval_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run's `config.eval` (defaults for runs saved before it existed) with the flags."""
    from genctl_jax.metrics import evaluation

    e = evaluation.default_config()
    if "eval" in config:
        e.update(config.eval.to_dict())
    e.update(every_steps=0, best_metric="")  # The trainer's fields.
    flag_fields = (
        "num_samples",
        "reference",
        "num_reference",
        "inception_weights",
        "inception_precision",
        "clip_model",
        "batch_size",
        "seed",
    )
    for field in flag_fields:
        if FLAGS[field].value is not None:
            e[field] = FLAGS[field].value
    if FLAGS.metrics is not None:
        e.metrics = tuple(FLAGS.metrics)
    return e


def sampling_options(config, overrides: dict):
    from genctl_jax.diffusion import samplers

    sampling = ml_collections.ConfigDict(config.sampling.to_dict())
    for key, value in overrides.items():
        if value is not None:
            sampling[key] = value
    samplers.validate(sampling, config.diffusion)
    return samplers.options_from_config(sampling, config.diffusion)


def default_name(step: int, options, sweep) -> str:
    if sweep:
        return f"step{step}_sweep_{sweep[0]}"
    return f"step{step}_{options.sampler}{options.num_steps}_g{options.guidance_scale:g}"


def write_plot(path: pathlib.Path, field: str, rows: list[dict]) -> None:
    """One panel per scalar against the swept value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in rows[0]["metrics"] if not k.endswith("_std")]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    xs = [row["value"] for row in rows]
    for ax, name in zip(axes[0], names, strict=True):
        ys = [row["metrics"][name] for row in rows]
        std = [row["metrics"].get(f"{name}_std") for row in rows]
        if all(s is not None for s in std):
            ax.errorbar(xs, ys, yerr=std, marker="o", capsize=3)
        else:
            ax.plot(xs, ys, marker="o")
        ax.set_xlabel(field)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run() -> None:
    distributed.initialize()
    from genctl_jax.metrics import evaluation
    from genctl_jax.trainers import generation, saved_run
    from genctl_jax.trainers.diffusion import DiffusionTask, warn_if_unguidable

    sweep = parse_sweep(FLAGS.sweep)
    loaded = saved_run.load(FLAGS.workdir, checkpoint=FLAGS.checkpoint)
    config, task = loaded.config, loaded.task
    if not isinstance(task, DiffusionTask):
        raise ConfigError(
            f"{FLAGS.workdir} holds a {config.task.name!r} run; evaluation needs a diffusion run"
        )
    e = eval_config(config)
    evaluation.validate(e, generation.batch_ways(loaded.mesh))
    base = dict(sampler=FLAGS.sampler, num_steps=FLAGS.steps, eta=FLAGS.eta)
    base["guidance_scale"] = FLAGS.guidance_scale
    values = sweep[1] if sweep else [None]
    settings = []
    if sweep and sweep[0] == "conditioning_scale" and config.task.name != "controlnet":
        raise ConfigError("--sweep conditioning_scale=... needs a ControlNet run")
    for value in values:
        overrides = dict(base)
        if sweep and SWEEP_FIELDS[sweep[0]][0]:
            overrides[SWEEP_FIELDS[sweep[0]][0]] = value
        settings.append((value, sampling_options(config, overrides)))
        warn_if_unguidable(config, settings[-1][1].guidance_scale)

    workdir = pathlib.Path(FLAGS.workdir)
    name = FLAGS.name or default_name(loaded.step, settings[0][1], sweep)
    out = workdir / "eval" / f"{name}.json"
    plot = out.with_suffix(".png")
    for path in (out, plot) if sweep else (out,):
        if path.exists() and not FLAGS.overwrite:
            raise ConfigError(f"{path} exists; pass --overwrite to replace it, or --name")

    prompts = None
    if FLAGS.prompts_file:
        prompts = [p for p in pathlib.Path(FLAGS.prompts_file).read_text().splitlines() if p]
        if not prompts:
            raise ConfigError(f"--prompts_file={FLAGS.prompts_file} holds no prompts")
    conditions = evaluation.conditions_for(task, config, e.num_samples, prompts)
    controls, control_maps = (), None
    if config.task.name == "controlnet":
        controls, control_maps = evaluation.controls_for(task, config, e.num_samples)
    evaluator = evaluation.Evaluator.from_config(e, loaded.mesh, config.data, workdir)
    params = generation.with_text_encoder(task, loaded.params)
    rows = []
    for value, options in settings:
        setting_task = task
        if sweep and sweep[0] == "conditioning_scale":
            unit = dataclasses.replace(task.units[0], scale=value)
            setting_task = task.with_controls([unit])
        generator = generation.Generator(
            setting_task, loaded.mesh, options, e.batch_size, negative_prompt=FLAGS.negative_prompt
        )
        draws = generator.draw(params, e.num_samples, e.seed, conditions, controls)
        samples = np.concatenate(list(draws))
        scores = evaluator.evaluate(samples, conditions, control_maps)
        label = f"{sweep[0]}={value}: " if sweep else ""
        print(f"{label}{evaluation.headline(scores)}", flush=True)
        rows.append(
            {
                "value": value,
                "sampling": {
                    "sampler": options.sampler,
                    "num_steps": options.num_steps,
                    "eta": options.eta,
                    "guidance_scale": options.guidance_scale,
                },
                "metrics": scores,
            }
        )

    if jax.process_index() != 0:
        return
    report = {
        "workdir": str(workdir),
        "checkpoint": FLAGS.checkpoint,
        "step": loaded.step,
        "num_samples": e.num_samples,
        "seed": e.seed,
        "negative_prompt": FLAGS.negative_prompt,
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if {"fid", "kid"} & set(e.metrics):
        report["reference"] = e.reference or config.data.name
        report["num_reference"] = e.num_reference or e.num_samples
    if set(evaluation.INCEPTION_METRICS) & set(e.metrics):
        report["inception_precision"] = e.inception_precision
    if sweep:
        report["sweep"] = {"field": sweep[0], "values": values}
        report["results"] = rows
    else:
        report.update(sampling=rows[0]["sampling"], metrics=rows[0]["metrics"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    logging.info("Wrote %s", out)
    print(f"wrote {out}")
    if sweep:
        write_plot(plot, sweep[0], rows)
        print(f"wrote {plot}")


def main(argv):
    del argv
    cli.run(run)


if __name__ == "__main__":
    app.run(main)

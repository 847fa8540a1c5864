"""Flags of the CLIs that sample a trained run (`sample`, `evaluate`).

Defined once here and imported by both, so both CLIs can live in one process (tests,
notebooks) without absl's duplicate-flag error.
"""

from absl import flags

flags.DEFINE_string("workdir", None, "Workdir of a training run.")
flags.DEFINE_enum(
    "checkpoint",
    "latest",
    ["latest", "best"],
    "Which params: the latest checkpoint's, or the one kept for config.eval.best_metric.",
)
flags.DEFINE_integer(
    "num_samples", None, "Number of images (sample: 16; evaluate: config.eval.num_samples)."
)
flags.DEFINE_string("sampler", None, "ddpm or ddim (default: the run's config.sampling).")
flags.DEFINE_integer("steps", None, "Denoising steps, at most the training T.")
flags.DEFINE_float("eta", None, "DDIM eta: 0 is deterministic, 1 is DDPM-like.")
flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale; 1 disables it.")
flags.DEFINE_string("negative_prompt", "", "Text-to-image runs: the prompt guidance steers from.")
flags.DEFINE_integer("seed", None, "Sampling seed (sample: 0; evaluate: config.eval.seed).")
flags.mark_flags_as_required(["workdir"])

"""A ControlNet on the frozen shapes text-to-image model, conditioned on the dataset's edge maps.

Launch (after training the base, which this run reads from its workdir):

  python -m genctl_jax.train --config configs/shapes_t2i.py --workdir runs/shapes_t2i
  python -m genctl_jax.train --config configs/shapes_controlnet.py --workdir runs/shapes_cn

The base UNet and its T5 encoder (EMA params of the base run's latest checkpoint) stay frozen;
only the ControlNet, initialised from the base UNet's trunk with zero convs, trains. Prompts
are dropped half of the time (the paper's 50%), so the ControlNet learns to read the control
on its own. The control is the shapes dataset's `edges` map (one-pixel object contours);
the data is the base's (single-object 32 x 32 scenes, whose captions the base's tokenizer and
max_length fit).

Variants (comma-separated after a colon):
  control=seg      the `segmentation` label map as VOC palette colours instead of edges.
  base=DIR         the base run's workdir (default runs/shapes_t2i).
  steps=N          train steps.
  tiny             tests: the tiny t2i base (configs/shapes_t2i.py:tiny), a few steps.
"""

import importlib.util
from pathlib import Path

from genctl_jax import configlib
from genctl_jax.models import controlnet
from genctl_jax.trainers import controlnet as controlnet_trainer
from genctl_jax.trainers import optim

# The base recipe (config files are loaded by path).
_spec = importlib.util.spec_from_file_location(
    "shapes_t2i", Path(__file__).with_name("shapes_t2i.py")
)
shapes_t2i = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shapes_t2i)

# control type -> the dataset field it reads.
CONTROL_FIELDS = {"edges": "edges", "seg": "segmentation"}


def get_config(arg=None):
    arg = configlib.parse_arg(arg, tiny=False, steps=2000, control="edges", base="runs/shapes_t2i")
    base = shapes_t2i.get_config("tiny" if arg.tiny else None)
    c = configlib.base_config()

    c.data = base.data
    if arg.control not in CONTROL_FIELDS:
        # The task's validation names the accepted types; keep the data fields sensible here.
        c.data.fields = ("image", "caption")
    else:
        c.data.fields = ("image", "caption", CONTROL_FIELDS[arg.control])

    c.controlnet = controlnet_trainer.default_config()
    c.controlnet.base_workdir = arg.base
    c.controlnet.control_type = arg.control
    c.controlnet.conditioning_scale = 1.0

    # The ControlNet copies the base UNet's trunk; the hint encoder downsamples by the UNet's
    # patch size (2 here: one strided step).
    hint = (8, 16) if arg.tiny else (16, 32, 64)
    c.model = controlnet.config_from_unet(base.model, hint_channels=hint, conditioning_factor=1)

    # The base's schedule and sampler (the task checks the schedule against the base run's).
    c.diffusion = base.diffusion
    c.sampling = base.sampling

    c.task.name = "controlnet"
    c.task.cond_drop_prob = 0.5  # Prompts replaced by the empty prompt (the paper's 50%).

    c.optimizers.controlnet = optim.default_config(
        name="adamw", learning_rate=1e-4, warmup_steps=100, schedule="constant"
    )

    c.trainer.num_train_steps = arg.steps
    c.trainer.ema_decay = 0.995
    c.trainer.log_every = 100
    c.trainer.checkpoint_every = 1000
    c.trainer.sample_every = 1000
    c.trainer.num_samples = 16

    if arg.tiny:
        c.optimizers.controlnet.warmup_steps = 1
        c.optimizers.controlnet.learning_rate = 1e-3
        c.sampling.num_steps = 2
        configlib.tiny_trainer(c.trainer, 2)
        c.sharding.max_replicated_fraction = base.sharding.max_replicated_fraction
    return c

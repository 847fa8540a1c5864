"""ControlNet training on a frozen text-to-image base (Zhang, Rao & Agrawala 2023).

Networks:
  controlnet    trained (`config.optimizers.controlnet`); `config.model` is its config (a
                `models.controlnet` block whose trunk copies the base UNet's layout). A new run
                starts it from the base UNet (`controlnet.init_from_unet`): trunk copied, hint
                encoder random, zero convs zero, so step 0 reproduces the base exactly.
  model         the base UNet, frozen: the EMA params of the text-to-image run in
                `config.controlnet.base_workdir` (`saved_run.load`), built from that run's
                `config.model`.
  text_encoder  frozen too, from the same run (with its `config.text`); absent when that run
                read cached embeddings (then the cache is read here as well).
Only `controlnet` is in a phase, so the step differentiates its params alone (the frozen ones
are constants of the loss: no gradients, no optimizer state, no EMA copy). Each frozen network
is held once, sharded by `config.sharding.network_rules.<name>` when given, else by the
default rules.

Condition. `config.controlnet.control_type` names how the batch gives the control image,
computed on the host in `prepare_batch` as float32 [B, H, W, conditioning_channels] in [0, 1]
(batch field `control`): 'edges' (the dataset's own `edges` map), 'seg' (the `segmentation`
label map as `control.seg_color_map` colours), 'depth' (the `depth` map), or an extractor run
on the image ('canny', 'sobel', 'scribble').

Loss: the base's diffusion loss with the ControlNet's residuals added (conditioning scale 1),
the prompt replaced by the empty prompt with probability `config.task.cond_drop_prob` (0.5 in
the paper: the ControlNet learns to read the control without a prompt).

Sampling (`generate_from_tokens`, with the task's `units`; `with_controls` sets them) applies
one or several ControlNets on the same frozen base (multi-control: their residuals are summed),
each a `ControlUnit` with its own control image, conditioning scale and active fraction of the
denoising steps: on at step i of N iff start <= i / N and (i + 1) / N <= end, as diffusers'
control_guidance_start / _end. Classifier-free guidance applies the control to both the
conditional and the unconditional branch; in guess mode only to the conditional one, with the
residuals weighted from 0.1 (first skip) to 1 (middle block) on a log scale, so the ControlNet
can steer with an empty prompt (the paper's guess mode; diffusers' `guess_mode`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from genctl_jax import control as control_lib
from genctl_jax import models
from genctl_jax.diffusion import samplers
from genctl_jax.errors import ConfigError
from genctl_jax.models import controlnet as controlnet_lib
from genctl_jax.models import unet
from genctl_jax.parallel import sharding
from genctl_jax.trainers.task import Phase
from genctl_jax.trainers.text_to_image import TextToImageTask

# control_type -> the batch field it reads.
CONTROL_SOURCES = {
    "edges": "edges",
    "seg": "segmentation",
    "depth": "depth",
    "canny": "image",
    "sobel": "image",
    "scribble": "image",
}
FROZEN = ("model", "text_encoder")  # The base run's networks this task holds frozen.
BASE_TASK = "text_to_image"


@dataclasses.dataclass(frozen=True)
class ControlUnit:
    """One ControlNet applied when sampling (module doc: multi-control, scheduling)."""

    module: controlnet_lib.ControlNet
    control_type: str  # What it was trained on (CONTROL_SOURCES); names it in messages.
    scale: float = 1.0  # Conditioning scale of its residuals.
    start: float = 0.0  # Fraction of the denoising steps after which it starts...
    end: float = 1.0  # ...and after which it stops.

    def __post_init__(self):
        what = f"the {self.control_type!r} ControlNet's"
        if isinstance(self.scale, bool) or not self.scale >= 0.0:
            raise ConfigError(f"{what} conditioning scale is {self.scale!r}; expected >= 0")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ConfigError(
                f"{what} control start {self.start!r} and end {self.end!r}: expected "
                f"0 <= start < end <= 1 (fractions of the denoising steps)"
            )

    def active_steps(self, num_steps: int) -> np.ndarray:
        """[num_steps] float32: 1 on the steps this unit runs on, else 0 (float64 rule)."""
        i = np.arange(num_steps)
        on = (i / num_steps >= self.start) & ((i + 1) / num_steps <= self.end)
        return on.astype(np.float32)


def guess_mode_weights(num_skips: int) -> np.ndarray:
    """[num_skips + 1] weights of the skips' residuals and, last, the middle block's: from 0.1
    to 1 evenly on a log scale (diffusers' `torch.logspace(-1, 0, num_skips + 1)`)."""
    return np.logspace(-1.0, 0.0, num_skips + 1).astype(np.float32)


def default_config() -> ml_collections.ConfigDict:
    """The `config.controlnet` block (one line per field)."""
    c = ml_collections.ConfigDict()
    c.base_workdir = ""  # Workdir of the text-to-image run whose EMA params are the frozen base.
    c.control_type = "edges"  # One of CONTROL_SOURCES: how the batch gives the control image.
    c.conditioning_scale = 1.0  # Scale of the residuals when sampling (training uses 1).
    return c


def _has_checkpoint(workdir: pathlib.Path) -> bool:
    directory = workdir / "checkpoints"
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def base_run_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config of the base text-to-image run, read from its workdir's config.json; a
    ConfigError when the workdir holds no such run or no checkpoint yet."""
    if "controlnet" not in config or not config.controlnet.get("base_workdir"):
        raise ConfigError(
            "config.controlnet.base_workdir is not set: a ControlNet trains on a frozen "
            "text-to-image run; give that run's --workdir"
        )
    workdir = pathlib.Path(config.controlnet.base_workdir)
    config_file = workdir / "config.json"
    if not config_file.exists() or not _has_checkpoint(workdir):
        what = "no run (no config.json)" if not config_file.exists() else "no checkpoint yet"
        raise ConfigError(
            f"config.controlnet.base_workdir={str(workdir)!r} holds {what}. Train the base "
            f"text-to-image model first: python -m genctl_jax.train --config "
            f"configs/shapes_t2i.py --workdir {workdir}"
        )
    base = ml_collections.ConfigDict(json.loads(config_file.read_text()))
    if base.task.name != BASE_TASK:
        raise ConfigError(
            f"config.controlnet.base_workdir={str(workdir)!r} holds a {base.task.name!r} run; "
            f"the base of a ControlNet must be a {BASE_TASK!r} run"
        )
    return base


def base_view(
    config: ml_collections.ConfigDict, base: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
    """`config` with the base run's UNet (`model`) and `text` blocks: what the inherited
    text-to-image code (encoder, tokenizer, base UNet, its checks) reads."""
    view = ml_collections.ConfigDict(config.to_dict())
    view.model = ml_collections.ConfigDict(base.model.to_dict())
    view.text = ml_collections.ConfigDict(base.text.to_dict())
    return view


class ControlNetTask(TextToImageTask):
    """Trains a ControlNet beside a frozen text-to-image UNet and text encoder."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.base_config = base_run_config(config)
        # The base UNet, encoder, tokenizer and schedule come from the base run's config.
        super().__init__(base_view(config, self.base_config))
        self.config = config
        self.controlnet = models.build(config.model)
        self.control_type = config.controlnet.control_type
        self.conditioning_scale = float(config.controlnet.conditioning_scale)
        self.units = (
            ControlUnit(self.controlnet, self.control_type, scale=self.conditioning_scale),
        )
        self.guess_mode = False

    def with_controls(self, units: Sequence[ControlUnit], guess_mode: bool = False):
        """A copy of this task that samples with `units` (in the order of the ControlNet
        params and control images given to `generate_from_tokens`), in guess mode if asked."""
        if not units:
            raise ConfigError("sampling a ControlNet run needs at least one ControlUnit")
        for unit in units:
            controlnet_lib.check_matches_unet(
                unit.module,
                self.model,
                controlnet_source=f"the {unit.control_type!r} ControlNet",
                unet_source=f"the base UNet ({self.config.controlnet.base_workdir})",
            )
        task = copy.copy(self)
        task.units, task.guess_mode = tuple(units), bool(guess_mode)
        return task

    # ---- Condition.

    def control_from_batch(self, batch) -> np.ndarray:
        """The control images of a host batch: float32 [B, H, W, channels] in [0, 1]."""
        kind, channels = self.control_type, self.config.model.conditioning_channels
        source = np.asarray(batch[CONTROL_SOURCES[kind]])
        if kind == "edges":
            if source.dtype != np.uint8:  # The pipeline resizes uint8 maps to floats in [0, 1].
                source = np.clip(np.rint(source * 255.0), 0, 255).astype(np.uint8)
            out = control_lib.to_model_input(source, channels)
        elif kind == "seg":
            out = control_lib.extract("seg", source.astype(np.int32), channels=channels)
        elif kind == "depth":
            out = control_lib.extract("depth", source, channels=channels)
        else:  # An extractor on the image, which the pipeline gives in [-1, 1].
            out = control_lib.extract(kind, source, channels=channels, value_range=(-1.0, 1.0))
        return np.asarray(out, np.float32)

    def prepare_batch(self, batch):
        batch = super().prepare_batch(batch)
        batch["control"] = self.control_from_batch(batch)
        source = CONTROL_SOURCES[self.control_type]
        if source != "image":
            batch.pop(source)  # Only the control image travels to the devices.
        return batch

    # ---- Networks.

    def _dummy_inputs(self, batch_size: int = 1) -> dict:
        size, m = self.config.data.image_size, self.config.model
        f = m.conditioning_factor
        return dict(
            x=jnp.zeros((batch_size, size, size, m.in_channels), jnp.float32),
            t=jnp.zeros((batch_size,), jnp.int32),
            condition=jnp.zeros((batch_size, f * size, f * size, m.conditioning_channels)),
            context=jnp.zeros((batch_size, self.max_length, self.encoder.hidden_size)),
            context_mask=jnp.ones((batch_size, self.max_length), jnp.int32),
            pooled=(
                jnp.zeros((batch_size, self.encoder.pooled_size))
                if self.text_config.use_pooled
                else None
            ),
        )

    def _residuals(self, module, controlnet_params, x, t, cond, control, scale, dropout_rng=None):
        """One ControlNet's (down, mid) residuals, already times `scale` (scalar or [B]).

        dropout_rng: None for inference; else the ControlNet runs in train mode with it."""
        pooled = cond["pooled"] if self.text_config.use_pooled else None
        train = dropout_rng is not None
        return module.apply(
            {"params": controlnet_params},
            x,
            t,
            control,
            context=cond["hidden"],
            context_mask=cond["mask"],
            pooled=pooled,
            conditioning_scale=scale,
            train=train,
            rngs={"dropout": dropout_rng} if train else None,
        )

    def controlled_output(self, params, x, t, cond, control, scale, *, dropout_rng=None):
        """The base UNet's output with this run's ControlNet's residuals (times `scale`) added;
        the frozen base always runs in inference mode."""
        down, mid = self._residuals(
            self.controlnet, params["controlnet"], x, t, cond, control, scale, dropout_rng
        )
        return self._unet(params, x, t, cond, down_residuals=down, mid_residual=mid)

    # ---- Task API.

    def init_params(self, rng, batch):
        k_base, k_control = jax.random.split(rng)
        params = super().init_params(k_base, batch)  # Replaced by the base run's params.
        params["controlnet"] = self.controlnet.init(k_control, **self._dummy_inputs())["params"]
        return params

    @property
    def phases(self):
        return (Phase("denoise", ("controlnet",), self.loss),)

    def pretrained_params(self, shardings):
        """The base run's UNet and text encoder (EMA params), and the ControlNet initialised
        from that UNet, each placed by its network's shardings."""
        from genctl_jax.trainers import saved_run

        mesh = jax.tree.leaves(shardings["controlnet"])[0].mesh
        workdir = self.config.controlnet.base_workdir
        base = saved_run.load(workdir, list(mesh.devices.flat))
        logging.info("Frozen base: %s at step %d", workdir, base.step)
        out = {}
        for name in FROZEN:
            if name not in shardings:
                continue
            if name not in base.params:
                raise ConfigError(
                    f"the base run {workdir} has no {name!r} params; it has "
                    f"{', '.join(base.params)}"
                )
            out[name] = jax.device_put(base.params[name], shardings[name])

        def init(key, unet_params):
            fresh = nn.unbox(self.controlnet.init(key, **self._dummy_inputs())["params"])
            return controlnet_lib.init_from_unet(fresh, unet_params)

        key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), 3)
        rules = sharding.rules_for(self.config.sharding, "controlnet")
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            out["controlnet"] = jax.jit(init, out_shardings=shardings["controlnet"])(
                key, out["model"]
            )
        return out

    def loss(self, params, batch, rng, step):
        del step
        x0 = batch["image"]
        k_t, k_noise, k_drop, k_dropout = jax.random.split(rng, 4)
        drop = jax.random.bernoulli(k_drop, self.config.task.cond_drop_prob, (x0.shape[0],))
        cond = self._batch_condition(params, batch, drop)
        control = batch["control"]
        return self.denoising_loss(
            x0,
            k_t,
            k_noise,
            lambda x_t, t: self.controlled_output(
                params, x_t, t, cond, control, 1.0, dropout_rng=k_dropout
            ),
        )

    def sampling_model_fn(self, params, options):
        """The model function `samplers.sample` calls: (x, t, c) -> the base UNet's output with
        the residuals of the task's `units` (module doc), c = {"text": conditioning, "controls":
        one control batch per unit, "branch": [B] factor on every residual (0 leaves a row
        uncontrolled)}. params: the base's, with "controlnet" the ControlNet params, a sequence
        of one per unit (or, for one unit, its params themselves)."""
        units = self.units
        nets = params["controlnet"]
        nets = tuple(nets) if isinstance(nets, list | tuple) else (nets,)
        if len(nets) != len(units):
            raise ConfigError(
                f"{len(units)} ControlNet units but {len(nets)} ControlNet params; give one per "
                f"unit"
            )
        ts = jnp.asarray(
            samplers.timesteps(self.schedule.num_timesteps, options.num_steps, options.spacing)
        )
        active = jnp.asarray(np.stack([u.active_steps(options.num_steps) for u in units]))
        weights = guess_mode_weights(unet.num_skips(self.model)) if self.guess_mode else None

        def model_fn(x, t, c):
            step = jnp.sum(ts > t[0])  # The timesteps descend, so this is the step's index.
            down = mid = None
            for k, (unit, p, control) in enumerate(zip(units, nets, c["controls"], strict=True)):
                scale = unit.scale * active[k, step] * c["branch"]
                d, m = self._residuals(unit.module, p, x, t, c["text"], control, scale)
                down = d if down is None else [a + b for a, b in zip(down, d, strict=True)]
                mid = m if mid is None else mid + m
            if weights is not None:
                down = [r * w.astype(r.dtype) for r, w in zip(down, weights[:-1], strict=True)]
            return self._unet(params, x, t, c["text"], down_residuals=down, mid_residual=mid)

        return model_fn

    def generate_controlled(self, params, rng, cond, uncond, controls, num_samples, options):
        """Images in [-1, 1] from the task's `units` (module doc).

        cond/uncond: text conditionings with a leading batch of num_samples; controls: one
        [num_samples, H, W, C] control image batch per unit; params: as `sampling_model_fn`.
        """
        controls = tuple(controls)
        if len(controls) != len(self.units):
            raise ConfigError(
                f"{len(self.units)} ControlNet units but {len(controls)} control image "
                f"batches; give one per unit"
            )
        n = num_samples
        # Guess mode leaves the unconditional branch uncontrolled.
        on = jnp.ones((n,))
        off = jnp.zeros((n,)) if self.guess_mode else on
        x0 = samplers.sample(
            self.sampling_model_fn(params, options),
            self.schedule,
            rng,
            (n, *self.image_shape),
            options,
            {"text": cond, "controls": controls, "branch": on},
            {"text": uncond, "controls": controls, "branch": off},
        )
        return jnp.clip(x0, -1.0, 1.0)

    def generate_from_tokens(self, params, rng, prompt, negative, num_samples, options, controls):
        """`prompt`/`negative`: (ids, mask) [N, L] each; `controls`: one [N, H, W, C] batch
        per unit (`generate_controlled`)."""
        cond = self.encode(params, *prompt)
        uncond = self.encode(params, *negative)
        return self.generate_controlled(params, rng, cond, uncond, controls, num_samples, options)

    def sample(self, params, rng, batch):
        """The periodic grid: the first `trainer.num_samples` prompts and controls of the
        sample batch."""
        n = self.config.trainer.num_samples
        head = jax.tree.map(lambda x: x[:n], batch)
        cond = self._batch_condition(params, head)
        uncond = self._batch_condition(params, head, jnp.ones((n,), bool))
        return self.generate_controlled(
            params, rng, cond, uncond, (head["control"],), n, self.sampling
        )

    @classmethod
    def validate(cls, config):
        if "controlnet" not in config:
            raise ConfigError(
                "config.controlnet is missing; see genctl_jax.trainers.controlnet.default_config"
            )
        c = config.controlnet
        kind = c.get("control_type")
        if kind not in CONTROL_SOURCES:
            raise ConfigError(
                f"config.controlnet.control_type={kind!r} is not a control type this trainer "
                f"reads from a batch; accepted: {', '.join(CONTROL_SOURCES)}"
            )
        source = CONTROL_SOURCES[kind]
        if source not in config.data.fields:
            raise ConfigError(
                f"config.controlnet.control_type={kind!r} reads the batch field {source!r}, but "
                f"config.data.fields={tuple(config.data.fields)!r} lacks it; add it"
            )
        scale = c.get("conditioning_scale")
        if not isinstance(scale, int | float) or isinstance(scale, bool) or scale < 0:
            raise ConfigError(
                f"config.controlnet.conditioning_scale={scale!r}: expected a number >= 0"
            )
        if config.model.get("name") != "controlnet":
            raise ConfigError(
                f"config.model.name={config.model.get('name')!r}: the trained network of a "
                f"ControlNet run is a 'controlnet' (models.controlnet.config_from_unet)"
            )
        m = controlnet_lib._with_defaults(config.model)
        if m.conditioning_factor != 1:
            raise ConfigError(
                f"config.model.conditioning_factor={m.conditioning_factor}: the control maps "
                f"come at the image's size; set conditioning_factor=1"
            )
        if m.conditioning_channels not in (1, 3) or (
            kind == "seg" and m.conditioning_channels != 3
        ):
            raise ConfigError(
                f"config.model.conditioning_channels={m.conditioning_channels}: control type "
                f"{kind!r} gives {'3' if kind == 'seg' else '1 or 3'} channels"
            )
        base = base_run_config(config)
        workdir = c.base_workdir
        controlnet_lib.check_matches_unet(
            config.model,
            base.model,
            controlnet_source="config.model (the ControlNet)",
            unet_source=f"the base run's config.model ({workdir}/config.json)",
        )
        for block in ("diffusion",):
            ours, theirs = config[block].to_dict(), base[block].to_dict()
            for key in sorted(set(ours) | set(theirs)):
                a, b = ours.get(key), theirs.get(key)
                if (list(a) if isinstance(a, tuple) else a) != b:
                    raise ConfigError(
                        f"config.{block}.{key}={a!r}, but the base run ({workdir}) trained "
                        f"with {block}.{key}={b!r}; a ControlNet must use the base's {block}"
                    )
        if config.data.image_size != base.data.image_size:
            raise ConfigError(
                f"config.data.image_size={config.data.image_size}, but the base run ({workdir}) "
                f"trained at {base.data.image_size}; set image_size={base.data.image_size}"
            )
        super().validate(base_view(config, base))

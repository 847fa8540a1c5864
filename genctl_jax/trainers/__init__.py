"""Training families on one shared core (state, step, loop); see task.py for the plug-in API."""

from __future__ import annotations

import importlib

import ml_collections

from genctl_jax.errors import ConfigError

# config.task.name -> "module:Class" of its Task (imported on demand).
TASKS = {
    "autoencoder": "genctl_jax.trainers.autoencoder:AutoencoderTask",
    "controlnet": "genctl_jax.trainers.controlnet:ControlNetTask",
    "diffusion": "genctl_jax.trainers.diffusion:DiffusionTask",
    "pix2pix": "genctl_jax.trainers.gan:Pix2PixTask",
    "spade": "genctl_jax.trainers.gan:SpadeTask",
    "stylegan2": "genctl_jax.trainers.gan:StyleGAN2Task",
    "text_to_image": "genctl_jax.trainers.text_to_image:TextToImageTask",
}


def task_class(name: str):
    if name not in TASKS:
        raise ConfigError(
            f"config.task.name={name!r} is not a known training task; accepted: {', '.join(TASKS)}"
        )
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_task(config: ml_collections.ConfigDict):
    return task_class(config.task.name)(config)


def validate(config: ml_collections.ConfigDict) -> None:
    from genctl_jax.trainers import optim

    task = build_task(config)
    task.validate(config)
    optim.validate(config, task.trained_networks)

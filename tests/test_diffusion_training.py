"""The diffusion trainer and the sampling CLI, end to end on the tiny shapes config."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cli, run_cli_body
from PIL import Image

from genctl_jax import configlib
from genctl_jax.errors import CheckpointError, ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = "configs/shapes_diffusion.py:tiny"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One train step of the tiny config through the training CLI."""
    workdir = tmp_path_factory.mktemp("diffusion")
    result = cli(
        "genctl_jax.train",
        "--config",
        TINY,
        "--workdir",
        str(workdir),
        "--config.trainer.num_train_steps=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_one_train_step_from_the_cli(trained):
    assert (trained / "checkpoints" / "1").is_dir()
    assert (trained / "samples" / "step_00000001.png").exists()
    line = (trained / "metrics.jsonl").read_text().splitlines()[-1]
    assert '"loss"' in line and '"mse"' in line


def test_sampling_cli_writes_a_grid_and_reports_fidelity(trained, tmp_path):
    out = tmp_path / "grid.png"
    result = cli(
        "genctl_jax.sample",
        "--workdir",
        str(trained),
        "--num_samples",
        "6",
        "--sampler",
        "ddim",
        "--steps",
        "3",
        "--guidance_scale",
        "2",
        "--labels",
        "0,5,47",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # 6 tiles of 16 px in a 3 x 2 grid with 1-px borders.
    assert Image.open(out).size == (3 * 17 + 1, 2 * 17 + 1)
    assert "class fidelity (analytic checker, 6 samples, guidance 2.0)" in result.stdout


def run_sample(*argv):
    from genctl_jax import sample

    run_cli_body(sample, *argv)


def test_sampling_bad_input_gets_one_clear_error(trained, tmp_path):
    with pytest.raises(ConfigError, match=r"config\.sampling\.sampler='euler'.*ddpm.*ddim"):
        run_sample(f"--workdir={trained}", "--sampler=euler")
    with pytest.raises(ConfigError, match=r"num_steps=2000: expected at most .*num_timesteps=1000"):
        run_sample(f"--workdir={trained}", "--steps=2000")
    with pytest.raises(ConfigError, match=r"--labels holds \[48, -1\], outside .* 0\.\.47"):
        run_sample(f"--workdir={trained}", "--labels=3,48,-1")
    with pytest.raises(CheckpointError, match="holds no run"):
        run_sample(f"--workdir={tmp_path}")
    (tmp_path / "config.json").write_text((trained / "config.json").read_text())
    with pytest.raises(CheckpointError, match="has no checkpoint yet"):
        run_sample(f"--workdir={tmp_path}")


def test_guidance_without_condition_dropout_warns(caplog):
    from genctl_jax.trainers.diffusion import warn_if_unguidable

    config = configlib.load_config(f"{REPO / TINY}")
    config.task.cond_drop_prob = 0.0
    warn_if_unguidable(config, 3.0)
    assert "trained without condition dropout" in caplog.text
    caplog.clear()
    config.task.cond_drop_prob = 0.1
    warn_if_unguidable(config, 3.0)
    assert not caplog.text


def test_condition_dropout_rate_and_loss_target():
    """The loss sees the null class at the configured rate and regresses the eps target."""
    from genctl_jax.diffusion import schedules
    from genctl_jax.trainers.diffusion import DiffusionTask

    config = configlib.load_config(f"{REPO / TINY}")
    config.task.cond_drop_prob = 0.25
    task = DiffusionTask(config)
    seen = []

    class Spy:
        def apply(self, variables, x_t, t, labels, **kw):
            seen.append(labels)
            return jnp.zeros_like(x_t)

    task.model = Spy()
    x0 = jax.random.uniform(jax.random.PRNGKey(1), (4096, 2, 2, 3), minval=-1, maxval=1)
    batch = {"image": x0, "label": jnp.arange(4096, dtype=jnp.int32) % 48}
    config.diffusion.loss_weighting = "uniform"
    config.diffusion.prediction_type = "eps"
    loss, metrics = task.loss({"model": {}}, batch, jax.random.PRNGKey(0), 0)
    dropped = float(jnp.mean(seen[0] == task.null_label))
    assert abs(dropped - 0.25) < 0.03, dropped
    kept = seen[0] != task.null_label
    np.testing.assert_array_equal(seen[0][kept], batch["label"][kept])
    # A zero prediction of eps costs E[eps^2] = 1.
    np.testing.assert_allclose(float(loss), 1.0, atol=0.02)
    assert schedules.from_config(config.diffusion).num_timesteps == 1000


@pytest.mark.slow
def test_tiny_model_learns_class_conditional_shapes(tmp_path):
    """A few hundred steps on shapes: the loss falls and guided samples follow their class."""
    from genctl_jax.data import shapes
    from genctl_jax.diffusion import samplers
    from genctl_jax.metrics.fidelity import class_fidelity
    from genctl_jax.trainers import loop

    config = configlib.load_config(f"{REPO / TINY}")
    config.data.batch_size = 32
    config.optimizers.model.learning_rate = 2e-3
    config.optimizers.model.warmup_steps = 50
    config.trainer.num_train_steps = 600
    config.trainer.ema_decay = 0.99
    config.trainer.log_every = 100
    config.trainer.checkpoint_every = 0
    config.trainer.sample_every = 0
    config.mesh.data = 2  # two fake devices: the fastest layout for 2 CPU cores
    state = loop.train_and_evaluate(config, tmp_path, devices=jax.devices()[:2])

    losses = [json.loads(x)["mse"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.5 * losses[0], losses

    from genctl_jax.trainers.diffusion import DiffusionTask

    task = DiffusionTask(config)
    labels = jnp.arange(96, dtype=jnp.int32) % shapes.NUM_CLASSES
    options = samplers.SamplerOptions(num_steps=25, guidance_scale=3.0)
    images = jax.jit(lambda p, key: task.generate(p, key, labels, 96, options))(
        {**state.params, **state.ema_params}, jax.random.PRNGKey(0)
    )
    asked = class_fidelity(images, labels)["colour"]
    chance = class_fidelity(images, np.roll(np.asarray(labels), 7))["colour"]
    # At 16 px the checker judges colour reliably, shape not; chance is the same images
    # scored against other classes' colours. Measured on 2026-11-25: mse 0.45 -> 0.13,
    # colour fidelity 0.53 against a chance of 0.14.
    assert asked > chance + 0.3, (asked, chance)

"""GAN trainers on the shared core: pix2pix, SPADE and StyleGAN2 steps, lazy regularisation,
buffers, generator EMA, and a sharded step equal to the single-device one."""

import json

import jax
import numpy as np
import pytest
from conftest import REPO

from genctl_jax import configlib, trainers
from genctl_jax.data import pipeline
from genctl_jax.errors import ConfigError
from genctl_jax.parallel import mesh as mesh_lib
from genctl_jax.trainers import loop
from genctl_jax.trainers import trainer as trainer_lib
from genctl_jax.trainers.task import BUFFERS


def recipe(name, arg="tiny"):
    return configlib.load_config(f"{REPO / 'configs' / name}:{arg}")


def host(tree):
    return jax.tree.map(np.asarray, tree)


def first_batch(config, task, mesh):
    data = pipeline.create_iterator(config.data, seed=config.seed)
    raw = next(data)
    data.close()
    return pipeline.to_global(task.prepare_batch(dict(raw)), mesh)


def run_steps(config, devices, num_steps):
    """(states after each step, metrics of each step, sharded final state)."""
    mesh = mesh_lib.create_mesh(config.mesh, devices)
    task = trainers.build_task(config)
    batch = first_batch(config, task, mesh)
    run = trainer_lib.build(config, mesh, batch, task)
    state = run.initialize()
    states, metrics = [host(state)], []
    for _ in range(num_steps):
        state, step_metrics = run.train_step(state, batch)
        states.append(host(state))
        metrics.append(host(step_metrics))
    return states, metrics, state


@pytest.fixture(scope="module")
def stylegan2_run():
    """Two StyleGAN2 steps (R1 and path length every 2 steps: on at step 0, off at step 1) on
    a data=2 x fsdp=4 mesh."""
    config = recipe("shapes_stylegan2.py")
    config.mesh.data, config.mesh.fsdp = 2, 4
    return run_steps(config, None, 2)


def test_stylegan2_lazy_regularisers_fire_on_their_steps_only(stylegan2_run):
    states, metrics, sharded = stylegan2_run
    on, off = metrics
    for phase in ("r1", "path_length"):
        assert on[f"{phase}/loss"] > 0 and on[f"{phase}/grad_norm"] > 0, phase
        assert off[f"{phase}/loss"] == 0 and off[f"{phase}/grad_norm"] == 0, phase
    assert on["r1/r1"] > 0 and on["path_length/pl_length"] > 0
    for phase in ("discriminator", "generator"):  # every step
        assert on[f"{phase}/loss"] > 0 and off[f"{phase}/loss"] > 0, phase
    # Buffers: the path-length mean moves only with its phase; the w average every step.
    pl_means = [float(s.params[BUFFERS]["pl_mean"]) for s in states]
    assert pl_means[0] == 0.0 and pl_means[1] > 0.0 and pl_means[2] == pl_means[1]
    # pl_mean <- pl_mean + 0.01 * (mean length - pl_mean), from 0.
    np.testing.assert_allclose(pl_means[1], 0.01 * on["path_length/pl_length"], rtol=1e-5)
    w_avgs = [s.params[BUFFERS]["w_avg"] for s in states]
    assert np.abs(w_avgs[1] - w_avgs[0]).max() > 0 and np.abs(w_avgs[2] - w_avgs[1]).max() > 0
    assert set(states[-1].ema_params) == {"generator"}
    assert set(states[-1].opt_state) == {"generator", "discriminator"}
    specs = [leaf.sharding.spec for leaf in jax.tree.leaves(sharded.params["generator"])]
    assert any("fsdp" in str(spec) for spec in specs)


def test_gan_step_on_a_mesh_equals_one_device():
    """Two pix2pixHD steps (both phases, multi-scale D, feature matching) on one device and
    on data=2 x fsdp=4."""
    runs = {}
    for name, devices, mesh in (("one", jax.devices()[:1], (1, 1)), ("mesh", None, (2, 4))):
        config = recipe("shapes_pix2pix.py", "tiny,hd")
        config.mesh.data, config.mesh.fsdp = mesh
        runs[name] = run_steps(config, devices, 2)
    (ref_states, ref_metrics, _), (states, metrics, sharded) = runs["one"], runs["mesh"]
    for got, want in zip(metrics, ref_metrics, strict=True):
        for key in ("discriminator/loss", "generator/loss", "generator/feature_matching"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-6, err_msg=key)
    for tree in ("params", "ema_params", "opt_state"):
        got, want = getattr(states[-1], tree), getattr(ref_states[-1], tree)
        # Adam's first steps are about lr * sign(gradient): reduction-order noise in a gradient
        # near zero can move a parameter by a fraction of the 2e-4 step.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4), got, want)
    specs = [leaf.sharding.spec for leaf in jax.tree.leaves(sharded.params["discriminator"])]
    assert any("fsdp" in str(spec) for spec in specs)  # actually sharded, not replicated


def test_pix2pix_trains_and_writes_its_outputs(tmp_path):
    config = recipe("shapes_pix2pix.py")
    state = loop.train_and_evaluate(config, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for key in ("discriminator/loss", "generator/loss", "generator/l1", "generator/adversarial"):
        assert all(np.isfinite(line[key]) for line in lines), key
    # Generator loss = adversarial + 100 * L1 (no feature matching in pix2pix).
    last = lines[-1]
    np.testing.assert_allclose(
        last["generator/loss"], last["generator/adversarial"] + 100 * last["generator/l1"],
        rtol=1e-5,
    )  # fmt: skip
    assert (tmp_path / "samples" / "step_00000002.png").exists()
    assert (tmp_path / "checkpoints" / "2").is_dir()
    assert set(state.ema_params) == {"generator"}


def test_spade_with_vae_trains_the_encoder_with_the_generator():
    config = recipe("shapes_spade.py", "tiny,vae")
    states, metrics, _ = run_steps(config, jax.devices()[:2], 1)
    assert metrics[0]["generator/kl"] > 0 and np.isfinite(metrics[0]["generator/loss"])
    assert metrics[0]["generator/feature_matching"] > 0
    before, after = states
    for network in ("generator", "encoder", "discriminator"):
        moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), before.params[network],
                             after.params[network])  # fmt: skip
        assert max(jax.tree.leaves(moved)) > 0, network


def test_bad_input():
    config = recipe("shapes_spade.py")
    task = trainers.build_task(config)
    labels = np.zeros((2, 32, 32), np.uint8)
    labels[0, 3, 3] = 9
    with pytest.raises(ConfigError, match=r"label ids 0\.\.9, outside 0\.\.6"):
        task.prepare_batch({"image": np.zeros((2, 32, 32, 3)), "segmentation": labels})
    config = recipe("shapes_pix2pix.py")
    config.task.condition = "depth"
    with pytest.raises(ConfigError, match="config.task.condition='depth': expected one of edges"):
        configlib.validate(config, num_devices=8, process_count=1)
    config = recipe("shapes_stylegan2.py")
    config.task.r1_every = 0
    with pytest.raises(ConfigError, match="config.task.r1_every=0: expected an integer >= 1"):
        configlib.validate(config, num_devices=8, process_count=1)
    config = recipe("shapes_stylegan2.py")
    config.task.gan_loss = "wasserstein"
    with pytest.raises(ConfigError, match="gan_loss='wasserstein': expected one of"):
        configlib.validate(config, num_devices=8, process_count=1)

"""ControlNet training on a frozen text-to-image base: what trains, what stays, what it costs."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from genctl_jax import configlib
from genctl_jax.control import voc_palette
from genctl_jax.data import pipeline
from genctl_jax.errors import CheckpointError, ConfigError
from genctl_jax.models import controlnet as controlnet_lib
from genctl_jax.parallel import mesh as mesh_lib
from genctl_jax.trainers import saved_run
from genctl_jax.trainers import trainer as trainer_lib
from genctl_jax.trainers.controlnet import ControlNetTask
from genctl_jax.trainers.task import Phase

RECIPE = REPO / "configs" / "shapes_controlnet.py"


@pytest.fixture(scope="module")
def base_run(tiny_t2i_base):
    """The frozen base's workdir (conftest: two steps of the tiny text-to-image config)."""
    return tiny_t2i_base


def controlnet_config(base_workdir, *args):
    arg = ",".join(["tiny", f"base={base_workdir}", *args])
    return configlib.load_config(f"{RECIPE}:{arg}")


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.fixture(scope="module")
def built(base_run):
    """The tiny ControlNet run's compiled pieces, its example batch and a fresh state."""
    config = controlnet_config(base_run)
    configlib.validate(config)
    mesh = mesh_lib.create_mesh(config.mesh)
    data = pipeline.create_iterator(config.data, seed=config.seed)
    task = ControlNetTask(config)
    example = pipeline.to_global(task.prepare_batch(next(data)), mesh)
    data.close()
    run = trainer_lib.build(config, mesh, example, task)
    return config, mesh, task, run, example


def test_only_the_controlnet_trains(built, base_run):
    config, _, task, run, example = built
    state = run.initialize()
    assert task.trained_networks == ("controlnet",)
    assert set(state.params) == {"controlnet", "model", "text_encoder"}
    assert set(state.opt_state) == {"controlnet"} and set(state.ema_params) == {"controlnet"}
    before = host(state.params)
    # The frozen networks are the base run's EMA params.
    base = host(saved_run.load(base_run).params)
    for name in ("model", "text_encoder"):
        jax.tree.map(np.testing.assert_array_equal, before[name], base[name])
    # Step 1 has learning rate 0 (warm-up); step 2 moves the zero convs, the only params with
    # gradients while they are zero; from step 3 the whole ControlNet learns.
    for _ in range(3):
        state, metrics = run.train_step(state, example)
        assert np.isfinite(float(metrics["loss"])) and not bool(metrics["update_skipped"])
    after = host(state.params)
    for name in ("model", "text_encoder"):
        jax.tree.map(np.testing.assert_array_equal, after[name], before[name])
    changed = jax.tree.map(
        lambda a, b: float(np.abs(a - b).max()), after["controlnet"], before["controlnet"]
    )
    # Zero-initialised layers (zero convs, hint conv_out, the barely trained base's res-block
    # conv_2 and attention outputs) pass gradients one layer deeper per step, so after three
    # steps the zero convs, the hint encoder's output and the trunk's input side have moved.
    moved = {
        name: max(jax.tree.leaves(changed[name]))
        for name in changed
        if controlnet_lib.is_controlnet_only(name) or name == "conv_in"
    }
    moved["hint_encoder/conv_out"] = max(jax.tree.leaves(changed["hint_encoder"]["conv_out"]))
    print(f"ControlNet change after 3 steps: {moved}")
    assert all(v > 1e-4 for v in moved.values()), moved


def test_fresh_controlnet_leaves_the_base_unchanged(built):
    _, mesh, task, run, example = built
    state = run.initialize()
    params = state.params
    # init_from_unet: the trunk is the base UNet's.
    np.testing.assert_array_equal(
        np.asarray(params["controlnet"]["conv_in"]["kernel"]),
        np.asarray(params["model"]["conv_in"]["kernel"]),
    )
    cond = task._batch_condition(params, example)
    x = jax.random.normal(jax.random.PRNGKey(1), example["image"].shape)
    t = jnp.full((x.shape[0],), 500, jnp.int32)
    with jax.set_mesh(mesh):
        plain = jax.jit(lambda p, x, t, c: task._unet(p, x, t, c))(params, x, t, cond)
        controlled = jax.jit(lambda p, x, t, c, k: task.controlled_output(p, x, t, c, k, 1.0))(
            params, x, t, cond, example["control"]
        )
    diff = float(jnp.abs(plain - controlled).max())
    print(f"fresh ControlNet: max |base - base with residuals| = {diff:.3g}")
    assert float(jnp.abs(plain).max()) > 1e-3  # the base's output is not trivially zero
    assert diff < 1e-6


class FullFineTune(ControlNetTask):
    """The same loss with the base UNet and text encoder trained too (the comparison)."""

    @property
    def phases(self):
        return (Phase("denoise", ("controlnet", "model", "text_encoder"), self.loss),)


def _cost(run, example):
    """The train step's FLOPs (XLA's count of the lowered program) and the train state's bytes
    on one device (params, optimizer state and EMA, as laid out on the mesh)."""
    flops = run.lower(example).cost_analysis()["flops"]
    state_bytes = sum(
        np.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
        for leaf in jax.tree.leaves(run.layout.abstract)
    )
    return flops, state_bytes


def test_frozen_base_costs_less_than_full_fine_tune(built):
    config, mesh, task, run, example = built
    flops, memory = _cost(run, example)
    full_config = config.copy_and_resolve_references()
    full_config.optimizers.model = config.optimizers.controlnet
    full_config.optimizers.text_encoder = config.optimizers.controlnet
    full = trainer_lib.build(full_config, mesh, example, FullFineTune(full_config))
    full_flops, full_memory = _cost(full, example)
    print(
        f"train step: ControlNet {flops:.4g} FLOPs, state {memory / 2**20:.2f} MiB per device; "
        f"full fine-tune {full_flops:.4g} FLOPs, {full_memory / 2**20:.2f} MiB; "
        f"ratios {flops / full_flops:.3f}, {memory / full_memory:.3f}"
    )
    assert flops < 0.85 * full_flops
    assert memory < 0.85 * full_memory


def test_tiny_run_end_to_end(tiny_controlnet_run):
    workdir = tiny_controlnet_run  # conftest: two steps of the tiny recipe, through the loop.
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert len(losses) == 2 and all(np.isfinite(losses)) and all(v > 0 for v in losses)
    assert (workdir / "checkpoints" / "2").is_dir()
    assert (workdir / "samples" / "step_00000002.png").exists()
    # The saved run reopens with its frozen base inside.
    loaded = saved_run.load(workdir)
    assert loaded.step == 2
    assert set(loaded.params) == {"controlnet", "model", "text_encoder"}
    # A second ControlNet for multi-control reads its own params only, not its base's copy.
    alone = saved_run.load(workdir, networks=["controlnet"])
    assert set(alone.params) == {"controlnet"}
    jax.tree.map(
        np.testing.assert_array_equal, alone.params["controlnet"], loaded.params["controlnet"]
    )
    with pytest.raises(CheckpointError, match="holds no vae params; its networks are controlnet"):
        saved_run.load(workdir, networks=["vae"])


def test_segmentation_control_is_the_palette_colour_map(base_run):
    task = ControlNetTask(controlnet_config(base_run, "control=seg"))
    seg = np.zeros((2, 16, 16), np.int32)
    seg[0, 4:8, 4:8] = 3
    seg[1, 2:5, 9:12] = 1
    batch = task.control_from_batch({"segmentation": seg})
    assert batch.shape == (2, 16, 16, 3) and batch.dtype == np.float32
    palette = voc_palette(8) / 255.0
    np.testing.assert_allclose(batch[0, 5, 5], palette[3], atol=1e-6)
    np.testing.assert_allclose(batch[1, 3, 10], palette[1], atol=1e-6)
    np.testing.assert_array_equal(batch[0, 0, 0], [0, 0, 0])
    edges = ControlNetTask(controlnet_config(base_run)).control_from_batch(
        {"edges": np.eye(16, dtype=np.float32)[None]}
    )
    np.testing.assert_array_equal(edges[0, ..., 1], np.eye(16))


def test_bad_input(base_run, tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError, match="Train the base text-to-image model first.*shapes_t2i"):
        configlib.validate(controlnet_config(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(base_run / "config.json", empty / "config.json")
    with pytest.raises(ConfigError, match="holds no checkpoint yet"):
        configlib.validate(controlnet_config(empty))

    # A base whose UNet has another width: both configs are named.
    other = tmp_path / "other"
    (other / "checkpoints" / "1").mkdir(parents=True)
    saved = json.loads((base_run / "config.json").read_text())
    saved["model"]["channels"] = 2 * saved["model"]["channels"]
    (other / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError) as error:
        configlib.validate(controlnet_config(other))
    message = str(error.value)
    assert "config.model (the ControlNet) has channels=16" in message
    assert "the base run's config.model" in message and "channels=32" in message

    config = controlnet_config(base_run)
    config.controlnet.control_type = "hed"
    with pytest.raises(ConfigError, match="control_type='hed'.*accepted: edges, seg"):
        configlib.validate(config)
    config = controlnet_config(base_run, "control=seg")
    config.data.fields = ("image", "caption")
    with pytest.raises(ConfigError, match="reads the batch field 'segmentation'"):
        configlib.validate(config)

"""The shared training core on fake 8-device meshes: parity, sharding, guard, outputs."""

import json
import logging
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from genctl_jax import configlib, trainers
from genctl_jax.data import pipeline
from genctl_jax.errors import CheckpointError, ConfigError, TrainingError
from genctl_jax.io.checkpoints import Checkpointer
from genctl_jax.parallel import mesh as mesh_lib
from genctl_jax.trainers import loop
from genctl_jax.trainers import state as state_lib
from genctl_jax.trainers import trainer as trainer_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 4


def tiny_config(**mesh):
    c = configlib.load_config(f"{REPO / 'configs' / 'shapes_autoencoder.py'}:tiny")
    c.trainer.num_train_steps = STEPS
    c.trainer.checkpoint_every = 2
    c.trainer.sample_every = 0
    c.trainer.async_checkpoints = False
    # SGD keeps updates linear in the gradients. Adam would turn the float noise of
    # mathematically-zero gradients (conv biases before a GroupNorm) into lr-sized steps
    # of random sign, so its params cannot be compared across reduction orders.
    c.optimizers.model.name = "sgd"
    c.optimizers.model.learning_rate = 0.05
    c.update_from_flattened_dict({f"mesh.{k}": v for k, v in mesh.items()})
    return c


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def losses(workdir):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def assert_trees_close(a, b, rtol=1e-5, atol=1e-7):
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
    """The reference: the same run on one device."""
    workdir = tmp_path_factory.mktemp("single")
    config = tiny_config()
    config.trainer.sample_every = STEPS
    state = loop.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    return workdir, host(state)


def test_single_device_run_writes_its_outputs(single_device_run):
    workdir, state = single_device_run
    assert int(state.step) == STEPS
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for key in ("loss", "grad_norm", "steps_per_s", "examples_per_s", "eta_s"):
        assert np.isfinite(records[-1][key]), key
    # Learning rate of the applied updates, averaged per log interval: warm-up 0 -> 0.05 over
    # updates 0-1, then cosine to 0.1 x peak over updates 2-3 (closed forms).
    cosine_1 = 0.05 * (0.9 * 0.5 * (1 + np.cos(np.pi / 2)) + 0.1)
    expected = [(0.0 + 0.025) / 2, (0.05 + cosine_1) / 2]
    np.testing.assert_allclose([r["learning_rate"] for r in records], expected, rtol=1e-6)
    assert list((workdir / "tb").glob("events.out.tfevents.*"))
    assert (workdir / "samples" / f"step_{STEPS:08d}.png").exists()
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["channels"] == 8


@pytest.mark.parametrize(
    "mesh", [dict(data=2, fsdp=4), dict(data=8, fsdp=1)], ids=["data2_fsdp4", "data8"]
)
def test_mesh_run_matches_single_device(mesh, single_device_run, tmp_path):
    ref_dir, ref = single_device_run
    state = loop.train_and_evaluate(tiny_config(**mesh), tmp_path)
    np.testing.assert_allclose(losses(tmp_path), losses(ref_dir), rtol=1e-5)
    assert_trees_close(host(state.params), ref.params)
    assert_trees_close(host(state.ema_params), ref.ema_params)
    assert_trees_close(host(state.opt_state), ref.opt_state)

    kernel = state.params["model"]["decoder"]["conv_out"]["kernel"]  # (3, 3, 8, 3)
    mid = state.params["model"]["encoder"]["ResBlock_1"]["Conv_1"]["kernel"]  # (3, 3, 16, 16)
    mu = (
        state.opt_state["model"][1]
        .inner_state[0]
        .trace["encoder"]["ResBlock_1"]["Conv_1"]["kernel"]
    )
    if mesh["fsdp"] == 4:
        assert mid.sharding.spec == P(None, None, None, "fsdp")
        assert mu.sharding.spec == mid.sharding.spec  # optimizer state follows its param
        assert mid.addressable_shards[0].data.shape == (3, 3, 16, 4)
        assert kernel.sharding.spec == P(None, None, None, None)  # 3 outputs: not divisible
    else:
        assert mid.addressable_shards[0].data.shape == mid.shape  # pure data parallelism
    assert mid.sharding.mesh.shape == {"data": mesh["data"], "fsdp": mesh["fsdp"], "tensor": 1}


def build_trainer(config, devices=None):
    mesh = mesh_lib.create_mesh(config.mesh, devices)
    data = pipeline.create_iterator(config.data, seed=config.seed)
    batch = pipeline.to_global(next(data), mesh)
    return trainer_lib.build(config, mesh, batch), batch, data, mesh


def test_gradient_accumulation_matches_one_big_batch():
    config = tiny_config(data=2, fsdp=4)
    run, batch, data, mesh = build_trainer(config)
    config.trainer.grad_accum_steps = 2
    accum_run, *_ = build_trainer(config)
    state_a, metrics_a = run.train_step(run.layout.initialize(), batch)
    state_b, metrics_b = accum_run.train_step(accum_run.layout.initialize(), batch)
    np.testing.assert_allclose(metrics_a["loss"], metrics_b["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics_a["grad_norm"], metrics_b["grad_norm"], rtol=1e-5)
    assert_trees_close(host(state_a.params), host(state_b.params))


def test_non_finite_update_is_refused_and_repeated_ones_stop_training(tmp_path, monkeypatch):
    config = tiny_config(data=2, fsdp=4)
    run, batch, _, _ = build_trainer(config)
    state = run.layout.initialize()
    before = host(state)
    bad = dict(batch, image=batch["image"].at[0, 0, 0, 0].set(jnp.nan))
    after, metrics = run.train_step(state, bad)
    after = host(after)
    assert bool(metrics["update_skipped"]) and int(metrics["nonfinite_streak"]) == 1
    for x, y in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params), strict=True):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(
        jax.tree.leaves(before.opt_state), jax.tree.leaves(after.opt_state), strict=True
    ):
        np.testing.assert_array_equal(x, y)
    assert int(after.step) == 1 and int(after.nonfinite_total) == 1

    # In the loop: the data turns to NaN after step 2; two refusals in a row stop the run.
    real_to_global = pipeline.to_global
    calls = []

    def poisoned(batch, mesh, **kw):
        calls.append(1)
        out = real_to_global(batch, mesh, **kw)
        return dict(out, image=out["image"] * jnp.nan) if len(calls) > 3 else out

    monkeypatch.setattr(pipeline, "to_global", poisoned)
    config.trainer.max_nonfinite_steps = 2
    config.trainer.num_train_steps = 6
    with pytest.raises(TrainingError, match=r"2 train steps in a row \(up to step 4\)"):
        loop.train_and_evaluate(config, tmp_path)


def test_restore_onto_other_meshes_and_resume(tmp_path, single_device_run):
    """Saved as fsdp=8, restored as data=2,fsdp=4 and on one device; training continues."""
    config = tiny_config(data=1, fsdp=8)
    config.trainer.num_train_steps = 2
    saved = host(loop.train_and_evaluate(config, tmp_path))

    for mesh, devices in [(dict(data=2, fsdp=4), None), (dict(data=-1, fsdp=1), jax.devices()[:1])]:
        run, *_ = build_trainer(tiny_config(**mesh), devices)
        checkpointer = Checkpointer(tmp_path / "checkpoints")
        restored, data_state, step = checkpointer.restore(run.layout.abstract)
        checkpointer.close()
        assert step == 2 and data_state["global_batches"] == 2
        for x, y in zip(jax.tree.leaves(host(restored)), jax.tree.leaves(saved), strict=True):
            np.testing.assert_array_equal(x, y)
        leaf = restored.params["model"]["encoder"]["ResBlock_1"]["Conv_1"]["kernel"]
        assert leaf.sharding.mesh.size == (8 if devices is None else 1)

    # Resuming on data=2,fsdp=4 finishes the run as if it had never stopped.
    resumed = loop.train_and_evaluate(tiny_config(data=2, fsdp=4), tmp_path)
    _, ref = single_device_run
    assert int(resumed.step) == STEPS
    assert_trees_close(host(resumed.params), ref.params)


def test_corrupt_latest_checkpoint_is_moved_aside_for_the_previous(
    single_device_run, tmp_path, caplog
):
    ref_dir, _ = single_device_run
    workdir = tmp_path / "run"
    shutil.copytree(ref_dir, workdir)
    # A half-written save (no commit) is ignored; a damaged latest one is skipped.
    (workdir / "checkpoints" / "6.orbax-checkpoint-tmp").mkdir()
    for f in (workdir / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "manifest" in f.name:
            f.write_bytes(b"\0garbage")
    run, *_ = build_trainer(tiny_config(), jax.devices()[:1])
    checkpointer = Checkpointer(workdir / "checkpoints")
    assert checkpointer.all_steps() == [2, 4]
    with caplog.at_level(logging.WARNING):
        _, data_state, step = checkpointer.restore(run.layout.abstract)
    checkpointer.close()
    assert step == 2 and data_state["global_batches"] == 2
    assert "Checkpoint at step 4 cannot be read" in caplog.text
    assert (workdir / "corrupt_checkpoints" / "4" / "state").is_dir()  # kept, not deleted
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]


def test_run_level_errors_come_before_any_compilation(tmp_path):
    with pytest.raises(CheckpointError, match="is a URL; remote storage is not supported"):
        loop.train_and_evaluate(tiny_config(), "gs://bucket/run")
    config = tiny_config()
    config.data.num_epochs = 1
    config.trainer.num_train_steps = 100  # tiny16 has 512 examples: 32 batches of 16
    with pytest.raises(ConfigError, match=r"num_epochs=1 gives 32 batches of 16, fewer than"):
        loop.train_and_evaluate(config, tmp_path)
    config = tiny_config()
    config.sharding.network_rules.modle = configlib.DEFAULT_RULES
    mesh = mesh_lib.create_mesh(config.mesh)
    batch = {"image": jax.ShapeDtypeStruct((16, 16, 16, 3), jnp.float32)}
    task = trainers.build_task(config)
    with pytest.raises(ConfigError, match=r"network_rules has entries for \['modle'\].*model"):
        state_lib.layout(task, {}, config, mesh, batch)


def test_workdir_of_another_config_is_refused_unless_overwrite(tmp_path):
    config = tiny_config()
    loop.claim_workdir(config, tmp_path)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    resumed = tiny_config()
    resumed.trainer.num_train_steps = 100  # run-length changes are a resume, not a new run
    resumed.mesh.fsdp = 4
    loop.claim_workdir(resumed, tmp_path)
    other = tiny_config()
    other.model.channels = 16
    with pytest.raises(CheckpointError, match=r"model\.channels: 8 -> 16.*--config\.overwrite"):
        loop.claim_workdir(other, tmp_path)
    assert (tmp_path / "metrics.jsonl").exists()
    other.overwrite = True
    loop.claim_workdir(other, tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()
    assert json.loads((tmp_path / "config.json").read_text())["model"]["channels"] == 16


class _CountingData:
    """A finite data iterator whose state is the number of batches handed out."""

    def __init__(self, n, fail_at=None):
        self.n, self.i, self.fail_at = n, 0, fail_at

    def __next__(self):
        if self.i == self.fail_at:
            raise OSError("disk gone")
        if self.i == self.n:
            raise StopIteration
        self.i += 1
        return {"x": np.full((2,), self.i)}

    def get_state(self):
        return {"global_batches": self.i}


def test_prefetched_batches_carry_the_data_position_after_them():
    batches = loop.BatchPrefetcher(_CountingData(5), lambda b: b["x"] * 10, depth=2)
    got = list(batches)
    batches.close()
    assert [int(b[0]) for b, _ in got] == [10, 20, 30, 40, 50]
    assert [s["global_batches"] for _, s in got] == [1, 2, 3, 4, 5]

    failing = loop.BatchPrefetcher(_CountingData(5, fail_at=2), lambda b: b, depth=1)
    assert next(failing)[1] == {"global_batches": 1}
    assert next(failing)[1] == {"global_batches": 2}
    with pytest.raises(OSError, match="disk gone"):
        next(failing)
    failing.close()

    # Closing while the thread waits on a full queue returns.
    stuck = loop.BatchPrefetcher(_CountingData(100), lambda b: b, depth=1)
    next(stuck)
    stuck.close()
    assert not stuck._thread.is_alive()

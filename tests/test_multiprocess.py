"""Whole runs of the training CLI in fresh processes: exact resume and two-process training."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/shapes_autoencoder.py:tiny"

pytestmark = pytest.mark.slow

TIMEOUT_S = 300  # per training command


def cli_env(**extra):
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "JAX_PLATFORMS": "cpu",
        "TFDS_DATA_DIR": os.environ["TFDS_DATA_DIR"],
        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
    }
    env.update(extra)
    return env


def train(workdir, steps, *overrides, launcher=(), env=None, program=("-m", "genctl_jax.train")):
    command = [
        *launcher,
        sys.executable,
        *program,
        "--config",
        CONFIG,
        "--workdir",
        str(workdir),
        f"--config.trainer.num_train_steps={steps}",
        *overrides,
    ]
    # A session of its own, so a timeout stops the launcher's processes too.
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env or cli_env(JAX_NUM_CPU_DEVICES="8"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"no exit after {TIMEOUT_S} s; the output ends:\n{(stdout + stderr)[-3000:]}")
    # The launcher relays its processes' output to its stdout.
    assert process.returncode == 0, (stdout + stderr)[-3000:]
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def load_state(workdir, step):
    """A saved train state as numpy arrays, whatever mesh wrote it."""
    path = pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def load_data_state(workdir, step):
    return json.loads(
        (pathlib.Path(workdir) / "checkpoints" / str(step) / "data" / "metadata").read_text()
    )


# SGD: Adam would amplify the float noise of mathematically-zero gradients (see test_train.py),
# and the one- and two-process runs reduce across devices in a different order.
OVERRIDES = ("--config.mesh.fsdp=4", "--config.optimizers.model.name=sgd")


@pytest.fixture(scope="module")
def one_run(tmp_path_factory):
    """4 steps in one process over 8 devices: the reference of both tests."""
    workdir = tmp_path_factory.mktemp("one_run")
    train(workdir, 4, *OVERRIDES)
    return workdir


def test_resume_after_process_exit_is_bitwise_exact(one_run, tmp_path):
    """2N steps in one run == N steps, exit, resume, N steps: params, EMA, optimizer, RNG."""
    train(tmp_path / "two_runs", 2, *OVERRIDES)
    second = train(tmp_path / "two_runs", 4, *OVERRIDES)
    assert "Resumed from the checkpoint at step 2" in second.stderr

    a, b = load_state(one_run, 4), load_state(tmp_path / "two_runs", 4)
    assert set(a) == {"params", "opt_state", "ema_params", "step", "rng"} | {
        "nonfinite_streak",
        "nonfinite_total",
    }
    leaves_a = jax.tree_util.tree_leaves_with_path(a)
    for (path, x), y in zip(leaves_a, jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    assert int(a["step"]) == 4
    assert load_data_state(one_run, 4) == load_data_state(tmp_path / "two_runs", 4)
    metrics = lambda w: [
        json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()
    ]
    assert metrics(one_run)[-1]["loss"] == metrics(tmp_path / "two_runs")[-1]["loss"]


def test_two_processes_train_like_one(one_run, tmp_path):
    """2 processes x 4 CPU devices (gloo) end with the params of 1 process x 8 devices.

    Process 1 compiles its train step 40 s late: gloo gives up on a device group that a process
    joins more than 30 s after the others, so the processes must start their steps together.
    """
    launcher = (
        str(REPO / "launch" / "multiprocess_cpu.sh"),
        "2",
        "--devices-per-process",
        "4",
        "--",
    )
    result = train(
        tmp_path / "two",
        4,
        *OVERRIDES,
        launcher=launcher,
        env=cli_env(SLOW_COMPILE_S="40", PYTHONPATH=str(REPO)),
        program=(str(REPO / "tests" / "slow_compile_train.py"),),
    )
    assert "process 1/2: 4 local / 8 global devices" in result.stdout + result.stderr

    one, two = load_state(one_run, 4), load_state(tmp_path / "two", 4)
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(one), jax.tree.leaves(two), strict=True
    ):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    assert load_data_state(one_run, 4) == load_data_state(tmp_path / "two", 4)

"""Sampling with ControlNets: multi-control, step schedules, guess mode, control files, the CLIs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_cli_body
from PIL import Image

from genctl_jax import evaluate, sample
from genctl_jax.control import files
from genctl_jax.diffusion import samplers
from genctl_jax.errors import ConfigError
from genctl_jax.models import controlnet as controlnet_lib
from genctl_jax.models import unet
from genctl_jax.trainers import saved_run
from genctl_jax.trainers.controlnet import ControlUnit, guess_mode_weights

N = 8  # One example per fake device.


def perturbed(controlnet_params, seed):
    """The ControlNet's params with its zero-initialised layers made random, so that its
    residuals are not zero (a fresh or barely trained ControlNet's are)."""
    out = jax.tree.map(np.asarray, jax.device_get(controlnet_params))
    rng = np.random.default_rng(seed)
    for name, layer in out.items():
        if controlnet_lib.is_controlnet_only(name):
            if name == "hint_encoder":
                layer = layer["conv_out"]
            layer["kernel"] = rng.normal(0.0, 0.3, layer["kernel"].shape).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def setup(tiny_controlnet_run):
    run = saved_run.load(tiny_controlnet_run)
    task = run.task
    size = task.config.data.image_size
    rng = np.random.default_rng(0)
    ids, mask = task.tokenize(["a large red circle", "a small blue star"] * (N // 2))
    inputs = dict(
        x=rng.normal(size=(N, size, size, 3)).astype(np.float32),
        ids=ids,
        mask=mask,
        controls=tuple(rng.uniform(size=(2, N, size, size, 3)).astype(np.float32)),
    )
    nets = (perturbed(run.params["controlnet"], 1), perturbed(run.params["controlnet"], 2))
    return run, task, inputs, nets


def evaluate_fns(run, task, fns, inputs, nets, t, branch):
    """Each of `fns` (params, x, t, cond, controls, branch -> output) on the inputs, in one jit."""

    def all_outputs(params, nets, x, ids, mask, controls, t, branch):
        params = dict(params, controlnet=nets)
        cond = task.encode(params, ids, mask)
        ts = jnp.full((N,), t, jnp.int32)
        return [fn(params, x, ts, cond, controls, branch) for fn in fns]

    with jax.set_mesh(run.mesh):
        outs = jax.jit(all_outputs)(
            run.params,
            nets,
            inputs["x"],
            inputs["ids"],
            inputs["mask"],
            inputs["controls"],
            jnp.int32(t),
            jnp.asarray(branch, jnp.float32),
        )
    return [np.asarray(o) for o in outs]


def test_multi_control_sums_the_scaled_residuals(setup):
    run, task, inputs, nets = setup
    module = task.controlnet
    units = [ControlUnit(module, "edges", scale=0.7), ControlUnit(module, "edges", scale=1.3)]
    multi = task.with_controls(units)
    options = samplers.SamplerOptions(num_steps=4)

    def sampled(params, x, t, cond, controls, branch):
        fn = multi.sampling_model_fn(params, options)
        return fn(x, t, {"text": cond, "controls": controls, "branch": branch})

    def by_hand(params, x, t, cond, controls, branch):
        a = task._residuals(module, params["controlnet"][0], x, t, cond, controls[0], 0.7)
        b = task._residuals(module, params["controlnet"][1], x, t, cond, controls[1], 1.0)
        down = [ra + 1.3 * rb for ra, rb in zip(a[0], b[0], strict=True)]
        return task._unet(params, x, t, cond, down_residuals=down, mid_residual=a[1] + 1.3 * b[1])

    def first_only(params, x, t, cond, controls, branch):
        a = task._residuals(module, params["controlnet"][0], x, t, cond, controls[0], 0.7)
        return task._unet(params, x, t, cond, down_residuals=a[0], mid_residual=a[1])

    def base(params, x, t, cond, controls, branch):
        return task._unet(params, x, t, cond)

    out, expected, one, plain = evaluate_fns(
        run, task, [sampled, by_hand, first_only, base], inputs, nets, 500, jnp.ones((N,))
    )
    error = np.abs(out - expected).max()
    print(
        f"multi-control: max |sampled - by hand| {error:.2g}; effect of the second ControlNet "
        f"{np.abs(out - one).max():.3g}, of both {np.abs(out - plain).max():.3g}"
    )
    assert error < 1e-5
    assert np.abs(out - one).max() > 1e-2 and np.abs(one - plain).max() > 1e-2


def test_control_schedule_and_guess_mode(setup):
    run, task, inputs, nets = setup
    module = task.controlnet
    # diffusers' rule: step i of N runs iff i / N >= start and (i + 1) / N <= end.
    np.testing.assert_array_equal(
        ControlUnit(module, "edges", start=0.2, end=0.8).active_steps(10),
        [0, 0, 1, 1, 1, 1, 1, 1, 0, 0],
    )
    np.testing.assert_array_equal(
        ControlUnit(module, "edges", start=0.5).active_steps(4), [0, 0, 1, 1]
    )
    k = unet.num_skips(module)
    np.testing.assert_allclose(guess_mode_weights(k), 10.0 ** np.linspace(-1, 0, k + 1), 1e-6)

    options = samplers.SamplerOptions(num_steps=4)
    ts = samplers.timesteps(1000, 4, options.spacing)
    late = task.with_controls([ControlUnit(module, "edges", start=0.5)])
    guess = task.with_controls([ControlUnit(module, "edges")], guess_mode=True)
    branch = jnp.asarray([1.0, 0.0] * (N // 2))

    def sampled_by(variant):
        def fn(params, x, t, cond, controls, branch):
            one = dict(params, controlnet=params["controlnet"][0])
            if not variant.guess_mode:  # Both guidance branches are controlled.
                branch = jnp.ones_like(branch)
            c = {"text": cond, "controls": controls[:1], "branch": branch}
            return variant.sampling_model_fn(one, options)(x, t, c)

        return fn

    def full(params, x, t, cond, controls, branch):
        r = task._residuals(module, params["controlnet"][0], x, t, cond, controls[0], 1.0)
        return task._unet(params, x, t, cond, down_residuals=r[0], mid_residual=r[1])

    def weighted(params, x, t, cond, controls, branch):
        down, mid = task._residuals(module, params["controlnet"][0], x, t, cond, controls[0], 1.0)
        w = 10.0 ** np.linspace(-1, 0, k + 1)
        down = [r * w[i] for i, r in enumerate(down)]
        return task._unet(params, x, t, cond, down_residuals=down, mid_residual=mid)

    def base(params, x, t, cond, controls, branch):
        return task._unet(params, x, t, cond)

    fns = [sampled_by(late), sampled_by(guess), full, weighted, base]
    results = {
        step: evaluate_fns(run, task, fns, inputs, nets, int(ts[step]), branch) for step in (0, 3)
    }
    for step, (scheduled, guessed, with_control, with_weights, plain) in results.items():
        # start=0.5 of 4 steps: steps 0 and 1 uncontrolled, 2 and 3 controlled.
        np.testing.assert_allclose(scheduled, plain if step < 2 else with_control, atol=1e-5)
        # Guess mode: rows of branch 0 (the unconditional twin) are uncontrolled.
        np.testing.assert_allclose(guessed[1::2], plain[1::2], atol=1e-5)
        np.testing.assert_allclose(guessed[0::2], with_weights[0::2], atol=1e-5)
        assert np.abs(with_control - plain).max() > 1e-2
        assert np.abs(with_weights - with_control).max() > 1e-3


def write_png(path, array):
    Image.fromarray(array).save(path)
    return str(path)


def test_control_files(tmp_path):
    edges = np.zeros((16, 16), np.uint8)
    edges[4, 2:12] = 255
    grey = write_png(tmp_path / "edges.png", edges)
    out = files.read_control(grey, "edges", 3, 16)
    assert out.shape == (1, 16, 16, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0, ..., 2], edges / 255.0)
    # Another size: resized (bilinear), with a note; a greyscale map saved as RGB is fine for
    # a 1-channel input.
    big = write_png(
        tmp_path / "big.png", np.repeat(np.kron(edges, np.ones((2, 2), np.uint8))[..., None], 3, -1)
    )
    resized = files.read_control(big, "edges", 1, 16)
    assert resized.shape == (1, 16, 16, 1)
    line = resized[0, :, 3:11, 0]
    assert (line.argmax(0) == 4).all() and line[4].min() > 0.5 and line[7:].max() == 0
    # Label ids coloured by the palette, resized nearest-neighbour (ids stay ids).
    labels = np.zeros((32, 32), np.uint8)
    labels[8:20, 8:20] = 3
    ids = write_png(tmp_path / "ids.png", labels)
    seg = files.read_control(ids, "seg", 3, 16, extract=True)
    np.testing.assert_allclose(seg[0, 6, 6], np.array([128, 128, 0]) / 255.0)  # VOC colour 3
    np.testing.assert_array_equal(seg[0, 0, 0], [0, 0, 0])
    # Canny on an image, at the model's size: a filled square's outline.
    image = np.zeros((16, 16, 3), np.uint8)
    image[4:12, 4:12] = 200
    canny = files.read_control(write_png(tmp_path / "im.png", image), "canny", 1, 16, extract=True)
    assert canny[0, 4:12, 4:12, 0].sum() > 10 and canny[0, 0, 0, 0] == 0

    colour = np.zeros((16, 16, 3), np.uint8)
    colour[..., 0] = 255
    with pytest.raises(ConfigError, match=r"colour image of shape \(16, 16, 3\).*1-channel"):
        files.read_control(write_png(tmp_path / "c.png", colour), "edges", 1, 16)
    with pytest.raises(ConfigError, match="greyscale, but a 'seg' ControlNet.*--extract_control"):
        files.read_control(ids, "seg", 3, 16)
    with pytest.raises(ConfigError, match="extracting a 'depth' control"):
        files.read_control(grey, "depth", 3, 16, extract=True)
    with pytest.raises(ConfigError, match="does not exist"):
        files.read_control(tmp_path / "nope.png", "edges", 3, 16)


def test_sample_and_evaluate_clis(tiny_controlnet_run, tmp_path):
    workdir = str(tiny_controlnet_run)
    edges = np.zeros((16, 16), np.uint8)
    edges[3:13, 3] = edges[3:13, 12] = 255
    control = write_png(tmp_path / "edges.png", edges)
    common = ["--num_samples=2", "--steps=2", "--guidance_scale=2"]
    out = tmp_path / "multi.png"
    run_cli_body(
        sample,
        f"--workdir={workdir}",
        f"--controlnet={workdir}",
        f"--control={control}",
        f"--control={control}",
        "--conditioning_scale=1,0.5",
        "--control_end=1,0.5",
        "--prompt=a red circle",
        f"--out={out}",
        *common,
    )
    assert Image.open(out).size == (35, 18)  # a 2 x 1 grid of 16-pixel samples
    guessed = tmp_path / "guess.png"
    run_cli_body(
        sample,
        f"--workdir={workdir}",
        f"--control={control}",
        "--prompt=",
        "--guess_mode",
        f"--out={guessed}",
        *common,
    )
    assert guessed.exists()

    with pytest.raises(ConfigError, match="2 ControlNets .* need one --control image each"):
        run_cli_body(
            sample,
            f"--workdir={workdir}",
            f"--controlnet={workdir}",
            f"--control={control}",
            *common,
        )
    with pytest.raises(ConfigError, match="trained on 'edges' controls"):
        run_cli_body(
            sample, f"--workdir={workdir}", f"--control={control}", "--control_type=seg", *common
        )
    with pytest.raises(ConfigError, match="start 0.6 and end 0.5"):
        run_cli_body(
            sample,
            f"--workdir={workdir}",
            f"--control={control}",
            "--control_start=0.6",
            "--control_end=0.5",
            *common,
        )
    base = json.loads((tiny_controlnet_run / "config.json").read_text())["controlnet"]
    with pytest.raises(ConfigError, match="--control needs a ControlNet run"):
        run_cli_body(sample, f"--workdir={base['base_workdir']}", f"--control={control}", *common)

    # evaluate: the shapes test split's captions and edge maps; conditioning scale 0 is the base.
    run_cli_body(
        evaluate,
        f"--workdir={workdir}",
        "--metrics=control,fidelity",
        "--num_samples=8",
        "--batch_size=8",
        "--steps=2",
        "--sweep=conditioning_scale=0,1",
        "--name=cs",
    )
    report = json.loads((tiny_controlnet_run / "eval" / "cs.json").read_text())
    rows = report["results"]
    assert [row["value"] for row in rows] == [0.0, 1.0]
    for row in rows:
        assert 0.0 <= row["metrics"]["control/edge_f1"] <= 1.0
        assert 0.0 <= row["metrics"]["control/segmentation_miou"] <= 1.0


def test_units_refuse_bad_settings_and_other_layouts(setup):
    _, task, _, _ = setup
    module = task.controlnet
    with pytest.raises(ConfigError, match="conditioning scale is -1"):
        ControlUnit(module, "edges", scale=-1.0)
    with pytest.raises(ConfigError, match="start 0.5 and end 0.5: expected 0 <= start < end <= 1"):
        ControlUnit(module, "edges", start=0.5, end=0.5)
    wider = dict(task.config.model.to_dict())
    wider["channels"] = 2 * wider["channels"]
    other = controlnet_lib.from_config(wider)
    with pytest.raises(ConfigError) as error:
        task.with_controls([ControlUnit(module, "edges"), ControlUnit(other, "seg")])
    message = str(error.value)
    assert f"the 'seg' ControlNet has channels={wider['channels']}" in message
    assert f"the base UNet ({task.config.controlnet.base_workdir}) has channels=" in message

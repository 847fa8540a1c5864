"""Sampling GAN runs with the sampling CLI: StyleGAN2 with truncation, pix2pix from the shapes
test maps or a control file, SPADE's label-id files, and the errors of misused options."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, run_cli_body
from PIL import Image

from genctl_jax import configlib, sample, trainers
from genctl_jax.errors import ConfigError
from genctl_jax.io import images
from genctl_jax.trainers import gan_sampling, saved_run
from genctl_jax.trainers.task import BUFFERS

SIZE = 16  # The tiny configs' image size.


def recipe(name, arg="tiny"):
    return configlib.load_config(f"{REPO / 'configs' / name}:{arg}")


@pytest.fixture(scope="module")
def pix2pix_run(trained_tiny_pix2pix):
    return trained_tiny_pix2pix  # conftest: 600 steps, shared with the quality test


@pytest.fixture(scope="module")
def stylegan2_run(trained_tiny_stylegan2):
    return trained_tiny_stylegan2  # conftest: 160 steps, shared with the quality test


def run_sample(*argv):
    run_cli_body(sample, *argv)


def tiles(path, n):
    """The n tiles (int [SIZE, SIZE, 3]) of a grid `images.make_grid` wrote."""
    grid = np.asarray(Image.open(path)).astype(int)
    columns = int(np.ceil(np.sqrt(n)))
    out = []
    for i in range(n):
        top, left = 1 + (i // columns) * (SIZE + 1), 1 + (i % columns) * (SIZE + 1)
        out.append(grid[top : top + SIZE, left : left + SIZE])
    return out


def test_stylegan2_grid_and_truncation(stylegan2_run, tmp_path):
    def grid(psi, seed):
        out = tmp_path / f"psi{psi}_seed{seed}.png"
        run_sample(
            f"--workdir={stylegan2_run}", "--num_samples=6", f"--truncation={psi}",
            f"--seed={seed}", f"--out={out}",
        )  # fmt: skip
        # 6 tiles of 16 px in a 3 x 2 grid with 1-px borders.
        assert Image.open(out).size == (3 * (SIZE + 1) + 1, 2 * (SIZE + 1) + 1)
        return tiles(out, 6)

    free = grid(1, 0)
    differences = [np.abs(free[0] - t).mean() for t in free[1:]]
    assert min(differences) > 10, differences  # distinct latents, distinct images
    # psi = 0: every sample of any seed is the w average's image, up to the noise inputs.
    first = grid(0, 0)
    for tile in first + grid(0, 1):
        assert np.abs(tile - first[0]).max() <= 8
    assert np.abs(first[0] - free[0]).mean() > 10


def test_truncation_zero_is_the_w_average_image(stylegan2_run):
    run = saved_run.load(stylegan2_run, for_sampling=True)
    task, params = run.task, run.params
    assert set(params) == {"generator", BUFFERS}  # Sampling reads no discriminator.
    w_avg = np.asarray(params[BUFFERS]["w_avg"])
    assert np.abs(w_avg).max() > 0  # tracked during training
    ws = jnp.broadcast_to(jnp.asarray(w_avg), (1, task.generator.num_ws, w_avg.shape[0]))
    want = task.generator.apply(
        {"params": params["generator"]}, ws, True, method=task.generator.synthesize
    )

    def draw(seed, psi, n=3):
        return gan_sampling.generate(
            task, run.mesh, params, n, seed, truncation=psi, deterministic=True
        )

    for seed in (0, 1):
        got = draw(seed, 0.0)
        assert got.shape == (3, SIZE, SIZE, 3)
        np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), atol=1e-5)
    free = draw(0, 1.0)
    assert np.abs(free[0] - free[1]).mean() > 0.05
    with pytest.raises(ConfigError, match=r"truncation=-0\.5: expected a value in \[0, 1\]"):
        draw(0, -0.5)


def test_pix2pix_samples_the_test_maps_and_reports_fidelity(pix2pix_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    run_sample(f"--workdir={pix2pix_run}", "--num_samples=5", f"--out={out}")
    assert Image.open(out).size == (3 * (SIZE + 1) + 1, 2 * (SIZE + 1) + 1)
    stdout = capsys.readouterr().out
    assert "control fidelity (analytic checker, 5 samples from the shapes test split's maps)" in (
        stdout
    )
    assert "segmentation mIoU" in stdout and "edge F1" in stdout
    # The tiles are the generator's images of the first 5 test examples' edge maps.
    run = saved_run.load(pix2pix_run, for_sampling=True)
    assert set(run.params) == {"generator"}
    maps = gan_sampling.shapes_test_maps(run.config.data, 5)
    want = gan_sampling.generate(
        run.task, run.mesh, run.params, 5, 0, conditions=run.task.condition_from_batch(maps)
    )
    got = tiles(out, 5)
    for i in range(5):
        np.testing.assert_array_equal(got[i], images.to_uint8(want[i]))
    assert len({t.tobytes() for t in got}) == 5

    # --control FILE: the first test example's edge map gives its sample, for every sample.
    Image.fromarray(maps["edges"][0]).save(tmp_path / "edges.png")
    controlled = tmp_path / "controlled.png"
    run_sample(
        f"--workdir={pix2pix_run}", "--num_samples=3", f"--control={tmp_path / 'edges.png'}",
        f"--out={controlled}",
    )  # fmt: skip
    assert Image.open(controlled).size == (2 * (SIZE + 1) + 1, 2 * (SIZE + 1) + 1)
    for tile in tiles(controlled, 3):
        np.testing.assert_array_equal(tile, got[0])
    assert "control fidelity" not in capsys.readouterr().out  # no maps to judge against
    # A map of another size is resized (bilinear, as a ControlNet's edge files).
    big = Image.fromarray(maps["edges"][0]).resize((2 * SIZE, 2 * SIZE), Image.Resampling.NEAREST)
    big.save(tmp_path / "edges32.png")
    run_sample(
        f"--workdir={pix2pix_run}", "--num_samples=2", f"--control={tmp_path / 'edges32.png'}",
        f"--out={controlled}",
    )  # fmt: skip
    assert Image.open(controlled).size == (2 * (SIZE + 1) + 1, 1 * (SIZE + 1) + 1)


def test_gan_runs_refuse_misused_options(pix2pix_run, stylegan2_run, tmp_path):
    edges = tmp_path / "edges.png"
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(edges)
    pix, style = f"--workdir={pix2pix_run}", f"--workdir={stylegan2_run}"
    cases = [
        ((style, "--truncation=1.5"), r"--truncation=1\.5: expected a value in \[0, 1\]"),
        ((pix, "--truncation=0.5"), r"--truncation needs a StyleGAN2 run; .* 'pix2pix' run"),
        ((pix, "--steps=5"), r"--steps is a diffusion sampling option; .* 'pix2pix' GAN run"),
        ((style, "--prompt=a red circle", "--steps=5"), r"--steps is a diffusion sampling"),
        ((style, "--guidance_scale=2"), r"--guidance_scale is a diffusion sampling option"),
        ((pix, f"--control={edges}", f"--control={edges}"), r"takes one --control file .* 2"),
        ((style, f"--control={edges}"), r"--control given, but .* unconditional StyleGAN2"),
        ((pix, f"--control={tmp_path / 'missing.png'}"), r"missing\.png' does not exist"),
    ]
    for argv, message in cases:
        with pytest.raises(ConfigError, match=message):
            run_sample(*argv)


def test_label_id_files_for_spade_and_pix2pix_seg(tmp_path):
    config = recipe("shapes_spade.py")  # 32 px, 7 classes
    task = trainers.build_task(config)
    size, classes = config.data.image_size, task.num_classes
    ids = (np.arange(size * size).reshape(size, size) % classes).astype(np.uint8)
    Image.fromarray(ids).save(tmp_path / "ids.png")
    got = gan_sampling.read_condition(task, config, tmp_path / "ids.png")
    assert got.dtype == np.int32 and got.shape == (1, size, size)
    np.testing.assert_array_equal(got[0], ids)
    # Another size: nearest-neighbour, so still class ids.
    small = np.kron(np.arange(4, dtype=np.uint8).reshape(2, 2), np.ones((8, 8), np.uint8))
    Image.fromarray(small).save(tmp_path / "small.png")
    got = gan_sampling.read_condition(task, config, tmp_path / "small.png")
    np.testing.assert_array_equal(got[0], np.kron(small, np.ones((2, 2), np.uint8)))
    # Ids beyond the classes, or a colour image, are refused.
    bad = ids.copy()
    bad[3, 4] = 9
    Image.fromarray(bad).save(tmp_path / "bad.png")
    with pytest.raises(ConfigError, match=r"holds class id 9, but the model has 7 classes"):
        gan_sampling.read_condition(task, config, tmp_path / "bad.png")
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ConfigError, match=r"'RGB'; label ids .* greyscale"):
        gan_sampling.read_condition(task, config, tmp_path / "rgb.png")

    # pix2pix 'seg' runs: the ids' palette colours in [-1, 1], as in training.
    config = recipe("shapes_pix2pix.py", "tiny,seg")
    task = trainers.build_task(config)
    ids16 = ids[:SIZE, :SIZE]
    Image.fromarray(ids16).save(tmp_path / "ids16.png")
    got = gan_sampling.read_condition(task, config, tmp_path / "ids16.png")
    assert got.shape == (1, SIZE, SIZE, 3)
    np.testing.assert_array_equal(got, task.condition_from_batch({"segmentation": ids16[None]}))
    assert len(np.unique(got.reshape(-1, 3), axis=0)) == classes
    Image.fromarray(bad[:SIZE, :SIZE]).save(tmp_path / "bad16.png")
    with pytest.raises(ConfigError, match=r"holds class id 9, but the model has 7 classes"):
        gan_sampling.read_condition(task, config, tmp_path / "bad16.png")

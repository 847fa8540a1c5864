"""Test-wide JAX set-up: 8 fake CPU devices and a persistent compilation cache.

This runs before any test module imports JAX, so every test sees the same
8-device platform and sharding is exercised on every run.
"""

import fcntl
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The embedded dataset is built once into the repo's cache and reused across runs.
os.environ.setdefault("TFDS_DATA_DIR", str(REPO / ".cache" / "tfds"))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# Faster random init on CPU; the partitionable variant is only needed on real meshes.
jax.config.update("jax_threefry_partitionable", False)
# The Makefile's cache directory, also when pytest runs without make.
USER_CACHE = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("JAX_COMPILATION_CACHE_DIR", str(USER_CACHE / "genctl_jax" / "jax")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _save_encoder(directory, kind):
    """A random-weight transformers text encoder with the shapes tokenizer beside it."""
    import torch
    import transformers

    from genctl_jax.models.text.tokenizer import shapes_tokenizer

    torch.manual_seed(0)
    if kind == "t5":
        config = transformers.T5Config(
            vocab_size=40, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=16,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        )  # fmt: skip
        model = transformers.T5EncoderModel(config)
    else:  # CLIP with projection; the shapes tokenizer's </s> (id 1) ends every prompt.
        config = transformers.CLIPTextConfig(
            vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, projection_dim=24,
            bos_token_id=3, eos_token_id=1, pad_token_id=0,
        )  # fmt: skip
        model = transformers.CLIPTextModelWithProjection(config)
    model.save_pretrained(directory, safe_serialization=True)
    shapes_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def pretrained_encoders(tmp_path_factory):
    """{'t5': dir, 'clip': dir}: tiny pretrained-encoder directories as Hugging Face writes them."""
    return {kind: _save_encoder(tmp_path_factory.mktemp(kind), kind) for kind in ("t5", "clip")}


def cli(*args, env_extra=None):
    """`python -m *args` in a fresh process on 8 CPU devices, sharing the compilation cache."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "JAX_PLATFORMS": "cpu",
        "JAX_NUM_CPU_DEVICES": "8",
        "TFDS_DATA_DIR": os.environ["TFDS_DATA_DIR"],
        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
        **(env_extra or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True
    )


def built_once(tmp_path_factory, name, build):
    """Directory `name`, filled by `build(directory)` once per test run for all xdist workers.

    Session fixtures are per worker; a run that several workers' tests read is trained once
    under a file lock (the others wait for it) instead of once per worker. Readers must not
    change what is inside.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers' base directories
    directory = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / ".built").exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            build(directory)
            (directory / ".built").touch()
    return directory


@pytest.fixture(scope="session")
def tiny_t2i_base(tmp_path_factory):
    """Two train steps of configs/shapes_t2i.py:tiny through the training CLI.

    The text-to-image CLI tests' run and the ControlNet tests' frozen base.
    """

    def build(workdir):
        result = cli(
            "genctl_jax.train", "--config", "configs/shapes_t2i.py:tiny",
            "--workdir", str(workdir), "--config.trainer.num_train_steps=2",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]

    return built_once(tmp_path_factory, "t2i_base", build)


@pytest.fixture(scope="session")
def trained_tiny_t2i(tmp_path_factory):
    """600 steps of configs/shapes_t2i.py:tiny (batch 32, on 2 devices): a small model that
    follows prompts' colours, and the ControlNet quality test's base (about 2.5 minutes)."""
    from genctl_jax import configlib
    from genctl_jax.trainers import loop

    def build(workdir):
        config = configlib.load_config(f"{REPO / 'configs' / 'shapes_t2i.py'}:tiny")
        config.data.batch_size = 32
        for network in ("model", "text_encoder"):
            config.optimizers[network].learning_rate = 2e-3
            config.optimizers[network].warmup_steps = 50
        config.trainer.num_train_steps = 600
        config.trainer.ema_decay = 0.99
        config.trainer.log_every = 100
        config.trainer.checkpoint_every = 600
        config.trainer.sample_every = 0
        config.mesh.data = 2
        loop.train_and_evaluate(config, workdir, devices=jax.devices()[:2])

    return built_once(tmp_path_factory, "t2i_trained", build)


def _tiny_gan_training(recipe, steps, log_every):
    """A `built_once` build: `steps` of configs/`recipe`:tiny on 2 devices, logged every
    `log_every`, one checkpoint at the end."""
    from genctl_jax import configlib
    from genctl_jax.trainers import loop

    def build(workdir):
        config = configlib.load_config(f"{REPO / 'configs' / recipe}:tiny")
        config.trainer.num_train_steps = steps
        config.trainer.log_every = log_every
        config.trainer.checkpoint_every = steps
        config.trainer.sample_every = 0
        config.mesh.data = 2
        loop.train_and_evaluate(config, workdir, devices=jax.devices()[:2])

    return build


@pytest.fixture(scope="session")
def trained_tiny_pix2pix(tmp_path_factory):
    """600 steps of configs/shapes_pix2pix.py:tiny: the pix2pix quality test's run, and the
    GAN sampling tests' pix2pix run."""
    return built_once(
        tmp_path_factory, "pix2pix_trained", _tiny_gan_training("shapes_pix2pix.py", 600, 100)
    )


@pytest.fixture(scope="session")
def trained_tiny_stylegan2(tmp_path_factory):
    """160 steps of configs/shapes_stylegan2.py:tiny (R1 and path length every 2 steps): the
    StyleGAN2 quality test's run, and the GAN sampling tests' StyleGAN2 run."""
    return built_once(
        tmp_path_factory, "stylegan2_trained", _tiny_gan_training("shapes_stylegan2.py", 160, 20)
    )


@pytest.fixture(scope="session")
def tiny_controlnet_run(tiny_t2i_base, tmp_path_factory):
    """Workdir of two train steps of configs/shapes_controlnet.py:tiny on `tiny_t2i_base`."""
    from genctl_jax import configlib
    from genctl_jax.trainers import loop

    def build(workdir):
        recipe = REPO / "configs" / "shapes_controlnet.py"
        config = configlib.load_config(f"{recipe}:tiny,base={tiny_t2i_base}")
        loop.train_and_evaluate(config, workdir)

    return built_once(tmp_path_factory, "controlnet", build)


def write_cityscapes_like(root, *, per_city=2, size=(16, 32), num_classes=35, seed=0):
    """A Cityscapes-layout tree of random PNGs under `root`; returns {image path: label ids}.

    leftImg8bit/train/CITY/CITY_N_leftImg8bit.png (RGB, `size` = (h, w)) beside
    gtFine/train/CITY/CITY_N_gtFine_{labelIds,color,instanceIds}.png: label ids (mode L),
    their colours (RGB) and instance ids (16-bit), as the real set ships them.
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    labels = {}
    for city in ("aachen", "bonn"):
        for n in range(per_city):
            stem = f"{city}_{n:06d}_000019"
            image = root / "leftImg8bit" / "train" / city / f"{stem}_leftImg8bit.png"
            maps = root / "gtFine" / "train" / city
            for folder in (image.parent, maps):
                folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (*size, 3), np.uint8)).save(image)
            ids = rng.integers(0, num_classes, size, np.uint8)
            Image.fromarray(ids, mode="L").save(maps / f"{stem}_gtFine_labelIds.png")
            Image.fromarray(rng.integers(0, 256, (*size, 3), np.uint8)).save(
                maps / f"{stem}_gtFine_color.png"
            )
            instances = ids.astype(np.uint16) * 1000 + 1
            Image.fromarray(instances).save(maps / f"{stem}_gtFine_instanceIds.png")
            labels[image] = ids
    return labels


def run_cli_body(module, *argv):
    """A CLI module's `run()` in this process: its flags parsed from argv, then reset."""
    from absl import flags

    flags.FLAGS([module.__name__, *argv])
    try:
        return module.run()
    finally:
        flags.FLAGS.unparse_flags()


# The files that take longest (minutes of training or compiling), longest first. Under
# `pytest -n 2 --dist loadfile` a worker takes the next file when it is free, so starting
# these first keeps one of them from running alone at the end.
LONGEST_FIRST = (
    "test_text_to_image.py",
    "test_evaluate.py",
    "test_diffusion_training.py",
    "test_controlnet_quality.py",
    "test_controlnet_sampling.py",
    "test_controlnet_training.py",
    "test_multiprocess.py",
    "test_gan_training.py",
    "test_gan_quality.py",
    "test_gan_inversion.py",
)


# Files that read runs other files train (`built_once`): last, when those runs exist, so their
# worker does not wait for them.
LAST = ("test_gan_sampling.py",)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    rank.update({name: len(rank) + 1 + i for i, name in enumerate(LAST)})
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))

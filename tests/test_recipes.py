"""Full-size recipes that cannot train here still validate, read their data and lower their train
step on the mesh (tracing with every sharding; XLA's compile of these programs takes minutes on
2 CPU cores and checks nothing more that these tests assert)."""

import io
import pathlib

import jax
import numpy as np
import pytest
from conftest import write_cityscapes_like
from PIL import Image

from genctl_jax import configlib, trainers
from genctl_jax.data import pipeline
from genctl_jax.parallel import mesh as mesh_lib
from genctl_jax.parallel.mesh import batch_sharding
from genctl_jax.trainers import trainer as trainer_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fake_cifar10(tmp_path_factory):
    """A prepared `cifar10` with the real builder's features and version, random pixels."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.image_classification.cifar import Cifar10

    class FakeCifar10(Cifar10, skip_registration=True):
        name = "cifar10"

        def _split_generators(self, dl_manager):
            return {"train": self._fake(256), "test": self._fake(16)}

        def _fake(self, n):
            rng = np.random.default_rng(0)
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(buf, "PNG")
                buf.seek(0)
                yield i, {"id": f"fake_{i}", "image": buf, "label": i % 10}

    data_dir = tmp_path_factory.mktemp("tfds")
    FakeCifar10(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    assert len(tfds.data_source("cifar10", split="train", data_dir=str(data_dir))) == 256
    return data_dir


@pytest.mark.slow
def test_cifar10_ddpm_validates_and_lowers_its_train_step(fake_cifar10):
    config = configlib.load_config(str(REPO / "configs" / "cifar10_ddpm.py"))
    config.data.data_dir = str(fake_cifar10)
    config.mesh.fsdp = 4
    configlib.validate(config, num_devices=8, process_count=1)

    mesh = mesh_lib.create_mesh(config.mesh)
    batch = {
        "image": jax.ShapeDtypeStruct((128, 32, 32, 3), np.float32, sharding=batch_sharding(mesh))
    }
    run = trainer_lib.build(config, mesh, batch)
    params = run.layout.abstract.params["model"]
    count = sum(x.size for x in jax.tree.leaves(params))
    assert abs(count - 35.7e6) / 35.7e6 < 0.02, count
    # The unpartitioned program's count (the compiled one's per-device share times 8 agreed to
    # 0.3% on 2026-11-27). The forward is ~6 GMAC (12 GFLOP) per 32x32 image and a train step
    # ~3 forwards.
    per_image = run.lower(batch).cost_analysis()["flops"] / 128
    assert 25e9 < per_image < 50e9, per_image


def _real_batch_and_lowered_step(config):
    """One batch read through the config's pipeline, and its train step lowered on the mesh."""
    mesh = mesh_lib.create_mesh(config.mesh)
    task = trainers.build_task(config)
    data = pipeline.create_iterator(config.data, seed=config.seed)
    raw = next(data)
    data.close()
    batch = pipeline.to_global(task.prepare_batch(dict(raw)), mesh)
    run = trainer_lib.build(config, mesh, batch, task)
    return raw, run.lower(batch)


@pytest.mark.slow
def test_cityscapes_spade_reads_its_pairs_and_lowers_its_train_step(tmp_path):
    labels = write_cityscapes_like(tmp_path, per_city=8, size=(32, 64))
    config = configlib.load_config(f"{REPO / 'configs' / 'cityscapes_spade.py'}:root={tmp_path}")
    config.mesh.fsdp = 8
    configlib.validate(config, num_devices=8, process_count=1)

    raw, lowered = _real_batch_and_lowered_step(config)
    assert raw["image"].shape == (16, 256, 256, 3)
    assert raw["segmentation"].shape == (16, 256, 256)
    # Nearest resampling keeps ids: every id seen is one the label files hold.
    seen = np.unique(raw["segmentation"])
    assert set(seen) <= set(np.unique(np.stack(list(labels.values())))) and len(seen) > 30
    assert lowered.cost_analysis()["flops"] > 0


@pytest.mark.slow
def test_ffhq_stylegan2_validates_and_lowers_its_train_step(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(32):  # FFHQ's layout: thousands-folders of numbered PNGs
        path = tmp_path / f"{i // 16 * 1000:05d}" / f"{i:05d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(path)
    config = configlib.load_config(f"{REPO / 'configs' / 'ffhq_stylegan2.py'}:folder={tmp_path}")
    config.mesh.fsdp = 8
    configlib.validate(config, num_devices=8, process_count=1)

    raw, lowered = _real_batch_and_lowered_step(config)
    assert raw["image"].shape == (32, 256, 256, 3)
    assert lowered.cost_analysis()["flops"] > 0

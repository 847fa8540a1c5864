"""Evaluation: sharded Inception features, the evaluate CLI (sweep, JSON, plot) and the
trainer's periodic evaluation with best-checkpoint selection, on the tiny shapes config.

The FID Inception weights here are RANDOM (no download is possible in tests): the numbers
exercise the plumbing, not image quality. The network itself is checked against pytorch-fid
in test_inception.py.
"""

import json
import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import run_cli_body
from flax import traverse_util
from PIL import Image

from genctl_jax import configlib
from genctl_jax.errors import CheckpointError, ConfigError
from genctl_jax.metrics import distribution, evaluation
from genctl_jax.models import inception
from genctl_jax.trainers import generation, loop, saved_run

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = "configs/shapes_diffusion.py:tiny"


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A safetensors file of RANDOM FID-Inception weights (BatchNorm statistics randomised)."""
    rng = np.random.default_rng(0)
    flat = {}
    for path, leaf in traverse_util.flatten_dict(nn.unbox(inception.abstract_params())).items():
        shape = leaf.shape
        if path[-1] == "var":
            value = rng.uniform(0.5, 1.5, shape)
        elif path[-1] == "scale":
            value = rng.uniform(0.8, 1.2, shape)
        elif path[-1] in ("mean", "bias"):
            value = rng.normal(0, 0.1, shape)
        else:  # Kernels: variance-preserving, so features neither vanish nor explode.
            value = rng.normal(0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
        flat[path] = value.astype(np.float32)
    path = tmp_path_factory.mktemp("inception") / "fid_inception.safetensors"
    inception.save_params(path, traverse_util.unflatten_dict(flat))
    return path


def tiny_config(**eval_fields):
    config = configlib.load_config(TINY)
    config.trainer.num_train_steps = 2
    config.trainer.checkpoint_every = 1
    config.trainer.keep_checkpoints = 1
    config.trainer.progress_bar = False
    config.eval.update(eval_fields)
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, inception_weights):
    """Two train steps of the tiny config, evaluated after each, keeping the best FID."""
    workdir = tmp_path_factory.mktemp("evaluated")
    config = tiny_config(
        every_steps=1,
        metrics=("fid", "fidelity"),
        num_samples=8,
        batch_size=8,
        reference="shapes:test",
        inception_weights=str(inception_weights),
        best_metric="fid",
    )
    loop.train_and_evaluate(config, workdir)
    return workdir


def test_periodic_evaluation_logs_scalars_and_keeps_the_best_checkpoint(trained):
    lines = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    evals = {line["step"]: line for line in lines if "eval/fid" in line}
    assert sorted(evals) == [1, 2]
    fids = {step: line["eval/fid"] for step, line in evals.items()}
    assert all(np.isfinite(v) and v > 0 for v in fids.values()), fids
    assert all(0 <= line["eval/fidelity/class"] <= 1 for line in evals.values())
    best = json.loads((trained / "eval" / "best.json").read_text())
    best_step = min(fids, key=fids.get)
    assert best == {"step": best_step, "metric": "fid", "value": pytest.approx(fids[best_step])}
    # The kept state is that step's, still there although only the last checkpoint is kept.
    assert [p.name for p in (trained / "best_checkpoint").iterdir() if p.name.isdigit()] == [
        str(best_step)
    ]
    assert saved_run.load(trained, checkpoint="best").step == best_step
    assert saved_run.load(trained).step == 2
    # The reference statistics were computed once and cached.
    assert len(list((trained / "eval" / "reference").glob("*_n8_highest.npz"))) == 1


def test_features_and_samples_do_not_depend_on_the_device_count(trained, inception_weights):
    outputs = {}
    for count in (1, 8):
        loaded = saved_run.load(trained, jax.devices()[:count])
        options = loaded.task.sampling
        conditions = evaluation.conditions_for(loaded.task, loaded.config, 8)
        mesh = loaded.mesh
        generator = generation.Generator(loaded.task, mesh, options, 8)
        samples = next(generator.draw(loaded.params, 8, 0, conditions))
        pool, logits = evaluation.InceptionFeatures(str(inception_weights), mesh, 8, "highest")(
            samples
        )
        stats = distribution.FeatureStatistics()
        stats.update(pool)
        outputs[count] = samples, pool, logits, stats.result()
    (s1, p1, l1, g1), (s8, p8, l8, g8) = outputs[1], outputs[8]
    assert float(np.abs(s1).mean()) > 0.1  # real images, not zeros
    np.testing.assert_allclose(s8, s1, atol=2e-5)
    np.testing.assert_allclose(p8, p1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-4)
    assert distribution.fid(g1, g8) < 1e-6


def test_evaluate_cli_sweeps_steps_and_writes_json_and_a_plot(trained, inception_weights, capsys):
    run_evaluate(
        f"--workdir={trained}",
        "--metrics=fid,kid,is,fidelity",
        "--num_samples=16",
        "--batch_size=8",
        "--reference=shapes:test",
        f"--inception_weights={inception_weights}",
        "--sweep=steps=2,4",
        "--name=sweep",
    )
    report = json.loads((trained / "eval" / "sweep.json").read_text())
    assert report["step"] == 2 and report["sweep"] == {"field": "steps", "values": [2, 4]}
    rows = report["results"]
    assert [r["sampling"]["num_steps"] for r in rows] == [2, 4]
    for row in rows:
        m = row["metrics"]
        assert m["fid"] > 0 and np.isfinite(m["kid"]) and m["kid_std"] >= 0
        # IS lies in [1, classes]; with 16 samples and 10 splits it is close to 1 but not 1.
        assert 1.0 < m["inception_score"] < 1008
        assert 0 <= m["fidelity/class"] <= m["fidelity/colour"] <= 1
    # The step count changes the samples, so the scores differ between the two settings.
    assert rows[0]["metrics"]["fid"] != rows[1]["metrics"]["fid"]
    assert "steps=4: fid" in capsys.readouterr().out
    plot = Image.open(trained / "eval" / "sweep.png")
    assert plot.size[0] > 4 * plot.size[1] // 2  # one panel per metric, side by side

    # A precomputed statistics file gives the same FID as the dataset it was computed from.
    cached = next((trained / "eval" / "reference").glob("*n16_highest.npz"))
    run_evaluate(
        f"--workdir={trained}",
        "--metrics=fid",
        "--num_samples=16",
        "--batch_size=8",
        f"--reference=stats:{cached}",
        f"--inception_weights={inception_weights}",
        "--steps=4",
        "--name=from_stats",
    )
    single = json.loads((trained / "eval" / "from_stats.json").read_text())
    assert single["metrics"]["fid"] == pytest.approx(rows[1]["metrics"]["fid"], rel=1e-6)


def run_evaluate(*argv):
    from genctl_jax import evaluate

    run_cli_body(evaluate, *argv)


def test_evaluate_bad_input_gets_one_clear_error(trained, inception_weights, tmp_path):
    workdir = f"--workdir={trained}"
    with pytest.raises(ConfigError, match=r"--sweep='cfg=1,2'.*guidance_scale, steps, eta"):
        run_evaluate(workdir, "--sweep=cfg=1,2")
    with pytest.raises(ConfigError, match=r"--sweep='steps=1,x': values must be ints"):
        run_evaluate(workdir, "--sweep=steps=1,x")
    with pytest.raises(ConfigError, match=r"metrics \['fid', 'lpips'\]: expected some of"):
        run_evaluate(workdir, "--metrics=fid,lpips")
    with pytest.raises(ConfigError, match=r"need the FID Inception weights.*convert_fid_inception"):
        run_evaluate(workdir, "--metrics=is", "--inception_weights=")
    with pytest.raises(ConfigError, match=r"KID compares features.*stats:"):
        run_evaluate(workdir, "--metrics=kid", f"--reference=stats:{tmp_path}/x.npz")
    with pytest.raises(ConfigError, match=r"clip metric needs a CLIP model"):
        run_evaluate(workdir, "--metrics=clip")
    with pytest.raises(ConfigError, match=r"batch_size=6 is not a multiple of the 8 devices"):
        run_evaluate(workdir, "--metrics=fidelity", "--batch_size=6")
    (tmp_path / "config.json").write_text((trained / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no best checkpoint"):
        run_evaluate(f"--workdir={tmp_path}", "--checkpoint=best")
    (trained / "eval" / "taken.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"taken\.json exists; pass --overwrite"):
        run_evaluate(workdir, "--metrics=fidelity", "--num_samples=8", "--name=taken")
    assert (trained / "eval" / "taken.json").read_text() == "{}"


def test_eval_config_is_validated_before_training(tmp_path):
    config = tiny_config(every_steps=1, metrics=("fidelity",), best_metric="clip_score")
    with pytest.raises(ConfigError, match=r"best_metric='clip_score' is not a scalar of"):
        configlib.validate(config)
    config = tiny_config(every_steps=0, best_metric="fid")
    configlib.validate(config)  # eval off: its fields are not checked
    config = tiny_config(every_steps=1, metrics=("fid",), batch_size=12)
    with pytest.raises(ConfigError, match=r"eval\.batch_size=12 is not a multiple of the 8"):
        configlib.validate(config)


def test_reference_images_resize_mixed_sizes_convert_grey_and_refuse_too_few(tmp_path, caplog):
    folder = tmp_path / "refs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate((16, 40, 24, 33)):
        pixels = rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        (image.convert("L") if i % 2 else image).save(folder / f"{i}.png")
    data_config = configlib.load_config(TINY).data
    reference = evaluation.parse_reference(f"folder:{folder}")
    with caplog.at_level("INFO"):
        images = evaluation.reference_images(reference, data_config, 4, 2)
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.float32
    assert -1.0 <= images.min() < images.max() <= 1.0
    # Grey-scale files come out with three equal channels, and the conversion is logged.
    grey = images[1]
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
    assert "grey" in caplog.text.lower() or "gray" in caplog.text.lower()
    with pytest.raises(ConfigError, match=r"gives 4 images in batches of 2, fewer than the 6"):
        evaluation.reference_images(reference, data_config, 6, 2)
    for bad in ("cifar10", "stats:", ""):
        with pytest.raises(ConfigError, match=r"expected 'shapes\[:SPLIT\]'"):
            evaluation.parse_reference(bad)


def test_control_and_fidelity_metrics_through_the_evaluator_interface():
    from genctl_jax.data import shapes

    examples = [shapes.generate_example(i, seed=5, image_size=32, max_objects=3) for i in range(16)]
    images = np.stack([e["image"] for e in examples]).astype(np.float32) / 127.5 - 1.0
    labels = np.array([e["label"] for e in examples])
    maps = {k: np.stack([e[k] for e in examples]) for k in ("segmentation", "edges")}
    evaluator = evaluation.Evaluator(
        metrics=("fidelity", "control"),
        mesh=None,
        data_config=configlib.load_config("configs/shapes_diffusion.py").data,
        batch_size=8,
    )
    right = evaluator.evaluate(images, labels, maps)
    wrong = evaluator.evaluate(images, labels, {k: np.roll(v, 1, 0) for k, v in maps.items()})
    print(f"dataset images against their own controls: {right}\nshuffled controls: {wrong}")
    assert right["fidelity/class"] > 0.9
    assert right["control/segmentation_miou"] > 0.95 and right["control/edge_f1"] > 0.95
    assert wrong["control/segmentation_miou"] < 0.3 and wrong["control/edge_f1"] < 0.3
    with pytest.raises(ConfigError, match="takes no control input"):
        evaluator.evaluate(images, labels)

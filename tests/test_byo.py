"""Your own model and data across three tiers over Mosquitto: PyTorch exports the zoo does not have,
on an image folder and a CSV table, equal to single-process training; trained weights exported back
into the ONNX file; a model or data that does not fit is one line before anything trains."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import byo
from cluster import dump, equals_single_process, rel, schedule
from hiertrain.lab.replay import dataset
from hiertrain.train import models

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from hiertrain.bench import hubmodels  # noqa: E402 (needs transformers)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A user's files: two exported models and their data."""
    root = tmp_path_factory.mktemp("user")
    torch.manual_seed(0)
    return {"mobile": byo.export(byo.mobilenet(), (3, 32, 32), root / "mobilenet.onnx"),
            "mlp": byo.export(byo.mlp(), (8,), root / "mlp.onnx"),
            "mobile-bn": byo.export(byo.mobilenet(), (3, 32, 32), root / "mobilenet-bn.onnx", batchnorm=True),
            "images": byo.image_folder(root / "images"), "csv": byo.table(root / "table.csv"),
            # Hugging Face's own ViT: a class token broadcast to the batch, attention, GELU, x[:, 0]
            "hf-vit": byo.export(hubmodels.families(3, 4, 32)["hf-vit"](), (3, 32, 32), root / "hf-vit.onnx")}


RUNS = {
    # 8 units: s trains units 1..2 on the device, l 1..5 on the edge, o the whole model on the cloud
    "mobilenet on images": ("mobile", "images", schedule("cloud", "device", "edge", 2, 5, 4, 4, 4, version=1), 0.05, 25),
    # 5 units: o on the device, s 1..1 on the edge, l 1..3 on the cloud
    "mlp on csv": ("mlp", "csv", schedule("device", "edge", "cloud", 1, 3, 2, 6, 4, version=1), 0.05, 25),
    # 8 units: s trains units 1..3 on the device (the class token's), l 1..6 on the edge, o all on the cloud
    "transformers vit on images": ("hf-vit", "images", schedule("cloud", "device", "edge", 3, 6, 4, 4, 4, version=1),
                                   0.05, 25),
    # BatchNorm in training mode: each worker's samples normalised on their own, so held to the split in one
    # process, every tier on one thread as the reference is. Statistics of a few samples (1x1 after the
    # pooling) amplify rounding chaotically: a ReLU that flips on one ulp parts the two by 5e-6 in
    # a step, 1e-4 within a few more (measured: 3 steps agree to 5e-6, 10 steps part by 3e-3).
    "mobilenet training batchnorm": ("mobile-bn", "images", schedule("cloud", "device", "edge", 2, 5, 8, 8, 8,
                                                                      version=1), 0.01, 3),
}


@pytest.mark.parametrize("name", RUNS)
def test_a_users_model_and_data_train_across_three_tiers_equal_to_single_process(cluster, user, name, tmp_path):
    model, fmt, plan, lr, n = RUNS[name]
    bn = model.endswith("-bn")
    c = cluster(model=str(user[model]), data={"dataset": fmt, "path": str(user[fmt])}, holdout=20, batch=24 if bn else 12,
                iterations=n, every=n, lr=lr, threads={"cloud": 1} if bn else None)
    c.publish(plan)
    c.start()
    assert c.wait() == {"device": 0, "edge": 0, "cloud": 0}, dump(c)
    losses, ref_params = equals_single_process(c, n, plan if bn else None)
    ck = c.final_checkpoint()
    assert ck.iteration == n - 1 and rel(ck.params, ref_params) < 1e-4
    assert bn or losses[n - 1] < losses[0]  # (three steps at 0.01 need not lower the loss)

    # the trained weights go back into the user's file: it predicts as the trained model does
    import onnxruntime as ort

    from hiertrain.train.reference import SingleProcess

    out = tmp_path / "trained.onnx"
    ck_dir = next(d for d in (c.work / f"ck-{t}" for t in ("cloud", "edge", "device")) if d.is_dir())
    done = subprocess.run([sys.executable, "-m", "hiertrain", "model", "export", "--model", str(user[model]),
                           "--checkpoint", str(ck_dir), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    spec = models.get(str(user[model]))
    x, _ = dataset(c).take(np.arange(10))
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, SingleProcess(spec, params=ck.params).predict(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in hubmodels.RECIPES if n != "hf-vit"])  # (hf-vit: above, 25 iterations)
def test_a_transformers_model_trains_across_three_tiers_equal_to_its_split_in_one_process(cluster, user, name, tmp_path):
    """Each of transformers' own models as `bench families` exports it (BatchNorm in training mode): every
    tier trains a share of each batch (8 samples), cut at a third and two thirds of its units, three
    iterations (MobileNetV2: two) over Mosquitto equal to the same split in one process (held to PyTorch
    in test_families)."""
    torch.manual_seed(0)
    path = byo.export(hubmodels.families(3, 4, 32)[name](), (3, 32, 32), tmp_path / f"{name}.onnx", batchnorm=True)
    units = models.get(str(path)).n_units
    plan = schedule("cloud", "device", "edge", max(1, units // 3), max(2, 2 * units // 3), 8, 8, 8, version=1)
    n = 2 if name == "hf-mobilenetv2" else 3  # its third step is chaotic: see test_families
    c = cluster(model=str(path), data={"dataset": "images", "path": str(user["images"])}, holdout=20, batch=24,
                iterations=n, every=n, lr=0.01, threads={"cloud": 1})
    c.publish(plan)
    c.start()
    assert c.wait() == {"device": 0, "edge": 0, "cloud": 0}, dump(c)
    # MobileNetV2's BatchNorm over 8-sample shares amplifies the order of float sums (ORT's threads)
    # a thousandfold by its second step: one CI run measured 3.7e-4 there; a wrong gradient is percents
    equals_single_process(c, n, plan, tol=1e-3 if name == "hf-mobilenetv2" else 1e-4)


def test_data_that_does_not_fit_the_model_stops_the_device_at_start_in_one_line(cluster, user):
    c = cluster(model=str(user["mobile"]), data={"dataset": "csv", "path": str(user["csv"])}, iterations=5)
    done = subprocess.run([sys.executable, "-m", "hiertrain", "device", "run", "--config", str(c.configs["device"])],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "samples of csv are shaped (8,), but the model" in lines[0] and "(3, 32, 32)" in lines[0]

import numpy as np
import pytest

from hiertrain.train import data, models
from hiertrain.errors import ConfigError
from hiertrain.train.reference import SingleProcess
from hiertrain.train.optim import OptimizerConfig
from hiertrain.train.runtime import Runtime



def test_cifar10_binary_files_are_read(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 7).astype(np.uint8)
    pixels = rng.integers(0, 256, (7, 3072)).astype(np.uint8)
    records = np.concatenate([labels[:, None], pixels], axis=1)
    records[:4].tofile(tmp_path / "data_batch_1.bin")
    records[4:].tofile(tmp_path / "data_batch_2.bin")
    ds = data.cifar10(tmp_path)
    assert len(ds) == 7 and ds.shape == (3, 32, 32) and ds.classes == 10
    x, y = ds.take(np.arange(7))
    np.testing.assert_array_equal(y, labels)
    np.testing.assert_allclose(x[5, 1, 0, :4], pixels[5, 1024:1028] / 255.0, rtol=1e-6)  # green plane, row 0
    (tmp_path / "data_batch_3.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(ConfigError, match="not a multiple"):
        data.cifar10(tmp_path)


def test_tiny_imagenet_folder_layout_is_read(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    wnids = ["n01", "n02", "n03"]
    (tmp_path / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for i, w in enumerate(wnids):
        d = tmp_path / "train" / w / "images"
        d.mkdir(parents=True)
        for k in range(2):
            Image.fromarray(np.full((64, 64, 3), 40 * i + k, np.uint8)).save(d / f"{w}_{k}.JPEG")
    (tmp_path / "val" / "images").mkdir(parents=True)
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(tmp_path / "val" / "images" / "val_0.JPEG")
    (tmp_path / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\t0\t0\t63\t63\n")
    train = data.tiny_imagenet(tmp_path)
    assert len(train) == 6 and train.shape == (3, 64, 64) and train.classes == 3
    assert list(train.labels) == [0, 0, 1, 1, 2, 2]
    x, _ = train.take(np.array([2]))
    assert abs(float(x.mean()) - 40 / 255) < 0.02  # JPEG is lossy, a flat image stays flat
    val = data.tiny_imagenet(tmp_path, split="val")
    assert list(val.labels) == [1]
    with pytest.raises(ConfigError, match="wnids.txt"):
        data.tiny_imagenet(tmp_path / "train")


def test_batches_are_deterministic_and_cover_an_epoch():
    ds = data.synthetic(n=64)
    a = [ds.batch(i, 16, seed=3)[1] for i in range(4)]
    b = [ds.batch(i, 16, seed=3)[1] for i in range(4)]
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    idx = np.concatenate([np.random.default_rng([3, 0]).permutation(64)])
    np.testing.assert_array_equal(np.concatenate(a), ds.labels[idx])


@pytest.mark.compute
def test_the_synthetic_set_is_learnable(tmp_path):
    spec = models.get("lenet5")
    train, held = data.synthetic(spec.input_shape, 10, n=2048, seed=0).split(256)
    model = SingleProcess(spec, optimizer=OptimizerConfig("sgd", lr=0.05), runtime=Runtime(root=tmp_path))
    x, y = held.take(np.arange(len(held)))

    def accuracy():
        return float((model.predict(x).argmax(1) == y).mean())

    before = accuracy()
    for i in range(150):
        model.step(*train.batch(i, 32))
    after = accuracy()
    assert before < 0.25 and after > 0.6, (before, after)


def test_uint8_images_travel_as_stored_and_are_normalised_where_used():
    """Samples go on the wire as stored (CIFAR: 3 KB a sample, not float32's 12 KB); the tier that
    uses them normalises them exactly as the device would have."""
    from hiertrain.net.validate import validator
    from hiertrain.net.wire import Message

    ds = data.synthetic((3, 32, 32), 10, n=64)
    raw, y = ds.batch_raw(3, 16, seed=1)
    x, y2 = ds.batch(3, 16, seed=1)
    assert raw.dtype == np.uint8 and ds.sample_bytes == 3 * 32 * 32 == raw[0].nbytes
    np.testing.assert_array_equal(data.normalize(raw), x)
    np.testing.assert_array_equal(y, y2)
    floats = data.Dataset("f", np.zeros((4, 13), np.float32), np.zeros(4, np.int64), 2)
    assert floats.sample_bytes == 4 * 13 and data.normalize(floats.images) is floats.images

    check = validator(models.get("lenet5"))
    ok = Message("samples", "t", "device", "edge", 3, 0, {"x": raw})
    assert check(ok) is None
    assert check(Message("samples", "t", "device", "edge", 3, 0, {"x": x})) is None
    bad = Message("act", "t", "device", "edge", 3, 2, {"x": np.zeros((4, 6, 14, 14), np.uint8)})
    assert "expected float32" in check(bad)  # only samples may be uint8
    # the labels ride with the samples to the tier that computes the loss, checked as labels
    assert check(Message("samples", "t", "device", "edge", 3, 0, {"x": raw, "y": y})) is None
    assert "out of range" in check(Message("samples", "t", "device", "edge", 3, 0, {"x": raw, "y": y + 10}))
    assert "17 labels for a batch of 16" in validator(models.get("lenet5"), 16)(
        Message("samples", "t", "device", "edge", 3, 0, {"y": np.zeros(17, np.int64)}))
    # and with a fleet member's activations; gradients carry none
    h = np.zeros((16, 6, 14, 14), np.float32)
    assert check(Message("act", "t", "pi1", "edge", 3, 2, {"x": h, "y": y})) is None
    assert "out of range" in check(Message("act", "t", "pi1", "edge", 3, 2, {"x": h, "y": y - 1 - y.max()}))
    assert "wrong shape: labels" in check(Message("act", "t", "pi1", "edge", 3, 2, {"x": h, "y": y.astype(np.int32)}))
    assert "unexpected tensors ['y']" in check(Message("grad", "t", "edge", "pi1", 3, 2, {"x": h, "y": y}))


def test_compressed_samples_round_trip_and_a_bad_or_inflating_stream_is_refused():
    import zlib

    from hiertrain.net.compress import SAMPLE_CODEC, pack_samples, sample_tensors, unpack_samples
    from hiertrain.net.validate import validator
    from hiertrain.net.wire import Message

    raw = data.synthetic((3, 32, 32), 10, n=16, noise=0.0).images  # flat 8x8 blocks: compressible
    z = pack_samples(raw)
    assert z.dtype == np.uint8 and z.ndim == 1 and len(z) < raw.nbytes / 2
    np.testing.assert_array_equal(unpack_samples(z, (3, 32, 32), 16), raw)
    packed, meta = sample_tensors(raw, True)
    assert set(packed) == {"z"} and meta == {"codec": SAMPLE_CODEC}
    np.testing.assert_array_equal(packed["z"], z)
    assert set(sample_tensors(raw, False)[0]) == {"x"} and sample_tensors(raw[:0], True) == ({}, {})
    floats = data.normalize(raw)
    assert sample_tensors(floats, True)[0]["x"] is floats  # only uint8 samples are packed

    def samples(z, codec=SAMPLE_CODEC):
        return Message("samples", "t", "device", "edge", 3, 0, {"z": z}, meta={"codec": codec})

    msg = samples(z)
    assert validator(models.get("lenet5"), 16)(msg) is None  # decoded in place, then checked as samples
    np.testing.assert_array_equal(msg.tensors["x"], raw)
    assert set(msg.tensors) == {"x"}
    check = validator(models.get("lenet5"), 8)
    bomb = np.frombuffer(zlib.compress(bytes(3072 * 10_000)), np.uint8)  # 30 MB of zeros in 30 KB
    assert "inflate past 8 samples" in check(samples(bomb))
    whole = validator(models.get("lenet5"), 16)
    assert "truncated" in whole(samples(z[:-9])) and "do not decode" in whole(samples(z[::-1].copy()))
    assert "not whole samples" in check(samples(np.frombuffer(zlib.compress(bytes(3071)), np.uint8)))
    assert "malformed compressed samples" in check(samples(z, codec="gzip"))
    assert "malformed compressed samples" in validator(models.get("lenet5"))(samples(z))  # no batch: refused


def test_the_planner_takes_a_samples_size_from_the_device_that_holds_the_data():
    from dataclasses import replace

    from hiertrain.planner.replan import PlannerState
    from hiertrain.profile import Profile

    from conftest import ROOT

    full = Profile.load(ROOT / "bench" / "profiles" / "lenet5.json")
    state = PlannerState(batch=32)
    state.on_profile("edge", Profile(full.model, full.sample_bytes, full.layers, {"edge": full.tiers["edge"]}))
    assert state.profile.sample_bytes == 4 * 3072  # float32, as profiled
    device = Profile(full.model, 3072.0, full.layers, {"device": full.tiers["device"]})
    state.on_profile("device", device)
    assert state.profile.sample_bytes == 3072.0 and set(state.profile.tiers) == {"edge", "device"}
    state.on_profile("cloud", replace(device, tiers={"cloud": full.tiers["cloud"]}, sample_bytes=12288.0))
    assert state.profile.sample_bytes == 3072.0  # another tier's profile does not say what the data weighs

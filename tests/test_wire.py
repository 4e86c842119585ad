import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hiertrain.net import reassembly, wire
from hiertrain.errors import WireError


DTYPES = ["float32", "float16", "int64", "int32", "uint8"]
arrays = st.sampled_from(DTYPES).flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)))


@given(arrays)
def test_tensor_round_trip_any_dtype_and_shape(a):
    b = wire.decode_tensor(wire.encode_tensor(a))
    assert b.dtype == a.dtype and b.shape == a.shape
    np.testing.assert_array_equal(b, a)


def test_non_contiguous_and_big_endian_arrays_round_trip():
    a = np.arange(24, dtype=">i4").reshape(4, 6)[:, ::2].T
    b = wire.decode_tensor(wire.encode_tensor(a))
    assert b.dtype == np.int32 and b.shape == (3, 4)
    np.testing.assert_array_equal(b, a)


@pytest.mark.parametrize("bad", [np.zeros(3, np.float64), np.array(["x"]), np.zeros(2, np.int8),
                                 np.zeros([1] * 9, np.uint8)])
def test_encode_refuses_what_cannot_go_on_the_wire(bad):
    with pytest.raises(WireError):
        wire.encode_tensor(bad)


@settings(max_examples=400)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_wire_error(data):
    for decode in (wire.decode_tensor, wire.decode_frame, lambda d: reassembly.Reassembler().feed(d)):
        try:
            decode(data)
        except WireError:
            pass


@settings(max_examples=300)
@given(arrays, st.data())
def test_truncated_or_tampered_tensors_raise_wire_error(a, data):
    enc = bytearray(wire.encode_tensor(a))
    cut = data.draw(st.integers(0, len(enc) - 1))
    with pytest.raises(WireError):
        wire.decode_tensor(bytes(enc[:cut]))
    i = data.draw(st.integers(0, len(enc) - 1))
    enc[i] = data.draw(st.integers(0, 255))
    try:
        wire.decode_tensor(bytes(enc))
    except WireError:
        pass


@pytest.mark.parametrize("obj", [
    ["float64", [2], b"\0" * 16],          # dtype not on the whitelist
    ["float32", [3], b"\0" * 8],           # len != prod(shape) * itemsize
    ["float32", [-1], b""],                # negative size
    ["float32", [1 << 40, 1 << 40], b""],  # over the ceiling (and would overflow int64)
    ["float32", [2], "text"],              # data not bytes
    ["float32", [1.5], b"\0" * 4],         # size not an integer
    {"dtype": "float32"},                  # not a 3-item array
])
def test_inconsistent_tensors_are_refused(obj):
    import msgpack

    with pytest.raises(WireError):
        wire.decode_tensor(msgpack.packb(obj))


def _message(**tensors):
    return wire.Message("act", "job", "device", "cloud", 7, 3, tensors, schedule_version=2,
                        meta={"loss": 0.5, "names": ["a", "b"]})


@pytest.mark.parametrize("chunk", [1024, 4096, 1 << 20])
def test_message_frames_reassemble_in_any_order(chunk):
    rng = np.random.default_rng(1)
    msg = _message(x=rng.random((50, 30), dtype=np.float32), y=np.arange(7, dtype=np.int64),
                   e=np.zeros((0, 4), np.uint8), s=np.float16(3.0))
    frames = wire.encode_message(msg, msg_id="n:1", chunk_bytes=chunk)
    assert all(len(f) <= chunk + 200 for f in frames)
    order = rng.permutation(len(frames))
    r = reassembly.Reassembler()
    results = [r.feed(frames[i]) for i in order]
    out = results[-1]
    assert all(x is None for x in results[:-1]) and out is not None
    assert (out.kind, out.sender, out.dest, out.iteration, out.layer, out.schedule_version) == \
        ("act", "device", "cloud", 7, 3, 2)
    assert out.meta == {"loss": 0.5, "names": ["a", "b"]}
    for k, v in msg.tensors.items():
        np.testing.assert_array_equal(out.tensors[k], v)
        assert out.tensors[k].dtype == np.asarray(v).dtype


def test_duplicate_frames_and_messages_are_counted_not_delivered_twice():
    frames = wire.encode_message(_message(x=np.ones(3000, np.float32)), msg_id="n:2", chunk_bytes=4096)
    r = reassembly.Reassembler()
    assert r.feed(frames[0]) is None and r.feed(frames[0]) is None
    assert r.feed(frames[1]) is None
    assert r.feed(frames[2]) is not None
    assert r.feed(frames[2]) is None
    assert r.duplicates == 2


def test_frames_that_disagree_with_their_message_are_refused():
    a = wire.encode_message(_message(x=np.ones(3000, np.float32)), msg_id="n:3", chunk_bytes=4096)
    b = wire.encode_message(wire.Message("act", "job", "device", "cloud", 8, 3, {"x": np.ones(3000, np.float32)}),
                            msg_id="n:3", chunk_bytes=4096)
    r = reassembly.Reassembler()
    r.feed(a[0])
    with pytest.raises(WireError, match="disagrees"):
        r.feed(b[1])


def test_partial_messages_are_evicted_past_the_memory_bound():
    r = reassembly.Reassembler(max_pending_bytes=10_000)
    for i in range(5):
        r.feed(wire.encode_message(_message(x=np.ones(3000, np.float32)), msg_id=f"n:{i}", chunk_bytes=4096)[0])
    assert r.evicted >= 3


@pytest.mark.parametrize("field,value", [("iteration", -1), ("layer", -2), ("sender", "Lap top"), ("dest", "planner"),
                                         ("kind", "pickle"), ("job", "a/b"), ("meta", {"k": object()})])
def test_invalid_messages_cannot_be_built(field, value):
    kw = dict(kind="act", job="job", sender="device", dest="cloud", iteration=0, layer=1, tensors={})
    kw[field] = value
    with pytest.raises(WireError):
        wire.Message(**kw)


def test_a_tampered_payload_is_refused():
    frames = wire.encode_message(_message(x=np.ones(10, np.float32)), msg_id="n:9")
    bad = frames[0][:-4] + b"\x01\x02\x03"  # shorter than its header announces
    with pytest.raises(WireError):
        reassembly.Reassembler().feed(bad)


def _first_frames(n, sender="device", size=4096):
    msg = wire.Message("samples", "t", sender, "edge", 1, 0, {"x": np.zeros((4, size // 4), np.float32)}, 1)
    return [wire.encode_message(msg, msg_id=f"m{i}", chunk_bytes=1024)[0] for i in range(n)]


def test_a_flood_of_incomplete_messages_evicts_itself_and_memory_stays_bounded():
    r = reassembly.Reassembler(max_pending_per_sender=8)
    for f in _first_frames(1000):
        assert r.feed(f) is None
    assert r.evicted == 992 and r.pending_bytes <= 8 * 1024 + 8 * 200
    msg = wire.Message("samples", "t", "device", "edge", 2, 0, {"x": np.ones((4, 1024), np.float32)}, 1)
    frames = wire.encode_message(msg, msg_id="real", chunk_bytes=1024)
    got = [r.feed(f) for f in frames]  # a real message still gets through
    assert got[-1] is not None and np.array_equal(got[-1].tensors["x"], msg.tensors["x"])


def test_a_message_declaring_more_than_a_tier_accepts_is_refused_before_buffering():
    r = reassembly.Reassembler(max_message_bytes=10_000)
    with pytest.raises(reassembly.Refused, match="too large"):
        r.feed(_first_frames(1, size=40_000)[0])
    assert r.pending_bytes == 0


def test_incomplete_messages_expire():
    r = reassembly.Reassembler(expire_s=5)
    frames = _first_frames(3)
    r.feed(frames[0], at=100.0)
    r.feed(frames[1], at=103.0)
    r.feed(frames[2], at=106.0)  # the first is now 6 s old
    assert r.expired == 1


def test_a_flood_evicts_its_own_messages_not_the_real_senders_in_flight_one():
    r = reassembly.Reassembler(max_pending_per_sender=8)
    msg = wire.Message("samples", "t", "device", "edge", 2, 0, {"x": np.ones((4, 1024), np.float32)}, 1)
    for f in wire.encode_message(msg, msg_id="real:0", chunk_bytes=1024):  # the real stream completes messages
        r.feed(f)
    frames = wire.encode_message(msg, msg_id="real:1", chunk_bytes=1024)
    r.feed(frames[0])
    for f in _first_frames(1000):  # the flood arrives between the real message's frames
        r.feed(f)
    got = [r.feed(f) for f in frames[1:]]
    assert got[-1] is not None and np.array_equal(got[-1].tensors["x"], msg.tensors["x"])

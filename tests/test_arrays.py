"""fedeq.arrays: the fast .npy path gives exactly what Flower's own Array conversions give."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

from fedeq.arrays import (
    from_numpy,
    npy_header,
    record_from_state_dict,
    record_to_numpy,
    record_to_state_dict,
    to_numpy,
)

_RNG = np.random.default_rng(0)
VALUES = [
    _RNG.standard_normal((3, 4)).astype(np.float32),
    _RNG.standard_normal(7),
    np.arange(5, dtype=np.int64),
    np.array(3.5),
    np.zeros((0, 3), np.float32),
    np.array([True, False]),
    (_RNG.standard_normal(3) + 1j).astype(np.complex64),
    np.zeros((2,) * 12, np.float16),
    np.arange(6, dtype=">i4").reshape(2, 3),  # big-endian
]


@pytest.mark.parametrize("values", VALUES, ids=lambda v: f"{v.dtype.str}{v.shape}")
def test_encode_is_byte_identical_and_decode_agrees(values):
    ours, flowers = from_numpy(values), Array(values)
    assert ours.data == flowers.data
    assert (ours.dtype, tuple(ours.shape), ours.stype) == (flowers.dtype, tuple(flowers.shape), flowers.stype)
    got, want = to_numpy(flowers), flowers.numpy()
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_fast_path_is_taken_for_the_standard_header(monkeypatch):
    arr = Array(np.ones((4, 4), np.float32))
    monkeypatch.setattr(Array, "numpy", lambda self: pytest.fail("fell back to np.load"))
    np.testing.assert_array_equal(to_numpy(arr), np.ones((4, 4), np.float32))


def test_fortran_order_payload_falls_back_and_decodes():
    values = _RNG.standard_normal((4, 5)).T  # F-contiguous: np.save writes fortran_order=True
    flowers = Array(values)
    assert not flowers.data.startswith(npy_header(str(values.dtype), values.shape))
    np.testing.assert_array_equal(to_numpy(flowers), values)
    ours = from_numpy(values)  # written in C order instead, same values
    np.testing.assert_array_equal(ours.numpy(), values)


def test_mismatched_or_broken_payloads_behave_like_flower():
    good = Array(np.ones((2, 2), np.float32))
    # metadata claims another shape: the header differs, Flower's path decides (the payload's own shape)
    lying = Array(dtype="float32", shape=(4,), stype=SType.NUMPY, data=good.data)
    np.testing.assert_array_equal(to_numpy(lying), lying.numpy())
    truncated = Array(dtype="float32", shape=(2, 2), stype=SType.NUMPY, data=good.data[:-4])
    with pytest.raises(ValueError):
        truncated.numpy()
    with pytest.raises(ValueError):
        to_numpy(truncated)
    garbage = Array(dtype="no-such-dtype", shape=(2, 2), stype=SType.NUMPY, data=b"\x93NUMPY junk")
    with pytest.raises(ValueError):
        to_numpy(garbage)


def test_object_arrays_are_refused_as_flower_refuses_them():
    with pytest.raises(ValueError):
        from_numpy(np.array([{"a": 1}], dtype=object))


def test_fast_views_are_read_only_and_state_dicts_writable():
    record = ArrayRecord({"w": Array(np.ones(3, np.float32))})
    view = record_to_numpy(record)["w"]
    assert not view.flags.writeable
    state = record_to_state_dict(record)
    state["w"].add_(1.0)  # a writable copy: the record is untouched
    np.testing.assert_array_equal(record["w"].numpy(), np.ones(3, np.float32))


def test_state_dict_round_trip_matches_flower():
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.GroupNorm(1, 3))
    ours, flowers = record_from_state_dict(model.state_dict()), ArrayRecord(model.state_dict())
    assert list(ours.keys()) == list(flowers.keys())
    assert all(ours[k].data == flowers[k].data for k in ours.keys())
    back = record_to_state_dict(ours)
    ref = flowers.to_torch_state_dict()
    for key, tensor in ref.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor)

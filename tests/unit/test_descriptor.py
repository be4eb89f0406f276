"""QuantDescriptor: pytorch-quantization's keywords and presets, immutable, validated with the allowed values."""

from __future__ import annotations

import dataclasses
import math

import pytest

from trtquant import tensor_quant
from trtquant.descriptor import QuantDescriptor, ScaledQuantDescriptor


def test_defaults_and_presets():
    d = QuantDescriptor()
    assert (d.num_bits, d.axis, d.unsigned, d.narrow_range, d.fake_quant, d.amax, d.learn_amax, d.scale_amax,
            d.calib_method) == (8, None, False, False, True, None, False, None, "max")
    assert not d.per_channel and d.channel_axis is None and d.bound == 127
    assert QuantDescriptor(unsigned=True).bound == 255
    assert ScaledQuantDescriptor is QuantDescriptor
    expected_axis = {
        "QUANT_DESC_8BIT_PER_TENSOR": None,
        "QUANT_DESC_8BIT_CONV1D_WEIGHT_PER_CHANNEL": (0,),
        "QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL": (0,),
        "QUANT_DESC_8BIT_CONV3D_WEIGHT_PER_CHANNEL": (0,),
        "QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW": (0,),
        "QUANT_DESC_8BIT_CONVTRANSPOSE1D_WEIGHT_PER_CHANNEL": (1,),
        "QUANT_DESC_8BIT_CONVTRANSPOSE2D_WEIGHT_PER_CHANNEL": (1,),
        "QUANT_DESC_8BIT_CONVTRANSPOSE3D_WEIGHT_PER_CHANNEL": (1,),
    }
    for name, axis in expected_axis.items():
        desc = getattr(tensor_quant, name)
        assert isinstance(desc, QuantDescriptor) and desc.num_bits == 8 and desc.axis == axis, name
    assert tensor_quant.QUANT_DESC_UNSIGNED_8BIT_PER_TENSOR.unsigned
    # pytorch-quantization keywords.
    d = tensor_quant.QuantDescriptor(num_bits=8, axis=(0,), calib_method="histogram", amax=2.0, unsigned=False,
                                     narrow_range=True, fake_quant=True, learn_amax=False, scale_amax=1.5, name="w")
    assert d.axis == (0,) and d.amax == 2.0 and d.name == "w"


def test_axis_normalized():
    assert QuantDescriptor(axis=0).axis == (0,)
    assert QuantDescriptor(axis=[1]).axis == (1,)
    assert QuantDescriptor(axis=(0,)).channel_axis == 0
    assert QuantDescriptor(axis=-1).channel_axis == -1


def test_frozen_and_replace():
    d = QuantDescriptor()
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.num_bits = 4  # type: ignore[misc]
    e = d.replace(unsigned=True)
    assert e.unsigned and not d.unsigned
    with pytest.raises(ValueError, match="num_bits"):
        d.replace(num_bits=17)
    assert d.replace(num_bits=4).bound == 7
    assert QuantDescriptor(axis=0) == QuantDescriptor(axis=(0,))
    assert hash(QuantDescriptor(axis=0)) == hash(QuantDescriptor(axis=(0,)))


def test_dict_round_trip():
    d = QuantDescriptor(axis=(1,), unsigned=True, calib_method="histogram", amax=3.5, scale_amax=0.9, name="x")
    data = d.dict()
    assert data["axis"] == [1] and data["version"] == 1
    assert QuantDescriptor.from_dict(data) == d
    with pytest.raises(ValueError, match=r"unknown QuantDescriptor keys \['bits'\]"):
        QuantDescriptor.from_dict({"bits": 8})
    with pytest.raises(ValueError, match="version 2"):
        QuantDescriptor.from_dict(dict(data, version=2))


@pytest.mark.parametrize("bits", [17, 32, -8])
def test_unsupported_num_bits_lists_allowed(bits):
    with pytest.raises(ValueError) as info:
        QuantDescriptor(num_bits=bits)
    assert f"num_bits={bits!r}" in str(info.value) and "allowed: integers 1-16 or FP8 (4, 3)/(5, 2)" in str(info.value)


@pytest.mark.parametrize("bits", [True, 8.0, "8", (7, 3), (4, 4)])
def test_num_bits_wrong_type(bits):
    with pytest.raises(TypeError, match="num_bits"):
        QuantDescriptor(num_bits=bits)


@pytest.mark.parametrize("axis", [(), (0, 0)])
def test_unsupported_axis_lists_allowed(axis):
    with pytest.raises(ValueError) as info:
        QuantDescriptor(axis=axis)
    msg = str(info.value)
    assert "is not supported" in msg and "None for per-tensor" in msg and "1 for ConvTranspose" in msg


def test_multi_axis_kept():
    assert QuantDescriptor(axis=[0, 1]).axis == (0, 1) and QuantDescriptor(axis=(1, 2, 3)).channel_axis == 1


@pytest.mark.parametrize("axis", ["0", 1.0, True])
def test_axis_wrong_type(axis):
    with pytest.raises(TypeError, match="axis must be None, an int or a tuple of ints"):
        QuantDescriptor(axis=axis)


@pytest.mark.parametrize("method", ["entropy", "percentile", "Max", "minmax", ""])
def test_unknown_calib_method_lists_allowed(method):
    with pytest.raises(ValueError) as info:
        QuantDescriptor(calib_method=method)
    assert f"calib_method={method!r}" in str(info.value) and "allowed: max, histogram" in str(info.value)


@pytest.mark.parametrize("amax", [0.0, -1.0, math.nan, math.inf, -math.inf])
def test_invalid_fixed_amax(amax):
    with pytest.raises(ValueError, match="amax must be finite and > 0"):
        QuantDescriptor(amax=amax)


@pytest.mark.parametrize("scale_amax", [0.0, -2.0, math.nan, math.inf])
def test_invalid_scale_amax(scale_amax):
    with pytest.raises(ValueError, match="scale_amax must be finite and > 0"):
        QuantDescriptor(scale_amax=scale_amax)

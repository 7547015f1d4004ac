"""The quantizers of ``rag llm prepare`` on random matrices (no model, no vLLM)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from serving.prepare import (  # noqa: E402  (after the torch check)
    QuantSpec,
    dequantize,
    pack_awq,
    pack_gptq,
    pack_w8a8,
    quantization_config,
    quantize_channels_int8,
    quantize_groups,
    unpack_layer,
)


def _weights(out_f: int = 64, in_f: int = 128, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=generator) * 0.05


def test_int8_per_channel_codes_scales_and_error() -> None:
    w = _weights()
    w[3] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_channels_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.shape == (w.shape[0], 1)
    assert int(q.abs().max()) == 127  # the largest weight of a row lands on the last code
    assert float(scale[3]) == 1.0 and int(q[3].abs().max()) == 0
    back = q.to(torch.float32) * scale
    assert float((back - w).abs().max()) <= float(scale.max()) / 2 + 1e-9  # rounding: half a step at most
    assert float((back - w).norm() / w.norm()) < 0.01  # ~0.6 % on Gaussian rows


def test_w8a8_tensors_round_trip_and_config() -> None:
    w = _weights()
    q, scale = quantize_channels_int8(w)
    spec = QuantSpec.for_format("w8a8")
    assert (spec.bits, spec.group_size, spec.algorithm, spec.sym) == (8, 0, "rtn", True)
    packed = pack_w8a8(q, scale)
    assert set(packed) == {"weight", "weight_scale"}
    assert packed["weight"].dtype == torch.int8 and packed["weight_scale"].dtype == torch.float32
    assert torch.equal(unpack_layer(packed, spec), q.to(torch.float32) * scale)
    config = quantization_config(spec)
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "int-quantized"
    weights = config["config_groups"]["group_0"]["weights"]
    activations = config["config_groups"]["group_0"]["input_activations"]
    assert (weights["num_bits"], weights["type"], weights["strategy"]) == (8, "int", "channel")
    assert weights["dynamic"] is False
    assert (activations["num_bits"], activations["strategy"], activations["dynamic"]) == (8, "token", True)
    assert config["ignore"] == ["lm_head"]


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_4bit_packing_round_trips(fmt: str) -> None:
    spec = QuantSpec.for_format(fmt, group_size=32, algorithm="rtn")  # type: ignore[arg-type]
    w = _weights()
    q, scales, zeros = quantize_groups(w, spec)
    packed = (pack_gptq if fmt == "gptq" else pack_awq)(q, scales, zeros, spec)
    assert torch.equal(unpack_layer(packed, spec), dequantize(q, scales, zeros, spec.group_size))
    # 16 levels per group: an order of magnitude coarser than int8 per channel.
    error = float((dequantize(q, scales, zeros, spec.group_size) - w).norm() / w.norm())
    assert 0.02 < error < 0.15


def test_int8_is_far_closer_than_4bit() -> None:
    w = _weights(seed=1)
    q8, scale = quantize_channels_int8(w)
    e8 = float((q8.to(torch.float32) * scale - w).norm() / w.norm())
    spec4 = QuantSpec.for_format("gptq", group_size=32, algorithm="rtn")
    q4, s4, z4 = quantize_groups(w, spec4)
    e4 = float((dequantize(q4, s4, z4, 32) - w).norm() / w.norm())
    assert e8 * 5 < e4

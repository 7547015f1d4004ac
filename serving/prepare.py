"""Turn the packaged GGUF into a quantized checkpoint that vLLM's CPU build can serve.

Run once, under the ``.venv-llm`` interpreter (it imports torch, transformers and gguf)::

    .venv-llm/bin/python serving/prepare.py --gguf PATH --out DIR [--format w8a8|gptq|awq]
    .venv-llm/bin/python -m serving.prepare ...   # the same, from the repository root

vLLM cannot load GGUF on the CPU, but it has CPU kernels for INT8 W8A8 (compressed-tensors: int8
weights per output channel, int8 activations quantized per token at run time; oneDNN) and for 4-bit
GPTQ (symmetric, ``uint4b8``) and AWQ (asymmetric, ``uint4`` with zero points).

``w8a8`` is the default. The GGUF is already 4-bit (Q4_1), and a second 4-bit quantization onto
another grid doubles the error: the 4-bit checkpoints answered 0-1 of the test corpus's ten questions
where the dequantized bf16 model answered 6 and INT8 6-8 (docs/llm.md has the numbers). INT8 adds
~1 % relative weight error and keeps the answers; it runs about as fast as 4-bit here.

The steps:

1. transformers dequantizes the GGUF (``from_pretrained(dir, gguf_file=...)``) into float32 weights;
   config, generation config, tokenizer and chat template are written unchanged.
2. (4-bit GPTQ only) Calibration without a download: the model answers :data:`CALIBRATION_PROMPTS`
   (sampled, fixed seed) and the inputs of every decoder projection on that text give its Hessian
   ``sum(x x^T)``.
3. ``w8a8``: every decoder projection is rounded to int8 with one scale per output channel
   (``max |w| / 127``). 4-bit: every decoder projection is quantized per group of input channels.
   The group's scale (and zero point for AWQ) is chosen by minimising the squared error over a
   grid of clip ratios, refined by a few least-squares steps, and rounded to bfloat16 (what vLLM
   computes with). Then GPTQ picks the codes column by column, pushing each rounding error onto
   the columns not yet quantized through the inverse Hessian (``--algorithm rtn``: plain
   round-to-nearest, no calibration).
4. The tensors are written in the layout vLLM's loaders read (W8A8: ``weight`` int8 ``[out, in]``
   and ``weight_scale`` float32 ``[out, 1]`` with a compressed-tensors ``int-quantized`` config;
   GPTQ: ``qweight`` int32 packed along the input dim, ``qzeros``, fp16 ``scales``, ``g_idx``;
   AWQ: the GEMM layout packed along the output dim) with ``quantization_config`` in
   ``config.json``. Embeddings, norms and the (tied) head stay bf16.
5. The checkpoint is unpacked again (it must reproduce the codes exactly), dequantized into the bf16
   model, and its next-token log-probabilities are compared with the bf16 model's on held-out texts
   (:data:`EVAL_TEXTS`); the numbers go into ``prepared.json``.

The work happens in a temporary sibling directory that is renamed into place at the end, under a lock
file, and ``prepared.json`` records the GGUF's sha256 and the parameters: a second run with the same
input is a no-op. The last line on stdout is the model directory.

Exit codes: 0 done (or already prepared), 2 bad arguments, 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("serving.prepare")

QuantFormat = Literal["w8a8", "gptq", "awq"]
Algorithm = Literal["gptq", "rtn"]

#: Bump when the quantizer changes in a way that changes the output: a prepared dir with another
#: version is rebuilt.
QUANTIZER_VERSION = "2"

#: The decoder projections that are quantized; everything else (embeddings, norms, head) stays bf16.
QUANTIZED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: GPTQ/AWQ pack eight 4-bit values into one int32; AWQ interleaves them in this order.
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)

#: Fixed texts for the quality check: a chat turn, prose, code and a list, so the numbers are comparable
#: between runs and formats.
EVAL_TEXTS = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "What is the capital of France, and why is it famous?<|im_end|>\n<|im_start|>assistant\n"
    "The capital of France is Paris. It is famous for the Eiffel Tower, the Louvre museum and its cafes.",
    "The Debian project is an association of individuals who have made common cause to create a free "
    "operating system. The operating system that we have created is called Debian. An operating "
    "system is the set of basic programs and utilities that make your computer run.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "print([fibonacci(i) for i in range(10)])\n",
    "To install a package with pip, run pip install followed by the package name. Python's standard "
    "library includes modules for files, networking, text processing and much more. A virtual "
    "environment keeps the packages of one project apart from those of another.",
)


#: Questions whose answers, sampled from the model itself, are the calibration data of the GPTQ step
#: ("data-free": nothing to download or license, and it follows the model's own distribution). Disjoint
#: from EVAL_TEXTS, so the quality numbers are measured on held-out text.
CALIBRATION_PROMPTS = (
    "How do I reverse a list in Python?",
    "What is a Debian package and how do I install one?",
    "Explain photosynthesis in simple terms.",
    "Write a short poem about the sea.",
    "What causes rain?",
    "How does git rebase differ from git merge?",
    "Give three tips for writing clear documentation.",
    "What is the difference between TCP and UDP?",
    "Summarize the plot of Romeo and Juliet.",
    "How do I read a file line by line in Node.js?",
    "How do I fit a linear regression in R?",
    "Why is the sky blue?",
    "How do vaccines work?",
    "What is a virtual environment in Python?",
    "Translate 'good morning' into French and Spanish.",
    "List the planets of the solar system with one fact about each.",
)


class QuantizationError(Exception):
    """The model could not be quantized (bad input, unsupported shape, failed check).

    Internal to this script (it runs under another interpreter); the app sees a failed prepare as
    :class:`serving.launcher.QuantizationError` with the exit status."""


@dataclass(frozen=True)
class QuantSpec:
    """What to produce."""

    format: QuantFormat = "gptq"
    #: 4 for ``gptq``/``awq``, 8 for ``w8a8`` (use :meth:`for_format`)
    bits: int = 4
    #: input channels per scale for 4-bit; ``w8a8`` has one scale per output channel (0 here)
    group_size: int = 64
    #: ``gptq``: choose the codes column by column compensating the error through the inputs' Hessian
    #: (calibrated on the model's own answers); ``rtn``: round each weight to the nearest code.
    algorithm: Algorithm = "gptq"
    #: GPTQ's dampening, as a fraction of the Hessian's mean diagonal
    damp: float = 0.01
    #: new tokens sampled per calibration prompt
    calibration_tokens: int = 160
    #: clip ratios tried per group: scale = ratio * (range of the group) / levels
    clip_grid: int = 24
    #: least-squares refinement steps after the grid search
    refine_steps: int = 3

    @classmethod
    def for_format(cls, fmt: QuantFormat, *, group_size: int = 64, algorithm: Algorithm = "gptq") -> QuantSpec:
        """The spec of one format: ``w8a8`` is 8-bit per channel, rounded to nearest (GPTQ's error
        compensation buys nothing measurable at 8 bits and would cost the calibration pass)."""
        if fmt == "w8a8":
            return cls(format="w8a8", bits=8, group_size=0, algorithm="rtn")
        return cls(format=fmt, bits=4, group_size=group_size, algorithm=algorithm)

    @property
    def sym(self) -> bool:
        return self.format in ("gptq", "w8a8")

    def identity(self) -> dict[str, Any]:
        """The fields that decide whether an existing prepared dir can be reused."""
        return {
            "format": self.format,
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "algorithm": self.algorithm,
            "quantizer": QUANTIZER_VERSION,
        }


# --------------------------------------------------------------------------------------------------
# bookkeeping


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(out: Path) -> dict[str, Any] | None:
    """The ``prepared.json`` of a finished directory, or None when there is none or it is unreadable."""
    try:
        data = json.loads((out / "prepared.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_prepared(out: Path, source_sha256: str, spec: QuantSpec) -> bool:
    """True when ``out`` holds a finished checkpoint of this GGUF with these parameters."""
    manifest = read_manifest(out)
    if manifest is None or manifest.get("source_sha256") != source_sha256:
        return False
    return all(manifest.get(k) == v for k, v in spec.identity().items()) and (out / "config.json").is_file()


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Serialise concurrent preparations of the same directory (a CLI run and a test fixture, say)."""
    lock_path = out.parent / f".{out.name}.lock"
    with lock_path.open("a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# quantization (pure torch, no model needed: unit-testable on random matrices)


def _round_bf16(x: torch.Tensor) -> torch.Tensor:
    import torch

    return x.to(torch.bfloat16).to(torch.float32)


def quantize_groups(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a weight matrix per group of input channels.

    Args:
        w: ``[out_features, in_features]`` float weights (``nn.Linear.weight``).
        spec: bits, group size and symmetric (GPTQ) or zero-point (AWQ) grid.

    Returns:
        ``(q, scales, zeros)``: ``q`` int32 ``[out, in]`` in ``[0, 2**bits)``; ``scales`` float32
        ``[out, in // group]`` (already exact bfloat16 values); ``zeros`` int32 ``[out, in // group]``
        (``2**(bits-1)`` everywhere for the symmetric grid). The weight is ``(q - zero) * scale``.
    """
    import torch

    out_f, in_f = w.shape
    g = spec.group_size
    if in_f % g:
        raise QuantizationError(f"in_features {in_f} is not a multiple of the group size {g}")
    maxq = (1 << spec.bits) - 1
    x = w.detach().to(torch.float32).reshape(out_f, in_f // g, g)
    tiny = torch.finfo(torch.float32).tiny

    def fit(scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.clamp(torch.round(x / scale[..., None]) + zero[..., None], 0, maxq)
        err = ((q - zero[..., None]) * scale[..., None] - x).pow(2).sum(-1)
        return q, err

    xmin = x.amin(-1).clamp(max=0)
    xmax = x.amax(-1).clamp(min=0)
    best_err = torch.full(xmin.shape, math.inf)
    best_scale = torch.ones_like(xmin)
    best_zero = torch.zeros_like(xmin)
    if spec.sym:
        half = float(1 << (spec.bits - 1))  # levels are -half .. half-1
        absmax = torch.maximum(-xmin, xmax)
        # Ratios from generous clipping up to "the positive max lands exactly on half-1".
        ratios = torch.linspace(0.5, (half - 0.5) / (half - 1), spec.clip_grid)
        zero = torch.full_like(xmin, half)
        for r in ratios.tolist():
            scale = _round_bf16((absmax * r / (half - 0.5)).clamp(min=tiny))
            _, err = fit(scale, zero)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
        best_zero = zero
    else:
        for r in torch.linspace(0.5, 1.0, spec.clip_grid).tolist():
            lo, hi = xmin * r, xmax * r
            scale = _round_bf16(((hi - lo) / maxq).clamp(min=tiny))
            zero = torch.clamp(torch.round(-lo / scale), 0, maxq)
            _, err = fit(scale, zero)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)

    # Least-squares refinement: with the integer codes fixed, the best scale is <w, q-z> / <q-z, q-z>;
    # re-round the codes and keep whatever lowers the error, group by group.
    for _ in range(spec.refine_steps):
        q, _ = fit(best_scale, best_zero)
        c = q - best_zero[..., None]
        denom = c.pow(2).sum(-1)
        ls = (x * c).sum(-1) / denom.clamp(min=tiny)
        scale = _round_bf16(torch.where(denom > 0, ls, best_scale).abs().clamp(min=tiny))
        _, err = fit(scale, best_zero)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)

    q, _ = fit(best_scale, best_zero)
    return q.reshape(out_f, in_f).to(torch.int32), best_scale, best_zero.to(torch.int32)


def quantize_channels_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: ``(q, scale)`` with ``q`` int8 ``[out, in]`` in ``[-127, 127]``
    and ``scale`` float32 ``[out, 1]`` = ``max |w| / 127`` of the row; the weight is ``q * scale``.
    An all-zero row gets scale 1 (and zero codes)."""
    import torch

    wf = w.detach().to(torch.float32)
    absmax = wf.abs().amax(dim=1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    q = torch.clamp(torch.round(wf / scale), -127, 127).to(torch.int8)
    return q, scale


def pack_w8a8(q: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """The two tensors of one compressed-tensors ``int-quantized`` linear layer (vLLM's
    ``CompressedTensorsW8A8Int8`` with channel strategy): ``weight`` int8 ``[out, in]`` and
    ``weight_scale`` float32 ``[out, 1]``."""
    import torch

    return {"weight": q.to(torch.int8).contiguous(), "weight_scale": scale.to(torch.float32).contiguous()}


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of :func:`quantize_groups`: ``[out, in]`` float32 weights."""
    import torch

    out_f, in_f = q.shape
    x = q.reshape(out_f, in_f // group_size, group_size).to(torch.float32)
    return ((x - zeros[..., None].to(torch.float32)) * scales[..., None]).reshape(out_f, in_f)


def _pack_rows(vals: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[n, m]`` small ints along dim 0 into int32 ``[n * bits // 32, m]`` (low bits first)."""
    import torch

    per = 32 // bits
    n, m = vals.shape
    v = vals.to(torch.int64).reshape(n // per, per, m)
    shifts = (torch.arange(per, dtype=torch.int64) * bits).reshape(1, per, 1)
    packed = (v << shifts).sum(1)
    # Two's complement into int32: the top nibble may set the sign bit.
    packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed)
    return packed.to(torch.int32)


def _unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    import torch

    per = 32 // bits
    p = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(per, dtype=torch.int64) * bits).reshape(1, per, 1)
    vals = (p.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return vals.reshape(-1, packed.shape[1]).to(torch.int32)


def pack_gptq(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """The four tensors of one GPTQ (AutoGPTQ v1 ``checkpoint_format="gptq"``) linear layer.

    ``qweight`` int32 ``[in/8, out]`` packed along the input dim; ``qzeros`` int32 ``[in/g, out/8]``
    packed along the output dim and stored minus one (the v1 quirk, ignored by vLLM for symmetric
    checkpoints); ``scales`` fp16 ``[in/g, out]``; ``g_idx`` int32 ``[in]``.
    """
    import torch

    in_f = q.shape[1]
    return {
        "qweight": _pack_rows(q.t().contiguous(), spec.bits),
        "qzeros": _pack_rows(zeros - 1, spec.bits).t().contiguous(),
        "scales": scales.t().contiguous().to(torch.float16),
        "g_idx": (torch.arange(in_f, dtype=torch.int32) // spec.group_size).to(torch.int32),
    }


def pack_awq(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """The three tensors of one AWQ (GEMM version) linear layer.

    ``qweight`` int32 ``[in, out/8]`` and ``qzeros`` int32 ``[in/g, out/8]`` packed along the output dim
    in AWQ's interleaved order; ``scales`` fp16 ``[in/g, out]``.
    """
    import torch

    order = list(AWQ_PACK_ORDER)

    def pack_cols(vals: torch.Tensor) -> torch.Tensor:  # [n, out] -> [n, out/8]
        n, m = vals.shape
        interleaved = vals.reshape(n, m // 8, 8)[:, :, order].reshape(n, m)
        return _pack_rows(interleaved.t().contiguous(), spec.bits).t().contiguous()

    return {
        "qweight": pack_cols(q.t().contiguous()),
        "qzeros": pack_cols(zeros.t().contiguous()),
        "scales": scales.t().contiguous().to(torch.float16),
    }


def unpack_layer(tensors: dict[str, torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """Dequantize one packed layer back to ``[out, in]`` float32 (used to check the files we wrote)."""
    import torch

    if spec.format == "w8a8":
        return tensors["weight"].to(torch.float32) * tensors["weight_scale"].to(torch.float32)
    scales = tensors["scales"].to(torch.float32).t()  # [out, in/g]
    if spec.format == "gptq":
        q = _unpack_rows(tensors["qweight"], spec.bits).t()  # [out, in]
        zeros = _unpack_rows(tensors["qzeros"].t().contiguous(), spec.bits).t() + 1  # [in/g, out]
        return dequantize(q, scales, zeros.t(), spec.group_size)
    inverse = [AWQ_PACK_ORDER.index(i) for i in range(8)]

    def unpack_cols(packed: torch.Tensor) -> torch.Tensor:  # [n, out/8] -> [n, out]
        vals = _unpack_rows(packed.t().contiguous(), spec.bits).t()
        n, m = vals.shape
        return vals.reshape(n, m // 8, 8)[:, :, inverse].reshape(n, m)

    q = unpack_cols(tensors["qweight"]).t()
    zeros = unpack_cols(tensors["qzeros"]).t()
    return dequantize(q, scales, zeros, spec.group_size)


def quantization_config(spec: QuantSpec) -> dict[str, Any]:
    """The ``quantization_config`` block of ``config.json`` that vLLM (and transformers) read."""
    if spec.format == "w8a8":
        # compressed-tensors' schema (what llm-compressor writes for its W8A8 INT8 recipes): static
        # per-channel weights, dynamic per-token symmetric activations; vLLM picks its CPU int8 GEMM.
        return {
            "quant_method": "compressed-tensors",
            "format": "int-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {
                        "num_bits": 8,
                        "type": "int",
                        "symmetric": True,
                        "strategy": "channel",
                        "dynamic": False,
                        "observer": "minmax",
                    },
                    "input_activations": {
                        "num_bits": 8,
                        "type": "int",
                        "symmetric": True,
                        "strategy": "token",
                        "dynamic": True,
                        "observer": None,
                    },
                }
            },
            "ignore": ["lm_head"],
            "kv_cache_scheme": None,
            "quantizer": f"ragsvc-rtn/{QUANTIZER_VERSION}",
        }
    if spec.format == "gptq":
        return {
            "quant_method": "gptq",
            "bits": spec.bits,
            "group_size": spec.group_size,
            "desc_act": False,
            "sym": True,
            "static_groups": False,
            "true_sequential": True,
            "lm_head": False,
            "damp_percent": spec.damp if spec.algorithm == "gptq" else 0.0,
            "checkpoint_format": "gptq",
            "quantizer": [f"ragsvc-{spec.algorithm}/{QUANTIZER_VERSION}"],
        }
    return {
        "quant_method": "awq",
        "bits": spec.bits,
        "group_size": spec.group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }


def gptq_quantize(
    w: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, block: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al., 2022): pick the codes column by column and push each column's rounding error
    onto the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs, so the
    layer's *output* on the calibration data moves as little as possible.

    The per-group scales and zero points are fixed beforehand from the unmodified weights by
    :func:`quantize_groups` ("static groups"), which keeps the checkpoint a plain ``desc_act=False`` one.

    Args:
        w: ``[out, in]`` weights.
        hessian: ``[in, in]`` ``sum(x x^T)`` over the calibration inputs of this layer.
        spec: Grid and group size; ``spec.damp`` is added to the diagonal (relative to its mean).
        block: Columns updated lazily together (speed only).

    Returns:
        ``(q, scales, zeros)`` as :func:`quantize_groups`.
    """
    import torch

    wf = w.detach().to(torch.float32).clone()
    n_in = wf.shape[1]
    _, scales, zeros = quantize_groups(wf, spec)
    s_col = scales.repeat_interleave(spec.group_size, dim=1)
    z_col = zeros.to(torch.float32).repeat_interleave(spec.group_size, dim=1)
    maxq = float((1 << spec.bits) - 1)

    h = hessian.to(torch.float32).clone()
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights do not matter
    h[dead, dead] = 1.0
    wf[:, dead] = 0.0
    h.diagonal().add_(spec.damp * float(torch.diag(h).mean()))
    try:
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError as e:  # not positive definite even after dampening
        raise QuantizationError(f"GPTQ: Hessian not positive definite ({e}); try --algorithm rtn") from e

    qf = torch.empty_like(wf)
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        w1 = wf[:, i1:i2].clone()
        err = torch.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, s, z = w1[:, i], s_col[:, i1 + i], z_col[:, i1 + i]
            q = torch.clamp(torch.round(col / s) + z, 0.0, maxq)
            qf[:, i1 + i] = q
            step = (col - (q - z) * s) / u1[i, i]
            w1[:, i + 1 :].addr_(step, u1[i, i + 1 :], alpha=-1.0)
            err[:, i] = step
        wf[:, i2:].addmm_(err, u[i1:i2, i2:], alpha=-1.0)
    return qf.to(torch.int32), scales, zeros


# --------------------------------------------------------------------------------------------------
# the model


def _quantized_modules(model: Any) -> list[tuple[str, Any]]:
    return [
        (name, module)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in QUANTIZED_PROJECTIONS and hasattr(module, "weight")
    ]


def load_gguf(gguf: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """Dequantize a GGUF into a transformers model (and its tokenizer) that ``save_pretrained`` accepts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model: Any = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    # The weights are plain dequantized tensors now; transformers still marks the model as GGUF-quantized
    # and refuses to serialise it until these are cleared.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.eval()
    return model, tokenizer


def calibration_sequences(model: Any, tokenizer: Any, spec: QuantSpec, seed: int = 0) -> list[torch.Tensor]:
    """Token ids of the model's own sampled answers to :data:`CALIBRATION_PROMPTS` (chat template applied)."""
    import torch

    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in CALIBRATION_PROMPTS
    ]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.inference_mode():
            out = model.generate(
                **enc,
                max_new_tokens=spec.calibration_tokens,
                do_sample=True,
                temperature=0.8,
                top_p=0.95,
                pad_token_id=pad,
            )
    finally:
        torch.random.set_rng_state(generator_state)
    width = enc.input_ids.shape[1]
    sequences = []
    for row, mask in zip(out, enc.attention_mask, strict=True):
        ids = row[width - int(mask.sum()) :]
        answer = ids[int(mask.sum()) :]
        stops = (answer == tokenizer.eos_token_id).nonzero()
        if len(stops):
            ids = ids[: int(mask.sum()) + int(stops[0]) + 1]
        sequences.append(ids)
    return sequences


def collect_hessians(model: Any, sequences: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sum(x x^T)`` of the inputs of every quantized projection over the calibration sequences."""
    import torch

    sums: dict[str, torch.Tensor] = {}
    # q/k/v (and gate/up) receive the very same input tensor: compute x^T x once. The cache holds a
    # reference to that tensor, so the identity check cannot be fooled by a reused address.
    last: list[torch.Tensor] = []

    def hook(name: str) -> Any:
        def pre_forward(module: Any, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            if not last or last[0] is not x:
                x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
                last[:] = [x, x2.t() @ x2]
            if name in sums:
                sums[name] += last[1]
            else:
                sums[name] = last[1].clone()

        return pre_forward

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in _quantized_modules(model)]
    try:
        with torch.inference_mode():
            for ids in sequences:
                model(input_ids=ids[None])
                last.clear()
    finally:
        for h in handles:
            h.remove()
    return sums


def write_quantized(
    model: Any, out: Path, spec: QuantSpec, hessians: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Quantize ``model``'s decoder projections and write the checkpoint's weights and config into ``out``.

    ``hessians`` (from :func:`collect_hessians`) are required for ``spec.algorithm == "gptq"``.

    Returns the dequantized weights read back from the packed tensors (name -> ``[out, in]`` float32),
    which the quality check loads into a bf16 model.
    """
    import torch
    from safetensors.torch import save_file

    state = {k: v for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    tensors: dict[str, torch.Tensor] = {}
    roundtrip: dict[str, torch.Tensor] = {}
    modules = _quantized_modules(model)
    if not modules:
        raise QuantizationError("found no decoder projections to quantize")
    sq_err = sq_norm = 0.0
    for name, module in modules:
        w = module.weight.detach().to(torch.float32)
        packed, expected = _quantize_layer(name, w, spec, hessians)
        back = unpack_layer(packed, spec)
        if not torch.equal(back, expected):
            raise QuantizationError(f"{name}: packed tensors do not round-trip")
        sq_err += float((back - w).pow(2).sum())
        sq_norm += float(w.pow(2).sum())
        roundtrip[f"{name}.weight"] = back
        state.pop(f"{name}.weight")  # a bias, if any, stays in ``state`` and is written as bf16
        for suffix, t in packed.items():
            tensors[f"{name}.{suffix}"] = t
    for key, t in state.items():
        tensors[key] = t.detach().to(torch.bfloat16).contiguous()
    logger.info("quantized %d layers, relative weight error %.4f", len(modules), math.sqrt(sq_err / sq_norm))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = quantization_config(spec)
    config["dtype"] = "bfloat16"
    config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return roundtrip


def _quantize_layer(
    name: str, w: torch.Tensor, spec: QuantSpec, hessians: dict[str, torch.Tensor] | None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One projection's checkpoint tensors and the float weights they must decode to."""
    if spec.format == "w8a8":
        q8, scale = quantize_channels_int8(w)
        return pack_w8a8(q8, scale), q8.to(w.dtype) * scale
    out_f, in_f = w.shape
    if out_f % 32 or in_f % spec.group_size:
        # vLLM's CPU kernel wants multiples of 32 on both sides and whole groups.
        raise QuantizationError(f"{name}: shape {tuple(w.shape)} does not fit group size {spec.group_size}")
    if spec.algorithm == "gptq":
        if hessians is None or name not in hessians:
            raise QuantizationError(f"{name}: no calibration Hessian for GPTQ")
        q, scales, zeros = gptq_quantize(w, hessians[name], spec)
    else:
        q, scales, zeros = quantize_groups(w, spec)
    pack = pack_gptq if spec.format == "gptq" else pack_awq
    return pack(q, scales, zeros, spec), dequantize(q, scales, zeros, spec.group_size)


def next_token_logprobs(model: Any, tokenizer: Any, texts: Sequence[str]) -> list[torch.Tensor]:
    """Full-vocabulary next-token log-probabilities (``[len-1, vocab]`` float32) for each text."""
    import torch

    results = []
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids
            logits = model(input_ids=ids).logits[0, :-1].to(torch.float32)
            results.append(torch.log_softmax(logits, dim=-1))
    return results


def compare_logprobs(
    ref: Sequence[torch.Tensor], new: Sequence[torch.Tensor], tokenizer: Any, texts: Sequence[str]
) -> dict[str, float]:
    """How far the quantized model moved from the reference on the same texts.

    ``mean_abs_logprob_diff`` is the mean over positions of ``|log p_ref(t) - log p_q(t)|`` for the
    actual next token ``t`` (what ``echo`` + ``logprobs`` would show); ``mean_kl`` is KL(ref || q) over
    the whole vocabulary; ``top1_agreement`` is how often both models' most likely token agree.
    """
    import torch

    diffs, kls, agree, count = [], [], 0, 0
    for r, n, text in zip(ref, new, texts, strict=True):
        ids = tokenizer(text, return_tensors="pt").input_ids[0, 1:]
        tr = r.gather(1, ids[:, None])[:, 0]
        tn = n.gather(1, ids[:, None])[:, 0]
        diffs.append((tr - tn).abs())
        kls.append((r.exp() * (r - n)).sum(-1))
        agree += int((r.argmax(-1) == n.argmax(-1)).sum())
        count += int(ids.numel())
    return {
        "mean_abs_logprob_diff": round(float(torch.cat(diffs).mean()), 4),
        "max_abs_logprob_diff": round(float(torch.cat(diffs).max()), 4),
        "mean_kl": round(float(torch.cat(kls).mean()), 4),
        "top1_agreement": round(agree / count, 4),
        "positions": float(count),
    }


# --------------------------------------------------------------------------------------------------
# the whole job


def prepare(
    gguf: Path,
    out: Path,
    spec: QuantSpec,
    *,
    evaluate: bool = True,
    force: bool = False,
    bf16_out: Path | None = None,
    threads: int = 1,
) -> Path:
    """Produce ``out`` from ``gguf`` unless it already holds the same result. Returns ``out``.

    ``bf16_out``, when given, also receives the unquantized Hugging Face bf16 directory (for comparing
    the two under vLLM); it is written on every run that does work and is not part of the no-op check.

    Raises:
        QuantizationError: the GGUF is missing or a shape/round-trip check failed.
    """
    if not gguf.is_file():
        raise QuantizationError(f"GGUF file not found: {gguf}")
    gguf, out = gguf.resolve(), out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    source_sha256 = sha256_file(gguf)
    with _locked(out):
        # Leftovers of a run that was killed (SIGKILL, power loss): nobody else can be writing them, we
        # hold the lock.
        for stale in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if not force and is_prepared(out, source_sha256, spec):
            logger.info("already prepared: %s", out)
            return out
        import torch  # only now: the no-op check above must stay quick

        # One thread by default: the work is many small ops, and two OpenMP threads on a 2-core machine
        # that something else also uses spend their time waiting for each other.
        torch.set_num_threads(threads)

        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            logger.info("loading %s", gguf)
            # float32 keeps the dequantized GGUF values exact for the quantizer; bf16 is what is served.
            model, tokenizer = load_gguf(gguf, torch.float32)
            t_load = time.monotonic() - started
            if not getattr(tokenizer, "chat_template", None):
                raise QuantizationError("the GGUF carried no chat template")
            model.config.save_pretrained(str(tmp))
            model.generation_config.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            logger.info(
                "quantizing: %d-bit %s, group size %d (0: per channel)", spec.bits, spec.format, spec.group_size
            )
            hessians = None
            if spec.algorithm == "gptq":
                sequences = calibration_sequences(model, tokenizer, spec)
                n_tokens = sum(len(x) for x in sequences)
                logger.info("calibration: %d sampled sequences, %d tokens", len(sequences), n_tokens)
                hessians = collect_hessians(model, sequences)
            roundtrip = write_quantized(model, tmp, spec, hessians)
            del hessians
            t_quant = time.monotonic() - started - t_load
            quality: dict[str, float] | None = None
            model = model.to(torch.bfloat16)
            if bf16_out is not None:
                model.save_pretrained(str(bf16_out), safe_serialization=True)
                tokenizer.save_pretrained(str(bf16_out))
            if evaluate:
                ref = next_token_logprobs(model, tokenizer, EVAL_TEXTS)
                model.load_state_dict(roundtrip, strict=False)
                new = next_token_logprobs(model, tokenizer, EVAL_TEXTS)
                quality = compare_logprobs(ref, new, tokenizer, EVAL_TEXTS)
                logger.info("quality vs bf16: %s", quality)
            manifest = {
                "source": str(gguf),
                "source_sha256": source_sha256,
                **spec.identity(),
                "desc_act": False,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "seconds": {
                    "load": round(t_load, 1),
                    "quantize": round(t_quant, 1),
                    "total": round(time.monotonic() - started, 1),
                },
                "quality_vs_bf16": quality,
                "versions": {"torch": torch.__version__, "transformers": _version("transformers")},
            }
            (tmp / "prepared.json").write_text(json.dumps(manifest, indent=2) + "\n")
            # mkdtemp makes the dir 0700 and safetensors writes 0600: let other users (a service account)
            # read the model.
            tmp.chmod(0o755)
            for f in tmp.iterdir():
                f.chmod(0o644)
            if out.exists():
                stale = out.with_name(f".{out.name}.old-{os.getpid()}")
                out.rename(stale)
                shutil.rmtree(stale, ignore_errors=True)
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("prepared %s in %.1f s", out, time.monotonic() - started)
    return out


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serving.prepare",
        description="Convert a GGUF decoder into an INT8 W8A8 (or 4-bit GPTQ/AWQ) checkpoint for vLLM's CPU build.",
    )
    parser.add_argument("--gguf", type=Path, required=True, help="the .gguf file")
    parser.add_argument("--out", type=Path, required=True, help="the checkpoint directory to produce")
    parser.add_argument(
        "--format", choices=("w8a8", "gptq", "awq"), default="w8a8", help="checkpoint layout (w8a8: INT8)"
    )
    parser.add_argument(
        "--algorithm", choices=("gptq", "rtn"), default="gptq", help="GPTQ error compensation or plain rounding"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--group-size", type=int, default=64, help="4-bit formats: input channels per scale")
    parser.add_argument("--no-eval", action="store_true", help="skip the log-prob comparison")
    parser.add_argument("--bf16-out", type=Path, help="also write the unquantized bf16 HF directory here")
    parser.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.group_size <= 0 or args.group_size % 32:
        print("--group-size must be a positive multiple of 32", file=sys.stderr)
        return 2
    # SIGTERM (a test timeout, `kill`) unwinds like Ctrl-C, so the temporary directory is removed.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    spec = QuantSpec.for_format(args.format, group_size=args.group_size, algorithm=args.algorithm)
    try:
        out = prepare(
            args.gguf,
            args.out,
            spec,
            evaluate=not args.no_eval,
            force=args.force,
            bf16_out=args.bf16_out,
            threads=args.threads,
        )
    except QuantizationError as e:
        logger.error("%s", e)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

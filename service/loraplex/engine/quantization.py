"""A quantized frozen base: int8 (LLM.int8, row-wise) or nf4 (4-bit NormalFloat, blockwise) linear weights.

Only the seven projections of each decoder layer are quantized, with bitsandbytes' functional API and the
same parameters transformers' BitsAndBytesConfig uses, so the quantized bytes equal what transformers
produces for the same checkpoint; embeddings, norms and the LM head stay in the serving dtype. Adapters
stay in full precision on top (LoraLinear.add_lora_terms). The fused q/k/v and gate/up GEMMs stay fused:
int8 rows concatenate exactly; nf4 blocks concatenate when each member fills whole blocks (its double
quantization is then undone into one float32 absmax per block, the values transformers computes too).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loraplex.engine.errors import EngineError

QUANTIZATIONS = ("none", "int8", "nf4")
NF4_BLOCKSIZE = 64  # transformers' default (bnb_4bit_blocksize)
INT8_THRESHOLD = 6.0  # transformers' default llm_int8_threshold: outlier activations stay in 16 bits


def bnb():
    """bitsandbytes, or a start-up error naming the extra that installs it."""
    try:
        import bitsandbytes
    except ImportError:  # pragma: no cover - the test venv installs it
        raise EngineError("quantization needs bitsandbytes: pip install 'loraplex[quant]'") from None
    return bitsandbytes


@dataclass(frozen=True)
class QuantConfig:
    method: str  # int8 | nf4
    double_quant: bool = True  # nf4: quantize the per-block absmax too (QLoRA's double quantization)
    quant_type: str = "nf4"  # a 4-bit checkpoint may carry fp4
    threshold: float = INT8_THRESHOLD
    source: str = "load"  # load: quantized at start | checkpoint: saved quantized by transformers + bitsandbytes


class Nf4Weight(nn.Module):
    """packed: [N*K/2, 1] uint8 codes, state: bitsandbytes QuantState (absmax per 64 weights)."""

    def __init__(self, packed: torch.Tensor, state):
        super().__init__()
        self.register_buffer("packed", packed, persistent=False)
        self.state = state
        self.shape = tuple(state.shape)  # (d_out, d_in)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x: [T, d_in] -> [T, d_out]; dequantize to x.dtype + GEMM (bnb's CUDA kernels on GPU)
        return bnb().matmul_4bit(x, self.packed.t(), quant_state=self.state, bias=bias)

    def dequantize(self) -> torch.Tensor:
        return bnb().functional.dequantize_4bit(self.packed, self.state).to(self.state.dtype)  # [d_out, d_in]

    def flat_absmax(self) -> torch.Tensor:
        """One float32 scale per block, double quantization undone: [N*K/blocksize]."""
        s = self.state
        if not s.nested:
            return s.absmax.float()
        return bnb().functional.dequantize_blockwise(s.absmax, s.state2) + s.offset

    @property
    def nbytes(self) -> int:
        s, extra = self.state, 0
        if s.nested:
            extra = s.state2.absmax.nbytes + s.state2.code.nbytes + s.offset.nbytes
        return self.packed.nbytes + s.absmax.nbytes + s.code.nbytes + extra


class Int8Weight(nn.Module):
    """cb: [d_out, d_in] int8, scb: [d_out] float32 row scales (absmax / 127)."""

    def __init__(self, cb: torch.Tensor, scb: torch.Tensor, threshold: float):
        super().__init__()
        lib = bnb()
        self.register_buffer("cb", cb, persistent=False)
        self.register_buffer("scb", scb, persistent=False)
        self.state = lib.MatmulLtState()
        self.state.CB, self.state.SCB, self.state.threshold = cb, scb, threshold
        self.state.has_fp16_weights, self.state.is_training = False, False
        self.shape = tuple(cb.shape)
        self.sequences = SequenceIndex()  # install() shares one per model

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x: [T, d_in] -> [T, d_out]. bnb.matmul's LLM.int8 arithmetic, except that the outlier columns (kept in
        16 bits) are chosen per sequence: bnb takes them over the whole batch, so a request's tokens would depend
        on its batch neighbours. A step's tokens of one sequence are what transformers sees in one forward."""
        bnb()
        ops = torch.ops.bitsandbytes
        a = x.to(torch.float16)  # as bnb quantizes activations
        outliers = a.abs() >= self.state.threshold  # [T, d_in]
        a = a.masked_fill(outliers, 0)
        row_stats = a.abs().amax(dim=1).float()  # [T]
        ca = torch.round(a * (127.0 / row_stats.unsqueeze(-1))).to(torch.int8)
        cols = outliers.any(dim=0).nonzero().view(-1)  # [C]: outlier columns anywhere in the batch
        if not cols.numel():
            return ops.int8_scaled_mm.default(ca, self.cb, row_stats, self.scb, bias=bias, dtype=x.dtype)
        in_seq = _per_sequence(outliers[:, cols], self.sequences.of_token(x.shape[0], x.device))  # [T, C]
        ca[:, cols] = ca[:, cols].masked_fill(in_seq, 0)
        y = ops.int8_scaled_mm.default(ca, self.cb, row_stats, self.scb, bias=bias, dtype=x.dtype)
        sub_b = ops.int8_vectorwise_dequant.default(self.cb[:, cols].contiguous(), self.scb).to(x.dtype).t()  # [C, d_out]
        return y.addmm(x[:, cols].masked_fill(~in_seq, 0), sub_b)

    def dequantize(self) -> torch.Tensor:
        return self.cb.float() * (self.scb.float() / 127).unsqueeze(1)  # [d_out, d_in]

    @property
    def nbytes(self) -> int:
        return self.cb.nbytes + self.scb.nbytes


class SequenceIndex:
    """Which sequence each token of the current step belongs to (set per forward by quantized_layers)."""

    def __init__(self):
        self.labels: torch.Tensor | None = None  # [T] a label per sequence (its first token's index)

    def of_token(self, num_tokens: int, device) -> torch.Tensor:
        if self.labels is None or self.labels.shape[0] != num_tokens:
            return torch.arange(num_tokens, device=device)  # unknown: every token on its own
        return self.labels


def _per_sequence(outliers: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """outliers: [T, C] bool, labels: [T] -> [T, C]: whether the column is an outlier in the token's sequence."""
    counts = torch.zeros(outliers.shape, dtype=torch.int32, device=outliers.device)
    counts.index_add_(0, labels, outliers.to(torch.int32))
    return counts[labels] > 0


def quantize_weight(weight: torch.Tensor, config: QuantConfig) -> nn.Module:
    """weight: [d_out, d_in] in the serving dtype, on its device -> Nf4Weight | Int8Weight (as transformers does)."""
    functional = bnb().functional
    if config.method == "int8":
        cb, scb, _ = functional.int8_vectorwise_quant(weight.detach().contiguous().to(torch.float16))
        return Int8Weight(cb, scb, config.threshold)
    packed, state = functional.quantize_4bit(
        weight.detach().contiguous(), blocksize=NF4_BLOCKSIZE, compress_statistics=config.double_quant,
        quant_type=config.quant_type, quant_storage=torch.uint8,
    )
    return Nf4Weight(packed, state)


def fuse(weights: list[nn.Module]) -> list[nn.Module]:
    """Member weights of one fused projection -> one weight, or the members when their blocks do not align."""
    if len(weights) == 1:
        return weights
    if all(isinstance(w, Int8Weight) for w in weights):
        return [Int8Weight(torch.cat([w.cb for w in weights]), torch.cat([w.scb for w in weights]), weights[0].state.threshold)]
    states = [w.state for w in weights]
    first = states[0]
    aligned = all(
        (s.shape[0] * s.shape[1]) % s.blocksize == 0 and s.blocksize == first.blocksize and s.shape[1] == first.shape[1]
        and s.quant_type == first.quant_type for s in states
    )
    if not all(isinstance(w, Nf4Weight) for w in weights) or not aligned:
        return weights
    functional = bnb().functional
    state = functional.QuantState(
        absmax=torch.cat([w.flat_absmax() for w in weights]), shape=torch.Size((sum(s.shape[0] for s in states), first.shape[1])),
        code=first.code, blocksize=first.blocksize, quant_type=first.quant_type, dtype=first.dtype,
    )
    return [Nf4Weight(torch.cat([w.packed for w in weights]), state)]


def take_quantized(linear: nn.Module, config: QuantConfig, dtype: torch.dtype) -> nn.Module:
    """One projection of the loaded HF model -> its quantized weight: the saved bitsandbytes form as is,
    or the full-precision weight quantized now."""
    lib = bnb()
    if isinstance(linear, lib.nn.Linear4bit):
        return Nf4Weight(linear.weight.data, linear.weight.quant_state)
    if isinstance(linear, lib.nn.Linear8bitLt):
        scb = linear.weight.SCB if linear.weight.SCB is not None else linear.state.SCB
        return Int8Weight(linear.weight.data, scb, config.threshold)
    if config.source == "checkpoint":
        raise EngineError(f"the quantized checkpoint left a projection ({type(linear).__name__}) in full precision; "
                          "loraplex serves checkpoints whose seven decoder projections are all quantized")
    return quantize_weight(linear.weight.to(dtype), config)


def checkpoint_quantization(hf_config, requested: str) -> QuantConfig | None:
    """The base's quantization: the checkpoint's own (bitsandbytes only) or the requested one; None: full
    precision. Raises EngineError for an unknown value, an unsupported format, or a conflict."""
    if requested not in QUANTIZATIONS:
        raise EngineError(f"unknown quantization {requested!r}; choose from {', '.join(QUANTIZATIONS)}")
    saved = getattr(hf_config, "quantization_config", None)
    if saved is None:
        if requested == "none":
            return None
        bnb()  # the extra is missing: say so before loading anything
        return QuantConfig(requested)
    saved = saved if isinstance(saved, dict) else saved.to_dict()
    method = str(saved.get("quant_method", "unknown"))
    if method != "bitsandbytes":
        raise EngineError(f"the checkpoint is quantized with {method!r}, which loraplex does not serve; supported: "
                          "checkpoints saved by transformers + bitsandbytes (4-bit or 8-bit), or a full-precision "
                          "checkpoint with LORAPLEX_QUANTIZATION=int8|nf4")
    kind = "int8" if saved.get("load_in_8bit") else str(saved.get("bnb_4bit_quant_type", "nf4"))
    if requested not in ("none", kind):
        raise EngineError(f"the checkpoint is already quantized ({kind}); LORAPLEX_QUANTIZATION={requested} "
                          "conflicts with it: leave it at none")
    bnb()
    return QuantConfig(kind, double_quant=bool(saved.get("bnb_4bit_use_double_quant", False)), quant_type=kind,
                       threshold=float(saved.get("llm_int8_threshold", INT8_THRESHOLD)), source="checkpoint")


def transformers_config(method: str, dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for the same quantization as `QuantConfig(method)`."""
    from transformers import BitsAndBytesConfig

    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def fp32_cpu_compute(hf_model: nn.Module) -> None:
    """bitsandbytes' CPU fast path for 4-bit layers (AVX512-BF16 machines) computes in bf16 and fails unless
    d_out % 32 == 0: off, so an HF model computes as the engine does (dequantize + GEMM in its dtype)."""
    for module in hf_model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False

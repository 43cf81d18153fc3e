"""Weight formats — `--precision` × `--quant` × `--block-size` — and which execution provider runs each.

Imports neither torch nor onnx: the runtime imports this module to refuse, with a clear message, a
model its provider cannot run (`provider_problem`), and to allocate state in the right dtype
(`state_dtype`).

`--precision` is the dtype the graph *computes* in:

| precision | weights, activations, conv + K/V state | SSM state, router logits, logits | runs on                     |
|-----------|----------------------------------------|----------------------------------|-----------------------------|
| fp32      | float32                                | float32                          | CPU, CUDA                   |
| fp16      | float16                                | float32                          | CUDA; CPU (see below)       |
| bf16      | bfloat16                               | float32                          | CUDA only                   |

How reduced precision is realised on CPU (ONNX Runtime 1.32): the CPU provider has float16 kernels for
few ops (no float16 MatMul, Gemm, Softplus, LinearAttention, MoE on x86) and bfloat16 kernels for
almost none. A float16 graph still runs on CPU because ORT inserts float32 casts around every node
that has no float16 kernel (its `InsertCastTransformer`): results are float16-rounded, but neither
memory nor speed improve — fp16 on CPU is for checking accuracy; the fast CPU formats are int8/int4.
ORT does no such thing for bfloat16 (session creation fails with NOT_IMPLEMENTED), so a bf16 model is
a CUDA model, and the runtime refuses it on CPU.

`--quant` replaces the big weights, weight-only (activations keep the precision dtype):

| quant | linear layers                               | experts                          | tied embedding / LM head                 |
|-------|---------------------------------------------|----------------------------------|------------------------------------------|
| none  | MatMul                                      | granite_onnx.MoE (→ com.microsoft.MoE when fused) | Gather + Gemm           |
| int8  | MatMulNBits(bits=8), block-wise, symmetric   | QMoE(int, 8 bits), block-wise    | one 8-bit tensor shared by GatherBlockQuantized and a MatMulNBits head |
| int4  | MatMulNBits(bits=4), block-wise, symmetric   | QMoE(int, 4 bits), block-wise    | the same, still 8-bit (`embedding_bits`) |
| fp8   | MatMulBlockQuantizedFp8Weight (e4m3)        | QMoE(quant_type="fp8"), e4m3     | left in the precision dtype              |

fp8's kernels take float16/bfloat16 activations and exist on CUDA only: `--quant fp8` needs
`--precision fp16|bf16`, and the model runs on CUDA only. The router, norms and Mamba's small
per-head vectors stay in the precision dtype at every setting.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

PRECISIONS = ("fp32", "fp16", "bf16")
QUANTS = ("none", "int8", "int4", "fp8")
EMBEDDINGS = ("shared", "head", "float")  # tied embedding/LM head treatment when quantized (see WeightFormat)
DEFAULT_BLOCK_SIZE = {"none": 0, "int8": 32, "int4": 32, "fp8": 128}

# numpy dtype names (bfloat16 is ml_dtypes' name; the runtime only needs it on CUDA)
_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class FormatError(ValueError):
    """A precision/quant/block-size combination that cannot be exported; the message says how to fix it."""


@dataclass(frozen=True)
class WeightFormat:
    """How the weights are stored and what the graph computes in.

    `block_size`: weights are quantized in blocks of this many input features (K), each block with its
    own scale (0 = the default for `quant`). `embedding` (int8/int4 only) chooses what happens to the
    tied embedding/LM head: "shared" — one quantized tensor read by both the input gather
    (GatherBlockQuantized) and the head (MatMulNBits); "head" — a quantized head plus the float
    embedding for the gather; "float" — both stay in the precision dtype. `accuracy_level` is
    MatMulNBits'/QMoE's: None picks the measured default (see quantize.py).
    """

    precision: str = "fp32"
    quant: str = "none"
    block_size: int = 0
    embedding: str = "shared"
    accuracy_level: int | None = None
    embedding_bits: int = 0  # bits of the quantized embedding/LM head (0: 8, see embed_bits)

    def __post_init__(self) -> None:
        if self.block_size == 0 and self.quant in QUANTS:
            object.__setattr__(self, "block_size", DEFAULT_BLOCK_SIZE[self.quant])
        check_format(self)

    @property
    def is_default(self) -> bool:
        return self.precision == "fp32" and self.quant == "none"

    @property
    def dtype(self) -> str:
        """numpy dtype name of the compute precision."""
        return _DTYPE[self.precision]

    @property
    def bits(self) -> int:
        return {"int8": 8, "int4": 4, "fp8": 8}.get(self.quant, 0)

    @property
    def embed_bits(self) -> int:
        """Bits of the quantized tied embedding/LM head: 8 unless set — the head's error lands directly in
        the logits (default model, int4 block 32: top-1 93.4 % with a 4-bit head, 96.5 % with 8 bits)."""
        return self.embedding_bits or (8 if self.quant in ("int4", "int8") else self.bits)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "WeightFormat":
        """From a model folder's granite_config.json (folders written before formats existed are fp32)."""
        w = meta.get("weights") or {}
        return cls(precision=w.get("precision", "fp32"), quant=w.get("quant", "none"),
                   block_size=int(w.get("block_size", 0)), embedding=w.get("embedding", "shared"),
                   accuracy_level=w.get("accuracy_level"), embedding_bits=int(w.get("embedding_bits", 0)))

    def describe(self) -> str:
        q = "" if self.quant == "none" else f" {self.quant} (block {self.block_size})"
        return f"{self.precision}{q}"


def check_format(fmt: WeightFormat) -> None:
    """Raise FormatError when the names or the combination are invalid (independent of the model)."""
    if fmt.precision not in PRECISIONS:
        raise FormatError(f"unknown precision {fmt.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if fmt.quant not in QUANTS:
        raise FormatError(f"unknown quantization {fmt.quant!r}; choose one of {', '.join(QUANTS)}")
    if fmt.embedding not in EMBEDDINGS:
        raise FormatError(f"unknown embedding treatment {fmt.embedding!r}; choose one of {', '.join(EMBEDDINGS)}")
    if fmt.embedding_bits not in (0, 4, 8) or (fmt.embedding_bits and fmt.quant not in ("int4", "int8")):
        raise FormatError(f"embedding_bits={fmt.embedding_bits}: the quantized embedding/LM head takes 4 or 8 bits "
                          "(with --quant int4 or int8)")
    b = fmt.block_size
    if fmt.quant == "none":
        if b:
            raise FormatError(f"--block-size {b} needs a quantization: add --quant int8 or --quant int4")
        return
    if b < 16 or b & (b - 1):
        raise FormatError(f"--block-size {b} is not supported: ONNX Runtime's block-quantized kernels "
                          "(MatMulNBits, QMoE, GatherBlockQuantized) take a power of two ≥ 16, e.g. 32, 64, 128")
    if fmt.quant == "fp8" and fmt.precision == "fp32":
        raise FormatError("--quant fp8 needs --precision fp16 or bf16: ONNX Runtime's FP8 weight kernels "
                          "(MatMulBlockQuantizedFp8Weight, QMoE quant_type='fp8') take float16/bfloat16 activations")


def needs_cuda(fmt: WeightFormat) -> str | None:
    """Why a model in `fmt` runs only on CUDA, or None when the CPU provider runs it."""
    if fmt.quant == "fp8":
        return ("FP8 weights run on CUDA only: ONNX Runtime's CPU provider has no kernel for "
                "MatMulBlockQuantizedFp8Weight or QMoE(quant_type='fp8')")
    if fmt.precision == "bf16":
        return ("bfloat16 runs on CUDA only: ONNX Runtime's CPU provider has no bfloat16 kernels for "
                "MatMul, Gemm, MatMulNBits and most other ops")
    return None


def cpu_note(fmt: WeightFormat) -> str | None:
    """A caveat for a format the CPU provider runs, but not well."""
    if fmt.precision == "fp16" and needs_cuda(fmt) is None:
        return ("fp16 is meant for CUDA: on CPU, ONNX Runtime runs it by casting to float32 around every "
                "op without a float16 kernel — correct, but no smaller in memory and no faster than fp32; "
                "for a fast CPU model use --quant int8 or int4")
    return None


def provider_problem(meta: Mapping[str, Any], provider: str) -> str | None:
    """Why the model folder described by `meta` (its granite_config.json) cannot run on `provider`.

    None when it can. The message names the fix, for the runtime to raise as is.
    """
    fmt = WeightFormat.from_meta(meta)
    if provider == "cpu":
        why = needs_cuda(fmt)
        if why:
            return (f"this model was exported as {fmt.describe()}: {why}. Run it with provider 'cuda' "
                    "(onnxruntime-gpu on an NVIDIA GPU), or re-export it for CPU with "
                    "`granite-onnx export ... --precision fp32 --quant int4` (or int8, or none)")
    return None


def state_dtype(meta: Mapping[str, Any], float32_always: bool) -> str:
    """numpy dtype name of a state tensor: the SSM state is float32 always, conv and K/V follow precision."""
    return "float32" if float32_always else WeightFormat.from_meta(meta).dtype

"""The state contract: every graph input/output name, symbolic dim and state shape, written once.

The exporter, the fusions, the runtime and the tests import this module; nobody retypes a name.
Names follow onnxruntime-genai so that its runtime discovers them (see ARCHITECTURE.md).

| tensor                 | in → out                                                          | shape                                        | dtype       |
|------------------------|-------------------------------------------------------------------|----------------------------------------------|-------------|
| tokens                 | input_ids                                                         | [batch, sequence]                            | int64       |
| mask                   | attention_mask (1 = real token, left padding)                     | [batch, total_sequence]                      | int64       |
| attention layer i      | past_key_values.{i}.key / .value → present.{i}.key / .value        | [batch, kv_heads, past_sequence, head_dim]   | model dtype |
| mamba layer i, conv    | past_key_values.{i}.conv_state → present.{i}.conv_state            | [batch, conv_dim, d_conv − 1]                | model dtype |
| mamba layer i, SSM     | past_key_values.{i}.recurrent_state → present.{i}.recurrent_state  | [batch, mamba_heads, d_state, head_dim]      | float32     |
| output                 | logits                                                            | [batch, kept positions, vocab]               | float32     |

This module imports no torch and no onnx: the runtime uses it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:  # pragma: no cover
    from granite_onnx.models.config import HybridConfig

# Symbolic dimension names.
BATCH = "batch"
SEQUENCE = "sequence"
PAST_SEQUENCE = "past_sequence"
TOTAL_SEQUENCE = "total_sequence"
PRESENT_SEQUENCE = "present_sequence"
KEPT = "kept_sequence"

# Plain inputs/outputs.
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
LOGITS = "logits"

# Templates (printf style, as onnxruntime-genai's genai_config.json spells them).
PAST_KEY = "past_key_values.%d.key"
PAST_VALUE = "past_key_values.%d.value"
PRESENT_KEY = "present.%d.key"
PRESENT_VALUE = "present.%d.value"
PAST_CONV = "past_key_values.%d.conv_state"
PAST_RECURRENT = "past_key_values.%d.recurrent_state"
PRESENT_CONV = "present.%d.conv_state"
PRESENT_RECURRENT = "present.%d.recurrent_state"

MAMBA = "mamba"
ATTENTION = "attention"


@dataclass(frozen=True)
class StateSpec:
    """One recurrent-state tensor of one layer: its past/present names, shape and dtype kind."""

    layer: int
    kind: str  # "key" | "value" | "conv_state" | "recurrent_state"
    past_name: str
    present_name: str
    shape: tuple[int | str, ...]  # symbolic dims are strings
    float32_always: bool  # True: float32 at every precision (the SSM state)

    def concrete_shape(self, batch: int, past_sequence: int = 0) -> tuple[int, ...]:
        out = []
        for d in self.shape:
            if d == BATCH:
                out.append(batch)
            elif d in (PAST_SEQUENCE, PRESENT_SEQUENCE):
                out.append(past_sequence)
            else:
                assert isinstance(d, int), d
                out.append(d)
        return tuple(out)


def state_specs(cfg: HybridConfig, *, present: bool = False) -> list[StateSpec]:
    """Every state tensor of the model, in layer order (attention: key, value; mamba: conv, recurrent)."""
    specs: list[StateSpec] = []
    seq = PRESENT_SEQUENCE if present else PAST_SEQUENCE
    for i, kind in enumerate(cfg.layer_types):
        if kind == ATTENTION:
            shape = (BATCH, cfg.num_key_value_heads, seq, cfg.head_dim)
            specs.append(StateSpec(i, "key", PAST_KEY % i, PRESENT_KEY % i, shape, False))
            specs.append(StateSpec(i, "value", PAST_VALUE % i, PRESENT_VALUE % i, shape, False))
        else:
            specs.append(
                StateSpec(i, "conv_state", PAST_CONV % i, PRESENT_CONV % i,
                          (BATCH, cfg.conv_dim, cfg.mamba_d_conv - 1), False)
            )
            specs.append(
                StateSpec(i, "recurrent_state", PAST_RECURRENT % i, PRESENT_RECURRENT % i,
                          (BATCH, cfg.mamba_n_heads, cfg.mamba_d_state, cfg.mamba_d_head), True)
            )
    return specs


def input_names(cfg: HybridConfig) -> list[str]:
    return [INPUT_IDS, ATTENTION_MASK] + [s.past_name for s in state_specs(cfg)]


def output_names(cfg: HybridConfig) -> list[str]:
    return [LOGITS] + [s.present_name for s in state_specs(cfg)]


def iter_present_to_past(cfg: HybridConfig) -> Iterator[tuple[str, str]]:
    for s in state_specs(cfg):
        yield s.present_name, s.past_name


def genai_io_names() -> dict[str, dict[str, str]]:
    """The `model.decoder.inputs` / `outputs` blocks of onnxruntime-genai's genai_config.json."""
    return {
        "inputs": {
            "input_ids": INPUT_IDS,
            "attention_mask": ATTENTION_MASK,
            "past_key_names": PAST_KEY,
            "past_value_names": PAST_VALUE,
            "past_conv_names": PAST_CONV,
            "past_recurrent_names": PAST_RECURRENT,
        },
        "outputs": {
            "logits": LOGITS,
            "present_key_names": PRESENT_KEY,
            "present_value_names": PRESENT_VALUE,
            "present_conv_names": PRESENT_CONV,
            "present_recurrent_names": PRESENT_RECURRENT,
        },
    }

"""In-place recurrent state: on a fused graph the conv and SSM states are one buffer each, read and written
by the same step (ONNX Runtime's CausalConvWithState and LinearAttention read their past before writing).

Every result must equal the alternating two-buffer layout on the same folder — exactly: the same kernels on
the same values — across left-padded batches, chunked prefill, snapshots, a failed run's message and a chat
carried over turns; the folder must declare the layout only where its graph allows it; and the state must
hold one set of buffers, not two.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from granite_onnx.export import io
from granite_onnx.export.exporter import recurrent_state_mode
from granite_onnx.models.config import HybridConfig
from granite_onnx.runtime import GenerationConfig, Model
from granite_onnx.runtime.session import RuntimeError_


@pytest.fixture(scope="module")
def inplace(test_model_fused_dir: Path) -> Model:
    m = Model.load(test_model_fused_dir, threads=2)
    assert m.session.rec_inplace, "the fused folder should declare recurrent_state 'inplace'"
    return m


@pytest.fixture(scope="module")
def pingpong(test_model_fused_dir: Path) -> Model:
    m = Model.load(test_model_fused_dir, threads=2, recurrent_state="pingpong")
    assert not m.session.rec_inplace
    return m


def _prompts(m: Model, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(3, m.cfg.vocab_size, n))) for n in lengths]


def _graph_and_cfg(folder: Path) -> tuple[onnx.ModelProto, HybridConfig]:
    meta = json.loads((folder / "granite_config.json").read_text())
    return onnx.load(str(folder / "model.onnx"), load_external_data=False), HybridConfig.from_json_dict(meta["config"])


def test_folders_declare_what_their_graph_allows(test_model_fused_dir: Path, test_model_last_dir: Path) -> None:
    fused, cfg = _graph_and_cfg(test_model_fused_dir)
    portable, _ = _graph_and_cfg(test_model_last_dir)
    assert json.loads((test_model_fused_dir / "granite_config.json").read_text())["recurrent_state"] == "inplace"
    assert json.loads((test_model_last_dir / "granite_config.json").read_text())["recurrent_state"] == "pingpong"
    assert recurrent_state_mode(fused, cfg) == "inplace"
    assert recurrent_state_mode(portable, cfg) == "pingpong"
    # a node that reads only a past state's shape (quantized graphs keep one) changes nothing
    conv = next(s for s in io.state_specs(cfg) if s.kind == "conv_state")
    fused.graph.node.append(helper.make_node("Shape", [conv.past_name], ["conv_shape"]))
    fused.graph.output.append(onnx.ValueInfoProto(name="conv_shape"))
    assert recurrent_state_mode(fused, cfg) == "inplace"
    # one more reader of a past state's values (here: it is also returned as an output) → no longer safe
    fused.graph.node.append(helper.make_node("Identity", [conv.past_name], ["conv_echo"]))
    fused.graph.output.append(onnx.ValueInfoProto(name="conv_echo"))
    assert recurrent_state_mode(fused, cfg) == "pingpong"
    # the writer's present output renamed away from the state contract → refused as well
    fused, _ = _graph_and_cfg(test_model_fused_dir)
    writer = next(n for n in fused.graph.node if conv.past_name in n.input)
    writer.output[1] = "elsewhere"
    assert recurrent_state_mode(fused, cfg) == "pingpong"


def test_bad_requests_are_refused(test_model_fused_dir: Path, test_model_last_dir: Path) -> None:
    with pytest.raises(RuntimeError_, match="cannot update its recurrent state in place"):
        Model.load(test_model_last_dir, recurrent_state="inplace")
    with pytest.raises(RuntimeError_, match="unknown recurrent_state"):
        Model.load(test_model_fused_dir, recurrent_state="ring")
    assert not Model.load(test_model_last_dir).session.rec_inplace  # a portable folder alternates by default


@pytest.mark.parametrize("chunk", [None, 4])
def test_inplace_equals_alternating(inplace: Model, pingpong: Model, chunk: int | None) -> None:
    """Mixed lengths (left padding), whole or chunked prefill, 40 decode steps: identical logits."""
    prompts = _prompts(inplace, [21, 8, 15])
    out = {}
    for name, m in (("inplace", inplace), ("pingpong", pingpong)):
        logits, st = m.prefill(prompts, chunk_size=chunk)
        rows, nxt = [np.array(logits, copy=True)], logits.argmax(-1)
        for _ in range(40):
            lg, st = m.decode_step(nxt, st)
            rows.append(np.array(lg, copy=True))
            nxt = lg.argmax(-1)
        out[name] = (rows, st)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(out["inplace"][0], out["pingpong"][0]))
    print(f"chunk {chunk}: max |Δlogits| in place vs alternating over a prefill and 40 steps = {diff:.2e}")
    assert diff == 0.0
    # one buffer per state tensor in place, two alternating
    st_in, st_pp = out["inplace"][1], out["pingpong"][1]
    assert all(st_in.rec[0][k] is st_in.rec[1][k] for k in st_in.rec[0])
    assert all(st_pp.rec[0][k] is not st_pp.rec[1][k] for k in st_pp.rec[0])
    one_set = sum(int(np.prod(s.concrete_shape(3, 0))) * 4 for s in inplace.session.specs
                  if s.kind in ("conv_state", "recurrent_state"))
    assert inplace.session.recurrent_nbytes(st_in) == one_set
    assert pingpong.session.recurrent_nbytes(st_pp) == 2 * one_set


def test_snapshots_and_chats_in_place(inplace: Model, pingpong: Model) -> None:
    """A snapshot taken mid-generation is a copy: continuing the live state (which overwrites its buffers in
    place) leaves it intact, and a state restored from it continues exactly like the original did."""
    prompt = _prompts(inplace, [19], seed=5)[0]
    logits, st = inplace.prefill([prompt])
    nxt = logits.argmax(-1)
    snap = inplace.snapshot(st, logits=logits)
    first = []
    for _ in range(12):
        lg, st = inplace.decode_step(nxt, st)
        first.append(np.array(lg, copy=True))
        nxt = lg.argmax(-1)
    twin, nxt = inplace.restore(snap), logits.argmax(-1)
    for want in first:
        lg, twin = inplace.decode_step(nxt, twin)
        assert np.array_equal(lg, want)
        nxt = lg.argmax(-1)
    # a conversation carried over turns (each turn prefilled onto the state, then a greedy reply) and
    # generation from a shared prefix: the same tokens as with alternating buffers
    cfg = GenerationConfig(max_new_tokens=24)
    turns = _prompts(inplace, [30, 12, 7], seed=9)
    replies = {}
    for name, m in (("inplace", inplace), ("pingpong", pingpong)):
        st, got = None, []
        for t in turns:
            logits, st = m.prefill([t], state=st)
            nxt = logits.argmax(-1)
            for _ in range(8):
                got.append(int(nxt[0]))
                lg, st = m.decode_step(nxt, st)
                nxt = lg.argmax(-1)
        prefix = m.prefix(turns[0])
        replies[name] = (got, [r.token_ids for r in m.generate(turns[1:], cfg, state=prefix)])
    assert replies["inplace"] == replies["pingpong"]


def test_a_failed_run_says_what_it_may_have_left(inplace: Model, pingpong: Model) -> None:
    """A token id past the vocabulary fails inside ONNX Runtime (the embedding's Gather, before any state
    is written: the state still continues exactly); in place, the error warns that a state can be left
    partly advanced by a run that fails later in the graph."""
    prompt = _prompts(inplace, [11], seed=2)[0]
    for m in (inplace, pingpong):
        logits, st = m.prefill([prompt])
        with pytest.raises(RuntimeError_, match="ONNX Runtime failed on a step") as err:
            m.decode_step(np.array([m.cfg.vocab_size + 5]), st)
        print(err.value)
        assert ("partly advanced" in str(err.value)) == m.session.rec_inplace
        assert st.past_len == len(prompt)
        got = np.array(m.decode_step(logits.argmax(-1), st)[0], copy=True)
        fresh_logits, fresh = m.prefill([prompt])  # the same step from a state no failure touched
        assert np.array_equal(got, m.decode_step(fresh_logits.argmax(-1), fresh)[0])

"""The shipped default model (granite_onnx/assets/default_model) as a real-text fixture.

Checks the folder as a newcomer would use it: the tokenizer is lossless on Python source, the
chat template renders the Granite 4.0 format, and the model loads with AutoModelForCausalLM and
predicts held-out stdlib files far better than a unigram model of the same tokenizer.
Built by tools/train_default.py; every test skips (with the command to build it) if it is absent.
"""

from __future__ import annotations

import json
import math
import os
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = Path(
    os.environ.get("GRANITE_ONNX_DEFAULT_MODEL_DIR", REPO / "granite_onnx" / "assets" / "default_model")
)

pytestmark = pytest.mark.skipif(
    not (MODEL_DIR / "model.safetensors").exists(),
    reason=f"{MODEL_DIR} is not built; run `python tools/train_default.py` (about 40 min on one CPU thread)",
)

PYTHON_SNIPPETS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    'class Point:\n\t"""Tabs, trailing spaces   \n\tand a docstring."""\n\n\tx: float = 0.0  # comment\n',
    "s = f'{name!r:>10} → ∑ ünïcödé 😀'\nprint(s.encode('utf-8'), b'\\x00\\xff')\r\n",
    "\n\n\n    \n",
    "",
]


@pytest.fixture(scope="module")
def training_log() -> dict:
    return json.loads((MODEL_DIR / "training_log.json").read_text())


@pytest.fixture(scope="module")
def torch_one_thread():
    """One thread and denormal flushing, as in training (the Mamba scan underflows a lot)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield torch
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(torch_one_thread):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


def test_tokenizer_round_trips_python_source() -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    texts = PYTHON_SNIPPETS + [Path(__file__).read_text(encoding="utf-8")]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text, f"round trip changed {text[:40]!r}"
    # BPE learned something: real source is much shorter in tokens than in bytes.
    source = Path(__file__).read_text(encoding="utf-8")
    n_tokens = len(tok.encode(source, add_special_tokens=False).ids)
    assert len(source.encode()) / n_tokens > 2.5, f"{len(source.encode()) / n_tokens:.2f} bytes/token"


def test_special_tokens() -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    assert tok.token_to_id("<|end_of_text|>") == 0
    for name in ("<|start_of_role|>", "<|end_of_role|>", "<|pad|>"):
        assert tok.token_to_id(name) is not None, name
    ids = tok.encode("<|start_of_role|>user<|end_of_role|>hi<|end_of_text|>", add_special_tokens=False).ids
    assert ids[0] == tok.token_to_id("<|start_of_role|>") and ids[-1] == 0, ids

    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 0, 0)


def test_chat_template_renders_granite_format(hf_tokenizer) -> None:
    # Rendered exactly as transformers renders chat templates.
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template_src = json.loads((MODEL_DIR / "tokenizer_config.json").read_text())["chat_template"]
    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template_src)
    messages = [
        {"role": "user", "content": "Write fibonacci in Python."},
        {"role": "assistant", "content": "def fibonacci(n):\n    ..."},
    ]
    expected = (
        "<|start_of_role|>user<|end_of_role|>Write fibonacci in Python.<|end_of_text|>\n"
        "<|start_of_role|>assistant<|end_of_role|>def fibonacci(n):\n    ...<|end_of_text|>\n"
    )
    prompt = "<|start_of_role|>assistant<|end_of_role|>"
    assert template.render(messages=messages, add_generation_prompt=False) == expected
    assert template.render(messages=messages, add_generation_prompt=True) == expected + prompt
    assert hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected + prompt


def _heldout_tokens(training_log: dict, hf_tokenizer, max_files: int, max_tokens: int) -> list[list[int]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / rel for rel in training_log["data"]["heldout_files"] if (stdlib / rel).exists()]
    if not files:
        pytest.skip(f"none of the held-out files are in this interpreter's stdlib ({stdlib})")
    docs = []
    for path in files[:max_files]:
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.append(hf_tokenizer(text, add_special_tokens=False).input_ids[:max_tokens])
    return docs


def test_heldout_perplexity_well_below_unigram(model, hf_tokenizer, training_log, torch_one_thread) -> None:
    torch = torch_one_thread
    import torch.nn.functional as F

    counts = torch.tensor(training_log["unigram_counts"], dtype=torch.float64)
    log_unigram = torch.log((counts + 1.0) / (counts.sum() + counts.numel()))  # add-one smoothing

    model_nll = unigram_nll = 0.0
    n = 0
    with torch.no_grad():
        for ids in _heldout_tokens(training_log, hf_tokenizer, max_files=4, max_tokens=384):
            x = torch.tensor([ids])  # [1, L]
            logits = model(input_ids=x[:, :-1], use_cache=False).logits[0]  # [L-1, V]
            model_nll += float(F.cross_entropy(logits.float(), x[0, 1:], reduction="sum"))
            unigram_nll += float(-log_unigram[x[0, 1:]].sum())
            n += x.shape[1] - 1
    model_ppl, unigram_ppl = math.exp(model_nll / n), math.exp(unigram_nll / n)
    print(f"held-out sample: {n} tokens, model ppl {model_ppl:.2f}, unigram ppl {unigram_ppl:.2f}")
    assert model_ppl < unigram_ppl / 4, (model_ppl, unigram_ppl)


def test_greedy_sample_matches_model_card(model, hf_tokenizer, training_log, torch_one_thread) -> None:
    sample = training_log["sample"]
    ids = hf_tokenizer(sample["prompt"], return_tensors="pt").input_ids
    with torch_one_thread.no_grad():
        out = model.generate(ids, max_new_tokens=sample["max_new_tokens"], do_sample=False)
    continuation = hf_tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert continuation == sample["continuation"]

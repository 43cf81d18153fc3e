"""GenerationConfig: normalisation, validation messages, and the torch-free import of the text layer."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from granite_onnx.runtime.config import GenerationConfig, GenerationConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_greedy_and_off() -> None:
    config = GenerationConfig()
    assert config.max_new_tokens == 64 and config.greedy
    assert (config.top_k, config.top_p, config.min_p, config.repetition_penalty) == (0, 1.0, 0.0, 1.0)
    assert config.seed is None and config.stop_token_ids == () and config.stop_strings == ()
    assert config.logprobs is False


def test_lists_and_ints_are_normalised() -> None:
    config = GenerationConfig(temperature=1, top_p=1, stop_token_ids=[3, 5], stop_strings=["\n\n", "User:"])
    assert config.stop_token_ids == (3, 5) and config.stop_strings == ("\n\n", "User:")
    assert isinstance(config.temperature, float) and not config.greedy
    assert GenerationConfig(stop_token_ids=7).stop_token_ids == (7,)
    assert GenerationConfig(temperature=0.8, top_k=1).greedy
    hash(config)  # frozen and all-tuple: usable as a key


def test_replace_revalidates() -> None:
    config = GenerationConfig(seed=1)
    assert config.replace(temperature=0.7).temperature == 0.7
    assert config.replace(temperature=0.7).seed == 1
    with pytest.raises(GenerationConfigError, match="temperature"):
        config.replace(temperature=-1.0)
    with pytest.raises(AttributeError):
        config.seed = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -1.0}, r"temperature must be >= 0, got -1\.0; use 0 for greedy decoding"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0\.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1\.5"),
        ({"min_p": 1.0}, r"min_p must be in \[0, 1\), got 1\.0"),
        ({"min_p": -0.1}, r"min_p must be in \[0, 1\)"),
        ({"top_k": -1}, r"top_k must be >= 0, got -1; use 0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be > 0, got 0"),
        ({"max_new_tokens": -5}, "max_new_tokens must be > 0"),
        ({"repetition_penalty": 0.0}, r"repetition_penalty must be > 0, got 0\.0; use 1\.0 for no penalty"),
        ({"repetition_penalty": -1.2}, "repetition_penalty must be > 0"),
        ({"seed": -3}, "seed must be >= 0"),
        ({"stop_strings": ["ok", ""]}, "empty string"),
        ({"stop_token_ids": [1, -2]}, "non-negative"),
    ],
)
def test_out_of_range_values_are_clear_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(GenerationConfigError, match=match):
        GenerationConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stop_strings": "STOP"}, r"got the bare string 'STOP'; write stop_strings=\('STOP',\)"),
        ({"stop_strings": [1, 2]}, "must contain only strings, got the element 1 .int.; .*stop_token_ids"),
        ({"stop_strings": 3}, "tuple or list of strings"),
        ({"stop_token_ids": ["<|end_of_text|>"]}, "must contain only ints"),
        ({"stop_token_ids": "12"}, "tuple or list of token ids"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an int"),
        ({"max_new_tokens": True}, "max_new_tokens must be an int"),
        ({"temperature": "0.7"}, "temperature must be a number"),
    ],
)
def test_wrong_types_are_clear_type_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(TypeError, match=match) as info:
        GenerationConfig(**kwargs)
    assert isinstance(info.value, GenerationConfigError)  # one exception type catches every config error


def test_validate_checks_stop_ids_against_vocab() -> None:
    config = GenerationConfig(stop_token_ids=[0, 99])
    assert config.validate(100) is config and config.validate() is config
    with pytest.raises(GenerationConfigError, match=r"\[99\] are outside the model's vocabulary of 50 tokens"):
        config.validate(50)


def test_runtime_imports_without_torch() -> None:
    # Apps that embed the runtime ship numpy, tokenizers and onnxruntime only: a None entry in
    # sys.modules makes any `import torch` / `import transformers` raise ImportError.
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None
        sys.modules["transformers"] = None
        import granite_onnx.runtime.config, granite_onnx.runtime.sampling, granite_onnx.runtime.tokenizer
        import granite_onnx.runtime
        import granite_onnx.runtime.session, granite_onnx.runtime.state, granite_onnx.runtime.generate
        import granite_onnx.runtime.chat, granite_onnx.runtime.batcher
        from granite_onnx.runtime import Batcher, Chat, Model, Snapshot
        from granite_onnx.runtime.sampling import Sampler
        from granite_onnx.runtime.config import GenerationConfig
        import numpy as np
        ids = Sampler(GenerationConfig(temperature=1.0, seed=0))(np.zeros((2, 8), np.float32))
        assert ids.shape == (2,)
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"

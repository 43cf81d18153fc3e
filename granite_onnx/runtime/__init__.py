"""The embeddable runtime: onnxruntime, numpy and tokenizers only — never torch.

    from granite_onnx.runtime import Model, GenerationConfig
    model = Model.load("out/granite", provider="cpu")
    print(model.generate("def fibonacci(n):", GenerationConfig(max_new_tokens=32))[0].text)
"""

from __future__ import annotations

from granite_onnx.runtime.config import GenerationConfig, GenerationConfigError
from granite_onnx.runtime.generate import GenerationResult, Model, RequestError
from granite_onnx.runtime.session import GraniteSession, RuntimeError_ as ModelLoadError, State
from granite_onnx.runtime.tokenizer import Tokenizer

__all__ = ["Model", "GenerationConfig", "GenerationConfigError", "GenerationResult", "RequestError",
           "GraniteSession", "ModelLoadError", "State", "Tokenizer"]

"""The embeddable runtime: onnxruntime, numpy and tokenizers only — never torch.

    from granite_onnx.runtime import Model, GenerationConfig
    model = Model.load("out/granite", provider="cpu")
    print(model.generate("def fibonacci(n):", GenerationConfig(max_new_tokens=32))[0].text)

    chat = model.chat(system="You are terse.")        # state kept between turns
    print(chat.send("hi").text); chat.save("conv.npz")

    doc = model.prefix(long_document)                  # prefilled once, reused by every request
    model.generate(["Summarise.", "List the names."], state=doc)

    batcher = Batcher(model, max_batch=16)             # continuous batching
    req = batcher.submit("def f(x):"); batcher.run(); print(req.result().text)
"""

from __future__ import annotations

from granite_onnx.runtime.batcher import Batcher, Request
from granite_onnx.runtime.chat import Chat, ChatTurn
from granite_onnx.runtime.config import GenerationConfig, GenerationConfigError
from granite_onnx.runtime.generate import GenerationResult, Model, RequestError
from granite_onnx.runtime.session import GraniteSession, RuntimeError_ as ModelLoadError, State
from granite_onnx.runtime.state import Snapshot, SnapshotError
from granite_onnx.runtime.tokenizer import Tokenizer

__all__ = ["Model", "GenerationConfig", "GenerationConfigError", "GenerationResult", "RequestError",
           "GraniteSession", "ModelLoadError", "State", "Tokenizer", "Chat", "ChatTurn", "Batcher", "Request",
           "Snapshot", "SnapshotError"]

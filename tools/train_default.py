#!/usr/bin/env python
"""Train the small default Granite-4.0-hybrid model shipped in ``granite_onnx/assets/default_model``.

The model is a real ``transformers.GraniteMoeHybridForCausalLM`` with the whole hybrid recipe
(Mamba-2 layers, attention layers without positional encoding, MoE with a shared expert, Granite
multipliers), trained on CPU, on ONE thread, on the Python standard library source of the running
interpreter. It exists so that a newcomer's first export/generate command shows real text instead
of random tokens; it is not a useful code model.

Pipeline (each step is one function below)::

    collect_corpus      stdlib *.py files, sorted; held-out split by sha256(path); list digest
    train_tokenizer     byte-level BPE (tokenizers), special tokens first (<|end_of_text|> = 0)
    encode_corpus       files -> one uint16 token stream per split, files joined by <|end_of_text|>
    train               AdamW + warmup/cosine, batch of step s is a pure function of (seed, s),
                        checkpoint every few minutes, automatic resume from --work-dir
    evaluate            held-out perplexity vs a unigram (add-one) baseline on the same tokens
    export              save_pretrained + tokenizer files + README.md + training_log.json,
                        then reload the folder as-is and check the greedy sample is identical

Retrain the shipped model (30-40 minutes on one CPU thread)::

    python tools/train_default.py --out granite_onnx/assets/default_model --work-dir runs/default_model

Interrupting (Ctrl-C, SIGTERM) writes a checkpoint; rerunning the same command resumes from it.
"""

from __future__ import annotations

import os

# One thread everywhere, before numpy/torch/tokenizers spin up their pools: the training
# machine is shared, and one thread also makes every run bitwise reproducible.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ[_var] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# The model uses the pure-torch Mamba-2 path; never try to fetch hub kernels.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import random
import shutil
import signal
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GraniteMoeHybridConfig,
    GraniteMoeHybridForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

log = logging.getLogger("train_default")

END_OF_TEXT = "<|end_of_text|>"
START_OF_ROLE = "<|start_of_role|>"
END_OF_ROLE = "<|end_of_role|>"
PAD = "<|pad|>"
# Order fixes the ids: <|end_of_text|> must be 0 (eos = bos = pad, as in Granite 4.0).
SPECIAL_TOKENS = [END_OF_TEXT, START_OF_ROLE, END_OF_ROLE, PAD]

# Granite 4.0 chat format: every turn is <|start_of_role|>{role}<|end_of_role|>{content}<|end_of_text|>\n
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|end_of_text|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_of_role|>assistant<|end_of_role|>' -}}"
    "{%- endif -%}"
)

SAMPLE_PROMPT = "def fibonacci(n):"

# Directories of the stdlib that are not ordinary library code (tests, GUIs, generated tables,
# vendored packages) or that hold another interpreter's packages.
EXCLUDED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "tkinter",
        "turtledemo",
        "lib2to3",
        "ensurepip",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "encodings",  # generated codec tables, ~15% of the bytes and nothing to learn
        "pydoc_data",  # one 750 kB file of documentation strings
    }
)
HELDOUT_PERCENT = 5
# transformers >= 5 name -> the name granite-4.0-h checkpoints on the Hub use in config.json.
HUB_LAYER_NAMES = {"linear_attention": "mamba", "full_attention": "attention"}


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides the trained weights. Stored in the checkpoint and the log."""

    seed: int = 0
    vocab_size: int = 4096
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 700
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_max_tokens: int = 32768
    # bf16 autocast for the matmuls (master weights, optimizer and saved model stay float32).
    # On CPUs with AMX/avx512_bf16 this is ~1.4x faster per step; results then depend on the CPU.
    autocast_bf16: bool = True


def model_config(vocab_size: int) -> GraniteMoeHybridConfig:
    """The shipped architecture: a miniature granite-4.0-h (hidden 256, 6 layers, 2 attention).

    Sized by the 40 MB float32 budget of the shipped folder (~9.7M parameters, most of them in
    the experts) and by speed: ~1.5 s per 8x256-token step on one CPU thread.
    """
    hidden = 256
    n_heads = 4
    head_dim = hidden // n_heads
    layer_types = ["mamba", "mamba", "attention", "mamba", "mamba", "attention"]
    return GraniteMoeHybridConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=len(layer_types),
        layer_types=layer_types,
        num_attention_heads=n_heads,
        num_key_value_heads=2,
        position_embedding_type="nope",  # as in granite-4.0-h: attention without positional encoding
        max_position_embeddings=4096,
        intermediate_size=128,
        shared_intermediate_size=384,
        num_local_experts=8,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.01,
        output_router_logits=False,
        mamba_n_heads=8,
        mamba_d_head=64,
        mamba_d_state=64,
        mamba_n_groups=1,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_chunk_size=64,
        mamba_conv_bias=True,
        mamba_proj_bias=False,
        embedding_multiplier=12.0,
        residual_multiplier=0.22,
        attention_multiplier=1.0 / head_dim,
        logits_scaling=4.0,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        hidden_act="silu",
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        use_cache=True,
    )


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    root: Path
    train_files: list[str]
    heldout_files: list[str]
    file_list_sha256: str  # over "relpath\tsize\n" of every file, sorted by relpath
    content_sha256: str  # over the bytes of every file, in the same order
    total_bytes: int


def is_heldout(relpath: str) -> bool:
    """Deterministic split: a file is held out iff sha256(relpath) mod 100 < HELDOUT_PERCENT."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT


def collect_corpus(root: Path | None = None) -> Corpus:
    """The running interpreter's stdlib *.py files (minus EXCLUDED_DIRS), sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    relpaths = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if p.is_file() and not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])
    )
    if not relpaths:
        raise RuntimeError(f"no *.py files found under {root}; is this a full CPython install?")
    list_hash, content_hash, total = hashlib.sha256(), hashlib.sha256(), 0
    for rel in relpaths:
        data = (root / rel).read_bytes()
        list_hash.update(f"{rel}\t{len(data)}\n".encode())
        content_hash.update(data)
        total += len(data)
    return Corpus(
        root=root,
        train_files=[r for r in relpaths if not is_heldout(r)],
        heldout_files=[r for r in relpaths if is_heldout(r)],
        file_list_sha256=list_hash.hexdigest(),
        content_sha256=content_hash.hexdigest(),
        total_bytes=total,
    )


def read_texts(root: Path, relpaths: list[str]) -> list[str]:
    # errors="replace": a handful of stdlib files carry latin-1 bytes in comments.
    return [(root / r).read_text(encoding="utf-8", errors="replace") for r in relpaths]


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (lossless on any text) with the Granite special tokens at ids 0..3."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: Path, model_max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json (with chat_template) + special_tokens_map.json."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        unk_token=None,
        additional_special_tokens=[START_OF_ROLE, END_OF_ROLE, PAD],
        model_max_length=model_max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        add_bos_token=False,
        add_eos_token=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    # Recent transformers writes the template to chat_template.jinja and no longer writes
    # special_tokens_map.json; keep the classic layout that every loader (and genai) reads.
    config_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["chat_template"] = CHAT_TEMPLATE
    # transformers 5 writes "TokenizersBackend", which older transformers and genai do not know.
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    jinja_path = out_dir / "chat_template.jinja"
    if jinja_path.exists():
        jinja_path.unlink()
    special_map = {
        "bos_token": END_OF_TEXT,
        "eos_token": END_OF_TEXT,
        "pad_token": END_OF_TEXT,
        "additional_special_tokens": [START_OF_ROLE, END_OF_ROLE, PAD],
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def encode_corpus(tok: Tokenizer, texts: list[str]) -> np.ndarray:
    """All files as one stream, each followed by <|end_of_text|> (id 0)."""
    eos = tok.token_to_id(END_OF_TEXT)
    pieces = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        pieces.append(np.asarray(enc.ids, dtype=np.uint16))
        pieces.append(np.asarray([eos], dtype=np.uint16))
    return np.concatenate(pieces)


@dataclass
class Data:
    tokenizer: Tokenizer
    train: np.ndarray  # uint16 token stream
    heldout: np.ndarray  # uint16 token stream
    meta: dict


def prepare_data(corpus: Corpus, settings: TrainSettings, work_dir: Path) -> Data:
    """Tokenizer + token streams, cached in work_dir (rebuilt if the corpus or vocab changed)."""
    meta_path = work_dir / "data_meta.json"
    tok_path, arrays_path = work_dir / "tokenizer.json", work_dir / "tokens.npz"
    key = {
        "file_list_sha256": corpus.file_list_sha256,
        "content_sha256": corpus.content_sha256,
        "vocab_size": settings.vocab_size,
    }
    if meta_path.exists() and tok_path.exists() and arrays_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            arrays = np.load(arrays_path)
            log.info("data: reusing cached tokenizer and token streams from %s", work_dir)
            return Data(Tokenizer.from_file(str(tok_path)), arrays["train"], arrays["heldout"], meta)
        log.warning("data: cache in %s is for another corpus/vocab; rebuilding", work_dir)

    t0 = time.perf_counter()
    train_texts = read_texts(corpus.root, corpus.train_files)
    heldout_texts = read_texts(corpus.root, corpus.heldout_files)
    tok = train_tokenizer(train_texts, settings.vocab_size)
    t_tok = time.perf_counter() - t0
    train = encode_corpus(tok, train_texts)
    heldout = encode_corpus(tok, heldout_texts)
    train_chars = sum(len(t) for t in train_texts)
    meta = {
        "key": key,
        "tokenizer_train_seconds": round(t_tok, 1),
        "train_chars": train_chars,
        "train_tokens": int(train.size),
        "heldout_tokens": int(heldout.size),
        "chars_per_token": round(train_chars / train.size, 3),
    }
    tok.save(str(tok_path))
    np.savez(arrays_path, train=train, heldout=heldout)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    log.info(
        "data: tokenizer trained in %.1fs (vocab %d); %d train tokens, %d held-out tokens, %.2f chars/token",
        t_tok,
        tok.get_vocab_size(),
        train.size,
        heldout.size,
        meta["chars_per_token"],
    )
    return Data(tok, train, heldout, meta)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batch_for_step(stream: np.ndarray, step: int, settings: TrainSettings) -> torch.Tensor:
    """Random windows of seq_len + 1 tokens; a pure function of (seed, step) so resume is exact."""
    rng = np.random.default_rng([settings.seed, step])
    starts = rng.integers(0, stream.size - settings.seq_len - 1, size=settings.batch_size)
    rows = np.stack([stream[s : s + settings.seq_len + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(rows)  # [batch, seq_len + 1]


def lr_at(step: int, settings: TrainSettings) -> float:
    """Linear warmup, then cosine from lr down to lr * min_lr_ratio at the last step."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return settings.lr * (settings.min_lr_ratio + (1.0 - settings.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    # No weight decay on norms, biases and the Mamba per-head scalars (A_log, D, dt_bias).
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), eps=1e-8)


def train_step(
    model: GraniteMoeHybridForCausalLM, batch: torch.Tensor, aux_coef: float, autocast_bf16: bool
) -> tuple[torch.Tensor, float]:
    """One forward/backward; returns (total loss for backward, language-model loss)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]  # [B, T] each
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
        out = model(input_ids=inputs, output_router_logits=True, use_cache=False)
    logits = out.logits.float()  # [B, T, V]
    lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    total = lm_loss + aux_coef * out.aux_loss.float()
    total.backward()
    return total, float(lm_loss.detach())


@dataclass
class TrainState:
    step: int = 0
    train_seconds: float = 0.0
    loss_curve: list[list[float]] = dataclasses.field(default_factory=list)  # [step, lm loss]


def save_checkpoint(
    path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: TrainState, settings: TrainSettings
) -> None:
    """Atomic: write next to the target, then rename, so a kill mid-write keeps the old one."""
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "state": dataclasses.asdict(state),
            "settings": dataclasses.asdict(settings),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(),
            "python_rng": random.getstate(),
        },
        tmp,
    )
    os.replace(tmp, path)


def load_checkpoint(
    path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, settings: TrainSettings
) -> TrainState:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt["settings"] != dataclasses.asdict(settings):
        raise SystemExit(
            f"checkpoint {path} was written with different settings:\n  {ckpt['settings']}\n"
            f"vs now:\n  {dataclasses.asdict(settings)}\n"
            "rerun with the original flags, or use another --work-dir (or --fresh) to start over."
        )
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["torch_rng"])
    np.random.set_state(ckpt["numpy_rng"])
    random.setstate(ckpt["python_rng"])
    return TrainState(**ckpt["state"])


class StopFlag:
    """SIGINT/SIGTERM ask the loop to checkpoint and exit after the current step."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        log.warning("signal %d: will checkpoint and stop after this step", signum)
        self.requested = True


def train(
    model: GraniteMoeHybridForCausalLM,
    data: Data,
    settings: TrainSettings,
    work_dir: Path,
    minutes: float,
    checkpoint_minutes: float,
    log_every: int,
) -> TrainState:
    """Run (or resume) the training loop. Returns the final state; exits early on a signal."""
    opt = make_optimizer(model, settings)
    ckpt_path = work_dir / "checkpoint.pt"
    state = TrainState()
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path, model, opt, settings)
        log.info("resumed from %s at step %d (%.1f min trained)", ckpt_path, state.step, state.train_seconds / 60)
    if state.step >= settings.steps:
        return state

    stop = StopFlag()
    model.train()
    aux_coef = model.config.router_aux_loss_coef
    tokens_per_step = settings.batch_size * settings.seq_len
    session_start, session_step0 = time.perf_counter(), state.step
    last_ckpt, ema = time.perf_counter(), None
    while state.step < settings.steps:
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(state.step, settings)
        batch = batch_for_step(data.train, state.step, settings)
        opt.zero_grad(set_to_none=True)
        _, lm_loss = train_step(model, batch, aux_coef, settings.autocast_bf16)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip))
        opt.step()
        state.step += 1
        state.train_seconds += time.perf_counter() - t0
        state.loss_curve.append([state.step, round(lm_loss, 5)])
        ema = lm_loss if ema is None else 0.95 * ema + 0.05 * lm_loss

        if state.step % log_every == 0 or state.step == settings.steps:
            session_s = time.perf_counter() - session_start
            sps = (state.step - session_step0) / max(session_s, 1e-9)
            eta_min = (settings.steps - state.step) / max(sps, 1e-9) / 60
            log.info(
                "step %5d/%d  loss %.4f  ema %.4f  lr %.2e  |g| %.2f  %6.0f tok/s  trained %.1f min  ETA %.1f min",
                state.step,
                settings.steps,
                lm_loss,
                ema,
                lr_at(state.step - 1, settings),
                grad_norm,
                sps * tokens_per_step,
                state.train_seconds / 60,
                eta_min,
            )
        out_of_time = state.train_seconds > minutes * 60
        if stop.requested or out_of_time or time.perf_counter() - last_ckpt > checkpoint_minutes * 60:
            save_checkpoint(ckpt_path, model, opt, state, settings)
            last_ckpt = time.perf_counter()
            log.info("checkpoint: step %d -> %s", state.step, ckpt_path)
        if stop.requested:
            raise SystemExit(130)
        if out_of_time:
            log.warning(
                "time budget of %.1f min spent at step %d/%d; stopping early (LR schedule not finished)",
                minutes,
                state.step,
                settings.steps,
            )
            break
    save_checkpoint(ckpt_path, model, opt, state, settings)
    return state


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def model_nll(model: GraniteMoeHybridForCausalLM, tokens: np.ndarray, window: int) -> tuple[float, int]:
    """Summed NLL (nats) over non-overlapping windows; each window predicts its tokens 1..L-1."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, tokens.size - 1, window):
        chunk = torch.from_numpy(tokens[start : start + window].astype(np.int64))[None]  # [1, L]
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk[:, :-1], use_cache=False).logits  # [1, L-1, V]
        total += float(F.cross_entropy(logits[0].float(), chunk[0, 1:], reduction="sum"))
        count += chunk.shape[1] - 1
    return total, count


def unigram_log_probs(train_tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """log p(token) from training counts with add-one smoothing."""
    counts = np.bincount(train_tokens.astype(np.int64), minlength=vocab_size).astype(np.float64)
    return np.log((counts + 1.0) / (counts.sum() + vocab_size))


def unigram_nll(log_probs: np.ndarray, tokens: np.ndarray, window: int) -> tuple[float, int]:
    """Summed NLL of exactly the targets model_nll scores (the first token of a window is context)."""
    mask = np.ones(tokens.size, dtype=bool)
    mask[::window] = False
    targets = tokens[mask].astype(np.int64)
    return float(-log_probs[targets].sum()), int(targets.size)


@torch.no_grad()
def greedy_sample(
    model: GraniteMoeHybridForCausalLM, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int
) -> str:
    """Greedy continuation of prompt (text after the prompt only)."""
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_hub_layer_names(config_path: Path) -> None:
    """Spell layer_types as the granite-4.0-h checkpoints on the Hub do ("mamba"/"attention").

    transformers >= 5 renames them to "linear_attention"/"full_attention" when it builds the config
    and saves the new names; it maps the Hub names back on load, and every other reader of
    config.json (exporters, onnxruntime-genai, llama.cpp's converter) knows only the Hub names.
    """
    config = json.loads(config_path.read_text())
    config["layer_types"] = [HUB_LAYER_NAMES.get(t, t) for t in config["layer_types"]]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_model_card(out_dir: Path, record: dict) -> None:
    r = record
    ev, cfg = r["eval"], r["model"]
    card = f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [granitemoehybrid, tiny, test-fixture]
---

# granite-onnx default model (tiny GraniteMoeHybrid trained on the Python stdlib)

A **{r['parameters'] / 1e6:.2f}M-parameter** `GraniteMoeHybridForCausalLM` trained from scratch on CPU
so that `granite_onnx` has a real-text model to export and run out of the box. It has the full
Granite 4.0 hybrid recipe in miniature; it is a smoke-test fixture, not a useful code model.

## Architecture

| field | value |
|---|---|
| layers | {cfg['num_hidden_layers']}: {', '.join(HUB_LAYER_NAMES.get(t, t) for t in cfg['layer_types'])} |
| hidden / vocab | {cfg['hidden_size']} / {cfg['vocab_size']} (tied embeddings) |
| attention | {cfg['num_attention_heads']} heads, {cfg['num_key_value_heads']} KV heads, no positional encoding (`position_embedding_type: {cfg['position_embedding_type']}`) |
| Mamba-2 | {cfg['mamba_n_heads']} heads × d_head {cfg['mamba_d_head']}, d_state {cfg['mamba_d_state']}, {cfg['mamba_n_groups']} group, conv {cfg['mamba_d_conv']}, chunk {cfg['mamba_chunk_size']} |
| MoE | {cfg['num_local_experts']} experts, top-{cfg['num_experts_per_tok']}, expert intermediate {cfg['intermediate_size']}, shared expert intermediate {cfg['shared_intermediate_size']} |
| Granite multipliers | embedding {cfg['embedding_multiplier']}, residual {cfg['residual_multiplier']}, attention {cfg['attention_multiplier']}, logits scaling {cfg['logits_scaling']} |
| dtype | float32 |

## Data

The `*.py` files of the Python standard library of the training interpreter
(`{r['data']['python_version']}`), excluding `{'`, `'.join(sorted(EXCLUDED_DIRS))}`.
{r['data']['num_files']} files, {r['data']['total_bytes']:,} bytes, sorted by path;
sha256 of the sorted `path<TAB>size` list: `{r['data']['file_list_sha256']}`
(file contents: `{r['data']['content_sha256']}`).
A file is held out when `sha256(path) mod 100 < {HELDOUT_PERCENT}`: {len(r['data']['heldout_files'])} held-out files
({r['data']['heldout_tokens']:,} tokens), {r['data']['train_tokens']:,} training tokens.

Tokenizer: byte-level BPE (`tokenizers`), vocab {cfg['vocab_size']}, trained on the training files only;
`<|end_of_text|>` = 0 is bos/eos/pad; `<|start_of_role|>`, `<|end_of_role|>`, `<|pad|>` are special.
The chat template is the Granite 4.0 one (it has never seen a chat; it is there for the format).

## Training

{r['training']['steps']} steps × {r['settings']['batch_size']} × {r['settings']['seq_len']} tokens
({r['training']['tokens_seen']:,} tokens, {r['training']['epochs']:.2f} epochs), AdamW
(lr {r['settings']['lr']}, warmup {r['settings']['warmup_steps']}, cosine to {r['settings']['min_lr_ratio']}×, weight decay
{r['settings']['weight_decay']}, clip {r['settings']['grad_clip']}), router aux loss {cfg['router_aux_loss_coef']}, seed {r['settings']['seed']},
one CPU thread, {'bf16 autocast (float32 weights)' if r['settings']['autocast_bf16'] else 'float32'},
torch {r['environment']['torch']}, transformers {r['environment']['transformers']}.
Training time {r['training']['train_minutes']:.1f} min (whole run {r['training']['wall_minutes']:.1f} min).
Final training loss (mean of the last 50 steps): {r['training']['final_train_loss']:.3f}.
The per-step loss curve is in `training_log.json`.

## Evaluation (held-out files, {ev['tokens']:,} tokens, windows of {ev['window']})

| | perplexity | nats/token |
|---|---|---|
| this model | **{ev['model_ppl']:.2f}** | {ev['model_nll']:.3f} |
| unigram baseline (add-one, same tokenizer) | {ev['unigram_ppl']:.2f} | {ev['unigram_nll']:.3f} |

## Sample (greedy, {r['sample']['max_new_tokens']} new tokens)

```python
{r['sample']['prompt']}{r['sample']['continuation']}
```

## Reproduce

```
{r['command']}
```
"""
    (out_dir / "README.md").write_text(card)


def export(
    model: GraniteMoeHybridForCausalLM,
    data: Data,
    corpus: Corpus,
    settings: TrainSettings,
    state: TrainState,
    out_dir: Path,
    wall_start: float,
    max_new_tokens: int,
) -> dict:
    """Evaluate, write the HF folder, reload it as-is and check the sample is reproduced."""
    model.eval()
    window = settings.seq_len
    heldout = data.heldout[: settings.eval_max_tokens]
    t0 = time.perf_counter()
    m_nll, n = model_nll(model, heldout, window)
    logp = unigram_log_probs(data.train, settings.vocab_size)
    u_nll, n_u = unigram_nll(logp, heldout, window)
    assert n == n_u, (n, n_u)
    log.info(
        "eval: %d held-out tokens in %.1fs: model ppl %.2f, unigram ppl %.2f",
        n,
        time.perf_counter() - t0,
        math.exp(m_nll / n),
        math.exp(u_nll / n),
    )

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    save_tokenizer(data.tokenizer, out_dir, model_max_length=model.config.max_position_embeddings)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model.generation_config = GenerationConfig(
        bos_token_id=0, eos_token_id=0, pad_token_id=0, do_sample=False, max_new_tokens=max_new_tokens
    )
    continuation = greedy_sample(model, tokenizer, SAMPLE_PROMPT, max_new_tokens)
    log.info("sample:\n%s%s", SAMPLE_PROMPT, continuation)
    model.save_pretrained(out_dir, safe_serialization=True)
    write_hub_layer_names(out_dir / "config.json")

    tail = [loss for _, loss in state.loss_curve[-50:]]
    record = {
        "command": "python tools/train_default.py " + " ".join(sys.argv[1:]),
        "settings": dataclasses.asdict(settings),
        "model": {k: v for k, v in model.config.to_dict().items() if not k.startswith("_")},
        "parameters": sum(p.numel() for p in model.parameters()),
        "environment": {
            "python": sys.version,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "numpy": np.__version__,
            "threads": torch.get_num_threads(),
        },
        "data": {
            "python_version": sys.version,
            "stdlib": str(corpus.root),
            "excluded_dirs": sorted(EXCLUDED_DIRS),
            "num_files": len(corpus.train_files) + len(corpus.heldout_files),
            "total_bytes": corpus.total_bytes,
            "file_list_sha256": corpus.file_list_sha256,
            "content_sha256": corpus.content_sha256,
            "heldout_rule": f"sha256(relpath) first 8 bytes big-endian mod 100 < {HELDOUT_PERCENT}",
            "heldout_files": corpus.heldout_files,
            "train_tokens": int(data.train.size),
            "heldout_tokens": int(data.heldout.size),
            **{k: v for k, v in data.meta.items() if k != "key"},
        },
        "training": {
            "steps": state.step,
            "tokens_seen": state.step * settings.batch_size * settings.seq_len,
            "epochs": state.step * settings.batch_size * settings.seq_len / data.train.size,
            "train_minutes": state.train_seconds / 60,
            "wall_minutes": (time.perf_counter() - wall_start) / 60,
            "final_train_loss": float(np.mean(tail)) if tail else float("nan"),
            "stopped_by_time_cap": state.step < settings.steps,
        },
        "eval": {
            "window": window,
            "tokens": n,
            "model_nll": m_nll / n,
            "model_ppl": math.exp(m_nll / n),
            "unigram_nll": u_nll / n,
            "unigram_ppl": math.exp(u_nll / n),
        },
        # Training-token counts, so a test can recompute the unigram baseline without the corpus.
        "unigram_counts": np.bincount(data.train.astype(np.int64), minlength=settings.vocab_size).tolist(),
        "sample": {"prompt": SAMPLE_PROMPT, "max_new_tokens": max_new_tokens, "continuation": continuation},
        "loss_curve": state.loss_curve,
    }

    reloaded = AutoModelForCausalLM.from_pretrained(out_dir)
    again = greedy_sample(reloaded, AutoTokenizer.from_pretrained(out_dir), SAMPLE_PROMPT, max_new_tokens)
    if again != continuation:
        raise RuntimeError(
            f"the saved folder does not reproduce the sample:\n{continuation!r}\nvs reloaded\n{again!r}"
        )
    record["reload_check"] = "AutoModelForCausalLM.from_pretrained(out) reproduces the greedy sample"

    (out_dir / "training_log.json").write_text(json.dumps(record, indent=1) + "\n")
    write_model_card(out_dir, record)
    size = folder_bytes(out_dir)
    log.info("wrote %s (%.1f MB)", out_dir, size / 1e6)
    if size > 40e6:
        raise RuntimeError(f"{out_dir} is {size / 1e6:.1f} MB > 40 MB; shrink the model (keep float32)")
    return record


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def benchmark(model: GraniteMoeHybridForCausalLM, data: Data, settings: TrainSettings, steps: int) -> None:
    """Time a few training steps (on a throwaway copy of the optimizer) to size --steps."""
    opt = make_optimizer(model, settings)
    model.train()
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        batch = batch_for_step(data.train, step, settings)
        train_step(model, batch, model.config.router_aux_loss_coef, settings.autocast_bf16)
        opt.step()
        times.append(time.perf_counter() - t0)
    per_step = float(np.median(times[1:] if len(times) > 1 else times))
    tok = settings.batch_size * settings.seq_len
    log.info(
        "benchmark: %.3f s/step (median of %d, first step %.3f s), %.0f tok/s -> %d steps per 30 min",
        per_step,
        len(times),
        times[0],
        tok / per_step,
        int(1800 / per_step),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = TrainSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("granite_onnx/assets/default_model"))
    p.add_argument("--work-dir", type=Path, default=Path("runs/default_model"))
    p.add_argument(
        "--minutes", type=float, default=37.0, help="cap on training time (accumulated over resumes)"
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast (slower, CPU-independent)")
    p.add_argument("--eval-max-tokens", type=int, default=d.eval_max_tokens)
    p.add_argument("--checkpoint-minutes", type=float, default=2.0)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--fresh", action="store_true", help="delete the work dir's checkpoint first")
    p.add_argument("--benchmark", type=int, default=0, metavar="N", help="only time N training steps")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    # The Mamba-2 reference scan multiplies by exp(segment sums) that underflow into float32
    # denormals; without flushing them a training step is ~1.3x slower on x86.
    torch.set_flush_denormal(True)
    wall_start = time.perf_counter()
    settings = TrainSettings(
        seed=args.seed,
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        steps=args.steps,
        lr=args.lr,
        warmup_steps=min(args.warmup_steps, max(1, args.steps // 10)),
        eval_max_tokens=args.eval_max_tokens,
        autocast_bf16=not args.fp32,
    )
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.fresh and (args.work_dir / "checkpoint.pt").exists():
        (args.work_dir / "checkpoint.pt").unlink()

    corpus = collect_corpus()
    log.info(
        "corpus: %s, %d train + %d held-out files, %.1f MB, list sha256 %s",
        corpus.root,
        len(corpus.train_files),
        len(corpus.heldout_files),
        corpus.total_bytes / 1e6,
        corpus.file_list_sha256[:16],
    )
    data = prepare_data(corpus, settings, args.work_dir)

    seed_everything(settings.seed)
    model = GraniteMoeHybridForCausalLM(model_config(settings.vocab_size)).float()
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters (%s)", n_params / 1e6, ", ".join(model.config.layer_types))

    if args.benchmark:
        benchmark(model, data, settings, args.benchmark)
        return 0

    state = train(model, data, settings, args.work_dir, args.minutes, args.checkpoint_minutes, args.log_every)
    record = export(model, data, corpus, settings, state, args.out, wall_start, args.max_new_tokens)
    log.info(
        "done: %d steps, %.1f train min, final loss %.3f, held-out ppl %.2f vs unigram %.2f",
        record["training"]["steps"],
        record["training"]["train_minutes"],
        record["training"]["final_train_loss"],
        record["eval"]["model_ppl"],
        record["eval"]["unigram_ppl"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

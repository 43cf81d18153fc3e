"""`granite-onnx` command line: export, optimize, generate, chat, validate, bench.

Each subcommand parses its arguments and calls one library function. Exit codes: 0 ok, 1 a check
failed (validate), 2 bad input or a model that cannot be used (the message says why and how to fix it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("granite_onnx")

DEFAULT_MODEL_HINT = "the shipped default model (granite_onnx/assets/default_model)"


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input: printed as one line, exit 2 (no traceback)."""
    from granite_onnx.models.config import ConfigError
    from granite_onnx.runtime.config import GenerationConfigError
    from granite_onnx.runtime.generate import RequestError
    from granite_onnx.runtime.session import RuntimeError_
    from granite_onnx.runtime.tokenizer import ChatTemplateError, TokenizerNotFoundError

    errs: list[type[BaseException]] = [ConfigError, GenerationConfigError, RequestError, RuntimeError_,
                                       ChatTemplateError, TokenizerNotFoundError]
    try:
        from granite_onnx.export.exporter import ExportError
        from granite_onnx.models.weights import WeightsError

        errs += [ExportError, WeightsError]
    except ImportError:  # export extra not installed
        pass
    return tuple(errs)


def default_model_dir() -> Path:
    return Path(__file__).parent / "assets" / "default_model"


# ------------------------------------------------------------------------- export
def _add_source(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="local HF checkpoint folder (config.json + *.safetensors)")
    g.add_argument("--preset", help="a preset shape with seeded random weights (see `granite-onnx presets`)")
    p.add_argument("--seed", type=int, default=0, help="seed for --preset weights (default 0)")
    p.add_argument("--layers", type=int, help="override the preset's layer count (keeps its widths)")


def _add_weight_format(p: argparse.ArgumentParser, precision_default: str | None) -> None:
    from granite_onnx.export.precision import PRECISIONS, QUANTS

    p.add_argument("--precision", choices=PRECISIONS, default=precision_default,
                   help="compute dtype: fp32 (default), fp16 (meant for CUDA; runs on CPU, not faster), bf16 (CUDA only)"
                   if precision_default else "must match the folder's precision (changing it needs a re-export)")
    p.add_argument("--quant", choices=QUANTS, default="none",
                   help="weight-only quantization: int8/int4 block-wise (fast on CPU), fp8 (CUDA, needs fp16/bf16)")
    p.add_argument("--block-size", type=int, default=0,
                   help="quantization block along the input features: a power of two ≥ 16 dividing the widths "
                   "(default 32; 128 for fp8)")


def cmd_export(a: argparse.Namespace) -> int:
    from granite_onnx.export.exporter import ExportOptions, export

    opts = ExportOptions(logits=a.logits, optimize=a.optimize, overwrite=a.overwrite,
                         parity_check=not a.no_parity_check, precision=a.precision, quant=a.quant,
                         block_size=a.block_size)
    report = export(model=a.model, preset_name=a.preset, seed=a.seed, layers=a.layers, out=a.out, options=opts,
                    progress=lambda s: print(f"[export] {s}", file=sys.stderr, flush=True))
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        par = report.get("parity", {})
        w = report.get("weights", {})
        fmt = w.get("precision", "fp32") + ("" if w.get("quant", "none") == "none" else f" {w['quant']}")
        print(f"exported to {a.out}: {report['num_parameters'] / 1e6:.1f}M parameters, {fmt}, graph {report['graph']}, "
              f"{report['size_bytes'] / 2**20:.1f} MiB, {report['timings_s']['total_s']:.1f} s, "
              f"peak RSS {report['peak_rss_mb']:.0f} MB"
              + (f", parity max |Δ| {par['worst']:.2e}" if "worst" in par else "")
              + (" (vs float32: the format's own error; `granite-onnx validate --reference` measures its accuracy)"
                 if "worst" in par and fmt != "fp32" else ""))
    return 0


def cmd_optimize(a: argparse.Namespace) -> int:
    from granite_onnx.export.optimize import optimize_folder

    if a.precision is not None or a.quant != "none":
        from granite_onnx.export.quantize import optimize_with_format

        report = optimize_with_format(a.input, a.output, precision=a.precision, quant=a.quant,
                                      block_size=a.block_size, overwrite=a.overwrite)
    else:
        report = optimize_folder(a.input, a.output, overwrite=a.overwrite)
    print(json.dumps(report, indent=2) if a.json else f"fused {a.input} → {a.output}: {report['fusion_counts']}")
    return 0


# ----------------------------------------------------------------------- generate
def _gen_config(a: argparse.Namespace) -> Any:
    from granite_onnx.runtime.config import GenerationConfig

    return GenerationConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                            top_p=a.top_p, min_p=a.min_p, repetition_penalty=a.repetition_penalty, seed=a.seed,
                            stop_strings=tuple(a.stop or ()), logprobs=getattr(a, "logprobs", False))


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--no-spin", action="store_true",
                   help="idle ONNX Runtime workers sleep instead of spinning (faster on a busy, shared machine)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="prefill chunk size (default: sized to an attention workspace of max(64 MiB, 1/8 of the "
                   "weights); short prompts in one chunk)")
    p.add_argument("--progress", action="store_true", help="report prefill progress on stderr (long prompts)")


def _load(a: argparse.Namespace) -> Any:
    from granite_onnx.runtime.generate import Model

    return Model.load(a.model_dir, provider=a.provider, threads=a.threads, spin=False if a.no_spin else None)


def _progress(a: argparse.Namespace) -> Any:
    """A prefill progress callback printing `[prefill] done/total tokens` to stderr, or None."""
    if not a.progress:
        return None
    t0 = time.perf_counter()

    def report(done: int, total: int) -> None:
        dt = time.perf_counter() - t0
        print(f"[prefill] {done}/{total} tokens ({100 * done / total:.0f}%, {done / max(dt, 1e-9):.0f} tok/s)",
              file=sys.stderr, flush=True)

    return report


def cmd_generate(a: argparse.Namespace) -> int:
    from granite_onnx.runtime.generate import Model, RequestError

    cfg = _gen_config(a)
    model = _load(a)
    if a.ids is not None:
        try:
            prompt: Any = [int(x) for x in a.ids.split(",") if x.strip()]
        except ValueError:
            raise RequestError(f"--ids must be comma-separated integers, got {a.ids!r}") from None
    else:
        prompt = a.prompt
    if a.chat:
        if model.tokenizer is None:
            raise RequestError("--chat needs a tokenizer in the model folder")
        prompt = model.tokenizer.encode_chat([{"role": "user", "content": prompt}])
    t0 = time.perf_counter()
    if a.stream and not a.json:
        first = None
        for piece in model.stream(prompt, cfg, chunk_size=a.chunk_size, progress=_progress(a)):
            first = first or time.perf_counter()
            print(piece, end="", flush=True)
        print()
        end = time.perf_counter()
        print(f"[first text after {(first or end) - t0:.3f} s, {end - t0:.2f} s in all]", file=sys.stderr)
        return 0
    res = model.generate(prompt, cfg, chunk_size=a.chunk_size, progress=_progress(a))[0]
    dt = time.perf_counter() - t0
    if a.json:
        print(json.dumps({"token_ids": res.token_ids, "text": res.text, "finish_reason": res.finish_reason,
                          "prompt_tokens": res.prompt_tokens, "logprobs": res.logprobs, "seconds": round(dt, 4)}))
    else:
        print(res.text if res.text is not None else " ".join(map(str, res.token_ids)))
        print(f"[{len(res.token_ids)} tokens, {res.finish_reason}, {len(res.token_ids) / dt:.1f} tok/s]",
              file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- chat
CHAT_HELP = """commands: /reset (forget the conversation), /save FILE, /load FILE (conversation state),
/exit (or end of input). Anything else is your next message."""


def cmd_chat(a: argparse.Namespace) -> int:
    """Interactive chat on stdin/stdout: one message per line, the reply streamed, stats on stderr."""
    from granite_onnx.runtime.chat import Chat
    from granite_onnx.runtime.state import SnapshotError

    model = _load(a)
    chat = Chat(model, system=a.system, config=_gen_config(a), chunk_size=a.chunk_size, progress=_progress(a))
    tty = sys.stdin.isatty()
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if tty:
        say(f"granite-onnx chat: {a.model_dir}. {CHAT_HELP}")
    recoverable = _user_errors() + (SnapshotError, OSError)
    while True:
        if tty:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\r\n")
        cmd, _, arg = line.strip().partition(" ")
        try:
            if cmd in ("/exit", "/quit"):
                break
            if cmd == "/reset":
                chat.reset()
                say("[conversation reset]")
            elif cmd == "/save":
                if not arg:
                    raise ValueError("/save needs a file name")
                path = chat.save(arg.strip())
                say(f"[saved {len(chat.tokens)} tokens of conversation to {path}]")
            elif cmd == "/load":
                if not arg:
                    raise ValueError("/load needs a file name")
                chat.load(arg.strip())
                say(f"[loaded {len(chat.messages)} messages, {len(chat.tokens)} tokens]")
            elif cmd in ("/help", "/?"):
                say(CHAT_HELP)
            elif cmd.startswith("/") and " " not in cmd and len(cmd) > 1:
                say(f"unknown command {cmd}; {CHAT_HELP}")
            elif line.strip():
                for piece in chat.stream(line):
                    print(piece, end="", flush=True)
                print(flush=True)
                t = chat.last
                assert t is not None
                say(f"[{len(t.token_ids)} tokens, {t.finish_reason}, {t.tokens_per_s:.1f} tok/s, first token "
                    f"{t.ttft_s * 1e3:.0f} ms, prefilled {t.prompt_tokens} of {t.context_tokens} context tokens]")
        except recoverable + (ValueError,) as e:
            say(f"error: {e}")
    return 0


# ----------------------------------------------------------------------- validate
def cmd_validate(a: argparse.Namespace) -> int:
    from granite_onnx.export.precision import WeightFormat
    from granite_onnx.runtime.session import read_folder_config
    from granite_onnx.validate import validate

    _, meta = read_folder_config(Path(a.model_dir))
    if not WeightFormat.from_meta(meta).is_default:
        # Reduced precision cannot meet fp32 tolerances: report accuracy against the fp32 PyTorch model.
        from granite_onnx.export.accuracy import accuracy_report, format_accuracy

        acc = accuracy_report(a.model_dir, a.reference, positions=max(256, a.positions), seed=a.seed,
                              layers=a.layers)
        print(json.dumps(acc) if a.json else format_accuracy(acc))
        return 0 if acc["meets_targets"] else 1
    rep = validate(a.model_dir, a.reference, seed=a.seed, layers=a.layers, prompt_len=a.prompt_len,
                   decode_steps=a.decode_steps, greedy_tokens=a.greedy_tokens, batch=a.batch, atol=a.atol)
    if a.json:
        print(json.dumps(rep.to_json()))
    else:
        print(rep.format_table())
    return 0 if rep.passed else 1


def cmd_bench(a: argparse.Namespace) -> int:
    from granite_onnx.bench import BenchError, bench

    try:
        res = bench(a.model_dirs, a.reference, seed=a.seed, layers=a.layers, threads=a.threads,
                    prompt_len=a.prompt_len, new_tokens=a.new_tokens, batches=tuple(a.batch),
                    prefill_lens=tuple(a.prefill), skip_hf=a.no_hf, turns=a.turns, long=a.long,
                    chunk_size=a.chunk_size, spin=False if a.no_spin else None, rounds=a.rounds,
                    roofline=not a.no_roofline, progress=lambda s: print(f"[bench] {s}", file=sys.stderr, flush=True))
    except BenchError as e:
        print(f"granite-onnx bench: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2) if a.json else res["table"])
    return 0


def cmd_presets(a: argparse.Namespace) -> int:
    from granite_onnx.models.config import preset, preset_names

    rows = []
    for n in preset_names():
        c = preset(n)
        rows.append({"name": n, "layers": c.num_layers, "hidden": c.hidden_size, "attention_layers":
                     list(c.attention_layers), "experts": c.num_experts, "params_M": round(c.num_parameters() / 1e6, 1)})
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['name']:28s} {r['layers']:3d} layers  hidden {r['hidden']:5d}  experts {r['experts']:3d}  "
                  f"{r['params_M']:10.1f}M params  attention at {r['attention_layers']}")
    return 0


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="granite-onnx", description=(
        "Export Granite 4.0 hybrid models (Mamba-2 + attention + MoE) to stateful ONNX, run them with "
        "ONNX Runtime, and prove they equal PyTorch."))
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    e = sub.add_parser("export", help="export an HF checkpoint or a preset to a model folder")
    _add_source(e)
    e.add_argument("--out", required=True, help="output model folder (written atomically)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    e.add_argument("--logits", choices=["last", "all"], default="last",
                   help="return only the last position's logits (default) or every position's")
    grp = e.add_mutually_exclusive_group()
    grp.add_argument("--optimize", dest="optimize", action="store_true", default=True,
                     help="fuse into ONNX Runtime kernels (default; see granite-onnx optimize)")
    grp.add_argument("--portable", dest="optimize", action="store_false",
                     help="keep the standard-op graph (runs on any ONNX runtime)")
    e.add_argument("--no-parity-check", action="store_true", help="skip the short in-export parity check")
    _add_weight_format(e, precision_default="fp32")
    e.add_argument("--json", action="store_true", help="print the export report as JSON")
    e.set_defaults(fn=cmd_export)

    o = sub.add_parser("optimize", help="fuse a portable model folder into ONNX Runtime kernels")
    o.add_argument("input")
    o.add_argument("output")
    o.add_argument("--overwrite", action="store_true")
    o.add_argument("--json", action="store_true")
    _add_weight_format(o, precision_default=None)
    o.set_defaults(fn=cmd_optimize)

    g = sub.add_parser("generate", help="generate from a model folder")
    g.add_argument("model_dir")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs tokenizer.json in the folder)")
    src.add_argument("--ids", help="prompt token ids, comma-separated")
    _add_sampling(g)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user turn")
    g.add_argument("--stream", action="store_true", help="print text as it is decoded")
    g.add_argument("--logprobs", action="store_true")
    g.add_argument("--json", action="store_true")
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat (stdin → streamed replies) keeping the state between turns",
                       description="Chat with a model folder that has a tokenizer. " + CHAT_HELP)
    c.add_argument("model_dir", help="an exported model folder with tokenizer.json")
    c.add_argument("--system", default=None, help="system message")
    _add_sampling(c)
    c.set_defaults(fn=cmd_chat, max_new_tokens=256)

    v = sub.add_parser("validate", help="compare a model folder with HF transformers, output by output")
    v.add_argument("model_dir")
    v.add_argument("--reference", required=True, help="HF checkpoint folder or preset name")
    v.add_argument("--seed", type=int, default=None, help="preset seed (default: the one the folder was exported with)")
    v.add_argument("--layers", type=int, default=None)
    v.add_argument("--prompt-len", type=int, default=37)
    v.add_argument("--decode-steps", type=int, default=16)
    v.add_argument("--greedy-tokens", type=int, default=32)
    v.add_argument("--batch", type=int, default=3)
    v.add_argument("--atol", type=float, default=1e-4)
    v.add_argument("--positions", type=int, default=256,
                   help="teacher-forced positions scored for reduced-precision folders (top-1, KL, perplexity)")
    v.add_argument("--json", action="store_true")
    v.set_defaults(fn=cmd_validate)

    b = sub.add_parser(
        "bench", help="time one or more model folders and HF eager side by side",
        description="Time prefill and decode for one or more exported folders of one model (typically a fused "
        "and a portable one) and HF transformers eager, in one process: each measurement times every runtime "
        "back to back. Prints a table (or --json); every ratio is against HF eager, plus fused/portable when "
        "both graphs are given. Each decode step's GB/s and each prefill's GFLOP/s are set against what "
        "ONNX Runtime's MatMul reaches on this machine (the roofline; see granite_onnx/roofline.py).")
    b.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR",
                   help="exported model folders, all of the same model (e.g. X-fused X-portable); rows are "
                   "labelled by graph kind, plus the folder name when two have the same kind")
    b.add_argument("--reference", help="HF checkpoint folder or preset name for the HF eager reference "
                   "(required unless --no-hf); a preset takes its seed and layers from the first folder's export")
    b.add_argument("--seed", type=int, default=None,
                   help="preset seed for --reference (default: the one the first folder was exported with)")
    b.add_argument("--layers", type=int, default=None,
                   help="preset layer count for --reference (default: the one the first folder was exported with)")
    b.add_argument("--threads", type=int, default=2,
                   help="intra-op threads for ONNX Runtime and for torch (default 2)")
    b.add_argument("--prompt-len", type=int, default=32,
                   help="decode: prompt tokens before the timed steps; multi-turn: new user tokens a turn (default 32)")
    b.add_argument("--new-tokens", type=int, default=128,
                   help="decode: timed greedy steps per batch size; multi-turn: reply length (default 128)")
    b.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16], metavar="B",
                   help="decode batch sizes (default 1 4 16)")
    b.add_argument("--prefill", type=int, nargs="+", default=[512, 4096], metavar="N",
                   help="prefill prompt lengths in tokens, batch 1 (default 512 4096)")
    b.add_argument("--no-hf", action="store_true", help="time the model folders only (no HF reference)")
    b.add_argument("--turns", type=int, default=4,
                   help="multi-turn case on the first folder: turns, TTFT with the state carried vs re-prefilled "
                   "(default 4; 0 = skip)")
    b.add_argument("--long", type=int, default=0, metavar="N",
                   help="long-prompt case on the first folder: prefill N tokens in chunks, report time, peak RSS "
                   "growth and K/V bytes (default 0 = skip)")
    b.add_argument("--chunk-size", type=int, default=None,
                   help="prefill chunk for --long (default: sized to the attention budget, see Model.chunk_length)")
    b.add_argument("--no-spin", action="store_true", help="idle ONNX Runtime workers sleep instead of spinning")
    b.add_argument("--rounds", type=int, default=1,
                   help="repeat every interleaved prefill/decode measurement this many times and keep each "
                   "runtime's best (default 1; 3 steadies the ratios on a loaded machine)")
    b.add_argument("--no-roofline", action="store_true",
                   help="skip the ceilings: by default ONNX Runtime's own MatMul is timed over each decode step's "
                   "working set (the GB/s it can read, in cache or memory) and on a dense prefill product (its "
                   "GFLOP/s), giving each step's floor and the most any runtime could beat HF by")
    b.add_argument("--json", action="store_true",
                   help="print the results as JSON (per-runtime rows; the shape is in granite_onnx/bench.py)")
    b.set_defaults(fn=cmd_bench)

    pr = sub.add_parser("presets", help="list the preset shapes")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(fn=cmd_presets)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(a.fn(a))
    except _user_errors() as e:
        print(f"granite-onnx {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

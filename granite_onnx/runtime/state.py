"""Host-side state: snapshots of a batch's full state, row surgery between batches, the mask buffer.

A `Snapshot` is everything a batch of sequences has consumed, as numpy:

    arrays[past name]   K/V [B, kv_heads, past_len, head_dim] (left-padded), conv [B, conv_dim, d_conv−1],
                        SSM [B, heads, d_state, head_dim]
    past_len, pads [B]  K/V and mask columns so far; the first pads[r] of them are padding for row r,
                        so row r's attention mask is [0]*pads[r] + [1]*(past_len − pads[r])
    tokens[r]           the ids row r has consumed (repetition penalty and chat history need them)
    logits [B, V]       the last logits, what the next token is drawn from (None if not kept)

Padding only ever sits on the left of a row: a padded position in the *middle* would not be neutral
(Mamba's state decays through a zeroed step, and the conv window shifts), so rows of different lengths
are re-aligned here, never padded between turns. `stack` and `rows` move whole rows between batches,
left-padding K/V to the longest row and trimming columns no row needs, which is how a request joins or
leaves a running batch (runtime/batcher.py) and how a shared prefix is reused by many requests.

Numpy only; no onnxruntime, no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

FORMAT = "granite-onnx-state/1"


class SnapshotError(ValueError):
    """A snapshot that cannot be used here (another model, a corrupt file); says what to do instead."""


@dataclass
class Snapshot:
    arrays: dict[str, np.ndarray]
    past_len: int
    pads: np.ndarray
    tokens: list[list[int]]
    kv_names: tuple[str, ...]  # which arrays are K/V (sequence on axis 2)
    logits: np.ndarray | None = None
    model: dict[str, Any] = field(default_factory=dict)  # the model's fingerprint, checked on restore
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-able, e.g. a chat's messages

    @property
    def batch(self) -> int:
        return int(self.pads.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        """Real tokens per row [B]."""
        return self.past_len - self.pads

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def kv_nbytes(self) -> int:
        return sum(self.arrays[n].nbytes for n in self.kv_names)

    def rows(self, index: Sequence[int]) -> Snapshot:
        """The rows `index` (in that order) as a new snapshot, K/V trimmed to the longest of them."""
        index = [int(i) for i in index]
        if not index:
            raise SnapshotError("a snapshot needs at least one row")
        return stack([_Row(self, i) for i in index], self)

    def repeat(self, batch: int) -> Snapshot:
        """A one-row snapshot as `batch` identical rows (a shared prefix for a batch of requests)."""
        if self.batch != 1:
            raise SnapshotError(f"repeat() needs a one-row snapshot, this one has {self.batch} rows")
        return self.rows([0] * batch)

    # ------------------------------------------------------------------ disk
    def save(self, path: str | Path) -> Path:
        """Write to `path` (.npz, uncompressed): arrays by name, plus a JSON header."""
        path = Path(path)
        flat = np.asarray([t for row in self.tokens for t in row], np.int64)
        offsets = np.cumsum([0] + [len(r) for r in self.tokens]).astype(np.int64)
        header = {"format": FORMAT, "past_len": self.past_len, "kv_names": list(self.kv_names),
                  "model": self.model, "extra": self.extra, "names": list(self.arrays)}
        payload = {f"state.{i}": a for i, a in enumerate(self.arrays.values())}
        payload.update(header=np.asarray(json.dumps(header)), pads=self.pads, tokens=flat, offsets=offsets)
        if self.logits is not None:
            payload["logits"] = self.logits
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:  # np.savez on a path would append .npz to the name
            np.savez(f, **payload)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Snapshot:
        path = Path(path)
        if not path.is_file():
            raise SnapshotError(f"no state file at {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(str(z["header"]))
                if header.get("format") != FORMAT:
                    raise SnapshotError(f"{path} is not a {FORMAT} state file (format {header.get('format')!r})")
                arrays = {n: z[f"state.{i}"] for i, n in enumerate(header["names"])}
                flat, offsets = z["tokens"], z["offsets"]
                tokens = [flat[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]
                logits = z["logits"] if "logits" in z.files else None
                pads = z["pads"].astype(np.int64)
        except (OSError, ValueError, KeyError) as e:
            if isinstance(e, SnapshotError):
                raise
            raise SnapshotError(f"{path} is not a readable state file: {e}") from e
        return cls(arrays, int(header["past_len"]), pads, tokens, tuple(header["kv_names"]), logits,
                   header.get("model", {}), header.get("extra", {}))


@dataclass(frozen=True)
class _Row:
    snap: Snapshot
    i: int


def stack(rows: Sequence[Snapshot | _Row], like: Snapshot | None = None) -> Snapshot:
    """Rows of several snapshots as one batch: each row keeps its real K/V columns, right-aligned to the
    longest row; shorter rows are left-padded with zeros (masked out). Columns no row needs are dropped."""
    picked: list[tuple[Snapshot, int]] = []
    for r in rows:
        if isinstance(r, _Row):
            picked.append((r.snap, r.i))
        else:
            picked.extend((r, i) for i in range(r.batch))
    if not picked:
        raise SnapshotError("nothing to stack")
    first = like or picked[0][0]
    names, kv = list(first.arrays), set(first.kv_names)
    for s, _ in picked:
        if list(s.arrays) != names or s.model != first.model:
            raise SnapshotError("cannot stack snapshots of different models")
    lengths = [int(s.past_len - s.pads[i]) for s, i in picked]
    past = max(lengths)
    arrays: dict[str, np.ndarray] = {}
    for n in names:
        ref = first.arrays[n]
        if n in kv:
            out = np.zeros((len(picked), ref.shape[1], past, ref.shape[3]), ref.dtype)
            for r, ((s, i), length) in enumerate(zip(picked, lengths)):
                if length:
                    out[r, :, past - length:] = s.arrays[n][i, :, s.past_len - length:]
        else:
            out = np.stack([s.arrays[n][i] for s, i in picked])
        arrays[n] = out
    logits = None
    if all(s.logits is not None for s, _ in picked):
        logits = np.stack([s.logits[i] for s, i in picked])  # type: ignore[index]
    pads = np.asarray([past - length for length in lengths], np.int64)
    tokens = [list(s.tokens[i]) for s, i in picked]
    return Snapshot(arrays, past, pads, tokens, first.kv_names, logits, dict(first.model), dict(first.extra))


class MaskBuffer:
    """Attention masks [B, n] for left-padded rows, written into one reused buffer (no per-step array).

    Row r is 0 in its first pads[r] columns and 1 after. Without padding the mask is a view of an
    all-ones buffer and costs nothing; with padding it is rewritten in place (one pass, B·n int64).
    """

    def __init__(self) -> None:
        self._ones = np.ones(0, np.int64)
        self._buf = np.zeros(0, np.int64)
        self._cols = np.arange(0, dtype=np.int64)

    @staticmethod
    def _grow(a: np.ndarray, need: int, fill: int | None) -> np.ndarray:
        if a.size >= need:
            return a
        size = max(need, 2 * a.size, 1024)
        return np.ones(size, np.int64) if fill == 1 else (np.arange(size, dtype=np.int64) if fill is None
                                                          else np.zeros(size, np.int64))

    def view(self, pads: np.ndarray, n: int) -> np.ndarray:
        b = pads.shape[0]
        if not pads.any():
            self._ones = self._grow(self._ones, b * n, 1)
            return self._ones[: b * n].reshape(b, n)
        self._buf = self._grow(self._buf, b * n, 0)
        self._cols = self._grow(self._cols, n, None)
        out = self._buf[: b * n].reshape(b, n)
        np.greater_equal(self._cols[:n], pads[:, None], out=out, casting="unsafe")
        return out


def mask_of(pads: np.ndarray, n: int) -> np.ndarray:
    """A fresh mask array [B, n] (tests, one-off callers)."""
    return (np.arange(n)[None, :] >= np.asarray(pads)[:, None]).astype(np.int64)

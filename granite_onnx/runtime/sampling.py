"""Token selection over next-token logits, in numpy (no torch).

Every function takes logits of shape [batch, vocab] (float32, as the graph returns them) and works
row by row. The filters are small pure functions that return *masked logits*: kept candidates keep
their value, every other entry becomes -inf. That makes each one testable on its own (the exact kept
set on a constructed distribution) and composable in one fixed order, the order Hugging Face
`generate()` applies them:

    repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw

Temperature 0 (or top_k 1) is greedy decoding: the repetition penalty still applies, then argmax.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from granite_onnx.runtime.config import GenerationConfig

__all__ = [
    "Sampler",
    "apply_repetition_penalty",
    "draw",
    "filter_min_p",
    "filter_top_k",
    "filter_top_p",
    "log_softmax",
    "process_logits",
    "sample",
    "softmax",
    "token_logprobs",
]

logger = logging.getLogger(__name__)

# Probability mass is summed in float64; a set whose mass is within this of top_p counts as reaching it.
# Softmax of float32 logits is only accurate to ~1e-7, so without the slack whether [0.5, 0.3] reaches
# top_p = 0.8 would depend on the last bit of the rounding.
_TOP_P_SLACK = 1e-6
# filter_top_p ranks this many candidates first, and 8x more each time their mass falls short of top_p.
_NUCLEUS_START = 64


def _check_logits(logits: np.ndarray, name: str = "logits") -> np.ndarray:
    if not isinstance(logits, np.ndarray):
        raise TypeError(f"{name} must be a numpy array of shape [batch, vocab], got {type(logits).__name__}")
    if logits.ndim != 2:
        raise ValueError(
            f"{name} must have shape [batch, vocab], got shape {logits.shape}; "
            "take the last position first (logits[:, -1, :]) if the graph returned [batch, seq, vocab]"
        )
    if not np.issubdtype(logits.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {logits.dtype}")
    return logits


def _masked(logits: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """`logits` where `keep`, -inf elsewhere (a new array)."""
    return np.where(keep, logits, np.array(-np.inf, dtype=logits.dtype))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, numerically stable; -inf entries get probability 0. [batch, vocab] -> same."""
    _check_logits(logits)
    row_max = logits.max(axis=-1, keepdims=True)
    probs = np.exp(logits - row_max)
    probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax, numerically stable (log-sum-exp with the row max taken out)."""
    _check_logits(logits)
    row_max = logits.max(axis=-1, keepdims=True)
    shifted = logits - row_max
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def token_logprobs(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Log-probability of `ids` [batch] under the softmax of `logits` [batch, vocab] -> [batch] float32.

    Pass the raw model logits to report the model's own distribution (what vLLM reports by default),
    or processed logits to report the distribution the token was actually drawn from.
    """
    _check_logits(logits)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.shape[0] != logits.shape[0]:
        raise ValueError(f"got {ids.shape[0]} ids for a batch of {logits.shape[0]} rows of logits")
    rows = np.arange(logits.shape[0])
    row_max = logits.max(axis=-1)
    lse = row_max + np.log(np.exp(logits - row_max[:, None]).sum(axis=-1))
    return (logits[rows, ids] - lse).astype(np.float32)


def apply_repetition_penalty(
    logits: np.ndarray, previous_ids_per_row: Sequence[Sequence[int]] | np.ndarray, penalty: float
) -> np.ndarray:
    """Penalise tokens already seen in each row (prompt and generated), Hugging Face semantics.

    A seen token's logit is divided by `penalty` when positive and multiplied by it when negative, so
    penalty > 1 always makes it less likely. Each distinct token is penalised once, however often it
    occurred (as HF's gather/scatter does). Ids outside the vocabulary are an error.
    """
    _check_logits(logits)
    if penalty <= 0:
        raise ValueError(f"repetition penalty must be > 0, got {penalty}; use 1.0 for no penalty")
    batch, vocab = logits.shape
    if len(previous_ids_per_row) != batch:
        raise ValueError(
            f"previous_ids_per_row has {len(previous_ids_per_row)} rows but logits have {batch}; "
            "pass one sequence of token ids per batch row"
        )
    out = logits.copy()
    if penalty == 1.0:
        return out
    for row, previous in enumerate(previous_ids_per_row):
        seen = np.unique(np.asarray(previous, dtype=np.int64))
        if seen.size == 0:
            continue
        if seen[0] < 0 or seen[-1] >= vocab:
            raise ValueError(
                f"row {row}: previous token ids must be in 0..{vocab - 1}, got {int(seen[0])}..{int(seen[-1])}"
            )
        scores = out[row, seen]
        out[row, seen] = np.where(scores < 0, scores * penalty, scores / penalty)
    return out


def filter_top_k(logits: np.ndarray, top_k: int) -> np.ndarray:
    """Keep the `top_k` largest logits of each row (0 or >= vocab: keep all).

    As in HF, a token tied with the k-th largest value is kept too, so a row can keep more than k.
    """
    _check_logits(logits)
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}; use 0 to switch top-k off")
    vocab = logits.shape[-1]
    if top_k == 0 or top_k >= vocab:
        return logits.copy()
    # The k-th largest value per row without a full sort: partition puts it at index vocab - k.
    kth = np.partition(logits, vocab - top_k, axis=-1)[:, vocab - top_k : vocab - top_k + 1]
    return _masked(logits, logits >= kth)


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Token ids of the nucleus of one row of probabilities [vocab] (float64).

    Sorting the whole vocabulary costs ~20 ms at 100k tokens, yet the nucleus is usually a few dozen
    tokens: rank only the most likely `size` tokens, and grow `size` until their mass reaches top_p.
    """
    vocab = probs.shape[0]
    threshold = top_p - _TOP_P_SLACK
    size = min(_NUCLEUS_START, vocab)
    while True:
        if size >= vocab:
            candidates = np.arange(vocab)
        else:
            # The `size` most likely tokens plus every token tied with the least of them, so that the
            # token-id tie-break below ranks exactly as a sort of the whole row would.
            floor = np.partition(probs, vocab - size)[vocab - size]
            candidates = np.flatnonzero(probs >= floor)
        ranked = candidates[np.argsort(-probs[candidates], kind="stable")]  # most likely first
        mass = np.cumsum(probs[ranked])
        if mass[-1] >= threshold or candidates.size == vocab:
            break
        size *= 8
    # A token is needed while the mass of the tokens ranked above it has not yet reached top_p.
    needed = 1 + int(np.count_nonzero(mass[:-1] < threshold))
    return ranked[:needed]


def filter_top_p(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Nucleus filtering: keep the smallest set of most likely tokens whose total probability >= top_p.

    The most likely token is always kept. Ties in probability are broken by token id (lower first), so
    the kept set is deterministic. top_p = 1.0 keeps everything.
    """
    _check_logits(logits)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}; use 1.0 to switch nucleus sampling off")
    if top_p == 1.0:
        return logits.copy()
    probs = softmax(logits.astype(np.float64))
    keep = np.zeros(logits.shape, dtype=bool)
    for row in range(logits.shape[0]):
        keep[row, _nucleus(probs[row], top_p)] = True
    return _masked(logits, keep)


def filter_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Keep tokens whose probability is at least `min_p` times the row's top probability (0.0: keep all).

    Done in log space: p_i >= min_p * p_max  <=>  logit_i - logit_max >= log(min_p), no softmax needed.
    The top token always passes.
    """
    _check_logits(logits)
    if not 0.0 <= min_p < 1.0:
        raise ValueError(f"min_p must be in [0, 1), got {min_p}; use 0.0 to switch min-p filtering off")
    if min_p == 0.0:
        return logits.copy()
    row_max = logits.max(axis=-1, keepdims=True)
    return _masked(logits, (logits - row_max) >= np.log(min_p))


def process_logits(
    logits: np.ndarray,
    config: GenerationConfig,
    previous_ids_per_row: Sequence[Sequence[int]] | np.ndarray | None = None,
) -> np.ndarray:
    """Apply the repetition penalty, temperature and the filters of `config`, in HF order.

    Returns the logits the next token is drawn from (masked entries -inf). For greedy configs only the
    repetition penalty applies: temperature and filters cannot change the argmax.
    """
    _check_logits(logits)
    out = logits
    if config.repetition_penalty != 1.0:
        if previous_ids_per_row is None:
            raise ValueError(
                "repetition_penalty != 1.0 needs the previous token ids of every row; "
                "pass previous_ids_per_row (prompt and generated ids)"
            )
        out = apply_repetition_penalty(out, previous_ids_per_row, config.repetition_penalty)
    if config.greedy:
        return out
    if config.temperature != 1.0:
        out = out / np.asarray(config.temperature, dtype=out.dtype)
    if config.top_k:
        out = filter_top_k(out, config.top_k)
    if config.top_p < 1.0:
        out = filter_top_p(out, config.top_p)
    if config.min_p > 0.0:
        out = filter_min_p(out, config.min_p)
    return out


def draw(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row from softmax(logits): [batch, vocab] -> ids [batch] int64.

    Inverts the CDF with a single uniform per row. -inf entries have probability 0 and are never drawn.
    """
    _check_logits(logits)
    probs = softmax(logits.astype(np.float64))
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(logits.shape[0]) * cdf[:, -1]
    # The first index whose cdf exceeds u. A zero-probability token never qualifies: its cdf equals its
    # predecessor's, so the predecessor would have been first.
    ids = (cdf <= u[:, None]).sum(axis=-1)
    # Rounding can put u on the final cdf value; fall back to the last token with probability > 0.
    last_kept = logits.shape[-1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=-1)
    return np.minimum(ids, last_kept).astype(np.int64)


def _compact(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The finite entries of each row, in token-id order: (values [batch, m], token ids [batch, m]).

    Rows with fewer than m candidates are padded with -inf (probability 0, never drawn). Keeping the
    token-id order keeps every filter's tie-breaking and the draw's CDF identical to the full-width path.
    """
    finite = np.isfinite(logits)
    width = int(finite.sum(axis=-1).max())
    values = np.full((logits.shape[0], width), -np.inf, dtype=logits.dtype)
    index = np.zeros((logits.shape[0], width), dtype=np.int64)
    for row in range(logits.shape[0]):
        ids = np.flatnonzero(finite[row])
        values[row, : ids.size] = logits[row, ids]
        index[row, : ids.size] = ids
    return values, index


def sample(
    logits: np.ndarray,
    config: GenerationConfig,
    rng: np.random.Generator | None = None,
    previous_ids_per_row: Sequence[Sequence[int]] | np.ndarray | None = None,
) -> np.ndarray:
    """Pick the next token of each row: logits [batch, vocab] -> ids [batch] int64.

    Greedy configs (temperature 0 or top_k 1) take the argmax and need no `rng`. Otherwise the token
    is `draw(process_logits(logits, config, previous_ids_per_row), rng)` (the same token for the same
    rng state, up to float64 rounding of the CDF), computed on the kept candidates only once they are
    few. Sampling needs `rng` so that the caller owns reproducibility (see `Sampler`).
    """
    _check_logits(logits)
    if config.greedy:
        processed = process_logits(logits, config, previous_ids_per_row)
        _check_finite(processed)
        return processed.argmax(axis=-1).astype(np.int64)
    if rng is None:
        raise ValueError(
            "sampling with temperature > 0 needs a numpy.random.Generator; pass rng= or use Sampler(config)"
        )
    vocab = logits.shape[-1]
    index = None  # token ids of the compacted columns, once the candidates are few
    if 0 < config.top_k < vocab // 4:
        # Top-k first (temperature does not change it), then the rest on the k candidates only: top-p
        # ranks k values instead of the whole vocabulary.
        pre = config.replace(temperature=1.0, top_p=1.0, min_p=0.0)
        candidates = process_logits(logits, pre, previous_ids_per_row)
        _check_finite(candidates)
        values, index = _compact(candidates)
        processed = process_logits(values, config.replace(top_k=0, repetition_penalty=1.0))
    else:
        processed = process_logits(logits, config, previous_ids_per_row)
        _check_finite(processed)
        if np.isfinite(processed).sum(axis=-1).max() < vocab // 4:
            # The draw then builds its CDF over the kept candidates, not the whole vocabulary.
            processed, index = _compact(processed)
    picked = draw(processed, rng)
    return picked if index is None else index[np.arange(index.shape[0]), picked]


def _check_finite(processed: np.ndarray) -> None:
    row_max = processed.max(axis=-1)
    if not np.all(np.isfinite(row_max)):
        bad = int(np.flatnonzero(~np.isfinite(row_max))[0])
        raise ValueError(
            f"row {bad} of the logits has no finite maximum (got {row_max[bad]}): the model produced "
            "NaN or inf; a float16 overflow in the graph is the usual cause (re-export in float32 to check)"
        )


class Sampler:
    """`sample()` bound to one `GenerationConfig` and its own random stream.

    The generator is seeded from `config.seed`, so two samplers built from the same config draw the same
    tokens from the same logits; seed None gives a fresh, non-reproducible stream.
    """

    def __init__(self, config: GenerationConfig, rng: np.random.Generator | None = None) -> None:
        self.config = config
        self.rng = rng if rng is not None else np.random.default_rng(config.seed)
        logger.debug("sampler: %s", config)

    def __call__(
        self,
        logits: np.ndarray,
        previous_ids_per_row: Sequence[Sequence[int]] | np.ndarray | None = None,
    ) -> np.ndarray:
        """Next token of each row: logits [batch, vocab] -> ids [batch] int64."""
        return sample(logits, self.config, self.rng, previous_ids_per_row)

    def logprobs(self, logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Log-probabilities of `ids` [batch] under the raw model distribution -> [batch] float32."""
        return token_logprobs(logits, ids)

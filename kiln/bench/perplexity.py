"""Perplexity and KL divergence measured the way llama.cpp's llama-perplexity measures them
(tools/perplexity/perplexity.cpp), so the numbers compare one to one.

The method:
- the whole text is tokenized once, with BOS where the model adds one and no parsing of special
  tokens; at least 2 * n_ctx tokens are needed (llama.cpp's rule, kept so both refuse alike);
- it is cut into non-overlapping chunks of n_ctx tokens (a tail shorter than n_ctx is dropped);
- each chunk is evaluated from an empty cache; when the model adds BOS, the chunk's first token is
  replaced by BOS for the evaluation (the scored targets are the text's own tokens);
- only the second half is scored: with first = n_ctx // 2, the logits at positions
  first .. n_ctx-2 predict tokens first+1 .. n_ctx-1, i.e. n_ctx - 1 - first tokens per chunk;
- the log-softmax of each scored row: max in float32, exp(x - max) in float32 summed in float64,
  nll = log(sum) - (x[target] - max) in float64; the sums of nll and nll^2 are float64;
- PPL = exp(mean nll) and its uncertainty PPL * sqrt(var / (count - 1)), var = E[nll^2] - E[nll]^2.

KL divergence compares a model Q with a base model whose log-probabilities were saved first. The
base file is llama.cpp's own format, so a base written by `llama-perplexity --kl-divergence-base`
is read here and one written here is read by llama.cpp (little-endian throughout):

    "_logits_" | n_ctx u32 | n_vocab i32 | n_chunk i32 | tokens i32 [n_chunk * n_ctx]
    then per chunk, per scored token, nv = 2 * ceil(n_vocab / 2) + 4 uint16:
    scale f32 | min_log_prob f32 | n_vocab uint16 codes | one 0 pad when n_vocab is odd

    log p[i] = scale * code[i] + min_log_prob covers the 16 nats below the top logit in steps of
    at most 16 / 65535 = 2.4e-4 nats; anything lower is code 0 and is left out of the KLD sum.
    A consequence (llama.cpp's too): a scored token more than 16 nats below the top has its base
    NLL capped near 16 + log-sum-exp, which lowers PPL(base) slightly on tiny models.
"""

from __future__ import annotations

import math
import os
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch

from kiln.errors import UsageError
from kiln.fileio import atomic_output, read_input_text

if TYPE_CHECKING:
    from kiln.llm import LLM
    from kiln.runtime.engine import Engine

DEFAULT_CTX = 512  # llama-perplexity's default -c
MIN_CTX = 4  # half of a chunk is context, the other half scored: both need a token at least

# progress(chunks done, chunks in all, the result so far: PerplexityResult or KLDStats)
Progress = Callable[[int, int, Any], None]


# -- the text -------------------------------------------------------------------------------------
# The most text -f reads: wiki.test.raw is 1.3 MB, wiki.train.raw 540 MB. A device such as
# /dev/zero is refused outright; a pipe is read up to this bound.
MAX_TEXT_BYTES = 1 << 30


def read_text(path: str | os.PathLike[str], max_bytes: int | None = None) -> str:
    """The text of a UTF-8 file, byte for byte (no newline translation), less one trailing
    newline: what llama.cpp's -f reads. At most max_bytes (default MAX_TEXT_BYTES) are read: a
    longer text, a device or a directory is a UsageError (kiln.fileio.read_input_text)."""
    max_bytes = MAX_TEXT_BYTES if max_bytes is None else max_bytes
    hint = f"measure a part of it (e.g. head -c 100M {path} > part.txt); --chunks bounds the work"
    text = read_input_text(path, "the text (-f)", max_bytes, hint=hint)
    if not text:
        raise UsageError(f"{path} is empty: perplexity needs a text of at least 2 x n_ctx tokens")
    return text[:-1] if text.endswith("\n") else text


def tokenize(tokenizer: Any, text: str) -> list[int]:
    """The whole text as llama.cpp's perplexity tokenizes it: BOS per the model, no special
    tokens parsed (a literal "<s>" in the text stays text)."""
    return tokenizer.encode(text, add_special=True, parse_special=False)


def bos_for_chunks(tokenizer: Any) -> int | None:
    """The token that replaces each chunk's first token: BOS when the model adds BOS, else None."""
    return tokenizer.bos_id if getattr(tokenizer, "add_bos", False) else None


def count_chunks(n_tokens: int, n_ctx: int, n_chunks: int | None = None) -> int:
    """How many chunks llama.cpp evaluates: all n_tokens // n_ctx, or at most n_chunks (None or
    negative: all). Raises UsageError for a text shorter than 2 * n_ctx tokens, as llama.cpp."""
    check_ctx(n_ctx)
    if n_chunks is not None and n_chunks == 0:
        raise UsageError("the number of chunks (--chunks) must be >= 1, or negative for all")
    if n_tokens < 2 * n_ctx:
        raise UsageError(
            f"the text tokenizes to {n_tokens} tokens, but perplexity with a context of {n_ctx} "
            f"needs at least {2 * n_ctx} (2 x n_ctx, as llama-perplexity requires): give a longer "
            f"text or a smaller context (-c)"
        )
    n_max = n_tokens // n_ctx
    return n_max if n_chunks is None or n_chunks < 0 else min(n_chunks, n_max)


def check_ctx(n_ctx: int) -> None:
    if n_ctx < MIN_CTX:
        raise UsageError(
            f"the context (-c) must be at least {MIN_CTX} tokens for perplexity (its first half is "
            f"context, its second half is scored), got {n_ctx}"
        )


def n_scored(n_ctx: int) -> int:
    """Tokens scored per chunk: n_ctx - 1 - n_ctx // 2 (255 for n_ctx 512)."""
    return n_ctx - 1 - n_ctx // 2


def chunk_input(tokens: Sequence[int], index: int, n_ctx: int, bos_id: int | None) -> list[int]:
    """The ids evaluated for chunk `index`: its n_ctx tokens, the first replaced by bos_id (when
    not None) as llama.cpp does for models that add BOS."""
    ids = [int(t) for t in tokens[index * n_ctx : (index + 1) * n_ctx]]
    if len(ids) != n_ctx:
        raise ValueError(f"chunk {index} of {n_ctx} tokens is past the {len(tokens)} tokens")
    if bos_id is not None:
        ids[0] = bos_id
    return ids


def chunk_targets(tokens: Sequence[int], index: int, n_ctx: int) -> list[int]:
    """The scored tokens of chunk `index`: positions n_ctx//2 + 1 .. n_ctx - 1 of the text's own
    tokens (never the BOS that replaced the chunk's first token)."""
    start = index * n_ctx
    return [int(t) for t in tokens[start + n_ctx // 2 + 1 : start + n_ctx]]


# -- the arithmetic -------------------------------------------------------------------------------
def token_nll(logits: torch.Tensor, targets: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] per row, with llama.cpp's arithmetic.

    logits: float32 [n, n_vocab]; targets: [n] -> float64 [n] on the CPU.
    """
    x = logits.float()
    t = torch.as_tensor(targets, dtype=torch.long, device=x.device).reshape(-1, 1)
    m = x.max(dim=1, keepdim=True).values
    log_sum = torch.exp(x - m).sum(dim=1, dtype=torch.float64).log()
    picked = (x.gather(1, t) - m).squeeze(1).double()  # logits[tok] - max in float32, as llama.cpp
    return (log_sum - picked).cpu()


def ppl_estimate(sum_nll: float, sum_nll2: float, count: int) -> tuple[float, float]:
    """(PPL, its uncertainty) from the sums of nll and nll^2 over `count` tokens: llama.cpp's
    exp(mean) and exp(mean) * sqrt((E[nll^2] - E[nll]^2) / (count - 1)); nan when undefined."""
    mean = sum_nll / count
    ppl = math.exp(mean)
    var = sum_nll2 / count - mean * mean
    err = ppl * math.sqrt(var / (count - 1)) if var > 0 and count > 1 else math.nan
    return ppl, err


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    ppl_err: float  # llama.cpp's "+/-"
    nll_per_token: float  # mean negative log-likelihood over the scored tokens, nats
    n_tokens: int  # tokens scored: chunks x (n_ctx - 1 - n_ctx // 2)
    chunks: tuple[float, ...]  # the running PPL after each chunk: llama.cpp's [1], [2], ...
    n_ctx: int = DEFAULT_CTX
    seconds: float = 0.0  # evaluation only (no loading, no tokenizing)
    chunk_seconds: tuple[float, ...] = ()  # each chunk's share of `seconds`

    def chunk_line(self) -> str:
        """`[1]75.2343,[2]64.4105,...` as llama-perplexity prints it."""
        return "".join(f"[{i + 1}]{p:.4f}," for i, p in enumerate(self.chunks))

    def summary(self) -> str:
        return f"Final estimate: PPL = {self.ppl:.4f} +/- {self.ppl_err:.5f}"


# -- evaluation ----------------------------------------------------------------------------------
def engine_for(llm: LLM, n_ctx: int) -> Engine:
    """llm's engine when its context holds a chunk, else one sharing its model with a larger
    context (no weights are copied)."""
    if n_ctx <= llm.n_ctx:
        return llm.engine
    if n_ctx > llm.config.n_ctx_train:
        raise UsageError(
            f"a context of {n_ctx} exceeds the {llm.config.n_ctx_train} tokens the model was "
            f"trained on: use a smaller -c"
        )
    from kiln.runtime.engine import Engine

    k, v = llm.engine.cache_types
    return Engine(llm.model, n_ctx=n_ctx, ubatch=llm.engine.ubatch, cache_type_k=k, cache_type_v=v)


def scored_logits(
    engine: Engine, tokens: Sequence[int], n_ctx: int, n_chunk: int, bos_id: int | None
) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """Per chunk: (logits float32 [n_scored, n_vocab] of positions n_ctx//2 .. n_ctx-2, the
    n_scored tokens they predict). The context half is run without computing its logits, and the
    last position is not run at all: nothing scored depends on them."""
    first = n_ctx // 2
    cache = engine.new_sequence()
    try:
        for i in range(n_chunk):
            ids = chunk_input(tokens, i, n_ctx, bos_id)
            cache.truncate(0)  # llama_memory_clear: each chunk starts from an empty cache
            engine.prefill(ids[:first], cache)
            logits = engine.prefill(ids[first : n_ctx - 1], cache, all_logits=True)
            yield logits, chunk_targets(tokens, i, n_ctx)
    finally:
        cache.free()


def perplexity(
    llm: LLM,
    text: str,
    n_ctx: int = DEFAULT_CTX,
    n_chunks: int | None = None,
    progress: Progress | None = None,
) -> PerplexityResult:
    """llama-perplexity's PPL of `llm` on `text` (see the module docstring for the method).

    n_chunks: evaluate at most this many chunks (None: all). progress(done, total, result so far)
    is called after each chunk.
    """
    check_ctx(n_ctx)
    return perplexity_of_tokens(llm, tokenize(llm.tokenizer, text), n_ctx, n_chunks, progress)


def perplexity_of_tokens(
    llm: LLM,
    tokens: Sequence[int],
    n_ctx: int = DEFAULT_CTX,
    n_chunks: int | None = None,
    progress: Progress | None = None,
    sink: Callable[[torch.Tensor], None] | None = None,
) -> PerplexityResult:
    """perplexity() on tokens already made (with BOS where the model adds it). sink(logits) gets
    each chunk's scored logits, float32 [n_scored, n_vocab] (the KL base writer uses it)."""
    n_chunk = count_chunks(len(tokens), n_ctx, n_chunks)
    engine = engine_for(llm, n_ctx)
    bos = bos_for_chunks(llm.tokenizer)
    sum_nll = sum_nll2 = 0.0
    count = 0
    running: list[float] = []
    result = None
    start = last = time.perf_counter()
    times: list[float] = []
    for i, (logits, targets) in enumerate(scored_logits(engine, tokens, n_ctx, n_chunk, bos)):
        check_finite(logits, f"the logits of chunk {i + 1}")
        nll = token_nll(logits, targets)
        sum_nll += float(nll.sum())
        sum_nll2 += float((nll * nll).sum())
        count += len(targets)
        if sink is not None:
            sink(logits)
        running.append(math.exp(sum_nll / count))
        now = time.perf_counter()
        times.append(now - last)
        last = now
        ppl, err = ppl_estimate(sum_nll, sum_nll2, count)
        result = PerplexityResult(
            ppl=ppl,
            ppl_err=err,
            nll_per_token=sum_nll / count,
            n_tokens=count,
            chunks=tuple(running),
            n_ctx=n_ctx,
            seconds=now - start,
            chunk_seconds=tuple(times),
        )
        if progress is not None:
            progress(i + 1, n_chunk, result)
    assert result is not None  # count_chunks returns >= 1
    return result


# -- the KL-divergence base file (llama.cpp's format) ---------------------------------------------
KLD_MAGIC = b"_logits_"
_HEADER = struct.Struct("<Iii")  # n_ctx, n_vocab, n_chunk after the magic
_LOG_PROB_RANGE = 16.0  # nats below the top logit that the uint16 codes cover (llama.cpp)


def row_width(n_vocab: int) -> int:
    """uint16 per scored token in a base file: 4 (scale, min f32) + n_vocab rounded up to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def base_file_size(n_ctx: int, n_vocab: int, n_chunk: int) -> int:
    tokens = 4 * n_ctx * n_chunk
    return (
        len(KLD_MAGIC) + _HEADER.size + tokens + 2 * n_chunk * n_scored(n_ctx) * row_width(n_vocab)
    )


def quantize_log_probs(logits: torch.Tensor) -> np.ndarray:
    """logits float32 [n, n_vocab] -> uint16 [n, row_width(n_vocab)]: llama.cpp's base-file rows
    (see the module docstring), with its float32 arithmetic and round-half-even."""
    x = logits.float()
    n, n_vocab = x.shape
    mx = x.max(dim=1, keepdim=True).values
    mn = torch.maximum(x.min(dim=1, keepdim=True).values, mx - _LOG_PROB_RANGE)
    log_sum = torch.exp(x - mx).sum(dim=1, keepdim=True, dtype=torch.float64).log().float()
    min_log_prob = (mn - mx) - log_sum
    scale = (mx - mn) / 65535.0
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    codes = torch.where(x > mn, torch.round(inv * (x - mn)), torch.zeros_like(x))
    rows = np.zeros((n, row_width(n_vocab)), dtype="<u2")
    head = torch.cat([scale, min_log_prob], dim=1).cpu().numpy().astype("<f4")
    rows[:, :4] = head.view("<u2")
    rows[:, 4 : 4 + n_vocab] = codes.to(torch.int32).cpu().numpy()
    return rows


def dequantize_log_probs(rows: np.ndarray, n_vocab: int) -> torch.Tensor:
    """uint16 [n, row_width(n_vocab)] base-file rows -> log-probs float32 [n, n_vocab]."""
    rows = np.ascontiguousarray(rows, dtype="<u2")
    head = torch.from_numpy(rows[:, :4].copy().view("<f4"))  # [n, 2]: scale, min_log_prob
    codes = torch.from_numpy(rows[:, 4 : 4 + n_vocab].astype(np.float32))
    return head[:, :1] * codes + head[:, 1:]


@dataclass(frozen=True)
class KLDBase:
    """A base file's header and a read-only map of its log-prob rows."""

    path: Path
    n_ctx: int
    n_vocab: int
    n_chunk: int
    tokens: np.ndarray  # int32 [n_chunk * n_ctx]: the text's tokens (BOS replacement not applied)
    rows: np.ndarray  # uint16 [n_chunk, n_scored, row_width]: a memory map

    def chunk_log_probs(self, index: int) -> torch.Tensor:
        """log-probs float32 [n_scored, n_vocab] of the base model for chunk `index`."""
        return dequantize_log_probs(np.asarray(self.rows[index]), self.n_vocab)


def read_kld_base(path: str | os.PathLike[str]) -> KLDBase:
    """Open a base file written by `kiln ppl --kl-divergence-base` or llama-perplexity's; a
    truncated or foreign file is a UsageError."""
    p = Path(path)
    if not p.exists():
        raise UsageError(
            f"{p}: no such base file; write it first with "
            f"kiln ppl -m BASE_MODEL -f TEXT --kl-divergence-base {p}"
        )
    if p.is_dir():
        raise UsageError(f"{p} is a directory, not a KL-divergence base file")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(len(KLD_MAGIC) + _HEADER.size)
    if len(head) < len(KLD_MAGIC) + _HEADER.size or not head.startswith(KLD_MAGIC):
        raise UsageError(
            f"{p} is not a KL-divergence base file (one written by kiln ppl --kl-divergence-base "
            f"or llama-perplexity --kl-divergence-base starts with {KLD_MAGIC.decode()})"
        )
    n_ctx, n_vocab, n_chunk = _HEADER.unpack(head[len(KLD_MAGIC) :])
    if n_ctx < MIN_CTX or n_vocab < 1 or n_chunk < 1:
        raise UsageError(f"{p}: a bad header (n_ctx {n_ctx}, n_vocab {n_vocab}, chunks {n_chunk})")
    expected = base_file_size(n_ctx, n_vocab, n_chunk)
    if size != expected:
        raise UsageError(
            f"{p} holds {size} bytes, but a base of {n_chunk} chunks of {n_ctx} tokens over "
            f"{n_vocab} tokens of vocabulary holds {expected}: the file is truncated or damaged; "
            f"write it again"
        )
    offset = len(KLD_MAGIC) + _HEADER.size
    tokens = np.fromfile(p, dtype="<i4", count=n_ctx * n_chunk, offset=offset)
    shape = (n_chunk, n_scored(n_ctx), row_width(n_vocab))
    rows = np.memmap(p, dtype="<u2", mode="r", offset=offset + 4 * tokens.size, shape=shape)
    return KLDBase(p, n_ctx, n_vocab, n_chunk, tokens, rows)


def _check_rows(p: Path, rows: np.ndarray) -> None:
    """Every row's scale and min_log_prob finite, the scale >= 0: a base saved from NaN or
    infinite logits (llama.cpp writes them as they come) would otherwise give NaN log-probs,
    which the KLD sum leaves out as below its range, and a Mean KLD of 0. Reads only the
    8-byte head of each row."""
    for c in range(rows.shape[0]):
        head = np.ascontiguousarray(rows[c, :, :4]).view("<f4")  # [n_scored, 2]: scale, min
        bad = ~np.isfinite(head).all(axis=1) | (head[:, 0] < 0)
        if bad.any():
            t = int(np.flatnonzero(bad)[0])
            scale, low = (float(x) for x in head[t])
            raise UsageError(
                f"{p}: chunk {c + 1}, scored token {t} has log-probabilities of scale {scale} and "
                f"minimum {low}: the base model's logits were NaN or infinite ({int(bad.sum())} "
                f"such tokens in this chunk); write the base again with a working model"
            )


class _BaseWriter:
    """Writes the base through kiln.fileio.atomic_output: a temporary file of its own, renamed
    over PATH at the end, so an interrupted run leaves no file that looks complete (and no
    planted link or device at PATH is written through). The disk space for the whole file is
    checked before the model runs."""

    def __init__(self, path: Path, n_ctx: int, n_vocab: int, n_chunk: int, tokens: Sequence[int]):
        self.path, self.n_vocab = path, n_vocab
        size = base_file_size(n_ctx, n_vocab, n_chunk)
        self._out = atomic_output(path, "wb", what="the KL-divergence base file", size=size)
        self.f: BinaryIO = self._out.__enter__()
        self.chunk = 0
        try:
            self.f.write(KLD_MAGIC + _HEADER.pack(n_ctx, n_vocab, n_chunk))
            self.f.write(np.asarray(tokens[: n_ctx * n_chunk], dtype="<i4").tobytes())
        except BaseException as e:
            self.abort(e)
            raise

    def add(self, logits: torch.Tensor) -> None:
        check_finite(logits, f"the base model's logits of chunk {self.chunk + 1}")
        self.f.write(quantize_log_probs(logits).tobytes())
        self.chunk += 1

    def finish(self) -> None:
        self._out.__exit__(None, None, None)

    def abort(self, exc: BaseException) -> None:
        """Remove the temporary file; raises a UsageError if exc was a failed write."""
        self._out.__exit__(type(exc), exc, exc.__traceback__)


def check_finite(logits: torch.Tensor, what: str) -> None:
    """UsageError when logits hold NaN or an infinity: every statistic made of them would be
    NaN, or (in the KLD sum, where NaN terms compare as out of range) silently 0."""
    bad = ~torch.isfinite(logits)
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0].tolist()[:2])
        value = float(logits[row, col])
        raise UsageError(
            f"{what} hold {int(bad.sum())} NaN or infinite values (first: {value} at scored token "
            f"{row}, vocabulary id {col}): the model file is broken or its arithmetic overflows "
            f"on this backend; check it with kiln run, or try --backend torch"
        )


def save_kld_base(
    llm: LLM,
    text: str,
    path: str | os.PathLike[str],
    n_ctx: int = DEFAULT_CTX,
    n_chunks: int | None = None,
    progress: Progress | None = None,
) -> PerplexityResult:
    """Measure llm's perplexity on text and save its log-probs of every scored token to `path`
    (llama.cpp's format, base_file_size(...) bytes: ~25 MB per 512-token chunk of a 49k vocab).
    """
    check_ctx(n_ctx)
    tokens = tokenize(llm.tokenizer, text)
    return save_kld_base_of_tokens(llm, tokens, path, n_ctx, n_chunks, progress)


def save_kld_base_of_tokens(
    llm: LLM,
    tokens: Sequence[int],
    path: str | os.PathLike[str],
    n_ctx: int = DEFAULT_CTX,
    n_chunks: int | None = None,
    progress: Progress | None = None,
) -> PerplexityResult:
    """save_kld_base() on tokens already made (with BOS where the model adds it)."""
    n_chunk = count_chunks(len(tokens), n_ctx, n_chunks)
    writer = _BaseWriter(Path(path), n_ctx, llm.config.n_vocab, n_chunk, tokens)
    try:
        result = perplexity_of_tokens(llm, tokens, n_ctx, n_chunk, progress, sink=writer.add)
    except BaseException as e:
        writer.abort(e)
        raise
    writer.finish()
    return result


# -- KL divergence: per token, then the statistics ------------------------------------------------
@dataclass(frozen=True)
class TokenKLD:
    """Per scored token, numpy [n]: what llama.cpp accumulates."""

    nll: np.ndarray  # float64: -log q(target) of the model Q
    nll_base: np.ndarray  # float64: -log p(target) of the base
    kld: np.ndarray  # float64: sum_i p_i (log p_i - log q_i) over base log-probs > -16
    p_diff: np.ndarray  # float64: q(target) - p(target)
    same_top: np.ndarray  # bool: argmax q == argmax p (first index on ties, as llama.cpp)

    @staticmethod
    def concat(parts: Sequence[TokenKLD]) -> TokenKLD:
        return TokenKLD(*(np.concatenate([getattr(p, f) for p in parts]) for f in _TOKEN_FIELDS))


_TOKEN_FIELDS = ("nll", "nll_base", "kld", "p_diff", "same_top")


def kld_token_values(
    logits: torch.Tensor,
    base_log_probs: torch.Tensor,
    targets: Sequence[int] | torch.Tensor,
    rows_per_step: int = 64,
) -> TokenKLD:
    """logits float32 [n, n_vocab] of Q, base_log_probs [n, n_vocab] (log p of the base, e.g.
    KLDBase.chunk_log_probs), targets [n] -> TokenKLD. Pure; float64 arithmetic (llama.cpp's is
    float32); base log-probs <= -16 are left out of the KLD sum, as llama.cpp does."""
    dev = logits.device  # on a GPU the float64 work stays there (CPU: ~0.5 s a 152k-vocab chunk)
    t = torch.as_tensor(targets, dtype=torch.long, device=dev).reshape(-1)
    parts = []
    for s in range(0, logits.shape[0], rows_per_step):
        x = logits[s : s + rows_per_step].float()
        lp = base_log_probs[s : s + rows_per_step].to(dev, torch.float64)
        tt = t[s : s + rows_per_step].reshape(-1, 1)
        m = x.max(dim=1, keepdim=True).values
        log_sum = torch.exp(x - m).sum(dim=1, keepdim=True, dtype=torch.float64).log()
        log_q = (x - m).double() - log_sum
        nll = -log_q.gather(1, tt).squeeze(1)
        nll_base = -lp.gather(1, tt).squeeze(1)
        terms = torch.where(lp > -_LOG_PROB_RANGE, torch.exp(lp) * (lp - log_q), 0.0)
        parts.append(
            TokenKLD(
                nll=nll.cpu().numpy(),
                nll_base=nll_base.cpu().numpy(),
                kld=terms.sum(dim=1).cpu().numpy(),
                p_diff=(torch.exp(-nll) - torch.exp(-nll_base)).cpu().numpy(),
                same_top=(x.argmax(dim=1) == lp.argmax(dim=1)).cpu().numpy(),
            )
        )
    return TokenKLD.concat(parts)


def _mean_and_uncertainty(values: np.ndarray) -> tuple[float, float]:
    """llama.cpp's mean and its standard error; the error is 0 for 10 values or fewer."""
    n = len(values)
    if n < 1:
        return 0.0, 0.0
    mean = float(values.sum()) / n
    var = float((values * values).sum()) / n - mean * mean
    return mean, math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0


def _covariance(a: np.ndarray, b: np.ndarray) -> float:
    """llama.cpp's covariance of the means of a and b (0 under 10 values)."""
    n = len(a)
    if n < 10:
        return 0.0
    return (float((a * b).sum()) / n - float(a.sum()) / n * (float(b.sum()) / n)) / (n - 1)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama.cpp's percentile: linear interpolation between the two nearest ranks."""
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = fraction * (len(sorted_values) - 1)
    i = int(p)
    p -= i
    j = min(i + 1, len(sorted_values) - 1)
    return float((1 - p) * sorted_values[i] + p * sorted_values[j])


KLD_PERCENTILES = (1.0, 0.999, 0.99, 0.95, 0.90, 0.5, 0.10, 0.05, 0.01, 0.001, 0.0)
P_DIFF_PERCENTILES = (1.0, 0.999, 0.99, 0.95, 0.90, 0.75, 0.5, 0.25, 0.10, 0.05, 0.01, 0.001, 0.0)


@dataclass(frozen=True)
class KLDStats:
    """llama.cpp's KL-divergence statistics. Fractions (same_top, p_diff) are 0..1, not %."""

    n_tokens: int
    ppl: float
    ppl_err: float
    ppl_base: float
    ppl_base_err: float
    log_ppl_cor: float  # correlation of ln PPL(Q) and ln PPL(base)
    log_ppl_ratio: float  # ln(PPL(Q)/PPL(base))
    log_ppl_ratio_err: float
    ppl_ratio: float
    ppl_ratio_err: float
    ppl_diff: float
    ppl_diff_err: float
    kld: float  # mean KLD, nats
    kld_err: float
    kld_percentiles: dict[float, float]  # fraction -> value; 1.0 = max, 0.5 = median, 0.0 = min
    p_diff: float
    p_diff_err: float
    p_diff_percentiles: dict[float, float]
    p_diff_rms: float
    p_diff_rms_err: float
    same_top: float
    same_top_err: float

    def chunk_row(self, chunk: int) -> str:
        """One line of llama.cpp's per-chunk table (cumulative values)."""
        return (
            f"{chunk:4d}    {self.ppl:9.4f} ± {self.ppl_err:9.4f}"
            f"    {self.log_ppl_ratio:10.5f} ± {self.log_ppl_ratio_err:10.5f}"
            f"    {self.kld:10.5f} ± {self.kld_err:10.5f}"
            f"    {100 * self.p_diff_rms:6.3f} ± {100 * self.p_diff_rms_err:6.3f} %"
            f"    {100 * self.same_top:6.3f} ± {100 * self.same_top_err:6.3f} %"
        )

    def report(self) -> str:
        """The three sections llama-perplexity --kl-divergence ends with."""
        lines = [
            "====== Perplexity statistics ======",
            f"Mean PPL(Q)                   : {self.ppl:10.6f} ± {self.ppl_err:10.6f}",
            f"Mean PPL(base)                : {self.ppl_base:10.6f} ± {self.ppl_base_err:10.6f}",
            f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * self.log_ppl_cor:6.2f}%",
            f"Mean ln(PPL(Q)/PPL(base))     : {self.log_ppl_ratio:10.6f} ± "
            f"{self.log_ppl_ratio_err:10.6f}",
            f"Mean PPL(Q)/PPL(base)         : {self.ppl_ratio:10.6f} ± {self.ppl_ratio_err:10.6f}",
            f"Mean PPL(Q)-PPL(base)         : {self.ppl_diff:10.6f} ± {self.ppl_diff_err:10.6f}",
            "",
            "====== KL divergence statistics ======",
            f"Mean    KLD: {self.kld:10.6f} ± {self.kld_err:10.6f}",
        ]
        lines += [f"{_label(f)} KLD: {v:10.6f}" for f, v in self.kld_percentiles.items()]
        lines += [
            "",
            "====== Token probability statistics ======",
            f"Mean    Δp: {100 * self.p_diff:6.3f} ± {100 * self.p_diff_err:5.3f} %",
        ]
        lines += [f"{_label(f)} Δp: {100 * v:6.3f}%" for f, v in self.p_diff_percentiles.items()]
        lines += [
            f"RMS Δp    : {100 * self.p_diff_rms:6.3f} ± {100 * self.p_diff_rms_err:5.3f} %",
            f"Same top p: {100 * self.same_top:6.3f} ± {100 * self.same_top_err:5.3f} %",
        ]
        return "\n".join(lines)


KLD_TABLE_HEADER = (
    "chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence"
    "              Δp RMS            Same top p"
)


def _label(fraction: float) -> str:
    if fraction >= 1:
        return "Maximum"
    if fraction <= 0:
        return "Minimum"
    if fraction == 0.5:
        return "Median "
    return f"{100 * fraction:4.1f}%  "


def kld_statistics(values: TokenKLD) -> KLDStats:
    """The statistics llama-perplexity --kl-divergence prints, from per-token values. Pure."""
    n = len(values.nll)
    if n < 1:
        raise ValueError("no tokens to compute KL-divergence statistics on")
    nll, nll_base = np.asarray(values.nll, float), np.asarray(values.nll_base, float)
    log_ppl, log_ppl_err = _mean_and_uncertainty(nll)
    log_base, log_base_err = _mean_and_uncertainty(nll_base)
    ppl, ppl_base = math.exp(log_ppl), math.exp(log_base)
    cov = _covariance(nll, nll_base)
    denom = log_ppl_err * log_base_err
    ratio_var = log_ppl_err**2 + log_base_err**2 - 2 * cov
    log_ratio_err = math.sqrt(max(ratio_var, 0.0))
    ppl_cov = ppl * ppl_base * cov
    diff_var = (ppl * log_ppl_err) ** 2 + (ppl_base * log_base_err) ** 2 - 2 * ppl_cov

    kld = np.asarray(values.kld, float)
    kld_mean, kld_err = _mean_and_uncertainty(kld)
    kld_sorted = np.sort(kld)
    p_diff = np.asarray(values.p_diff, float)
    p_mean, p_err = _mean_and_uncertainty(p_diff)
    p_sorted = np.sort(p_diff)
    mse, mse_err = _mean_and_uncertainty(p_diff * p_diff)
    rms = math.sqrt(mse)
    same = float(np.count_nonzero(values.same_top)) / n
    return KLDStats(
        n_tokens=n,
        ppl=ppl,
        ppl_err=ppl * log_ppl_err,
        ppl_base=ppl_base,
        ppl_base_err=ppl_base * log_base_err,
        log_ppl_cor=cov / denom if denom > 0 else math.nan,
        log_ppl_ratio=log_ppl - log_base,
        log_ppl_ratio_err=log_ratio_err,
        ppl_ratio=math.exp(log_ppl - log_base),
        ppl_ratio_err=math.exp(log_ppl - log_base) * log_ratio_err,
        ppl_diff=ppl - ppl_base,
        ppl_diff_err=math.sqrt(max(diff_var, 0.0)),
        kld=kld_mean,
        kld_err=kld_err,
        kld_percentiles={f: percentile(kld_sorted, f) for f in KLD_PERCENTILES},
        p_diff=p_mean,
        p_diff_err=p_err,
        p_diff_percentiles={f: percentile(p_sorted, f) for f in P_DIFF_PERCENTILES},
        p_diff_rms=rms,
        p_diff_rms_err=0.5 / rms * mse_err if rms > 0 else 0.0,
        same_top=same,
        same_top_err=math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0,
    )


def kl_divergence(
    llm: LLM,
    base: KLDBase | str | os.PathLike[str],
    text: str | None = None,
    n_ctx: int | None = None,
    n_chunks: int | None = None,
    progress: Progress | None = None,
) -> KLDStats:
    """Compare llm (Q) with a saved base on the base's own tokens.

    text: when given, it must tokenize to the tokens the base was made from (a check that the
    same text is meant). n_ctx: when given, it must equal the base's. n_chunks: at most this many
    of the base's chunks (None: all). progress(done, total, KLDStats so far) after each chunk.
    """
    if not isinstance(base, KLDBase):
        base = read_kld_base(base)
    check_kld_base(base, llm, text, n_ctx)
    n_chunk = base.n_chunk if n_chunks is None or n_chunks < 0 else min(n_chunks, base.n_chunk)
    if n_chunk == 0:
        raise UsageError("the number of chunks (--chunks) must be >= 1, or negative for all")
    engine = engine_for(llm, base.n_ctx)
    bos = bos_for_chunks(llm.tokenizer)
    tokens = base.tokens.tolist()
    parts: list[TokenKLD] = []
    stats = None
    for i, (logits, targets) in enumerate(scored_logits(engine, tokens, base.n_ctx, n_chunk, bos)):
        check_finite(logits, f"the logits of chunk {i + 1}")
        parts.append(kld_token_values(logits, base.chunk_log_probs(i), targets))
        stats = kld_statistics(TokenKLD.concat(parts))
        if progress is not None:
            progress(i + 1, n_chunk, stats)
    assert stats is not None
    return stats


def check_kld_base(
    base: KLDBase, llm: LLM, text: str | None = None, n_ctx: int | None = None
) -> None:
    """UsageError unless the base fits llm (vocabulary), n_ctx and text (its tokens), and its
    log-probabilities are finite."""
    if base.n_vocab != llm.config.n_vocab:
        raise UsageError(
            f"{base.path} was written by a model with a vocabulary of {base.n_vocab} tokens, "
            f"this model has {llm.config.n_vocab}: KL divergence compares models that share "
            f"their vocabulary"
        )
    if n_ctx is not None and n_ctx != base.n_ctx:
        raise UsageError(
            f"{base.path} was computed with a context of {base.n_ctx}, not {n_ctx}: pass "
            f"-c {base.n_ctx} or leave -c out"
        )
    bad = np.flatnonzero((base.tokens < 0) | (base.tokens >= llm.config.n_vocab))
    if bad.size:
        raise UsageError(f"{base.path}: token {int(base.tokens[bad[0]])} is outside the vocabulary")
    _check_rows(base.path, base.rows)
    if text is not None:
        tokens = tokenize(llm.tokenizer, text)
        want = base.tokens.tolist()
        got = tokens[: len(want)]
        if got != want:
            where = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(got))
            raise UsageError(
                f"the text does not match {base.path}: it tokenizes differently from the text "
                f"the base was computed on (first difference at token {where} of {len(want)}); "
                f"use the same -f file as for the base, or leave -f out to use the base's tokens"
            )

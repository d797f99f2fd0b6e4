"""TinyLM: a small decoder-only transformer over bytes, with a KV cache.

The weights are **random** by default (``init_weights(seed)``); the model is real — it runs
the full computation of a GPT-style decoder — but it is untrained, so its text is noise.
Load trained weights with :meth:`TinyLM.load` if you have some in the same layout.

Default size (``LMConfig()``): vocab 258 (256 bytes + BOS + EOS), d_model 128, 2 layers,
4 heads, d_ff 512, max_len 256 → 462,592 parameters, 1,850,368 bytes of float32 weights
(the output head is tied to the token embedding). A full KV cache adds
``2 * n_layers * max_len * d_model * 4`` = 524,288 bytes while a generation runs.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..runtime import capture_graph, current_context
from ._gemv import embed_row, layer_norm_row, sample_row, vecmat_t
from .layers import (
    Model,
    ParamSpec,
    decode_block,
    encoder_block,
    layer_norm,
    to_host,
    transformer_block_specs,
)

__all__ = (
    "BOS",
    "EOS",
    "VOCAB_SIZE",
    "FixedStep",
    "KVCache",
    "LMConfig",
    "TinyLM",
    "decode",
    "encode",
)

BOS = 256
EOS = 257
VOCAB_SIZE = 258
SENTENCE_END = frozenset(b".!?")


def encode(text: str, *, bos: bool = True) -> list[int]:
    """UTF-8 bytes of ``text`` as token ids, after a BOS token."""
    ids = list(text.encode("utf-8"))
    return [BOS, *ids] if bos else ids


def decode(ids: Sequence[int]) -> str:
    """Text from token ids (BOS/EOS dropped, invalid UTF-8 replaced)."""
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


@dataclasses.dataclass(frozen=True)
class LMConfig:
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 512
    max_len: int = 256
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "d_ff", "max_len"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"LMConfig.{name} must be positive")
        if self.d_model % self.n_heads:
            raise ValueError("LMConfig.d_model must be a multiple of n_heads")
        if self.max_len < 2:
            raise ValueError("LMConfig.max_len must be at least 2")


@dataclasses.dataclass
class KVCache:
    """Per-layer key/value caches, each ``(n_heads, max_len, d_head)`` float32."""

    keys: list[Any]
    values: list[Any]
    length: int = 0

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (*self.keys, *self.values))


class TinyLM(Model):
    """Decoder-only byte-level transformer with random weights by default.

    ``TinyLM(config=None, *, xp=numpy, seed=0)``: token + learned position embeddings,
    pre-LayerNorm blocks (causal multi-head self-attention, GELU MLP), final LayerNorm and
    an output head tied to the token embedding. All arrays are allocated through ``xp``.
    """

    config_cls = LMConfig
    config: LMConfig
    #: decode steps kept after ``generate(graph=True)`` for later generations. Each is a KV
    #: cache and its captured graphs, charged to the context that captured them while kept:
    #: more spares let that many concurrent generations skip allocating and capturing
    #: anew, at the price of idle memory in the context's budget
    SPARE_STEPS = 1

    def __init__(self, config: Any = None, *, xp: Any = np, seed: int = 0) -> None:
        super().__init__(config, xp=xp, seed=seed)
        #: decode steps (with their captured graphs) kept for the next generation
        self._spare_steps: list[FixedStep] = []

    def param_specs(self) -> dict[str, ParamSpec]:
        c = self.config
        std = c.init_std
        out_std = std / math.sqrt(2 * c.n_layers)
        specs = {
            "tok_emb": ParamSpec((VOCAB_SIZE, c.d_model), std),
            "pos_emb": ParamSpec((c.max_len, c.d_model), std),
        }
        for prefix in self._iter_blocks(c.n_layers):
            specs.update(transformer_block_specs(prefix, c.d_model, c.d_ff, std, out_std))
        specs["ln_f.g"] = ParamSpec((c.d_model,), "ones")
        specs["ln_f.b"] = ParamSpec((c.d_model,), "zeros")
        return specs

    # ------------------------------------------------------------------ forward
    def new_cache(self) -> KVCache:
        """Empty KV caches for one sequence (allocated through ``xp``)."""
        c, xp = self.config, self.xp
        shape = (c.n_heads, c.max_len, c.d_model // c.n_heads)
        return KVCache(
            keys=[xp.zeros(shape, dtype=xp.float32) for _ in range(c.n_layers)],
            values=[xp.zeros(shape, dtype=xp.float32) for _ in range(c.n_layers)],
        )

    def _check_tokens(self, tokens: Sequence[int], start: int) -> list[int]:
        ids = [int(t) for t in tokens]
        if not ids:
            raise ValueError("no tokens")
        if start + len(ids) > self.config.max_len:
            raise ValueError(f"{start + len(ids)} positions exceed max_len={self.config.max_len}")
        if min(ids) < 0 or max(ids) >= VOCAB_SIZE:
            raise ValueError(f"token ids must be in [0, {VOCAB_SIZE})")
        return ids

    def _forward(self, tokens: Sequence[int], cache: KVCache | None, start: int = 0) -> Any:
        """Logits ``(T, vocab)`` for ``tokens`` at positions ``start .. start+T``.

        With a cache, keys/values of these tokens are appended to it and attention reads
        the earlier positions from it.
        """
        xp, c, p = self.xp, self.config, self.params
        ids = self._check_tokens(tokens, start)
        t = len(ids)
        idx = xp.asarray(np.asarray(ids, dtype=np.int64))
        x = xp.take(p["tok_emb"], idx, axis=0) + p["pos_emb"][start : start + t]
        for i, prefix in enumerate(self._iter_blocks(c.n_layers)):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x = encoder_block(xp, p, prefix, x, c.n_heads, cache=kv, start=start, causal=True)
        if cache is not None:
            cache.length = start + t
        x = layer_norm(xp, x, p["ln_f.g"], p["ln_f.b"])
        return x @ p["tok_emb"].T

    def logits_full(self, tokens: Sequence[int]) -> Any:
        """Logits ``(T, vocab)`` of the whole sequence in one pass, without a cache."""
        return self._forward(tokens, None, 0)

    def prefill(self, tokens: Sequence[int]) -> tuple[KVCache, Any]:
        """Run the prompt once into a new cache; returns the cache and the last logits."""
        cache = self.new_cache()
        logits = self._forward(tokens, cache, 0)
        return cache, logits[-1]

    def step(self, token: int, cache: KVCache) -> Any:
        """Logits ``(vocab,)`` after appending one token to ``cache`` (one position)."""
        return self._forward([token], cache, cache.length)[0]

    def decoder(self) -> FixedStep:
        """A one-token step with fixed shapes over a cache of its own (see :class:`FixedStep`)."""
        return FixedStep(self)

    def logits_cached(self, tokens: Sequence[int], prefill: int = 1) -> Any:
        """Logits ``(T, vocab)`` computed the way :meth:`generate` does: ``prefill``
        tokens in one pass, then one cached step per token. Must match
        :meth:`logits_full`."""
        ids = [int(t) for t in tokens]
        if not 1 <= prefill <= len(ids):
            raise ValueError("prefill must be in [1, len(tokens)]")
        cache = self.new_cache()
        rows = [self._forward(ids[:prefill], cache, 0)]
        for tok in ids[prefill:]:
            rows.append(self.step(tok, cache)[None, :])
        return self.xp.concatenate(rows, axis=0)

    # ------------------------------------------------------------------ generation
    @staticmethod
    def _pick(logits: Any, temperature: float, rng: np.random.Generator) -> int:
        row = to_host(logits).astype(np.float64)
        row[BOS] = -np.inf  # never generate BOS
        if temperature <= 0.0:
            return int(np.argmax(row))
        gumbel = rng.gumbel(size=row.shape)  # Gumbel-max: a sample of softmax(row / T)
        return int(np.argmax(row / temperature + gumbel))

    def generate(
        self,
        prompt: str,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        seed: int = 0,
        graph: bool = False,
    ) -> Iterator[int]:
        """Yield up to ``max_new_tokens`` generated token ids, one at a time.

        The prompt (after BOS; its last ``max_len - 1`` tokens if longer) is run once into
        per-layer K/V caches; each further token is a one-position step that appends to
        them. ``temperature=0`` is greedy; otherwise tokens are sampled with
        ``numpy.random.default_rng(seed)``. Stops early at EOS (not yielded) or when the
        context is full.

        ``graph=True`` runs the steps as :class:`FixedStep` and, where a pygpukit context is
        current, captures one step into a CUDA graph and replays it for every later token:
        one launch per token instead of hundreds. The computation is the same either way
        (its sums may round differently in the last bit). The captured graphs stay with the
        model for the next call, their memory charged to the context they were captured in.
        """
        if max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        if max_new_tokens == 0:
            return
        max_len = self.config.max_len
        ids = encode(prompt)
        if len(ids) > max_len - 1:
            ids = [BOS, *ids[-(max_len - 2) :]]
        rng = np.random.default_rng(seed)
        if graph:
            yield from self._generate_fixed(ids, max_new_tokens, temperature, rng)
            return
        cache, logits = self.prefill(ids)
        for n in range(max_new_tokens):
            tok = self._pick(logits, temperature, rng)
            if tok == EOS:
                return
            yield tok
            if n + 1 == max_new_tokens or cache.length >= max_len:
                return
            logits = self.step(tok, cache)

    def _generate_fixed(
        self, ids: list[int], max_new_tokens: int, temperature: float, rng: np.random.Generator
    ) -> Iterator[int]:
        spares = self._spare_steps
        try:  # one generation per step; a concurrent one makes its own
            step = spares.pop()  # atomic: two threads never get the same step
            step._lm = self
        except IndexError:
            step = FixedStep(self)
        try:
            count = min(max_new_tokens, self.config.max_len - len(ids) + 1)
            step.start(ids, temperature, rng)
            for k in range(count):
                while step.issued < min(count, k + 1 + step.LOOKAHEAD):
                    step.next()  # the device runs ahead while this token is read
                tok = step.token_at(k)
                if tok == EOS:
                    return
                yield tok
        finally:
            step.drain()  # nothing of this generation left running on the buffers
            if len(spares) < self.SPARE_STEPS:  # kept with its graphs for the next one
                step._lm = None  # owned by the model meanwhile, not owning it back
                spares.append(step)
            # else dropped: freed right here (its graphs hold it weakly), cache included

    def sentences(
        self,
        prompt: str,
        max_new_tokens: int,
        *,
        max_chunk: int = 32,
        temperature: float = 0.0,
        seed: int = 0,
        graph: bool = False,
    ) -> Iterator[str]:
        """Generated text grouped into "sentences" as it is produced.

        A chunk ends after ``.``, ``!`` or ``?``, or after ``max_chunk`` bytes (so random
        weights still give chunks); whatever is left is yielded at the end. Chunks that are
        only whitespace are skipped. ``graph`` as in :meth:`generate`.
        """
        if max_chunk <= 0:
            raise ValueError("max_chunk must be positive")
        buf: list[int] = []
        tokens = self.generate(
            prompt, max_new_tokens, temperature=temperature, seed=seed, graph=graph
        )
        for tok in tokens:
            buf.append(tok)
            if tok in SENTENCE_END or len(buf) >= max_chunk:
                text = decode(buf)
                buf.clear()
                if text.strip():
                    yield text
        if buf:
            text = decode(buf)
            if text.strip():
                yield text


class FixedStep:
    """Decode steps of one sequence that launch the same kernels on the same buffers.

    The token, its position and the sampler's state live in device buffers, so nothing
    about a step depends on a host value. That is what CUDA graph capture needs:
    :meth:`advance` records a step once and replays it for every later token (see
    :meth:`TinyLM.generate`). A step writes the key/value of ``token`` into the cache row
    ``pos`` selects, attends to the rows up to ``pos``, leaves its logits in
    :attr:`logits` (always the same array), then samples the next token on the device (the
    host's float64 arithmetic: the same token): into ``token`` for the next step and into
    :attr:`tokens`, host memory the device writes; ``pos`` moves on by one. The host can
    queue steps ahead (:attr:`LOOKAHEAD`) and read each token when it is ready.

    Attention runs over a *bucket* of the cache, the smallest power of two (from
    :attr:`MIN_BUCKET`) that holds ``pos``, not over all ``max_len`` rows: a short
    sequence does a fraction of the work. Each bucket is one graph, captured the first time
    the sequence reaches it.
    """

    MIN_BUCKET = 64
    LOOKAHEAD = 4  # steps queued beyond the token being read
    NOISE_ROWS = 64  # tokens' worth of sampling noise uploaded at a time
    #: prompts up to this many tokens run through the (captured) step one token at a time;
    #: longer ones in one batched pass. A batched pass launches some 300 kernels from
    #: Python, about as much host time as 30 replayed steps take on the GPU (docs/adr/0021).
    STEP_PROMPT = 32

    def __init__(self, lm: TinyLM) -> None:
        xp, c = lm.xp, lm.config
        # None while the step is a spare of its model (TinyLM.generate): the model owns it
        # then, and a reference back would make a cycle that only the collector frees
        self._lm: TinyLM | None = lm
        self.cache = lm.new_cache()
        self.token = xp.zeros((1,), dtype=xp.int64)
        self.pos = xp.zeros((1,), dtype=xp.int64)
        self.n = xp.zeros((1,), dtype=xp.int64)  # tokens sampled in this generation
        self.prompt = xp.zeros((c.max_len,), dtype=xp.int64)
        self.prompt_len = xp.zeros((1,), dtype=xp.int64)  # positions below it are forced
        self.temperature = xp.zeros((1,), dtype=xp.float64)
        self.noise = xp.zeros((self.NOISE_ROWS, VOCAB_SIZE), dtype=xp.float64)
        self.logits = xp.zeros((VOCAB_SIZE,), dtype=xp.float32)
        self._cuda = hasattr(xp, "RawModule")  # CuPy: steps are queued, not done at once
        self.tokens = _device_writable(xp, c.max_len + 1, self._cuda)  # token k at k % len
        self.issued = 0  # tokens of this generation whose sampling is queued
        self._stream = 0  # where this generation's steps are queued
        self._rng: np.random.Generator | None = None
        self._marks: list[Any] = [None] * (self.LOOKAHEAD + 2)
        self._at = 0  # the host's copy of pos
        self._graphs: dict[int, Any] = {}  # bucket -> Graph
        self._runs = 0

    @property
    def lm(self) -> TinyLM:
        """The model whose weights the steps use."""
        lm = self._lm
        if lm is None:
            raise ValueError("this step is parked as a spare of its model; it has no model now")
        return lm

    def prefill(self, tokens: Sequence[int]) -> Any:
        """Run the prompt into the cache (variable shape, not captured); its last logits."""
        return self.lm._forward(tokens, self.cache, 0)[-1]

    def set(self, token: int, pos: int) -> None:
        """Point the next step at ``token`` in position ``pos``, its next token to be
        sampled (three tiny device writes)."""
        if not 0 <= pos < self.lm.config.max_len:
            raise ValueError(f"position {pos} outside max_len={self.lm.config.max_len}")
        self.token.fill(token)
        self.pos.fill(pos)
        self.prompt_len.fill(0)  # the next token is sampled
        self._at = pos

    def bucket(self, pos: int) -> int:
        """Cache rows a step at ``pos`` attends over."""
        rows = self.MIN_BUCKET
        while rows <= pos:
            rows *= 2
        return min(rows, self.lm.config.max_len)

    # -------------------------------------------------------------- one generation
    def start(self, ids: Sequence[int], temperature: float, rng: np.random.Generator) -> None:
        """Begin a generation after the prompt ``ids``: run the prompt into the cache and
        queue the sampling of the first new token (:meth:`token_at` ``(0)``).

        A prompt of up to :attr:`STEP_PROMPT` tokens where a context is current (so steps
        are replayed graphs) goes through the step, one position per replay, each step
        taking the prompt's next token instead of a sampled one; a longer one (or one
        without a context) runs in one batched pass.
        """
        ids = self.lm._check_tokens(ids, 0)
        self.drain()
        self._stream = self._current_stream()
        self._rng = rng if temperature > 0 else None
        self.n.fill(0)
        self.temperature.fill(temperature)
        self.issued = 0
        self._feed()
        if len(ids) <= self.STEP_PROMPT and current_context() is not None:
            self.prompt[: len(ids)] = self.lm.xp.asarray(np.asarray(ids, dtype=np.int64))
            self.prompt_len.fill(len(ids))
            self.token.fill(ids[0])
            self.pos.fill(0)
            self._at = 0
            for _ in ids:  # the last one samples the first new token
                self.advance()
        else:
            self.logits[...] = self.prefill(ids)
            self.prompt_len.fill(0)
            self.pos.fill(len(ids) - 1)  # sampling moves it on to the first new token's place
            self._sample()
            self._at = len(ids)
        self._mark()

    def next(self) -> None:
        """Queue the step that samples the generation's next token."""
        stream = self._current_stream()
        if stream != self._stream:  # resumed elsewhere: the queued steps must finish first
            self.drain()
            self._stream = stream
        self._feed()
        self.advance()
        self._mark()

    def token_at(self, k: int) -> int:
        """Token ``k`` of this generation (queued already); blocks this thread until the
        device has sampled it."""
        if not 0 <= k < self.issued or k < self.issued - len(self._marks):
            raise ValueError(f"token {k} is not among the ones queued last")
        mark = self._marks[k % len(self._marks)]
        if mark is not None:
            mark.synchronize()
        return int(self.tokens[k % len(self.tokens)])

    def drain(self) -> None:
        """Wait for every step queued so far."""
        if self.issued:
            mark = self._marks[(self.issued - 1) % len(self._marks)]
            if mark is not None:
                mark.synchronize()

    def _feed(self) -> None:
        """Upload sampling noise when the next token starts a new block of it (drawn from
        the generation's NumPy generator in the order the host's sampler draws it)."""
        if self._rng is not None and self.issued % self.NOISE_ROWS == 0:
            rows = self._rng.gumbel(size=(self.NOISE_ROWS, VOCAB_SIZE))
            self.noise[...] = self.lm.xp.asarray(rows)  # after the steps that read the last

    def _current_stream(self) -> int:
        """The stream steps go to now (CuPy's current one; 0 where work is synchronous)."""
        return int(self.lm.xp.cuda.get_current_stream().ptr) if self._cuda else 0

    def _mark(self) -> None:
        """Note where token ``issued`` will be ready (a CUDA event; nothing elsewhere: the
        array work is done once it is queued)."""
        if self._cuda:
            slot = self.issued % len(self._marks)
            if self._marks[slot] is None:
                self._marks[slot] = self.lm.xp.cuda.Event(disable_timing=True)
            self._marks[slot].record()  # on the current stream, where the step went
        self.issued += 1

    # -------------------------------------------------------------- steps
    def advance(self) -> None:
        """:meth:`run`, replayed from a CUDA graph after the first time.

        Like :meth:`run` it samples the next token into ``token`` and moves ``pos`` on, so
        calling it again continues the sequence. The first step runs normally (it compiles
        kernels and warms the pools); after that each bucket's step is captured where a
        pygpukit context is current (:func:`pygpukit.capture_graph`) and replayed with one
        launch. Without a context every step runs normally.

        :raises ValueError: the sequence is full (``pos`` reached ``max_len``)
        """
        if self._at >= self.lm.config.max_len:
            raise ValueError(f"the sequence is full (max_len={self.lm.config.max_len})")
        rows = self.bucket(self._at)
        self._at += 1  # the step samples the next token and moves pos on
        if current_context() is not None:  # else set() wrote on a stream graphs don't use
            graph = self._graphs.get(rows)
            if graph is None and self._runs >= 1:
                # the step owns its graphs: they hold it weakly, so dropping it frees it
                graph = self._graphs[rows] = capture_graph(_replay, weakref.ref(self), rows)
            if graph is not None:
                graph.launch()  # on the current context's stream, where set() wrote
                return
        self.run(rows)
        self._runs += 1

    def close(self) -> None:
        """Wait for the queued steps, then free the captured graphs and their buffers (the
        cache stays until this is dropped). Close (or :meth:`drain`) a step with queued
        work before dropping it: its kernels write into its pinned :attr:`tokens`."""
        self.drain()
        for graph in self._graphs.values():
            graph.close()
        self._graphs.clear()

    def run(self, rows: int | None = None) -> None:
        """One step: append ``token`` at ``pos`` to the cache, logits into :attr:`logits`,
        then sample the next token.

        Attention covers the first ``rows`` cache rows (all of them by default); ``pos``
        must be below ``rows``.
        """
        lm = self.lm
        xp, c, p = lm.xp, lm.config, lm.params
        rows = c.max_len if rows is None else rows
        x = embed_row(xp, p["tok_emb"], p["pos_emb"], self.token, self.pos)
        for i, prefix in enumerate(lm._iter_blocks(c.n_layers)):
            kv = (self.cache.keys[i], self.cache.values[i])
            x = decode_block(xp, p, prefix, x, kv, self.pos, rows)
        x = layer_norm_row(xp, x, p["ln_f.g"], p["ln_f.b"])
        vecmat_t(xp, x, p["tok_emb"], out=self.logits)
        self._sample()

    def _sample(self) -> None:
        sample_row(
            self.lm.xp,
            self.logits,
            self.noise,
            self.temperature,
            self.token,
            self.pos,
            self.n,
            self.prompt,
            self.prompt_len,
            self.tokens,
            BOS,
        )


def _replay(step: weakref.ref[FixedStep], rows: int) -> None:
    """The work a step's graph captures (and, on the host backend, runs on every launch):
    :meth:`FixedStep.run` of ``step``, which owns the graph and so is alive when launching
    it."""
    live = step()
    if live is not None:
        live.run(rows)


def _device_writable(xp: Any, n: int, cuda: bool) -> Any:
    """``n`` int32 of host memory the device can write (pinned under CuPy: with unified
    addressing a kernel writes it through its host address)."""
    if cuda:
        import cupyx

        out = cupyx.empty_pinned((n,), dtype=np.int32)
        out[...] = -1
        return out
    return np.full((n,), -1, dtype=np.int32)

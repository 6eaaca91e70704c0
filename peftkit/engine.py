"""The one decoder: continuous batching at decode-step granularity over one multi-slot model —
the server's, and evaluation's and `peftkit generate`'s through generation.py.

New requests are prefilled and join the running batch; finished ones leave. Each row carries its
adapter slot (-1 = base), so one forward per step serves every tenant in the batch. The KV cache
is one left-padded batch cache, rebuilt only when the batch changes.

Every request ends: with its answer, or with an error that fails that row alone (a bad prefill,
non-finite logits), or when its client went away (`cancel`) or its deadline passed, checked at
every step. Stopping the engine fails whatever is left, so no caller waits forever.
"""

import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from peftkit.between_steps import ModelThread
from peftkit.constrain import Grammars, RowGrammar
from peftkit.device import module_device
from peftkit.errors import PeftkitError
from peftkit.kv_batch import pack, unpack, unpadded, unpadded_mask
from peftkit.sampling import Sampling, sample, token_logprobs  # noqa: F401 (Sampling: re-exported)


class QueueFull(PeftkitError):
    """Too many waiting requests: HTTP 429."""


@dataclass
class Request:
    prompt_ids: list[int]
    slot: int
    sampling: Sampling
    on_delta: object = None  # callable(str) for streaming, called from the engine thread
    on_done: object = None  # callable(Request) when finished
    # filled in by the engine
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters already streamed
    finish_reason: str | None = None
    error: str | None = None
    t_submit: float = 0.0
    t_first: float | None = None
    generator: torch.Generator | None = None
    kv: list | None = None  # per layer (keys, values) of shape (kv_heads, length, head_dim)
    deadline: float | None = None  # perf_counter time after which it is aborted
    grammar: RowGrammar | None = None  # its structured output's state (Sampling.grammar)
    logprobs: list = field(default_factory=list)  # per output token (Sampling.logprobs)
    cancelled: bool = False  # set from any thread (client gone); the engine drops the row

    def cancel(self) -> None:
        self.cancelled = True


class Engine(ModelThread):
    def __init__(self, adapted, tokenizer, max_batch: int = 32, max_queue: int = 256,
                 max_len: int | None = None, timeout_s: float | None = None):
        super().__init__()
        self.adapted, self.tok = adapted, tokenizer
        self.model = adapted.model
        self.device = module_device(self.model)  # every tensor a step makes goes here
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_len = max_len or getattr(self.model.config, "max_position_embeddings", 2048)
        self.eos = {tokenizer.eos_token_id}
        self.grammars = Grammars(tokenizer, self.model.config.get_text_config().vocab_size)
        self.active: list[Request] = []
        self.cache: DynamicCache | None = None
        self.timeout_s = timeout_s  # per-request bound, submit to finish

    # -- public -------------------------------------------------------------------------------
    def submit(self, req: Request, admission: bool = True) -> Request:
        """Queue one request. `admission` applies `max_queue` (QueueFull: HTTP's 429, for
        clients that can retry); in-process work goes through `run_all` instead."""
        self.check(len(req.prompt_ids), req.sampling.max_tokens)
        if self._stop.is_set():
            raise QueueFull("the server is shutting down")
        if admission and self.waiting.qsize() >= self.max_queue:
            raise QueueFull(f"queue full ({self.max_queue} waiting)")
        req.t_submit = time.perf_counter()
        if self.timeout_s is not None:
            req.deadline = req.t_submit + self.timeout_s
        if req.sampling.seed is not None:
            try:
                req.generator = torch.Generator().manual_seed(req.sampling.seed)
            except (RuntimeError, OverflowError, TypeError):
                raise PeftkitError(f"seed: {req.sampling.seed} is not a 64-bit seed") from None
        self.waiting.put(req)
        self._wake.set()
        return req

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        """A request that can never be served: an empty prompt, or one over the context."""
        if prompt_tokens == 0:
            raise PeftkitError("prompt: empty (give at least one token of text)")
        if prompt_tokens >= self.max_len:
            raise PeftkitError(f"prompt: {prompt_tokens} tokens; the context is {self.max_len}")
        if prompt_tokens + max_tokens > self.max_len:
            raise PeftkitError(f"max_tokens: {max_tokens} + the prompt's {prompt_tokens} tokens "
                               f"exceed the {self.max_len}-token context")

    def prompt_logprobs(self, ids: list[int], slot: int, top: int) -> list[tuple]:
        """Each prompt token's log-probability after the ones before it, and the `top`
        likeliest there (completions' echo with logprobs): one forward of the prompt on
        `slot`, run between steps; the first token has none (its entry is (id, None, []))."""
        def forward():
            with torch.no_grad():
                logits = self.adapted(input_ids=torch.tensor([ids], device=self.device),
                                      slots=torch.tensor([slot], device=self.device)).logits[0]
            return [(ids[0], None, [])] + [token_logprobs(logits[i - 1], ids[i], top)
                                           for i in range(1, len(ids))]
        return self.between_steps(forward)

    def stop(self) -> None:
        self._halt()  # anything left ends now, so no client waits on a stopped engine
        for req in self._drain_waiting() + self.active:
            if req.finish_reason is None:
                self._fail(req, "the server is shutting down")
        self.active, self.cache = [], None

    def run_all(self, requests: list[Request]) -> list[Request]:
        """Answer every request, however many (evaluation, the demo, `compare`, benchmarks).

        They are fed to the queue as room frees up — at most one full batch waiting beside the
        running rows — so `max_queue`, the admission limit for HTTP clients, never applies to
        work the caller already holds, and HTTP clients keep their share of the queue. Every
        request is checked before any runs. Steps in this thread unless the engine's own
        thread is running, then waits on it. Returns `requests`, each finished."""
        for req in requests:
            self.check(len(req.prompt_ids), req.sampling.max_tokens)
        ended = threading.Semaphore(0)
        for req in requests:
            req.on_done = _then(req.on_done, lambda _r: ended.release())
        threaded = self.thread is not None and self.thread.is_alive()
        todo, running = list(reversed(requests)), 0
        while todo or running:
            while todo and self.waiting.qsize() < self.max_batch:
                self.submit(todo.pop(), admission=False)
                running += 1
            if threaded:
                if not ended.acquire(timeout=1.0):
                    continue
                running -= 1
            else:
                self.step()
            while ended.acquire(blocking=False):
                running -= 1
        return requests

    def run_until_idle(self) -> None:
        """Process everything submitted so far in this thread (tests, benchmarks)."""
        while not self.waiting.empty() or self.active:
            self.step()

    # -- the loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._between.run_pending()
            if self.waiting.empty() and not self.active:
                self._wake.wait(timeout=0.1)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as e:  # never let one bad step kill the server: fail its rows
                for req in self.active:
                    if req.finish_reason is None:
                        self._fail(req, f"engine error: {type(e).__name__}: {e}")
                self.active, self.cache = [], None

    @torch.no_grad()
    def step(self) -> None:
        self._drop_ended()
        fresh = []
        while len(self.active) + len(fresh) < self.max_batch and not self.waiting.empty():
            req = self.waiting.get()
            if not self._ended(req):
                fresh.append(req)
        new = self._prefill_all(fresh)
        if new:
            if self.cache is not None:  # running rows take their KV back before the repack
                unpack(self.active, self.cache, self.pad)
            self.active += new
            self.cache = None
        if self.thread is threading.current_thread():
            self._between.run_pending()  # a second point per step where a cold load's copy can run
        if self.active:
            self._decode()

    def _ended(self, req: Request) -> bool:
        """Finish a cancelled or overdue request; True when it was."""
        if req.cancelled:
            self._finish(req, "abort")
        elif req.deadline is not None and time.perf_counter() > req.deadline:
            self._fail(req, f"request timed out after {self.timeout_s:g} s", "timeout")
        return req.finish_reason is not None

    def _drop_ended(self) -> None:
        """Rows whose client left or whose time ran out leave the batch before the next step."""
        ended = [r for r in self.active if self._ended(r)]
        if ended:
            if self.cache is not None:
                unpack(self.active, self.cache, self.pad)
            self.active = [r for r in self.active if r.finish_reason is None]
            self.cache = None

    def _drain_waiting(self) -> list[Request]:
        out = []
        while not self.waiting.empty():
            out.append(self.waiting.get())
        return out

    def _prefill_all(self, reqs: list[Request]) -> list[Request]:
        """Prefill the new requests together in one forward; if that fails, one at a time, so
        that a bad request fails alone. Returns those still running."""
        if len(reqs) > 1:
            try:
                logits = self._prefill(reqs)
            except Exception:  # found out below, request by request
                logits = None
            if logits is not None:
                self._accept_rows(reqs, logits)
                return [r for r in reqs if r.finish_reason is None]
        for req in reqs:
            try:
                logits = self._prefill([req])
            except Exception as e:  # this request's own fault (or bad luck): fail it alone
                self._fail(req, f"prefill failed: {type(e).__name__}: {e}")
                continue
            self._accept_rows([req], logits)
        return [r for r in reqs if r.finish_reason is None]

    def _prefill(self, reqs: list[Request]) -> torch.Tensor:
        """One forward over the prompts left-padded to the longest; each request keeps its own
        KV (padding stripped). Requests with the same prompt on the same slot (one request's n
        choices) share one row of it and its KV (never written in place: a repack makes new
        tensors). Returns the last position's logits per request."""
        row_of: dict[tuple, int] = {}  # (slot, prompt) -> its row in the forward
        unique, rows = [], []
        for r in reqs:
            key = (r.slot, tuple(r.prompt_ids))
            if key not in row_of:
                row_of[key] = len(unique)
                unique.append(r)
            rows.append(row_of[key])
        shared, reqs = reqs, unique
        width = max(len(r.prompt_ids) for r in reqs)
        pad = [width - len(r.prompt_ids) for r in reqs]
        fill = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        on = {"device": self.device}
        ids = torch.tensor([[fill] * p + r.prompt_ids for r, p in zip(reqs, pad)], **on)
        mask = unpadded_mask(torch.tensor(pad, **on).unsqueeze(1), width)
        cache = DynamicCache(config=self.model.config)
        with self._lock:
            out = self.adapted(input_ids=ids, attention_mask=mask,
                               position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                               slots=torch.tensor([r.slot for r in reqs], **on),
                               past_key_values=cache, use_cache=True, logits_to_keep=1)
        v = cache.get_seq_length() - width  # prompt/prefix tuning's virtual positions lead
        for i, (req, p) in enumerate(zip(reqs, pad)):
            req.kv = [(unpadded(layer.keys[i], v, p), unpadded(layer.values[i], v, p))
                      for layer in cache.layers]
        for r, k in zip(shared, rows):
            r.kv = reqs[k].kv
        return out.logits[:, -1][torch.tensor(rows, **on)]

    def _decode(self) -> None:
        rows = self.active
        if self.cache is None:
            self.cache, self.pad = pack(rows, self.model.config)
        width = self.cache.get_seq_length()
        on = {"device": self.device}
        last = torch.tensor([[r.out_ids[-1]] for r in rows], **on)
        pad = torch.tensor(self.pad, **on).unsqueeze(1)
        mask = unpadded_mask(pad, width + 1)
        # each row's next position is its own cache length, which counts a prompt-tuned
        # adapter's virtual tokens (or a prefix) as well as the prompt and the answer so far
        positions = width - pad
        with self._lock:
            out = self.adapted(input_ids=last, attention_mask=mask, position_ids=positions,
                               slots=torch.tensor([r.slot for r in rows], **on),
                               past_key_values=self.cache, use_cache=True)
        self._accept_rows(rows, out.logits[:, -1])
        if any(r.finish_reason for r in rows):
            unpack(rows, self.cache, self.pad)
            self.active = [r for r in rows if r.finish_reason is None]
            self.cache = None

    # -- sampling and stopping ----------------------------------------------------------------
    def _accept_rows(self, rows: list[Request], logits: torch.Tensor) -> None:
        finite = torch.isfinite(logits).all(-1).tolist()  # one check (one sync) per forward
        for i, req in enumerate(rows):
            self._accept(req, logits[i], finite[i])

    def _accept(self, req: Request, logits: torch.Tensor, finite: bool) -> None:
        if not finite:
            return self._fail(req, "the model produced non-finite logits for this request")
        try:
            if req.sampling.grammar is not None and req.grammar is None:
                req.grammar = self.grammars.start(req.sampling.grammar)
            allowed = None if req.grammar is None else req.grammar.allowed()
            token = sample(req.sampling, logits, req.generator, allowed, req.out_ids)
            if req.grammar is not None and token not in self.eos:
                req.grammar.take(token)
        except (RuntimeError, PeftkitError) as e:
            return self._fail(req, f"sampling failed: {e}")
        if req.t_first is None:
            req.t_first = time.perf_counter()
        if token in self.eos:
            return self._finish(req, "stop")
        if req.sampling.logprobs is not None:
            req.logprobs.append(token_logprobs(logits, token, req.sampling.logprobs))
        req.out_ids.append(token)
        req.text = self.tok.decode(req.out_ids, skip_special_tokens=True)
        s = req.sampling
        for stop in s.stop:
            at = req.text.find(stop)
            if at >= 0:
                req.text = req.text[:at]
                return self._finish(req, "stop")
        if req.grammar is not None and req.grammar.complete:  # whole: nothing may follow
            return self._finish(req, "stop")
        if len(req.out_ids) >= s.max_tokens:
            return self._finish(req, "length")
        if len(req.prompt_ids) + len(req.out_ids) >= self.max_len:
            return self._finish(req, "length")
        # Hold back what could still become a stop string or an unfinished character.
        hold = max((len(x) for x in s.stop), default=1) - 1
        ready = len(req.text) - hold
        if req.text.endswith("\ufffd"):
            ready = min(ready, len(req.text) - 1)
        self._emit(req, ready)

    def _emit(self, req: Request, upto: int) -> None:
        if req.on_delta is not None and upto > req.sent:
            req.on_delta(req.text[req.sent:upto])
            req.sent = upto

    def _fail(self, req: Request, message: str, reason: str = "error") -> None:
        req.error = message
        self._finish(req, reason)

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        self._emit(req, len(req.text))
        if req.on_done is not None:
            req.on_done(req)


def _then(first, second):
    """Call `first` (if any), then `second`, with the same argument."""
    def both(arg):
        if first is not None:
            first(arg)
        second(arg)
    return both

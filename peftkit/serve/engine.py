"""The serving engine: continuous batching at decode-step granularity over one multi-slot model.

New requests are prefilled and join the running batch; finished ones leave. Each row carries its
adapter slot (-1 = base), so one forward per step serves every tenant in the batch. The KV cache
is one left-padded batch cache, rebuilt only when the batch changes.
"""

import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from peftkit.errors import PeftkitError


class QueueFull(PeftkitError):
    """Too many waiting requests: HTTP 429."""


@dataclass
class Sampling:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


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


class Engine:
    def __init__(self, adapted, tokenizer, max_batch: int = 32, max_queue: int = 256,
                 max_len: int | None = None, on_finish=lambda req: None):
        self.adapted, self.tok = adapted, tokenizer
        self.model = adapted.model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_len = max_len or getattr(self.model.config, "max_position_embeddings", 2048)
        self.eos = {tokenizer.eos_token_id}
        self.lock = threading.Lock()  # held during each forward; adapter writes take it too
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.active: list[Request] = []
        self.cache: DynamicCache | None = None
        self.on_finish = on_finish
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.thread: threading.Thread | None = None
        self.steps = 0

    # -- public -------------------------------------------------------------------------------
    def submit(self, req: Request) -> Request:
        if len(req.prompt_ids) >= self.max_len:
            raise PeftkitError(f"prompt is {len(req.prompt_ids)} tokens; the context is "
                               f"{self.max_len}")
        if self.waiting.qsize() >= self.max_queue:
            raise QueueFull(f"queue full ({self.max_queue} waiting)")
        req.t_submit = time.perf_counter()
        if req.sampling.seed is not None:
            req.generator = torch.Generator().manual_seed(req.sampling.seed)
        self.waiting.put(req)
        self._wake.set()
        return req

    def queue_depth(self) -> int:
        return self.waiting.qsize()

    def start(self) -> "Engine":
        self.thread = threading.Thread(target=self._run, name="peftkit-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self.thread:
            self.thread.join(timeout=10)

    def run_until_idle(self) -> None:
        """Process everything submitted so far in this thread (tests, benchmarks)."""
        while not self.waiting.empty() or self.active:
            self.step()

    # -- the loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            if self.waiting.empty() and not self.active:
                self._wake.wait(timeout=0.1)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as e:  # never let one bad step kill the server: fail its rows
                for req in self.active:
                    req.error = f"engine error: {e}"
                    self._finish(req, "error")
                self.active, self.cache = [], None

    @torch.no_grad()
    def step(self) -> None:
        new = []
        while len(self.active) + len(new) < self.max_batch and not self.waiting.empty():
            req = self.waiting.get()
            self._prefill(req)
            if req.finish_reason is None:
                new.append(req)
        if new:
            if self.cache is not None:  # running rows take their KV back before the repack
                self._unpack(self.active)
            self.active += new
            self.cache = None
        if self.active:
            self._decode()
        self.steps += 1

    def _prefill(self, req: Request) -> None:
        cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([req.prompt_ids])
        with self.lock:
            out = self.adapted(input_ids=ids, slots=torch.tensor([req.slot]),
                               past_key_values=cache, use_cache=True)
        req.kv = [(layer.keys[0], layer.values[0]) for layer in cache.layers]
        self._accept(req, out.logits[0, -1])

    def _decode(self) -> None:
        rows = self.active
        if self.cache is None:
            self.cache, self.pad = self._pack(rows)
        width = self.cache.get_seq_length()
        last = torch.tensor([[r.out_ids[-1]] for r in rows])
        mask = torch.ones(len(rows), width + 1, dtype=torch.long)
        for i, p in enumerate(self.pad):
            mask[i, :p] = 0
        positions = torch.tensor([[len(r.prompt_ids) + len(r.out_ids) - 1] for r in rows])
        with self.lock:
            out = self.adapted(input_ids=last, attention_mask=mask, position_ids=positions,
                               slots=torch.tensor([r.slot for r in rows]),
                               past_key_values=self.cache, use_cache=True)
        for i, req in enumerate(rows):
            self._accept(req, out.logits[i, -1])
        if any(r.finish_reason for r in rows):
            self._unpack(rows)
            self.active = [r for r in rows if r.finish_reason is None]
            self.cache = None

    def _pack(self, rows: list[Request]):
        """One left-padded cache for the batch from each row's own KV."""
        width = max(r.kv[0][0].shape[1] for r in rows)
        pad = [width - r.kv[0][0].shape[1] for r in rows]
        cache = DynamicCache(config=self.model.config)
        for layer in range(len(rows[0].kv)):
            keys = torch.stack([torch.nn.functional.pad(r.kv[layer][0], (0, 0, p, 0))
                                for r, p in zip(rows, pad)])
            values = torch.stack([torch.nn.functional.pad(r.kv[layer][1], (0, 0, p, 0))
                                  for r, p in zip(rows, pad)])
            cache.update(keys, values, layer)
        return cache, pad

    def _unpack(self, rows: list[Request]) -> None:
        """Give each surviving row back its own KV (padding stripped) before a repack."""
        for i, req in enumerate(rows):
            if req.finish_reason is None:
                req.kv = [(layer.keys[i, :, self.pad[i]:], layer.values[i, :, self.pad[i]:])
                          for layer in self.cache.layers]
            else:
                req.kv = None

    # -- sampling and stopping ----------------------------------------------------------------
    def _accept(self, req: Request, logits: torch.Tensor) -> None:
        token = self._sample(req, logits)
        if req.t_first is None:
            req.t_first = time.perf_counter()
        if token in self.eos:
            return self._finish(req, "stop")
        req.out_ids.append(token)
        req.text = self.tok.decode(req.out_ids, skip_special_tokens=True)
        s = req.sampling
        for stop in s.stop:
            at = req.text.find(stop)
            if at >= 0:
                req.text = req.text[:at]
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

    def _sample(self, req: Request, logits: torch.Tensor) -> int:
        s = req.sampling
        if s.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < s.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=req.generator))

    def _emit(self, req: Request, upto: int) -> None:
        if req.on_delta is not None and upto > req.sent:
            req.on_delta(req.text[req.sent:upto])
            req.sent = upto

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        self._emit(req, len(req.text))
        self.on_finish(req)
        if req.on_done is not None:
            req.on_done(req)

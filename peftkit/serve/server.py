"""One base loaded once, a pool of adapter slots, the engine and the store: a `Server`."""

import threading
from collections import Counter

import torch

from peftkit.data import chat_ids
from peftkit.data.templates import chat_template
from peftkit.device import placement, resolve_dtype
from peftkit.engine import Engine, Request, Sampling
from peftkit.errors import PeftkitError
from peftkit.methods import LoraConfig, add_adapter
from peftkit.models import load_base
from peftkit.quant import QuantConfig
from peftkit.serve.config import ServeConfig
from peftkit.serve.metrics import Metrics
from peftkit.serve.store import AdapterStore
from peftkit.serve.tenancy import Tenancy


class TenantBusy(PeftkitError):
    """This tenant already has its limit of requests queued or running: HTTP 429."""


class Server:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        device, dtype, attn = placement(cfg.device, cfg.dtype, cfg.attn)
        template = chat_template(cfg.chat_template) if cfg.chat_template else None
        if cfg.quantize not in (None, "nf4"):
            raise PeftkitError(f"--quantize: only nf4 is supported, got '{cfg.quantize}'")
        quant = QuantConfig(compute_dtype="bfloat16" if dtype == torch.bfloat16 else "float32") \
            if cfg.quantize == "nf4" else None
        self.base = load_base(cfg.base, task="causal-lm", quantize=quant, device=device,
                              dtype=dtype, attn=attn)
        if template is not None:
            self.base.tokenizer.chat_template = template
        self.name = cfg.base
        # All slots empty (identity) until an adapter is written into one.
        self.adapted = add_adapter(self.base.model, LoraConfig(r=cfg.max_rank, targets=cfg.targets),
                                   slots=cfg.max_loaded, init=False).eval()
        slot_dtype = dtype if cfg.adapter_dtype == "auto" else resolve_dtype(
            cfg.adapter_dtype, device, flag="--adapter-dtype")
        for layer in self.adapted.adapted_layers().values():
            layer.hold_slots_in(slot_dtype)
        self.metrics = Metrics()
        self.engine = Engine(self.adapted, self.base.tokenizer, cfg.max_batch, cfg.max_queue,
                             on_finish=self._finished, timeout_s=cfg.request_timeout_s)
        self.store = AdapterStore(cfg.adapters, self.adapted, self.engine.lock,
                                  cfg.max_adapter_mb * 2**20, on_event=self.metrics.store_event,
                                  host_bytes=cfg.host_cache_mb * 2**20)
        self.tenancy = Tenancy(cfg.api_keys)
        self.inflight: Counter = Counter()  # tenant -> requests admitted and not yet finished
        self._inflight_lock = threading.Lock()
        for adapter_id in cfg.preload:
            self.store.load(adapter_id, pin=True)

    def start(self) -> "Server":
        self.engine.start()
        return self

    def stop(self) -> None:
        self.engine.stop()

    # -- requests -----------------------------------------------------------------------------
    def prompt_ids(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        """Token ids of a completion prompt or a chat; text that is not valid Unicode (a lone
        surrogate from a JSON escape) is the caller's error, not a tokenizer crash."""
        tok = self.base.tokenizer
        texts = [prompt] if messages is None else [m["content"] for m in messages]
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                field = "prompt" if messages is None else "messages"
                raise PeftkitError(f"{field}: not valid Unicode (lone surrogate at "
                                   f"character {e.start})") from None
        if messages is not None:
            return chat_ids(messages, tok)
        return tok(prompt).input_ids

    def admit(self, tenant: str | None) -> None:
        """Count a tenant's request in; TenantBusy past --tenant-max-inflight, so one tenant
        flooding the queue cannot starve the others. Every admit is matched by one `leave`
        (when the request ends, or when it fails before reaching the engine)."""
        limit = self.cfg.tenant_max_inflight
        with self._inflight_lock:
            if limit and tenant is not None and self.inflight[tenant] >= limit:
                raise TenantBusy(f"tenant '{tenant}' has {limit} requests in flight (the limit); "
                                 "retry when one ends")
            self.inflight[tenant] += 1

    def leave(self, tenant: str | None) -> None:
        with self._inflight_lock:
            self.inflight[tenant] -= 1
            if self.inflight[tenant] <= 0:
                del self.inflight[tenant]

    def slot_for(self, model: str) -> int:
        """-1 for the base, else the adapter's slot, loaded when needed and held until the
        request ends. Raises AdapterNotFound / AdapterInvalid / StoreFull."""
        return -1 if model in ("", self.name) else self.store.acquire(model)

    def submit(self, model: str, ids: list[int], sampling: Sampling, loop=None, sink=None,
               slot: int | None = None, tenant: str | None = None, admitted: bool = False,
               stream: bool = False, tag: int = 0) -> Request:
        """Queue a request; `sink` (an asyncio.Queue on `loop`) receives (tag, the finished
        Request), preceded by (tag, text delta) items when `stream`. Takes `slot` from `slot_for` (acquired here when
        not given); the slot is released when the request ends, or here when it cannot be
        queued. An `admitted` tenant (see `admit`) leaves when the request ends."""
        slot = self.slot_for(model) if slot is None else slot
        put = None if sink is None else (
            lambda item: loop.call_soon_threadsafe(sink.put_nowait, (tag, item)))
        req = Request(ids, slot, sampling, on_delta=put if stream else None, on_done=put,
                      model=model or self.name)
        req.tenant, req.admitted = tenant, admitted
        try:
            return self.engine.submit(req)
        except PeftkitError:
            if slot >= 0:
                self.store.release(slot)
            raise

    def _finished(self, req: Request) -> None:
        if req.slot >= 0:
            self.store.release(req.slot)
        if req.admitted:
            self.leave(req.tenant)
        model = req.model or self.name
        self.metrics.requests.labels(model, req.finish_reason or "error").inc()
        self.metrics.tokens.labels(model).inc(len(req.out_ids))
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        if req.t_first is not None:
            self.metrics.ttft.observe(req.t_first - req.t_submit)


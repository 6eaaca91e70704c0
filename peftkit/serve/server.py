"""One base loaded once, a pool of adapter slots, the engine and the store: a `Server`."""

from dataclasses import dataclass

from peftkit.data import chat_prompt
from peftkit.errors import PeftkitError
from peftkit.methods import LoraConfig, add_adapter
from peftkit.models import load_base
from peftkit.quant import QuantConfig
from peftkit.serve.engine import Engine, Request, Sampling
from peftkit.serve.metrics import Metrics
from peftkit.serve.store import AdapterStore
from peftkit.serve.tenancy import Tenancy


@dataclass
class ServeConfig:
    base: str = "smollm2-135m"
    adapters: str = "adapters"
    quantize: str | None = None  # "nf4"
    max_loaded: int = 8  # adapter slots resident at once
    max_rank: int = 16  # the slot stack's rank; lower-rank adapters are zero-padded
    max_adapter_mb: float = 512.0  # bytes bound of the LRU cache, all loaded adapters together
    preload: tuple[str, ...] = ()  # loaded and pinned at start
    api_keys: str | None = None
    max_batch: int = 32
    max_queue: int = 256
    targets: str = "all-linear"  # modules that adapters may target


class Server:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        quant = QuantConfig() if cfg.quantize == "nf4" else None
        if cfg.quantize not in (None, "nf4"):
            raise PeftkitError(f"--quantize: only nf4 is supported, got '{cfg.quantize}'")
        self.base = load_base(cfg.base, task="causal-lm", quantize=quant)
        self.name = cfg.base
        # All slots empty (identity) until an adapter is written into one.
        self.adapted = add_adapter(self.base.model, LoraConfig(r=cfg.max_rank, targets=cfg.targets),
                                   slots=cfg.max_loaded, init=False).eval()
        self.metrics = Metrics()
        self.engine = Engine(self.adapted, self.base.tokenizer, cfg.max_batch, cfg.max_queue,
                             on_finish=self._finished)
        self.store = AdapterStore(cfg.adapters, self.adapted, self.engine.lock,
                                  cfg.max_adapter_mb * 2**20, on_event=self.metrics.store_event)
        self.tenancy = Tenancy(cfg.api_keys)
        for adapter_id in cfg.preload:
            self.store.load(adapter_id, pin=True)

    def start(self) -> "Server":
        self.engine.start()
        return self

    def stop(self) -> None:
        self.engine.stop()

    # -- requests -----------------------------------------------------------------------------
    def prompt_ids(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        tok = self.base.tokenizer
        if messages is not None:
            return tok(chat_prompt(messages, tok), add_special_tokens=False).input_ids
        return tok(prompt).input_ids

    def submit(self, model: str, ids: list[int], sampling: Sampling, loop, sink) -> Request:
        """Queue a request; `sink` (an asyncio.Queue on `loop`) receives text deltas, then the
        finished Request. Raises AdapterNotFound / AdapterInvalid / StoreFull / QueueFull."""
        slot = -1 if model in ("", self.name) else self.store.acquire(model)
        put = lambda item: loop.call_soon_threadsafe(sink.put_nowait, item)  # noqa: E731
        req = Request(ids, slot, sampling, on_delta=put, on_done=put)
        req.model = model or self.name
        try:
            return self.engine.submit(req)
        except PeftkitError:
            if slot >= 0:
                self.store.release(slot)
            raise

    def _finished(self, req: Request) -> None:
        if req.slot >= 0:
            self.store.release(req.slot)
        model = getattr(req, "model", self.name)
        self.metrics.requests.labels(model, req.finish_reason or "error").inc()
        self.metrics.tokens.labels(model).inc(len(req.out_ids))
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        if req.t_first is not None:
            self.metrics.ttft.observe(req.t_first - req.t_submit)


def generate_direct(server: Server, model: str, prompt_ids: list[int], sampling: Sampling) -> Request:
    """Run one request to completion in the calling thread (no HTTP; tests and benchmarks)."""
    slot = -1 if model in ("", server.name) else server.store.acquire(model)
    req = server.engine.submit(Request(prompt_ids, slot, sampling))
    server.engine.run_until_idle()  # the engine's on_finish releases the slot
    return req

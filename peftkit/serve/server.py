"""One base loaded once, a pool of adapter slots, the engine and the store: a `Server`."""

import torch
from jinja2 import TemplateError

from peftkit.classify_engine import ClassifyEngine
from peftkit.data import chat_ids
from peftkit.data.templates import chat_template
from peftkit.device import placement, resolve_dtype
from peftkit.engine import Engine, Request, Sampling
from peftkit.errors import PeftkitError
from peftkit.methods import LoraConfig, add_adapter
from peftkit.models import NotGenerative, load_base
from peftkit.quant import QuantConfig
from peftkit.serve.config import ServeConfig
from peftkit.serve.metrics import Metrics
from peftkit.serve.store import AdapterStore
from peftkit.serve.tenancy import Tenancy
from peftkit.serve.tickets import Admission, Ticket
from peftkit.serve.tools import renders_tool_calls, takes_tools


def valid_text(text: str, field: str) -> None:
    """Text that is not valid Unicode (a lone surrogate from a JSON escape) is the caller's
    error, named by its field, not a tokenizer crash."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PeftkitError(f"{field}: not valid Unicode (lone surrogate at character "
                           f"{e.start})") from None


class Server:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        device, dtype, attn = placement(cfg.device, cfg.dtype, cfg.attn)
        template = chat_template(cfg.chat_template) if cfg.chat_template else None
        if cfg.quantize not in (None, "nf4"):
            raise PeftkitError(f"--quantize: only nf4 is supported, got '{cfg.quantize}'")
        quant = QuantConfig(compute_dtype="bfloat16" if dtype == torch.bfloat16 else "float32") \
            if cfg.quantize == "nf4" else None
        self.task = cfg.task
        # a classify server's backbone is the base's body (an encoder, or a decoder without its
        # LM head), as `train --task classify` trained on it
        try:
            self.base = load_base(cfg.base, task="encoder" if cfg.task == "classify" else
                                  "causal-lm", quantize=quant, device=device, dtype=dtype,
                                  attn=attn)
        except NotGenerative:
            raise PeftkitError(f"--base {cfg.base}: an encoder does not generate; it serves "
                               "`train --task classify` runs with --task classify") from None
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
        if cfg.task == "classify":
            self.engine = ClassifyEngine(self.adapted, self.base.tokenizer, cfg.max_batch,
                                         cfg.max_queue)
        else:
            self.engine = Engine(self.adapted, self.base.tokenizer, cfg.max_batch,
                                 cfg.max_queue, timeout_s=cfg.request_timeout_s)
        self.store = AdapterStore(cfg.adapters, self.adapted, self.engine.between_steps,
                                  cfg.max_adapter_mb * 2**20, on_event=self.metrics.store_event,
                                  host_bytes=cfg.host_cache_mb * 2**20, task=cfg.task)
        self.tenancy = Tenancy(cfg.api_keys)
        self.admission = Admission(self.store, self.name, cfg.tenant_max_inflight)
        for adapter_id in cfg.preload:
            self.store.load(adapter_id, pin=True)

    def start(self) -> "Server":
        self.engine.start()
        return self

    def stop(self) -> None:
        self.engine.stop()

    # -- requests -----------------------------------------------------------------------------
    def prompt_ids(self, prompt: str | None = None, messages: list[dict] | None = None,
                   tools: list[dict] | None = None) -> list[int]:
        """Token ids of a completion prompt or a chat (with the `tools` it offers, where the
        chat template renders them); text that is not valid Unicode (a lone surrogate from a
        JSON escape), tool calls the template cannot render, or a template's own refusal is
        the caller's error, not a crash."""
        tok = self.base.tokenizer
        texts = [prompt] if messages is None else [m.get("content") or "" for m in messages]
        for text in texts:
            valid_text(text, "prompt" if messages is None else "messages")
        if messages is None:
            return tok(prompt).input_ids
        template = getattr(tok, "chat_template", None)
        if any(m.get("tool_calls") for m in messages) and not renders_tool_calls(template):
            raise PeftkitError("messages: this model's chat template does not render an "
                               "assistant turn's tool_calls")
        try:
            return chat_ids(messages, tok, tools if takes_tools(template) else None)
        except (TemplateError, TypeError, ValueError) as e:
            raise PeftkitError(f"messages: the chat template refused them ({str(e)[:160]})") \
                from None

    def admit(self, model: str, tenant: str | None = None, rows: int = 1,
              on_base: bool = False) -> list[Ticket]:
        """`rows` tickets for a request to `model` (see tickets.py); TenantBusy past the
        tenant's --tenant-max-inflight."""
        return self.admission.admit(model, tenant, rows, on_base)

    def request(self, model: str, ids: list[int], sampling: Sampling,
                ticket: Ticket | None = None, on_delta=None, on_done=None) -> Request:
        """An engine request for `model` (the base: "" or its name) that owns `ticket` (a new
        one, no tenant, when not given): the slot is taken here (AdapterNotFound /
        AdapterInvalid / StoreFull, the ticket then closed) and given back when it ends."""
        ticket = ticket or self.admit(model)[0]
        try:
            slot = ticket.take_slot()
        except BaseException:
            ticket.close()
            raise

        def done(req: Request) -> None:
            ticket.close()
            self._record(ticket.model, req)
            if on_done is not None:
                on_done(req)
        return Request(ids, slot, sampling, on_delta=on_delta, on_done=done)

    def submit(self, model: str, ids: list[int], sampling: Sampling, loop=None, sink=None,
               ticket: Ticket | None = None, stream: bool = False, tag: int = 0) -> Request:
        """`request`, queued; `sink` (an asyncio.Queue on `loop`) receives (tag, the finished
        Request), preceded by (tag, text delta) items when `stream`. A request the engine
        refuses closes its ticket here."""
        put = None if sink is None else (
            lambda item: loop.call_soon_threadsafe(sink.put_nowait, (tag, item)))
        ticket = ticket or self.admit(model)[0]
        req = self.request(model, ids, sampling, ticket, on_delta=put if stream else None,
                           on_done=put)
        try:
            return self.engine.submit(req)
        except PeftkitError:
            ticket.close()
            raise

    def _record(self, model: str, req: Request) -> None:
        self.metrics.requests.labels(model, req.finish_reason or "error").inc()
        self.metrics.tokens.labels(model).inc(len(req.out_ids))
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        if req.t_first is not None:
            self.metrics.ttft.observe(req.t_first - req.t_submit)


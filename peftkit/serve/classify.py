"""`POST /v1/classify` (and vLLM's `/classify`): a `--task classify` server's requests. Each
names a `peftkit train --task classify` run in the adapters directory (LoRA adapter + head, or a
probe's head on the bare backbone) and gives one text or a list; every text is a row of the
engine's shared batch (rows of other tenants' classifiers beside it), answered in vLLM's
pooling shape: per text its label, the probabilities of every label, and their count."""

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from peftkit.classify_engine import ClassifyRow
from peftkit.errors import PeftkitError
from peftkit.formats import CONFIG_NAME, adapter_dir
from peftkit.serve.api import ApiError, ClassifyBody, api_error
from peftkit.serve.server import valid_text
from peftkit.serve.store import CLASSIFY, AdapterInvalid, run_task
from peftkit.train.heads import POOLINGS, Head
from peftkit.train.run_dir import HEAD

def served(store, task: str) -> list[str]:
    """The ids of `store` a server of `task` answers for (links out of its root not listed)."""
    return sorted(name for name, p in store.directories() if run_task(p) == task)


@dataclass
class Classifier:
    """A classify run as served: its head (on the engine's device), labels, pooling."""
    head: Head
    labels: list[str]
    pooling: str
    has_adapter: bool


class Heads:
    """Each classify run's head, read on first use and again when its files change (a run
    rewritten under the same id is served with its new head)."""

    def __init__(self, store, device, width: int):
        self.store, self.device, self.width = store, device, width  # width: hidden size
        self.cache: dict[str, tuple[tuple, Classifier]] = {}
        self.lock = threading.Lock()

    def get(self, adapter_id: str) -> Classifier:
        path = self.store.run_dir(adapter_id)  # AdapterNotFound for anything not under root
        if run_task(path) != CLASSIFY:
            raise AdapterInvalid(f"'{adapter_id}' is not a classifier (a `peftkit train --task "
                                 "classify` run, with head.json): it is served by /v1/completions "
                                 "of a server started without --task classify")
        try:
            stamp = tuple((f.stat().st_mtime_ns, f.stat().st_size)
                          for f in (path / HEAD, path / "head.safetensors"))
        except OSError:
            raise AdapterInvalid(f"classifier '{adapter_id}' cannot be served: its head "
                                 "does not load (head.safetensors missing)") from None
        with self.lock:
            hit = self.cache.get(adapter_id)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        try:  # files from disk, any of them broken: refused by name, never a traceback
            head, meta = Head.load(path, self.device)
            found = Classifier(head.eval(), [str(x) for x in meta["labels"]],
                               str(meta["pooling"]), (adapter_dir(path) / CONFIG_NAME).is_file())
        except Exception as e:  # noqa: BLE001
            raise AdapterInvalid(f"classifier '{adapter_id}' cannot be served: its head "
                                 f"does not load ({type(e).__name__})") from None
        # checked here, or the shared batch it joins would fail for every tenant in it
        if head.d_in != self.width or head.d_out != len(found.labels) or \
                found.pooling not in POOLINGS:
            raise AdapterInvalid(f"classifier '{adapter_id}' cannot be served: its head reads "
                                 f"{head.d_in} features into {head.d_out} labels "
                                 f"({len(found.labels)} named, pooling '{found.pooling[:20]}'); "
                                 f"this backbone gives {self.width}")
        with self.lock:
            self.cache[adapter_id] = (stamp, found)
        return found


class Classify:
    def __init__(self, server, completions):
        self.server, self.completions = server, completions  # completions: its take_slot
        self.heads = Heads(server.store, server.engine.device,
                           server.base.model.config.hidden_size)

    async def handle(self, who, model: str, body: ClassifyBody) -> dict:
        server, engine = self.server, self.server.engine
        texts = [body.input] if isinstance(body.input, str) else body.input
        if len(texts) > server.cfg.max_queue:
            raise ApiError(400, f"input: {len(texts)} texts, over this server's --max-queue "
                                f"{server.cfg.max_queue}", param="input")
        try:
            run = await run_in_threadpool(self.heads.get, model)
            ids = await run_in_threadpool(self._tokenize, texts)
            tickets = server.admit(model, who.tenant, 1, on_base=not run.has_adapter)
        except PeftkitError as e:
            raise api_error(e, model) from None
        ticket, rows = tickets[0], []
        try:
            await self.completions.take_slot(ticket)
            loop, left = asyncio.get_running_loop(), asyncio.Event()
            pending = [len(ids)]

            def done(_row):
                pending[0] -= 1
                if pending[0] == 0:
                    loop.call_soon_threadsafe(left.set)
            rows = [ClassifyRow(x, ticket.slot, run.head, run.pooling, done) for x in ids]
            start = time.perf_counter()
            engine.submit(rows)
            try:
                await asyncio.wait_for(left.wait(), server.cfg.request_timeout_s)
            except asyncio.TimeoutError:
                raise ApiError(503, f"classify: not answered within {server.cfg.request_timeout_s}"
                                    " s", "server_error") from None
        except PeftkitError as e:
            raise api_error(e, model) from None
        finally:
            for row in rows:
                row.cancelled = True  # rows not yet run leave the queue's batches
            ticket.close()
        failed = next((r.error for r in rows if r.error), None)
        if failed:
            raise ApiError(500, failed, "server_error")
        tokens = sum(map(len, ids))
        server.metrics.record_classify(model, len(rows), tokens, time.perf_counter() - start)
        return {"id": f"classify-{uuid.uuid4().hex[:24]}", "object": "list",
                "created": int(time.time()), "model": model,
                "data": [{"index": i, "label": run.labels[max(range(len(r.probs)),
                                                            key=r.probs.__getitem__)],
                          "probs": r.probs, "num_classes": len(r.probs)}
                         for i, r in enumerate(rows)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens,
                          "completion_tokens": 0}}

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids (special tokens as the run trained with them), each checked."""
        tok, out = self.server.base.tokenizer, []
        for i, text in enumerate(texts):
            valid_text(text, f"input[{i}]")
            ids = tok(text).input_ids
            self.server.engine.check(len(ids), i)
            out.append(ids)
        return out

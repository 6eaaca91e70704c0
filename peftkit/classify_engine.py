"""Classification rows from every tenant pooled into shared batches: one frozen backbone (an
encoder such as MiniLM, or a decoder's body), each row on its own adapter slot, then each row's
own head (train/heads.py: the pooling and the linear or MLP head its run trained).

The serving counterpart of `Engine` for `--task classify`: one forward per batch instead of a
decode loop, the same admission bound (QueueFull past `max_queue` rows) and the same one way to
change the model while rows run (`between_steps`: slot writes and clears on this thread, under
the lock each forward holds)."""

import time

import torch

from peftkit.between_steps import ModelThread
from peftkit.device import module_device
from peftkit.engine import QueueFull
from peftkit.errors import PeftkitError
from peftkit.train.heads import Head, hidden_of, pool


class ClassifyRow:
    """One input text of a request: its token ids, its adapter's slot (-1: the bare base, a
    probe run) and head; `probs` once run, or `error`; `on_done(row)` either way."""

    def __init__(self, ids: list[int], slot: int, head: Head, pooling: str, on_done=None):
        self.ids, self.slot, self.head, self.pooling = ids, slot, head, pooling
        self.on_done = on_done
        self.probs: list[float] | None = None
        self.error: str | None = None
        self.cancelled = False
        self.t_submit = 0.0

    def finish(self, probs: list[float] | None = None, error: str | None = None) -> None:
        self.probs, self.error = probs, error
        if self.on_done is not None:
            self.on_done(self)


class ClassifyEngine(ModelThread):
    thread_name = "peftkit-classify"

    def __init__(self, adapted, tokenizer, max_batch: int = 32, max_queue: int = 256,
                 max_len: int | None = None):
        super().__init__()
        self.adapted, self.tok = adapted, tokenizer
        self.device = module_device(adapted.model)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_len = max_len or getattr(adapted.model.config, "max_position_embeddings", 512)
        self.active: list[ClassifyRow] = []  # the batch being run
        self.batches: list[list[int]] = []  # the slots of each batch run (tests, metrics)

    # -- public -------------------------------------------------------------------------------
    def check(self, tokens: int, index: int = 0) -> None:
        """An input that can never be run: empty, or longer than the backbone's positions
        (never truncated silently: the label would be another text's)."""
        if tokens == 0:
            raise PeftkitError(f"input[{index}]: empty (give at least one token of text)")
        if tokens > self.max_len:
            raise PeftkitError(f"input[{index}]: {tokens} tokens; the model reads at most "
                               f"{self.max_len}")

    def submit(self, rows: list[ClassifyRow]) -> list[ClassifyRow]:
        """Queue a request's rows, all or none (QueueFull past `max_queue` rows waiting)."""
        if self._stop.is_set():
            raise QueueFull("the server is shutting down")
        if self.waiting.qsize() + len(rows) > self.max_queue:
            raise QueueFull(f"queue full ({self.waiting.qsize()} rows waiting, "
                            f"{len(rows)} more asked; the limit is {self.max_queue})")
        for row in rows:
            row.t_submit = time.perf_counter()
            self.waiting.put(row)
        self._wake.set()
        return rows

    def stop(self) -> None:
        self._halt()
        while not self.waiting.empty():
            self.waiting.get().finish(error="the server is shutting down")

    def run_until_idle(self) -> None:
        """Process everything submitted so far in this thread (tests, benchmarks)."""
        while not self.waiting.empty():
            self.step()

    # -- the loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._between.run_pending()
            if self.waiting.empty():
                self._wake.wait(timeout=0.1)
                self._wake.clear()
                continue
            self.step()

    def step(self) -> None:
        rows = []
        while len(rows) < self.max_batch and not self.waiting.empty():
            row = self.waiting.get()
            if not row.cancelled:
                rows.append(row)
        if not rows:
            return
        self.active = rows
        try:
            for row, probs in zip(rows, self._forward(rows)):
                row.finish(probs)
        except Exception as e:  # one bad batch fails its rows, never the server
            for row in rows:
                row.finish(error=f"classify error: {type(e).__name__}: {e}")
        finally:
            self.active = []

    @torch.no_grad()
    def _forward(self, rows: list[ClassifyRow]) -> list[list[float]]:
        """One forward for the batch (right-padded: pooling reads the mask), then each head on
        its own rows."""
        width = max(len(r.ids) for r in rows)
        fill = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        on = {"device": self.device}
        ids = torch.tensor([r.ids + [fill] * (width - len(r.ids)) for r in rows], **on)
        mask = torch.tensor([[1] * len(r.ids) + [0] * (width - len(r.ids)) for r in rows], **on)
        slots = [r.slot for r in rows]
        with self._lock:
            out = self.adapted(input_ids=ids, attention_mask=mask,
                               slots=torch.tensor(slots, **on))
        self.batches.append(slots)
        hidden = hidden_of(out)
        probs: list[list[float] | None] = [None] * len(rows)
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault((id(row.head), row.pooling), []).append(i)
        for (_, pooling), idx in groups.items():
            at = torch.tensor(idx, **on)
            features = pool(hidden[at], mask[at], pooling)
            logits = rows[idx[0]].head(features.float())  # heads keep float32, as trained
            for i, p in zip(idx, torch.softmax(logits, -1).tolist()):
                probs[i] = p
        return probs

"""Changes to a running model made with no forward in flight: the engine's one way to write or
clear an adapter's slot while requests decode. Callers queue a job; the engine's thread runs the
queue between two steps, in order, under the lock each forward holds (nobody else takes it).
`ModelThread` is that thread and its queue, shared by the decoder (engine.py) and the
classifier (classify_engine.py)."""

import logging
import queue
import threading

log = logging.getLogger("peftkit.serve")


class BetweenSteps:
    def __init__(self, lock: threading.Lock, wake: threading.Event):
        self.lock, self.wake = lock, wake  # the engine's forward lock; wakes its idle loop
        self.jobs: queue.Queue[_Job] = queue.Queue()

    def call(self, fn, thread: threading.Thread | None, wait: bool = True):
        """`fn()`'s result (or its error raised here): run by `thread` (the engine's) between
        two steps while this thread waits, or queued without waiting (`wait=False`, for a
        caller holding a lock the engine's thread may need); run here, under the lock, when
        `thread` is not running or is this one."""
        if thread is None or not thread.is_alive() or threading.current_thread() is thread:
            with self.lock:
                return fn()
        job = _Job(fn, wait)
        self.jobs.put(job)
        self.wake.set()
        if not wait:
            return None
        while not job.done.wait(timeout=0.1):
            if not thread.is_alive():  # stopped meanwhile: nobody else will run it
                self.run_pending()
        if job.error is not None:
            raise job.error
        return job.result

    def run_pending(self) -> None:
        """Every queued job, in order (the engine's thread between steps, or `stop`)."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            with self.lock:
                job.run()


class _Job:
    def __init__(self, fn, waited: bool):
        self.fn, self.waited, self.done = fn, waited, threading.Event()
        self.result, self.error = None, None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except Exception as e:  # handed to the waiting caller, raised there
            self.error = e
            if not self.waited:
                log.error("a slot change failed between steps: %s: %s", type(e).__name__, e)
        finally:
            self.done.set()


class ModelThread:
    """What both engines share: one thread that runs a model's forwards, the queue it takes
    work from, the lock each forward holds, and the jobs run between two forwards."""
    thread_name = "peftkit-engine"

    def __init__(self):
        self.waiting: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # held during each forward and each `between_steps` job
        self._stop, self._wake = threading.Event(), threading.Event()
        self._between = BetweenSteps(self._lock, self._wake)
        self.thread: threading.Thread | None = None

    def between_steps(self, fn, wait: bool = True):
        """Run `fn()` with no forward in flight: the one way to change the model (an
        adapter's slot written or cleared) while requests run."""
        return self._between.call(fn, self.thread, wait)

    def queue_depth(self) -> int:
        return self.waiting.qsize()

    def start(self):
        self.thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self.thread.start()
        return self

    def _halt(self) -> None:
        """The thread stopped; the slot changes queued meanwhile run here."""
        self._stop.set()
        self._wake.set()
        if self.thread:
            self.thread.join(timeout=10)
        self._between.run_pending()

    def _run(self) -> None:
        raise NotImplementedError


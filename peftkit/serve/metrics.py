"""Prometheus metrics of one server (its own registry, so several servers can share a process)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("peftkit_requests", "Requests by model and status",
                                ["model", "status"], registry=r)
        self.tokens = Counter("peftkit_generated_tokens", "Generated tokens", ["model"], registry=r)
        self.prompt_tokens = Counter("peftkit_prompt_tokens", "Prompt tokens", registry=r)
        self.ttft = Histogram("peftkit_time_to_first_token_seconds", "Submit to first token",
                              buckets=LATENCY, registry=r)
        self.cache = Counter("peftkit_adapter_cache", "Adapter cache events", ["event"], registry=r)
        self.load = Histogram("peftkit_adapter_load_seconds", "Adapter cold-load latency",
                              buckets=LATENCY, registry=r)
        self.queue = Gauge("peftkit_queue_depth", "Requests waiting", registry=r)
        self.active = Gauge("peftkit_batch_rows", "Rows in the running batch", registry=r)
        self.classified = Counter("peftkit_classified_texts", "Texts classified", ["model"],
                                  registry=r)
        self.classify_latency = Histogram("peftkit_classify_seconds", "A /v1/classify request, "
                                          "submit to answer", buckets=LATENCY, registry=r)

    def record_classify(self, model: str, texts: int, tokens: int, seconds: float) -> None:
        self.requests.labels(model, "classified").inc()
        self.classified.labels(model).inc(texts)
        self.prompt_tokens.inc(tokens)
        self.classify_latency.observe(seconds)

    def store_event(self, kind: str, seconds: float | None = None) -> None:
        if kind == "load":
            self.load.observe(seconds)
        else:
            self.cache.labels(kind).inc()

    def cache_counts(self) -> dict[str, int]:
        """Per tier: device hit/miss/evict and host_hit/host_miss/host_evict so far."""
        return {s.labels["event"]: int(s.value) for metric in self.cache.collect()
                for s in metric.samples if s.name.endswith("_total")}

    def render(self) -> bytes:
        return generate_latest(self.registry)

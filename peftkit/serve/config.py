"""`peftkit serve`'s and `peftkit gateway`'s settings: a dataclass each, its fields' comments
the CLI's help texts (cli_flags.add_config_flags: every field is a flag), importable without
torch or the web stack."""

from dataclasses import asdict, dataclass

from peftkit.bounds import above, at_least, check_bounds
from peftkit.errors import PeftkitError


@dataclass
class ServeConfig:
    base: str = "smollm2-135m"  # the base model: alias, HF directory or .gguf file
    task: str = "generate"  # generate (completions, chat) or classify (POST /v1/classify: --task classify runs)
    adapters: str = "adapters"  # directory of PEFT adapters or `peftkit train` runs (id = subdir)
    quantize: str | None = None  # nf4: hold the base in 4-bit NF4 (QLoRA's format)
    max_loaded: int = 8  # adapter slots resident at once
    max_rank: int = 16  # the slot stack's rank; lower-rank adapters are zero-padded
    max_adapter_mb: float = 512.0  # bytes bound of the LRU cache, all loaded adapters together
    host_cache_mb: float = 1024.0  # host-memory tier: adapters read and prepared, LRU by bytes
    preload: tuple[str, ...] = ()  # adapter ids loaded and pinned at start (comma-separated)
    api_keys: str | None = None  # YAML/JSON keys file: admin_keys and tenants -> keys, adapters
    max_batch: int = 32  # rows decoded together in one step
    max_queue: int = 256  # waiting requests (in the engine's queue or for an adapter slot)
    targets: str = "all-linear"  # modules that adapters may target
    device: str = "auto"  # where the base, the slot stack and the KV cache live
    dtype: str = "auto"  # the base's precision (auto: bf16 on a GPU that has it, else fp32)
    adapter_dtype: str = "auto"  # the slots' precision, as vLLM's --lora-dtype (auto: the base's)
    attn: str = "auto"  # attention: auto (the model's own choice), sdpa, eager, flash_attention_2
    chat_template: str = ""  # for a base without one: chatml, zephyr or a Jinja file (as trained)
    # Abuse limits: every request ends within request_timeout_s; bodies over max_body_mb get 413;
    # a tenant with tenant_max_inflight requests queued or running gets 429 (0 = no limit);
    # a request for a cold adapter waits up to slot_wait_s for a slot before its 429.
    request_timeout_s: float = 300.0  # seconds after which any request is ended (answer or error)
    max_body_mb: float = 2.0  # larger request bodies get 413
    tenant_max_inflight: int = 0  # requests one tenant may have queued or running (0 = no limit)
    slot_wait_s: float = 30.0  # seconds a request for a cold adapter waits for a free slot

    def __post_init__(self):
        if self.task not in TASKS:
            raise PeftkitError(f"--task: choose {' or '.join(TASKS)}, got '{self.task}'")
        check_bounds(asdict(self), SERVE_BOUNDS)


TASKS = ("generate", "classify")
SERVE_BOUNDS = {"max_loaded": at_least(1), "max_rank": at_least(1), "max_adapter_mb": above(0),
                "host_cache_mb": at_least(0), "max_batch": at_least(1), "max_queue": at_least(1),
                "request_timeout_s": above(0), "max_body_mb": above(0),
                "tenant_max_inflight": at_least(0, " (0: no limit)"),
                "slot_wait_s": at_least(0)}


@dataclass
class GatewayConfig:
    backends: tuple[str, ...]  # comma-separated base URLs of `peftkit serve` or vLLM servers
    api_keys: str | None = None  # the keys file `serve` takes: tenants, keys, adapters
    backend_key: str | None = None  # the key the gateway sends to its backends (an admin key of theirs)
    base: tuple[str, ...] = ()  # comma-separated base model ids any caller may use (none given: learned from the backends, never widening the keys file)
    insecure_open: bool = False  # serve without --api-keys: anyone may use every adapter and the admin endpoints (localhost only)
    spill: int = 8  # leave an adapter's backend when it has this many more requests in flight than the least-loaded one
    health_every_s: float = 1.0  # seconds between health checks of each backend
    timeout_s: float = 300.0  # seconds to a backend's first byte (a whole answer when not streamed); past it the backend leaves the rotation and the request is retried
    chunk_timeout_s: float = 60.0  # seconds between two chunks of a backend's stream before it is failed
    connect_timeout_s: float = 5.0  # seconds to connect to a backend
    down_for_s: float = 10.0  # seconds a failed backend stays out of the rotation, even while its /health answers
    max_body_mb: float = 2.0  # larger request bodies get 413
    tenant_max_inflight: int = 0  # requests one tenant may have in flight through the gateway (0: no limit); past it, 429
    max_affinity: int = 4096  # adapter names remembered per backend (the least recently routed go first)

    def __post_init__(self):
        if not self.backends:
            raise PeftkitError("--backends: give at least one base URL")
        check_bounds(asdict(self), GATEWAY_BOUNDS)


GATEWAY_BOUNDS = {"spill": at_least(0), "health_every_s": above(0), "timeout_s": above(0),
                  "chunk_timeout_s": above(0), "connect_timeout_s": above(0),
                  "down_for_s": at_least(0), "max_body_mb": above(0),
                  "tenant_max_inflight": at_least(0, " (0: no limit)"),
                  "max_affinity": at_least(1)}

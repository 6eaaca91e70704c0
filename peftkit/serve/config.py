"""`peftkit serve`'s settings: one dataclass, its fields' comments are the CLI's help texts
(cli_flags.add_config_flags), importable without torch."""

from dataclasses import dataclass


@dataclass
class ServeConfig:
    base: str = "smollm2-135m"  # the base model: alias, HF directory or .gguf file
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

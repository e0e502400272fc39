"""What a Ray deployment of peftserve is made of, as one plain dict (serve.yaml `args:`).

The same keys come from `peftserve serve-ray` flags (dashes -> underscores) or from the
`args:` block of deploy/ray/serve.yaml, so both paths build the identical application.
Keys that mean the same as `peftserve serve` flags keep their names and defaults.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields


class RayConfigError(ValueError):
    """A bad deployment setting (stable code for logs: `ray_config_invalid`)."""

    code = "ray_config_invalid"


@dataclass
class RayServeConfig:
    # -- engine, as `peftserve serve` --------------------------------------------------------
    model: str = "default"  # `default` or a local HF model dir readable on every node
    dtype: str = "auto"
    adapter_dtype: str = "float32"  # LoRA weight storage (`--adapter-dtype`)
    device: str = "cpu"  # per replica; with `cuda` give each replica a GPU (num_gpus_per_replica)
    max_batch_size: int = 64  # these four and max_adapters_per_batch: EngineConfig's defaults
    max_model_len: int = 1024
    max_num_batched_tokens: int = 512
    max_waiting: int = 1024
    kv_cache_bytes: int | None = None  # per replica's KV pool (`--kv-cache-bytes`; None: EngineConfig's default)
    kv_block_size: int = 64
    decode_mode: str = "auto"  # `--decode-mode` / `--enforce-eager`: graphs on CUDA replicas
    max_lora_rank: int = 64
    max_bottleneck_size: int = 256
    max_adapters_per_batch: int = 32
    max_adapter_bytes: int | None = 2 << 30  # device memory of installed weight adapters, per replica
    max_cpu_adapters: int = 100_000  # RegistrySettings': max_cpu_bytes binds
    max_cpu_bytes: int = 2 << 30
    merge_policy: str = "never"
    merge_min_steps: int = 4
    adapter_store: str | None = None  # ONE directory every replica reads (shared volume on a cluster)
    api_key: str | None = None  # default: env PEFTSERVE_API_KEY of the replica process
    admin_key: str | None = None  # default: env PEFTSERVE_ADMIN_KEY
    max_body_bytes: int = 1024 * 1024
    max_upload_bytes: int = 256 * 1024 * 1024
    threads: int | None = None  # torch intra-op threads per replica (default: its CPU share, >= 1)
    ui: bool = True
    docs: bool = True
    max_combinations: int = 16
    strict_base: bool = False
    vllm_metric_names: bool = True
    # -- Ray --------------------------------------------------------------------------------
    replicas: int = 2  # fixed replica count (ignored when autoscaling)
    max_resident_adapters: int = 16  # K: adapters one replica keeps loaded (multiplexing bound)
    affinity: bool = True  # route by adapter (multiplexed_model_id); False = Ray's plain balancing
    autoscale: bool = False
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float | None = None  # default: max_batch_size (a full batch per replica)
    max_ongoing_requests: int | None = None  # per replica; default: max_batch_size + max_waiting
    num_cpus_per_replica: float = 1.0
    num_gpus_per_replica: float = 0.0
    ingress_num_cpus: float = 0.0  # the ingress only forwards bytes
    ingress_max_ongoing_requests: int = 1024
    retries: int = 2  # re-sends of a request whose replica died before it answered

    @classmethod
    def from_dict(cls, raw: dict | None) -> "RayServeConfig":
        raw = dict(raw or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise RayConfigError(f"unknown Ray deployment settings: {', '.join(unknown)}")
        cfg = cls(**{k: v for k, v in raw.items() if k in names})
        cfg.check()
        return cfg

    def check(self) -> None:
        for name in ("replicas", "max_resident_adapters", "min_replicas", "max_replicas", "max_batch_size"):
            if int(getattr(self, name)) < 1:
                raise RayConfigError(f"{name} must be >= 1")
        if self.autoscale and self.min_replicas > self.max_replicas:
            raise RayConfigError("min_replicas must be <= max_replicas")
        if self.retries < 0:
            raise RayConfigError("retries must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)

    def resolved_store(self) -> str:
        if self.adapter_store:
            return str(self.adapter_store)
        from peftserve.adapters.base_model import cache_dir

        return str(cache_dir() / "adapter-store")

    def keys(self) -> tuple[str | None, str | None]:
        return (self.api_key or os.environ.get("PEFTSERVE_API_KEY") or None,
                self.admin_key or os.environ.get("PEFTSERVE_ADMIN_KEY") or None)

    def deployment_options(self) -> dict:
        """`serve.deployment` options of the engine replicas (scaling + resources)."""
        actor = {"num_cpus": self.num_cpus_per_replica}
        if self.num_gpus_per_replica:
            actor["num_gpus"] = self.num_gpus_per_replica
        opts = {"ray_actor_options": actor,
                "max_ongoing_requests": self.max_ongoing_requests or self.max_batch_size + self.max_waiting}
        if self.autoscale:
            # Queue depth drives the replica count: Ray Serve adds replicas while the average of
            # ongoing (running + queued) requests per replica stays above the target.
            opts["autoscaling_config"] = {
                "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests or float(self.max_batch_size),
                "upscale_delay_s": 10.0, "downscale_delay_s": 120.0,
            }
        else:
            opts["num_replicas"] = self.replicas
        return opts

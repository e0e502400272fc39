"""The Ray Serve application: `PeftIngress` -> `PeftReplica` x N (or autoscaled).

`build_app(args)` is the application builder `serve run` calls with the `args:` of
deploy/ray/serve.yaml; `peftserve serve-ray` builds the same application from its flags.
"""

from __future__ import annotations

from .config import RayServeConfig
from .ingress import Ingress
from .replica import EngineReplica

REPLICA_DEPLOYMENT, INGRESS_DEPLOYMENT = "PeftReplica", "PeftIngress"


def replica_class(max_resident_adapters: int) -> type:
    """EngineReplica with its multiplexed loader: K is a decorator argument, so the class is
    made per configuration."""
    from ray import serve

    class PeftReplica(EngineReplica):
        @serve.multiplexed(max_num_models_per_replica=max_resident_adapters)
        async def load_adapter(self, name: str):
            return await self._load(name)

    PeftReplica.__qualname__ = PeftReplica.__name__ = REPLICA_DEPLOYMENT
    return PeftReplica


def build_app(args: dict | None = None):
    """-> a bound Ray Serve application (what `serve.run` takes)."""
    from ray import serve

    cfg = RayServeConfig.from_dict(args)
    raw = cfg.to_dict()
    replica = serve.deployment(name=REPLICA_DEPLOYMENT, **cfg.deployment_options())(
        replica_class(cfg.max_resident_adapters))
    ingress = serve.deployment(name=INGRESS_DEPLOYMENT, ray_actor_options={"num_cpus": cfg.ingress_num_cpus},
                               max_ongoing_requests=cfg.ingress_max_ongoing_requests)(Ingress)
    return ingress.bind(replica.bind(raw), raw)

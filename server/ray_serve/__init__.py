"""Multi-replica serving on Ray Serve with adapter affinity (optional extra `peftserve[ray]`).

- `replica.py`: one engine per replica, built exactly like `peftserve serve` builds it, serving
  requests in-process through the same FastAPI app; adapters are made resident through Ray
  Serve model multiplexing (`@serve.multiplexed`, bound K per replica) and checked against the
  shared store's `CURRENT` before every request.
- `ingress.py`: the HTTP entry point; forwards every path, picks the multiplexed model id
  (the adapter name) from the request body so Ray routes to replicas that hold the adapter.
- `app.py`: the application builder for `serve run` (deploy/ray/serve.yaml) and
  `peftserve serve-ray`.

Nothing here is imported by the single-process server: `ray` stays optional.
"""

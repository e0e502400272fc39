"""peftserve server: engine, registry, HTTP API."""

"""peftserve adapters: artifacts, validation, math. Never imports peftserve.server."""

"""Python clients for the peftserve HTTP API."""

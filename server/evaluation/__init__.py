"""Evaluation that needs both the trainer (`peftserve.adapters.training`) and the serving engine
(`peftserve.server`): it sits above both layers so that `adapters/` never imports `server`."""

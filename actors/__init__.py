"""Thin Ray actor classes (rollout, GRM, learner) around the library in `cpe_ray`."""

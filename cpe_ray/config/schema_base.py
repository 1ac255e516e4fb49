"""What every schema section is built from: `Frozen` (set once, by the constructor), `_f` (a
field with its validation rules), and what several sections share: `ApiConfig` (an endpoint:
`grm.api`, `eval.api`, `distill.api`) and `TINY_MODEL`. Sections live in `schema.py` (the run,
the cluster, the learner, the loop, and `Config`), `schema_rl.py` (the method's sections) and
`schema_stages.py` (evaluation, the supervised stages, the judge server).
"""

from __future__ import annotations

import copy
from dataclasses import FrozenInstanceError, dataclass, field
from typing import Any

TINY_MODEL = "tiny"  # policy.model_path value meaning "the offline tiny model, built if needed"


def _f(default: Any, **rules: Any) -> Any:
    """A dataclass field with validation rules as metadata (mutable defaults copied)."""
    if isinstance(default, list | dict):  # nested lists too: no instance shares them
        return field(default_factory=lambda: copy.deepcopy(default), metadata=rules)
    return field(default=default, metadata=rules)


class Frozen:
    """A schema section's fields are set once, by its constructor: nothing changes a loaded
    config while a run goes (verl's config dataclasses are frozen the same way). A changed
    config is a new one: `dataclasses.replace`, or `load_config` with overrides."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__:
            raise FrozenInstanceError(
                f"cannot set {type(self).__name__}.{name}: a config is frozen once built; "
                "make a new one with dataclasses.replace(...) or load_config(path, overrides)")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete {type(self).__name__}.{name}: a config is "
                                  "frozen once built")


@dataclass
class ApiConfig(Frozen):
    """An OpenAI-compatible endpoint: the GRM (`grm.api`), an evaluation judge (`eval.api`),
    the distillation teacher (`distill.api`)."""

    base_url: str | None = None
    """The endpoint's URL, e.g. https://api.openai.com/v1 (null: none configured)."""
    model: str | None = None
    """The model name sent with each request."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the key; the key itself never enters config."""
    timeout_s: float = _f(60.0, gt=0)
    """Seconds a request may take."""
    max_retries: int = _f(5, ge=0)
    """Retries per request, on timeouts, connection errors, 408/409/429/5xx."""
    backoff_initial_s: float = _f(1.0, gt=0)
    """Seconds of the first wait before a retry; waits double, with jitter."""
    backoff_max_s: float = _f(30.0, gt=0)
    """Seconds of the longest wait between retries."""
    max_concurrency: int = _f(8, ge=1)
    """Requests in flight at most."""
    max_wait_s: float = _f(300.0, gt=0)
    """Seconds one request may take with all its retries; then it fails (a GRM: the run stops)."""

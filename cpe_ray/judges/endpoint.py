"""An OpenAI-compatible chat endpoint for judges and answerers, and the GRM judge on it.

`EndpointClient` wraps the `openai` client (its own retries turned off) with tenacity:
timeouts, connection errors and HTTP 408 / 409 / 429 / 5xx are retried up to
`max_retries` times with exponential back-off and jitter; other 4xx answers are final.
401 / 403 / 404 mean the endpoint, model or key is wrong for every request, so they stop
the run with one line instead of failing each item. Requests run `max_concurrency` at a
time. A request that still fails is returned as an `EndpointReply` with its error, so the
caller counts it; nothing is dropped.

The key is read from the environment variable named by `api_key_env`, handed to the client
and nowhere else: it is never logged, and any error text is scrubbed of it before it is
stored or shown.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from cpe_ray.config import ApiConfig, GRMConfig
from cpe_ray.errors import ConfigError, CpeError
from cpe_ray.judges.base import JudgeError, JudgeRequest, check_mode
from cpe_ray.judges.grm import (
    JudgeOutcome,
    attempt_temperature,
    build_grm_messages,
    judge_with_retries,
    load_grm_templates,
    mode_persona_format,
)

log = logging.getLogger(__name__)
RETRY_STATUS = frozenset({408, 409, 429})  # plus every 5xx
SERVER_ERRORS = 500  # this status and above are retried
FATAL_STATUS = frozenset({401, 403, 404})  # wrong key, permission or model: stop the run
MAX_ERROR_CHARS = 300
REDACTED = "***"


class EndpointError(CpeError):
    """The endpoint refuses every request (wrong URL, model or key)."""


@dataclass(frozen=True)
class EndpointSpec:
    base_url: str
    model: str
    api_key_env: str
    timeout_s: float
    max_retries: int
    max_concurrency: int
    backoff_initial_s: float
    backoff_max_s: float
    max_wait_s: float = 300.0  # one request with all its retries
    section: str = "eval.api"  # for messages

    @classmethod
    def from_config(cls, api: ApiConfig, section: str) -> EndpointSpec:
        """The endpoint a config section describes (`grm.api`, `eval.api`, `distill.api`)."""
        if not (api.base_url and api.model):
            raise ConfigError(f"the endpoint needs {section}.base_url and {section}.model")
        return cls(api.base_url, api.model, api.api_key_env, api.timeout_s, api.max_retries,
                   api.max_concurrency, api.backoff_initial_s, api.backoff_max_s,
                   api.max_wait_s, section)

    def api_key(self) -> str:
        """The key from the variable `api_key_env` names (checked before anything starts)."""
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ConfigError(
                f"{self.section}.api_key_env names ${self.api_key_env}, which is not set; "
                "export the endpoint's key in it (any non-empty value for a local server)")
        return key


@dataclass(frozen=True)
class EndpointReply:
    text: str | None
    error: str | None = None
    attempts: int = 1


def _status(exc: BaseException) -> int | None:
    return getattr(exc, "status_code", None)


def _retryable(exc: BaseException) -> bool:
    import openai

    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return True
    status = _status(exc)
    return status is not None and (status in RETRY_STATUS or status >= SERVER_ERRORS)


class EndpointClient:
    """Chat completions against one endpoint and model; see the module docstring."""

    def __init__(self, spec: EndpointSpec) -> None:
        import openai

        key = spec.api_key()
        self.spec = spec
        self._secret = key
        self._client = openai.OpenAI(base_url=spec.base_url, api_key=key,
                                     timeout=spec.timeout_s, max_retries=0)

    def describe(self) -> str:
        return f"{self.spec.model} at {self.spec.base_url}"

    def scrub(self, text: str) -> str:
        """`text` on one line, without the key, at most MAX_ERROR_CHARS long."""
        one_line = " ".join(str(text).split())
        return one_line.replace(self._secret, REDACTED)[:MAX_ERROR_CHARS]

    def _describe_error(self, exc: BaseException) -> str:
        status = _status(exc)
        head = f"HTTP {status}" if status is not None else type(exc).__name__
        return self.scrub(f"{head}: {exc}")

    def chat(self, messages: list[dict[str, str]], *, temperature: float, max_tokens: int,
             seed: int | None = None) -> EndpointReply:
        """One completion; transport failures retried with back-off, then returned as errors."""
        import tenacity

        attempts = 0

        def call() -> str:
            nonlocal attempts
            attempts += 1
            extra: dict[str, Any] = {} if seed is None else {"seed": seed}
            response = self._client.chat.completions.create(
                model=self.spec.model, messages=messages,  # type: ignore[arg-type]
                temperature=temperature, max_tokens=max_tokens, **extra)
            if not response.choices:
                return ""
            return response.choices[0].message.content or ""

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            log.warning("endpoint %s: attempt %d/%d failed (%s); retrying in %.2f s",
                        self.spec.base_url, state.attempt_number, self.spec.max_retries + 1,
                        self._describe_error(exc) if exc else "?", wait)

        retrying = tenacity.Retrying(
            stop=(tenacity.stop_after_attempt(self.spec.max_retries + 1)
                  | tenacity.stop_after_delay(self.spec.max_wait_s)),
            wait=tenacity.wait_exponential(multiplier=self.spec.backoff_initial_s,
                                           max=self.spec.backoff_max_s)
            + tenacity.wait_random(0, self.spec.backoff_initial_s),
            retry=tenacity.retry_if_exception(_retryable),
            before_sleep=before_sleep, reraise=True)
        try:
            return EndpointReply(retrying(call), None, attempts)
        except Exception as exc:  # every failure becomes a counted, reported error
            if _status(exc) in FATAL_STATUS:
                raise EndpointError(
                    f"endpoint {self.spec.base_url} refused model {self.spec.model}: "
                    f"{self._describe_error(exc)}; check {self.spec.section}.base_url, "
                    f"{self.spec.section}.model and the key in ${self.spec.api_key_env}"
                ) from None
            return EndpointReply(None, self._describe_error(exc), attempts)

    def chat_many(self, conversations: Sequence[list[dict[str, str]]], *, temperature: float,
                  max_tokens: int, seed: int | None = None) -> list[EndpointReply]:
        """`chat` on each conversation, `max_concurrency` at a time, results in order."""
        if not conversations:
            return []
        workers = min(self.spec.max_concurrency, len(conversations))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(self.chat, c, temperature=temperature,
                                   max_tokens=max_tokens, seed=seed) for c in conversations]
            return [f.result() for f in futures]

    def close(self) -> None:
        self._client.close()


class EndpointGRMJudge:
    """grm.backend=openai: the GRM rubric prompt on an endpoint, behind `cpe_ray.judges.base.Judge`.

    An output that does not parse is regenerated up to grm.max_retries times and stays
    unparsed (reported) if it never does. A request the endpoint could not serve after its own
    retries (`grm.api.max_retries`, `grm.api.max_wait_s`) is a `JudgeError`: the judge cannot
    judge, and training on an empty output's 0 would train on nothing. Each mode prompts with
    its own template (`load_grm_templates`); a greedy call's retries sample at
    grm.retry_temperature.
    """

    def __init__(self, client: EndpointClient, cfg: GRMConfig) -> None:
        self.client, self.cfg = client, cfg
        self.templates = load_grm_templates(cfg)

    @classmethod
    def from_config(cls, cfg: GRMConfig) -> EndpointGRMJudge:
        """The GRM served at `grm.api` (its key variable is checked here)."""
        return cls(EndpointClient(EndpointSpec.from_config(cfg.api, "grm.api")), cfg)

    def describe(self) -> str:
        return f"GRM endpoint {self.client.describe()}"

    def judge(self, requests: Sequence[JudgeRequest], mode: str, seed: int = 0
              ) -> list[JudgeOutcome]:
        check_mode(mode)
        template = self.templates[mode]
        persona_format = mode_persona_format(self.cfg, mode)
        conversations = [build_grm_messages(template, r.persona, r.question, r.answer,
                                            persona_format) for r in requests]
        temperature = (self.cfg.critique_temperature if mode == "critique"
                       else self.cfg.score_temperature)
        attempt = 0

        def generate(indices: list[int]) -> list[str]:
            nonlocal attempt
            replies = self.client.chat_many(
                [conversations[i] for i in indices],
                temperature=attempt_temperature(temperature, attempt, self.cfg.retry_temperature),
                max_tokens=self.cfg.max_new_tokens)
            attempt += 1
            failed = [r for r in replies if r.error is not None]
            if failed:
                raise JudgeError(
                    f"the {self.describe()} could not {mode} {len(failed)} of {len(replies)} "
                    f"answers after {failed[0].attempts} attempt(s): {failed[0].error}; check "
                    "that it is up, or grm.api.max_retries / grm.api.max_wait_s")
            return [r.text or "" for r in replies]

        return judge_with_retries(generate, len(requests), self.cfg.max_retries,
                                  self.cfg.dimensions, (self.cfg.score_min, self.cfg.score_max),
                                  require_critique=mode == "critique",
                                  aliases=self.cfg.label_aliases)

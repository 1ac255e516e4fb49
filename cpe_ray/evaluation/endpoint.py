"""eval.judge=openai: the pairwise judge prompt on an OpenAI-compatible endpoint.

The client (retries, back-off, concurrency, key handling) is `cpe_ray.judges.endpoint`.
"""

from __future__ import annotations

from collections.abc import Sequence

from cpe_ray.evaluation.pairwise import (
    PairRequest,
    PairVerdict,
    build_pairwise_messages,
    compare_with_retries,
)
from cpe_ray.judges.endpoint import EndpointClient
from cpe_ray.prompts import PromptTemplate


class EndpointPairwiseJudge:
    """eval.judge=openai: the pairwise prompt on an OpenAI-compatible endpoint."""

    order_free = False

    def __init__(self, client: EndpointClient, template: PromptTemplate, max_tokens: int,
                 temperature: float, max_parse_retries: int) -> None:
        self.client, self.template = client, template
        self.max_tokens, self.temperature = max_tokens, temperature
        self.max_parse_retries = max_parse_retries

    def describe(self) -> str:
        return f"endpoint judge {self.client.describe()}"

    def compare(self, requests: Sequence[PairRequest]) -> list[PairVerdict]:
        conversations = [build_pairwise_messages(self.template, r) for r in requests]

        def generate(indices: list[int], attempt: int) -> list[tuple[str | None, str | None]]:
            replies = self.client.chat_many([conversations[i] for i in indices],
                                            temperature=self.temperature,
                                            max_tokens=self.max_tokens)
            return [(r.text, r.error) for r in replies]

        return compare_with_retries(generate, len(requests), self.max_parse_retries)

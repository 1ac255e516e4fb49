"""The `PolicyRollout` Ray actor: answers, post-edit rewrites and weight loading on one engine.

Prompts are built here from persona and question with the policy's chat template, so the
driver ships strings and gets back the exact token ids it must train on. A rewrite's
completion carries its log-probs under the *edit* prompt: that is log pi_e of method.md 3.3.
An edit prompt over rollout.max_prompt_length loses the end of the answer and the critique
and the middle of the question (`fit_edit_prompt`); an answer prompt loses the middle of its
question (`fit_policy_prompt`); neither loses the system turn with the persona, and each batch
says how many were cut.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray

from cpe_ray.algo.post_edit import (
    EditRequest,
    build_edit_messages,
    fit_edit_prompt,
    load_edit_template,
)
from cpe_ray.chat import (
    FittedPrompt,
    apply_chat_template,
    fit_policy_prompt,
    load_policy_system_template,
)
from cpe_ray.chat import system_prompt as render_system
from cpe_ray.config import Config
from cpe_ray.engines.base import Completion, SamplingParams
from cpe_ray.engines.factory import make_engine
from cpe_ray.engines.spec import EngineSpec
from cpe_ray.weight_sync.codec import Manifest
from cpe_ray.weight_sync.group import GroupSpec, SyncStats


@dataclass
class GenerationBatch:
    """Prompt token ids (one per request) and completions, prompt-major."""

    prompt_ids: list[list[int]]
    completions: list[Completion]
    shortened: int = 0  # edit prompts whose answer / critique / question were cut to fit
    cut_left: int = 0  # prompts over the limit even so, cut from the start (persona lost)
    questions_shortened: int = 0  # answer prompts whose question lost its middle to fit


@ray.remote
class PolicyRollout:
    def __init__(self, cfg: Config, engine_index: int = 0,
                 bundle_indices: list[int] | None = None,
                 gpu_fraction: float | None = None) -> None:
        import torch

        torch.set_num_threads(cfg.cluster.threads_per_actor)
        self.cfg, self.index = cfg, engine_index
        self.engine = make_engine(EngineSpec.for_policy(cfg, engine_index),
                                  bundle_indices=bundle_indices, gpu_fraction=gpu_fraction)
        from cpe_ray.models import load_tokenizer

        self.tokenizer = load_tokenizer(self.engine.info().model_path,
                                        cfg.policy.trust_remote_code)
        self.system_template = load_policy_system_template(cfg.policy.system_template)
        self.edit_template = load_edit_template(cfg.post_edit.template)

    def info(self) -> dict[str, str]:
        info = self.engine.info()
        return {"backend": info.backend, "model": info.model_path, "device": info.device,
                "node_id": ray.get_runtime_context().get_node_id()}

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def _fit(self, persona: str, question: str) -> FittedPrompt:
        return fit_policy_prompt(self.tokenizer, persona, question,
                                 self.cfg.rollout.max_prompt_length, self.system_template)

    def prompt_ids(self, persona: str, question: str) -> list[int]:
        """The answer prompt within rollout.max_prompt_length (`fit_policy_prompt`)."""
        return self._fit(persona, question).token_ids

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams
                 ) -> list[Completion]:
        return self.engine.generate(prompt_token_ids, params)

    def answer(self, prompts: list[tuple[str, str]], seed: int) -> GenerationBatch:
        """n answers per (persona, question), sampled with the rollout settings."""
        r = self.cfg.rollout
        fitted = [self._fit(persona, question) for persona, question in prompts]
        ids = [f.token_ids for f in fitted]
        params = SamplingParams(n=r.n_samples_per_prompt, temperature=r.temperature,
                                top_p=r.top_p, max_new_tokens=r.max_new_tokens, seed=seed)
        return GenerationBatch(ids, self.engine.generate(ids, params),
                               cut_left=sum(f.cut_left for f in fitted),
                               questions_shortened=sum(f.shortened for f in fitted))

    def post_edit(self, requests: list[EditRequest], seed: int) -> GenerationBatch:
        """One rewrite per request under the edit prompt; logprobs are log pi_e."""
        pe = self.cfg.post_edit
        ids, shortened, cut = [], 0, 0
        for req in requests:
            system = render_system(self.system_template, req.persona)

            def encode(question: str, answer: str, critique: str, persona: str = req.persona,
                       system: str = system) -> list[int]:
                messages = build_edit_messages(self.edit_template, question, answer, critique,
                                               system_prompt=system, persona=persona)
                return apply_chat_template(self.tokenizer, messages)

            fitted = fit_edit_prompt(encode, self.tokenizer, req,
                                     self.cfg.rollout.max_prompt_length)
            ids.append(fitted.token_ids)
            shortened += fitted.shortened
            cut += fitted.cut_left
        params = SamplingParams(n=1, temperature=pe.temperature, top_p=self.cfg.rollout.top_p,
                                max_new_tokens=pe.max_new_tokens, seed=seed)
        return GenerationBatch(ids, self.engine.generate(ids, params), shortened, cut)

    def next_token_logits(self, prompt_token_ids: list[list[int]]):
        """Raw next-token logits (engines that expose them: the HF engine); for checks."""
        fn = getattr(self.engine, "next_token_logits", None)
        if fn is None:
            raise NotImplementedError(f"{self.cfg.rollout.backend} engine exposes no logits")
        return fn(prompt_token_ids)

    def sync_ranks(self) -> int:
        return self.engine.info().sync_ranks

    def join_weight_group(self, spec: GroupSpec, first_rank: int) -> None:
        self.engine.join_weight_group(spec, first_rank)

    def receive_weights(self, manifest: Manifest) -> SyncStats:
        return self.engine.receive_weights(manifest)

    def load_ipc(self, handles: dict, bucket) -> None:
        self.engine.load_ipc(handles, bucket)

    def load_adapter(self, version: int, peft_config: dict, named_tensors: list) -> None:
        self.engine.load_adapter(version, peft_config, named_tensors)

    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()

"""The PPO learner on one data-parallel rank: DeepSpeed policy and critic, optional reference.

It computes log-probs and values for its shard of a batch, trains over mini- and
micro-batches (PPO clip on originals, the off-policy rewrite loss on rewrites, clipped value
loss for the critic), saves and loads its full training state, exports the policy in HF
format, and owns the `WeightSender` (weight_sync/sender.py) that sends the policy to the
engines. Each mini-batch is one optimiser step whatever its size: losses are
normalised by the mini-batch's global token (or sequence) count, so splitting rows over
micro-batches and ranks changes nothing but rounding (ppo.micro_batch_weighting=rows instead
weighs each micro-batch's own mean by its rows, as verl does). The Ray actor in `actors/learner.py`
is a thin wrapper around `PPOLearnerCore`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch

from cpe_ray.algo.advantages import ADVANTAGE_ESTIMATORS
from cpe_ray.algo.correction import KEPT_STATS, rollout_correction
from cpe_ray.algo.experience import Experience, pad_response, split_even
from cpe_ray.algo.losses import (
    POLICY_LOSSES,
    PolicyLossInput,
    aggregate_loss,
    policy_loss_name,
    rows_normalizer,
    value_loss,
)
from cpe_ray.algo.tensors import (
    entropy_from_logits,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
)
from cpe_ray.config import Config, lora_enabled
from cpe_ray.learners import lora
from cpe_ray.learners.ds_config import eval_config, train_config
from cpe_ray.learners.forward import ResponseForward, micro_order
from cpe_ray.models import (
    last_token_logits,
    left_pad,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
    torch_dtype,
)
from cpe_ray.weight_sync.sender import WeightSender, gathered

POLICY_TAG, CRITIC_TAG = "policy", "critic"
MB = 1 << 20
MAX_SUFFIX = "_max"  # a metric whose key ends so is a maximum over ranks, not a mean


@dataclass
class TrainShard:
    """This rank's rows of one mini-batch, and what every rank must agree on for it."""

    experience: Experience
    num_micro: int  # equal on all ranks: ZeRO-3 gathers are collective per forward
    global_tokens: int  # response tokens in the whole mini-batch, all ranks
    global_seqs: int  # non-empty responses in the whole mini-batch, all ranks
    global_rows: int  # rows in the whole mini-batch, all ranks


class MetricSums:
    """Weighted sums that ranks return and the driver reduces into means; a key ending in
    MAX_SUFFIX holds (largest value, 1) and reduces to the largest."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])

    def add(self, key: str, value: float, weight: float = 1.0) -> None:
        pair = self.sums[key]
        pair[0] += float(value) * weight
        pair[1] += weight

    def add_max(self, key: str, value: float) -> None:
        if not key.endswith(MAX_SUFFIX):
            raise ValueError(f"a maximum's key must end in {MAX_SUFFIX!r}, got {key!r}")
        pair = self.sums[key]
        if pair[1] == 0 or value > pair[0]:
            pair[0], pair[1] = float(value), 1.0

    def as_dict(self) -> dict[str, tuple[float, float]]:
        return {k: (v[0], v[1]) for k, v in self.sums.items()}


def step_and_report(engine, sums: MetricSums, prefix: str, loss_key: str, loss: float,
                    world: int) -> None:
    """One optimiser step, then its loss, gradient norm and learning rate under `prefix/`.

    A rank's loss is its share of the mini-batch's times the world size (DeepSpeed averages
    gradients over ranks), so the mean over ranks, which the driver reduces to, is the
    mini-batch's loss."""
    engine.step()
    sums.add(f"{prefix}/{loss_key}", loss, 1.0 / world)
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        sums.add(f"{prefix}/grad_norm", float(grad_norm), 1.0 / world)
    sums.add(f"{prefix}/lr", engine.get_lr()[0], 1.0 / world)


def reduce_metrics(parts: list[dict[str, tuple[float, float]]]) -> dict[str, float]:
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for part in parts:
        for key, (s, w) in part.items():
            if key.endswith(MAX_SUFFIX):
                if w > 0 and (totals[key][1] == 0 or s > totals[key][0]):
                    totals[key] = [s, 1.0]
                continue
            totals[key][0] += s
            totals[key][1] += w
    return {k: s / w for k, (s, w) in totals.items() if w > 0}


def _keep_fp32_clip_norm(engine) -> None:
    """DeepSpeed's plain fp32 path (no ZeRO, no fp16/bf16 optimizer) clips the gradients in
    `clip_fp32_gradients` but drops the norm, so `get_global_grad_norm()` stays None: the
    same clip, keeping the norm where the other paths keep theirs."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_keep_norm() -> None:
        engine._global_grad_norm = float(clip_grad_norm_(
            parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(),
            mpu=engine.mpu))

    engine.clip_fp32_gradients = clip_and_keep_norm


def init_trained_engine(cfg: Config, model: torch.nn.Module, lr: float, world: int,
                        lr_factor: Callable[[int], float]):
    """A DeepSpeed engine training `model` (AdamW, clipping, ZeRO from `cfg.learner`, precision
    from `cfg.policy.dtype`); the learning rate is `lr x lr_factor(optimiser step)`."""
    import deepspeed

    def schedule(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    conf = train_config(cfg.learner, lr, cfg.policy.dtype, world, cfg.cluster.use_gpu)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=params, config=conf, lr_scheduler=schedule
    )
    if cfg.learner.zero_stage == 0 and cfg.policy.dtype == "float32":
        _keep_fp32_clip_norm(engine)
    return engine


def gathered_state(module: torch.nn.Module, zero3: bool, rank: int) -> dict[str, torch.Tensor]:
    """Full weights of `module` on rank 0 (others get {}); under ZeRO-3 every rank must call."""
    state = {}
    for name, param in module.named_parameters():
        with gathered([param], zero3):
            if rank == 0:
                state[name] = param.data.detach().cpu().clone()
    return state


def export_hf_model(module: torch.nn.Module, tokenizer: Any, zero3: bool, rank: int,
                    path: str, base: Callable[[], torch.nn.Module]) -> None:
    """`module` as a Hugging Face directory with its tokenizer: rank 0 writes, all call. A
    peft module (LoRA) is written merged, its adapter beside it; `base()` loads its base."""
    state = gathered_state(module, zero3, rank)
    if rank == 0 and lora.is_adapter(module):
        lora.export_merged(module, state, base, tokenizer, path)
    elif rank == 0:
        os.makedirs(path, exist_ok=True)
        module.save_pretrained(path, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(path)


def save_engine_state(engine: Any, path: str, tag: str) -> None:
    """Weights, optimiser and scheduler under `path` with `tag` (all ranks call); of a LoRA
    model only what trains: its frozen base is the model it was loaded from."""
    engine.save_checkpoint(path, tag=tag, save_latest=False,
                           exclude_frozen_parameters=lora.is_adapter(engine.module))


def load_engine_state(engine: Any, path: str, tag: str) -> None:
    """What `save_engine_state` saved under `path` with `tag` (all ranks call)."""
    loaded, _ = engine.load_checkpoint(path, tag=tag, load_optimizer_states=True,
                                       load_lr_scheduler_states=True,
                                       load_module_strict=not lora.is_adapter(engine.module))
    if loaded is None:
        raise FileNotFoundError(f"no {tag} state under {path}")


def scale_by_row_temperature(logits: torch.Tensor, exp: Experience) -> torch.Tensor:
    """[B, T, V] logits / each row's temperature; greedy rows (T = 0) keep the raw logits, whose
    log-probs the engines report for them. Python-float divisors, as a single temperature
    always was: a bf16 tensor of temperatures would round 0.9 to 0.898."""
    if exp.temperature is None:
        raise ValueError("the experience carries no sampling temperatures; build it with "
                         "Experience.from_tokens(..., temperature=...) so each row is scored at "
                         "the temperature it was sampled with")
    temps = [t if t > 0 else 1.0 for t in exp.temperature.tolist()]
    if len(temps) != logits.shape[0]:
        raise ValueError(f"{len(temps)} temperatures for {logits.shape[0]} rows of logits")
    if all(t == temps[0] for t in temps):
        return logits if temps[0] == 1.0 else logits / temps[0]
    return torch.stack([row / t for row, t in zip(logits, temps, strict=True)])


class PPOLearnerCore:
    """One rank. `torch.distributed` must already be initialised (the actor does it)."""

    def __init__(self, cfg: Config, rank: int, world_size: int, device: torch.device) -> None:
        import deepspeed

        self._ds = deepspeed
        self.cfg, self.rank, self.world, self.device = cfg, rank, world_size, device
        # The critic's value head is newly initialised: seed it, or two runs of one config
        # (and a run and its resume) start from different critics.
        torch.manual_seed(cfg.run.seed)
        self.model_path = resolve_model_path(cfg.policy.model_path)
        trust = cfg.policy.trust_remote_code
        self.tokenizer = load_tokenizer(self.model_path, trust)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.zero3 = cfg.learner.zero_stage == 3
        policy = self._load_policy()
        if cfg.learner.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
            policy.config.use_cache = False
        if lora_enabled(cfg):
            policy = lora.wrap(policy, cfg.policy.lora, lora.CAUSAL_LM)
        self.policy = self._init_trained(policy, cfg.learner.actor_lr)
        self.critic = None
        if ADVANTAGE_ESTIMATORS[cfg.ppo.advantage_estimator].needs_critic:
            critic = self._load_critic()
            if lora_enabled(cfg) and cfg.policy.lora.critic:
                critic = lora.wrap(critic, cfg.policy.lora, lora.TOKEN_CLS)
            self.critic = self._init_trained(critic, cfg.learner.critic_lr)
        self.ref = None
        if cfg.learner.use_reference and lora_enabled(cfg):
            self.ref = self.policy  # its base: the adapter off (compute_ref_logprobs)
        elif cfg.learner.use_reference:
            ref = self._load_policy().eval()
            ref.requires_grad_(False)
            conf = eval_config(cfg.learner, cfg.policy.dtype, world_size)
            self.ref = self._ds.initialize(model=ref, config=conf)[0] if self.zero3 else (
                ref.to(device))
        share = cfg.learner.share_prompts
        self.policy_forward = ResponseForward(self.policy, share)
        self.critic_forward, self.ref_forward = (
            None if m is None else ResponseForward(m, share) for m in (self.critic, self.ref))
        if self.ref is self.policy:
            self.ref_forward = self.policy_forward
        # At ZeRO-0 in float32 DeepSpeed updates the parameters where they are (its fp16/bf16
        # optimizers and ZeRO-1/2 flatten them into buffers of their own, which adopting
        # would cut off from the updates): only then may they live in the sync buckets.
        self.weights = WeightSender(
            self.policy.module, rank=rank, world=world_size, device=device, zero3=self.zero3,
            bucket_bytes=int(cfg.learner.weight_sync_bucket_mb * MB),
            adopt=cfg.learner.zero_stage == 0 and cfg.policy.dtype == "float32")

    # --- construction -------------------------------------------------------------------
    def _load_policy(self) -> torch.nn.Module:
        return load_causal_lm(self.model_path, self.cfg.policy.dtype, "cpu",
                              self.cfg.policy.trust_remote_code)

    def _load_critic(self) -> torch.nn.Module:
        from transformers import AutoConfig, AutoModelForTokenClassification

        path = self.cfg.learner.critic_model_path
        path = resolve_model_path(path) if path else self.model_path
        trust = self.cfg.policy.trust_remote_code
        conf = AutoConfig.from_pretrained(path, num_labels=1, trust_remote_code=trust)
        conf.classifier_dropout = 0.0  # dropout would make values differ between passes
        critic = AutoModelForTokenClassification.from_pretrained(
            path, config=conf, dtype=torch_dtype(self.cfg.policy.dtype), trust_remote_code=trust
        )
        if self.cfg.learner.gradient_checkpointing:
            critic.gradient_checkpointing_enable()
        return critic

    def _init_trained(self, model: torch.nn.Module, lr: float):
        warmup = self.cfg.learner.warmup_steps
        return init_trained_engine(self.cfg, model, lr, self.world,
                                   lambda step: min(1.0, (step + 1) / (warmup + 1)))

    # --- forward passes -----------------------------------------------------------------
    def _filler(self) -> Experience:
        """A one-row batch with no response tokens: keeps collective counts equal on ranks."""
        return Experience.from_tokens([[self.pad_id]], [[self.pad_id]], self.pad_id,
                                      temperature=1.0).with_fields(
            response_mask=torch.zeros(1, 1)
        )

    def _micro_batches(self, exp: Experience, num_micro: int) -> Iterator[tuple[Experience, bool]]:
        for rows in split_even(len(exp), num_micro):
            if rows:
                yield exp.select(rows), True
            else:
                yield self._filler(), False

    @staticmethod
    def _policy_logits(forward: ResponseForward, exp: Experience) -> torch.Tensor:
        """Next-token logits over the responses, each row divided by its own sampling
        temperature: a rewrite sampled at post_edit.temperature is scored at that temperature
        (its old log-probs and its training forward), an answer at rollout.temperature."""
        return scale_by_row_temperature(forward(exp), exp)

    def _values(self, exp: Experience) -> torch.Tensor:
        return self.critic_forward(exp)[..., 0].float()

    @torch.no_grad()
    def _per_row(self, exp: Experience, num_micro: int, fn) -> torch.Tensor:
        """`fn` over micro-batches that keep a prompt's rows together, in `exp`'s row order."""
        width, outs = exp.response_width, []
        order = micro_order(exp)
        for micro, real in self._micro_batches(exp.select(order), num_micro):
            small, _, _ = micro.to(self.device).trimmed()
            result = fn(small)
            if real:
                outs.append(pad_response(result.float().cpu(), width))
        if not outs:
            return torch.zeros(0, width)
        return torch.cat(outs)[torch.argsort(order)]

    def compute_logprobs(self, exp: Experience, num_micro: int) -> torch.Tensor:
        self.policy.eval()
        return self._per_row(exp, num_micro, lambda m: logprobs_from_logits(
            self._policy_logits(self.policy_forward, m), m.responses))

    @torch.no_grad()
    def next_token_logits(self, prompts: list[list[int]]) -> torch.Tensor:
        """Raw logits after each prompt, [B, V] (every rank must call under ZeRO-3)."""
        self.policy.eval()
        ids, mask = left_pad(prompts, self.pad_id)
        return last_token_logits(self.policy, ids.to(self.device), mask.to(self.device))

    def compute_ref_logprobs(self, exp: Experience, num_micro: int) -> torch.Tensor:
        if self.ref is None:
            raise RuntimeError("learner.use_reference is off: no reference model")
        if self.ref is not self.policy:
            return self._per_row(exp, num_micro, lambda m: logprobs_from_logits(
                self._policy_logits(self.ref_forward, m), m.responses))
        self.policy.eval()  # LoRA's reference: the policy's base, its adapter (and dropout) off
        with self.policy.module.disable_adapter():
            return self._per_row(exp, num_micro, lambda m: logprobs_from_logits(
                self._policy_logits(self.ref_forward, m), m.responses))

    def compute_values(self, exp: Experience, num_micro: int) -> torch.Tensor:
        if self.critic is None:
            raise RuntimeError(f"{self.cfg.ppo.advantage_estimator} has no critic")
        self.critic.eval()
        return self._per_row(exp, num_micro, self._values)

    # --- training -------------------------------------------------------------------------
    def _normalizer(self, shard: TrainShard) -> float:
        count = shard.global_tokens if self.cfg.ppo.loss_agg == "token_mean" else shard.global_seqs
        # DeepSpeed averages gradients over ranks; multiplying back by world makes the
        # update the exact mean over the mini-batch.
        return max(count, 1) / self.world

    def _micro_normalizer(self, norm: float, shard: TrainShard, m: Experience) -> float:
        """Micro-batch `m`'s divisor: the mini-batch's `norm` (ppo.micro_batch_weighting
        tokens), or verl's row weighting of the micro-batch's own mean (rows)."""
        if self.cfg.ppo.micro_batch_weighting == "tokens":
            return norm
        return rows_normalizer(self.cfg.ppo.loss_agg, m.response_mask, shard.global_rows,
                               self.world)

    def train(self, shards: list[TrainShard]) -> dict[str, tuple[float, float]]:
        """One optimiser step of the policy (and critic) per shard; returns weighted sums."""
        sums = MetricSums()
        for shard in shards:
            # a prompt's rows side by side: micro-batches share its forward (the row order
            # within an optimiser step changes nothing but rounding)
            shard = replace(shard, experience=shard.experience.select(
                micro_order(shard.experience)))
            self._policy_step(shard, sums)
            if self.critic is not None:
                self._critic_step(shard, sums)
        return sums.as_dict()

    def _correct(self, shard: TrainShard, sums: MetricSums) -> tuple[TrainShard, float]:
        """The rollout correction over this rank's rows of the mini-batch, before its first
        backward: the weights travel with the rows to the micro-batches, and the rejected
        tokens (sequences) leave the normaliser, counted over every rank."""
        exp = shard.experience
        if exp.behaviour_logprobs is None:
            raise ValueError("ppo.rollout_correction needs the engines' log-probs of the rows; "
                             "build the experience with behaviour_logprobs")
        corr = rollout_correction(self.cfg.ppo.rollout_correction, exp.old_logprobs,
                                  exp.behaviour_logprobs, exp.response_mask, exp.is_edited)
        keep = corr.keep.to(exp.response_mask.dtype)
        rejected = [float(exp.response_mask.sum() - keep.sum()),
                    float(exp.num_nonempty() - int((keep.sum(-1) > 0).sum()))]
        if self.world > 1:
            counts = torch.tensor(rejected, dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(counts)
            rejected = counts.tolist()
        shard = replace(shard, experience=exp.with_fields(
            response_mask=keep, correction_weights=corr.weights),
            global_tokens=shard.global_tokens - round(rejected[0]),
            global_seqs=shard.global_seqs - round(rejected[1]))
        for key, value in corr.stats.to_dict().items():
            # each a mean over its own tokens; ess is not one: the tokens' mean of the ranks'
            tokens = corr.kept_tokens if key in KEPT_STATS else corr.tokens
            if tokens and key.endswith(MAX_SUFFIX):
                sums.add_max(f"rollout_correction/{key}", value)
            elif tokens:
                sums.add(f"rollout_correction/{key}", value, tokens)
        return shard, self._normalizer(shard)

    def _policy_step(self, shard: TrainShard, sums: MetricSums) -> None:
        ppo, norm = self.cfg.ppo, self._normalizer(shard)
        if ppo.rollout_correction.mode != "none":
            shard, norm = self._correct(shard, sums)
        policy_loss = POLICY_LOSSES[policy_loss_name(self.cfg)]
        self.policy.train()
        total = 0.0
        for micro, real in self._micro_batches(shard.experience, shard.num_micro):
            m, _, _ = micro.to(self.device).trimmed()
            if not real:
                m = self._zero_targets(m)
            mb_norm = self._micro_normalizer(norm, shard, m)
            logits = self._policy_logits(self.policy_forward, m)
            logp = logprobs_from_logits(logits, m.responses)
            loss, stats = policy_loss(PolicyLossInput(
                logp, m.old_logprobs, m.advantages, m.response_mask, is_edited=m.is_edited,
                edit_logprobs=m.edit_logprobs, clip_low=ppo.clip_low, clip_high=ppo.clip_high,
                edit_clip_low=ppo.edit_clip_low, edit_clip_high=ppo.edit_clip_high,
                dual_clip=ppo.dual_clip, agg=ppo.loss_agg, normalizer=mb_norm,
                is_weights=m.correction_weights,
                rewrite_clip=ppo.rollout_correction.rewrite_clip,
            ))
            ctx = nullcontext() if ppo.entropy_coef > 0 else torch.no_grad()
            with ctx:
                entropy = entropy_from_logits(logits)
                ent_term = aggregate_loss(entropy, m.response_mask, ppo.loss_agg, mb_norm)
            if ppo.entropy_coef > 0:
                loss = loss - ppo.entropy_coef * ent_term
            if self.ref is not None and ppo.kl_coef > 0 and not ppo.kl_in_reward:
                kl = kl_estimate(logp, m.ref_logprobs, ppo.kl_estimator, m.response_mask)
                loss = loss + ppo.kl_coef * aggregate_loss(kl, m.response_mask, ppo.loss_agg,
                                                           mb_norm)
            self.policy.backward(loss, scale_wrt_gas=False)
            total += float(loss.detach())
            tokens = float(m.response_mask.sum())
            if real and tokens > 0:
                for key, value in stats.to_dict().items():
                    sums.add(f"policy/{key}", value, tokens)
                sums.add("policy/entropy", float(ent_term.detach()) * mb_norm / tokens, tokens)
        step_and_report(self.policy, sums, "policy", "loss", total, self.world)

    def _critic_step(self, shard: TrainShard, sums: MetricSums) -> None:
        ppo, norm = self.cfg.ppo, self._normalizer(shard)
        self.critic.train()
        total = 0.0
        for micro, real in self._micro_batches(shard.experience, shard.num_micro):
            m, _, _ = micro.to(self.device).trimmed()
            if not real:
                m = self._zero_targets(m)
            values = self._values(m)
            loss, clip_frac = value_loss(
                values, m.old_values, m.returns, m.response_mask, clip=ppo.value_clip,
                agg=ppo.loss_agg, normalizer=self._micro_normalizer(norm, shard, m),
            )
            self.critic.backward(loss, scale_wrt_gas=False)
            total += float(loss.detach())
            tokens = float(m.response_mask.sum())
            if real and tokens > 0:
                sums.add("critic/value_clip_frac", float(clip_frac), tokens)
                sums.add("critic/values", float(masked_mean(values.detach(), m.response_mask)),
                         tokens)
        step_and_report(self.critic, sums, "critic", "value_loss", total, self.world)

    @staticmethod
    def _zero_targets(m: Experience) -> Experience:
        zeros = torch.zeros_like(m.response_mask)
        return m.with_fields(
            old_logprobs=zeros, edit_logprobs=zeros, advantages=zeros, returns=zeros,
            old_values=zeros, ref_logprobs=zeros,
        )

    # --- state ------------------------------------------------------------------------------
    def save_state(self, path: str) -> None:
        """Full training state (weights, optimiser, scheduler) under `path`; all ranks call."""
        save_engine_state(self.policy, path, POLICY_TAG)
        if self.critic is not None:
            save_engine_state(self.critic, path, CRITIC_TAG)
        if lora_enabled(self.cfg):
            lora.save_rng(path, self.rank)

    def load_state(self, path: str) -> None:
        for engine, tag in ((self.policy, POLICY_TAG), (self.critic, CRITIC_TAG)):
            if engine is not None:
                load_engine_state(engine, path, tag)
        if lora_enabled(self.cfg):
            lora.load_rng(path, self.rank)

    def export_hf(self, path: str) -> None:
        """The policy as a Hugging Face model directory (rank 0 writes; all ranks call): with
        LoRA the merged model, its adapter beside it (`lora.adapter_dir`)."""
        export_hf_model(self.policy.module, self.tokenizer, self.zero3, self.rank, path,
                        self._load_policy)

    def policy_state(self) -> dict[str, torch.Tensor]:
        """Full policy weights on rank 0 (others get {}): for tests and small models."""
        return gathered_state(self.policy.module, self.zero3, self.rank)

    def info(self) -> dict[str, Any]:
        return {"rank": self.rank, "world": self.world, "device": str(self.device),
                "zero_stage": self.cfg.learner.zero_stage, "model": self.model_path}

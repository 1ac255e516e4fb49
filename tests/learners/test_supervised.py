"""Supervised training: assistant-only labels, and the DeepSpeed rank group on local Ray
(SFT loss falls, 2 ranks train exactly like 1, BT accuracy as BTScorer measures it, state)."""

from __future__ import annotations

import pytest
import torch

from cpe_ray.chat import Message, load_policy_system_template
from cpe_ray.config import load_config
from cpe_ray.data import load_pairwise, load_sft
from cpe_ray.errors import DataError
from cpe_ray.learners.supervised import SupervisedSpec
from cpe_ray.models import load_tokenizer, resolve_model_path
from cpe_ray.paths import DATA_DIR
from cpe_ray.stages.data import heldout_split, tokenize_conversation, tokenize_pair

DEMO = DATA_DIR / "demo"


@pytest.fixture(scope="module")
def tiny():
    path = resolve_model_path("tiny")
    return path, load_tokenizer(path)


def test_labels_cover_exactly_the_assistant_turns(tiny) -> None:
    _, tok = tiny
    conv = [Message("system", "You help."), Message("user", "Hi there"),
            Message("assistant", "Hello! How can I help?"), Message("user", "Cook?"),
            Message("assistant", "Boil water, add pasta.")]
    ex = tokenize_conversation(tok, conv, 1024)
    ids, labels = list(ex.input_ids), list(ex.labels)
    eos = tok.eos_token_id
    # labelled: each assistant content's tokens and its <|im_end|>, nothing else
    expected = []
    for m in conv:
        if m.role == "assistant":
            expected += tok(m.content, add_special_tokens=False)["input_ids"] + [eos]
    assert [i for i, lab in zip(ids, labels, strict=True) if lab] == expected
    assert tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab]) == (
        "Hello! How can I help?<|im_end|>Boil water, add pasta.<|im_end|>")
    assert ex.num_targets == len(expected)
    # the ids are the whole templated conversation
    assert tok.decode(ids) == tok.apply_chat_template(
        [m.as_dict() for m in conv], tokenize=False)
    # truncation keeps the start; nothing labelled left within max_length gives None
    first_label = labels.index(1)
    assert tokenize_conversation(tok, conv, first_label) is None
    cut = tokenize_conversation(tok, conv, first_label + 3)
    assert cut.num_targets == 3 and len(cut.input_ids) == first_label + 3


def test_demo_sft_labels_are_its_assistant_messages(tiny) -> None:
    _, tok = tiny
    template = load_policy_system_template()
    for record in load_sft(DEMO / "sft.jsonl", system_template=template).records:
        ex = tokenize_conversation(tok, record.messages, 4096)
        labelled = tok.decode([i for i, lab in zip(ex.input_ids, ex.labels, strict=True) if lab])
        assert labelled == "".join(m.content + "<|im_end|>" for m in record.messages
                                   if m.role == "assistant")


def test_a_template_that_rewrites_earlier_turns_is_one_clear_error(tiny) -> None:
    import copy

    _, tok = tiny
    drops = copy.deepcopy(tok)  # like templates that hide earlier assistant turns' reasoning
    drops.chat_template = (
        "{%- for m in messages %}{%- if m.role == 'assistant' and not loop.last %}"
        "{{- '<|im_start|>assistant\\n[earlier]<|im_end|>\\n' }}{%- else %}"
        "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
        "{%- endif %}")
    conv = [Message("user", "a"), Message("assistant", "b"), Message("user", "c"),
            Message("assistant", "d")]
    with pytest.raises(DataError, match=r"demo, messages\[1\]: the chat template renders"):
        tokenize_conversation(drops, conv, 100, where="demo")


def test_heldout_split_is_seeded_sized_and_stable() -> None:
    keys = [f"k{i}" for i in range(32)]
    train, held = heldout_split(keys, 0.25, seed=7)
    assert len(held) == 8 and sorted(train + held) == list(range(32))
    assert heldout_split(keys, 0.25, seed=7) == (train, held)
    assert heldout_split(keys, 0.25, seed=8)[1] != held
    assert heldout_split(keys, 0.0, 7) == (list(range(32)), [])
    assert len(heldout_split(keys[:2], 0.01, 7)[1]) == 1  # at least one when asked
    # appending a record keeps (nearly) the same held-out set: it hashes the keys, not positions
    more = heldout_split([*keys, "new"], 0.25, seed=7)[1]
    assert len(set(more) & set(held)) >= 7


def test_cosine_schedule() -> None:
    spec = SupervisedSpec("sft", "m", 1.0, "cosine", warmup_steps=1, total_steps=5)
    factors = [spec.lr_factor(s) for s in range(5)]
    assert factors[0] == pytest.approx(0.5)  # warm-up
    assert factors[1] == pytest.approx(1.0)
    assert factors == sorted(factors[:2]) + sorted(factors[2:], reverse=True)
    assert SupervisedSpec("sft", "m", 1.0).lr_factor(100) == 1.0
    with pytest.raises(ValueError, match="task"):
        SupervisedSpec("dpo", "m", 1.0)


# ------------------------------------------------------------------ the rank group on Ray


def _sft_examples(tok, n: int):
    records = load_sft(DEMO / "sft.jsonl", system_template=load_policy_system_template()).records
    return [tokenize_conversation(tok, r.messages, 512) for r in records[:n]]


def _pairs(tok, n: int):
    template = load_policy_system_template()
    return [(p, tokenize_pair(tok, template, p.persona, p.question, p.chosen, p.rejected, 2048))
            for p in load_pairwise(DEMO / "pairwise.jsonl").records[:n]]


def _group(task: str, path: str, ranks: int, lr: float):
    from cpe_ray.runtime.groups import SupervisedGroup

    cfg = load_config(None, [f"learner.num_ranks={ranks}", "learner.micro_batch_size=2",
                             "learner.zero_stage=2"])
    group = SupervisedGroup(cfg, SupervisedSpec(task, path, lr))
    infos = group.setup()
    assert [i["rank"] for i in infos] == list(range(ranks))
    return group


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_sft_loss_falls_and_two_ranks_train_like_one(tiny) -> None:
    path, tok = tiny
    batch = _sft_examples(tok, 5)  # 5 rows: ranks get 3 and 2, micro-batches 2 + 1 and 2
    one = _group("sft", path, 1, 3e-3)
    losses = [one.train(batch)["train/loss"] for _ in range(2)]
    after_two = one.model_state()
    losses += [one.train(batch)["train/loss"] for _ in range(3)]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0] - 0.3, losses
    one.shutdown()
    two = _group("sft", path, 2, 3e-3)
    m = [two.train(batch) for _ in range(2)]
    assert [x["train/loss"] for x in m] == pytest.approx(losses[:2], rel=1e-5)
    state = two.model_state()
    diff = torch.cat([(state[k] - after_two[k]).abs().flatten() for k in after_two])
    # Float32 sums split over 2 ranks round differently; Adam's first steps (m / sqrt(v), about
    # lr x sign(g)) turn that noise on near-zero gradients into up to 2.4e-5 here (tiny v2),
    # under 1% of the 3e-3 step: 1e-4 still catches a rank that trained on other data.
    assert diff.max() < 1e-4, float(diff.max())
    two.shutdown()


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_bt_training_ranks_state_and_accuracy_as_btscorer_sees_it(tiny, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    from cpe_ray.judges.base import JudgeRequest
    from cpe_ray.judges.bt import BTScorer

    path, tok = tiny
    pairs = _pairs(tok, 12)
    train, held = [t for _, t in pairs[:8]], pairs[8:]
    one = _group("bt", path, 1, 1e-2)
    first = [one.train(train) for _ in range(2)]
    assert 0 <= first[0]["train/accuracy"] <= 1 and first[0]["train/loss"] > 0
    one.save_state(str(tmp_path / "state"))
    saved = one.model_state()
    one.export_hf(str(tmp_path / "rm"))
    one.train(train)
    assert any(not torch.equal(one.model_state()[k], saved[k]) for k in saved)
    one.load_state(str(tmp_path / "state"))
    assert all(torch.equal(one.model_state()[k], saved[k]) for k in saved)
    evaluation = one.evaluate([t for _, t in held])
    one.shutdown()
    two = _group("bt", path, 2, 1e-2)
    second = [two.train(train) for _ in range(2)]
    assert [m["train/loss"] for m in second] == pytest.approx(
        [m["train/loss"] for m in first], rel=1e-5)
    diff = max(float((two.model_state()[k] - saved[k]).abs().max()) for k in saved)
    assert diff < 1e-5
    two.shutdown()
    # the export is a sequence-classification checkpoint that BTScorer reads, and the
    # group's held-out accuracy is the share of pairs BTScorer ranks right
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").num_labels == 1
    scorer = BTScorer(str(tmp_path / "rm"), device="cpu")
    scores = scorer.score([JudgeRequest(p.persona, p.question, answer) for p, _ in held
                           for answer in (p.chosen, p.rejected)])
    right = [scores[2 * i].reward > scores[2 * i + 1].reward for i in range(len(held))]
    assert evaluation["eval/accuracy"] == pytest.approx(sum(right) / len(held))
    margins = [scores[2 * i].reward - scores[2 * i + 1].reward for i in range(len(held))]
    assert evaluation["eval/margin"] == pytest.approx(sum(margins) / len(held), abs=1e-4)

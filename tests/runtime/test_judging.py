"""The judge backends of training: a CPE step judged by a GRM behind an OpenAI-compatible
endpoint (the loopback server), and the checks that run before any actor starts."""

from __future__ import annotations

import json

import pytest

from cpe_ray.config import load_config
from cpe_ray.judges.grm import (
    build_grm_messages,
    load_grm_template,
    parse_judgement,
    weighted_reward,
)
from cpe_ray.judges.registry import judge_in_driver
from tests.evaluation_server import ChatServer, grm_policy

KEY_ENV = "CPE_RAY_TEST_GRM_KEY"
KEY = "grm-key-9"
SMALL = [
    "trainer.rollout_batch_size=2", "ppo.mini_batch_size=1", "rollout.n_samples_per_prompt=2",
    "rollout.max_new_tokens=8", "post_edit.max_new_tokens=8", "learner.micro_batch_size=2",
    "logging.wandb_mode=disabled",
]


def test_where_each_backend_judges() -> None:
    def where(*o: str) -> bool:
        return judge_in_driver(load_config(None, list(o)))

    assert where() and where("grm.backend=openai", "grm.api.base_url=u", "grm.api.model=m")
    assert where("grm.backend=bt", "grm.model_path=m", "post_edit.enabled=false")
    assert not where("grm.backend=hf", "grm.model_path=m")
    assert not where("grm.backend=bt", "grm.model_path=m", "post_edit.enabled=false",
                     "cluster.use_gpu=true")


def test_an_unset_endpoint_key_is_one_line_before_any_actor(capsys, monkeypatch) -> None:
    import ray

    from cpe_ray.cli import main

    monkeypatch.delenv(KEY_ENV, raising=False)
    code = main(["train", "grm.backend=openai", "grm.api.base_url=http://127.0.0.1:9/v1",
                 "grm.api.model=grm", f"grm.api.api_key_env={KEY_ENV}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"cpe-ray: error: grm.api.api_key_env names ${KEY_ENV}")
    assert not ray.is_initialized()


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_cpe_step_judged_by_a_grm_endpoint(tmp_path, monkeypatch) -> None:
    from cpe_ray.run import train

    monkeypatch.setenv(KEY_ENV, KEY)
    with ChatServer(grm_policy, KEY) as server:
        run = train(load_config(None, [
            *SMALL, "grm.backend=openai", f"grm.api.base_url={server.base_url}",
            "grm.api.model=grm-14b", f"grm.api.api_key_env={KEY_ENV}",
            f"run.output_dir={tmp_path}", "trainer.max_steps=1"]), progress=False)
        bodies = list(server.bodies)
    last = run["last"]
    assert last["grm/parse_failures"] == 0 and last["post_edit/kept_fraction"] == 0.5
    # 4 answers scored, 2 critiqued (random selection first), 2 rewrites scored
    temps = sorted(b["temperature"] for b in bodies)
    assert temps == [0.0] * 6 + [0.9] * 2 and {b["model"] for b in bodies} == {"grm-14b"}
    template = load_grm_template("grm_en.txt")
    samples = [json.loads(line) for line in
               (tmp_path / "cpe-tiny" / "samples.jsonl").read_text().splitlines()]
    for s in samples:  # each reward and critique is the endpoint's own judgement
        text = grm_policy(build_grm_messages(template, s["persona"], s["question"], s["answer"]))
        assert s["answer_reward"] == pytest.approx(weighted_reward(parse_judgement(text)))
        if s["kept"]:
            assert s["critique"] == parse_judgement(text).critique
    assert last["reward/original/weighted"] == pytest.approx(
        sum(s["answer_reward"] for s in samples) / len(samples))


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_cpe_step_on_release_data_judged_in_the_release_format(tmp_path, monkeypatch) -> None:
    """The release's pieces together, under the default GRM config: prompts from a verl
    parquet, a GRM endpoint prompted with release-style templates (score and critique apart)
    that answers `Natural: N分`, and cuts off the first output of every prompt. Each cut-off
    is retried (greedy score calls at grm.retry_temperature), counted in grm/retries, and
    the rewards are the release's 0.35 H + 0.40 P + 0.25 N."""
    from cpe_ray.run import train
    from tests.test_data import ANA, release_user_turn, write_verl_parquet

    prompts = write_verl_parquet(tmp_path / "test.parquet", [
        release_user_turn(ANA, "夜班后怎么吃？"), release_user_turn({"Name": "Bo"}, "怎么睡好？")])
    (tmp_path / "score.txt").write_text("SCORE\n{persona_str}\n{question_str}\n{solution_str}")
    (tmp_path / "critique.txt").write_text("CRITIQUE\n{persona_str}\n{question_str}\n"
                                           "{solution_str}")
    seen: set[str] = set()

    def release_grm(messages):
        content = messages[-1]["content"]
        if content not in seen:
            seen.add(content)
            return "<critique>\n太长。\n</critique>\n<scores>\nHelpfulness: 3分\n"  # cut off
        return ("<critique>\n太长。\n</critique>\n\n<scores>\nHelpfulness: 3分\n"
                "Personalization: 3分\nNatural: 2分\n</scores>")

    monkeypatch.setenv(KEY_ENV, KEY)
    with ChatServer(release_grm, KEY) as server:
        run = train(load_config(None, [
            *SMALL, "grm.backend=openai", f"grm.api.base_url={server.base_url}",
            "grm.api.model=grm-14b", f"grm.api.api_key_env={KEY_ENV}",
            f"grm.template={tmp_path / 'score.txt'}",
            f"grm.critique_template={tmp_path / 'critique.txt'}", f"data.train_path={prompts}",
            f"run.output_dir={tmp_path}", "trainer.max_steps=1"]), progress=False)
        bodies = list(server.bodies)
    last = run["last"]
    judged = 4 + 2 + 2  # answers scored, rewrites scored, answers critiqued
    retries = len(bodies) - judged
    assert last["grm/parse_failures"] == 0 and last["grm/retries"] == retries > 0
    score = [b["temperature"] for b in bodies if b["messages"][0]["content"].startswith("SCORE")]
    assert sorted(set(score)) == [0.0, 0.7] and score.count(0.0) == 6
    assert last["reward/original/weighted"] == pytest.approx(0.35 * 3 + 0.40 * 3 + 0.25 * 2)
    assert last["reward/original/naturalness"] == 2
    samples = [json.loads(line) for line in
               (tmp_path / "cpe-tiny" / "samples.jsonl").read_text().splitlines()]
    assert {s["prompt_id"] for s in samples} == {"test-0", "test-1"}
    assert all(s["persona"].startswith("{\n  \"Name\": ") for s in samples)


def _train_cli(tmp_path, *overrides: str, timeout: float = 300):
    """`cpe-ray train` in a subprocess: (exit code, stderr lines, seconds)."""
    import os
    import subprocess
    import sys
    import time

    env = dict(os.environ, **{KEY_ENV: KEY})
    tmp_path.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "cpe_ray", "train", *SMALL,
                           f"run.output_dir={tmp_path}", *overrides], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=timeout)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("cpe-ray: error:")]
    return proc.returncode, errors, time.monotonic() - start


@pytest.mark.slow
def test_a_dead_grm_endpoint_stops_the_run_before_anything_is_trained(tmp_path) -> None:
    """The issue's case: nothing listens at 127.0.0.1:1 and every retry is off. Before, the
    run trained on rewards of 0 (8/8 parse failures) and exited 0 with a checkpoint."""
    code, errors, _ = _train_cli(
        tmp_path, "grm.backend=openai", "grm.api.base_url=http://127.0.0.1:1/v1",
        "grm.api.model=x", f"grm.api.api_key_env={KEY_ENV}", "grm.api.max_retries=0",
        "grm.max_retries=0", "trainer.max_steps=2")
    assert code == 2 and len(errors) == 1
    assert "GRM endpoint x at http://127.0.0.1:1/v1 could not" in errors[0]
    assert "at step 1/2" in errors[0] and "no checkpoint was written yet" in errors[0]
    run_dir = tmp_path / "cpe-tiny"
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
    assert not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text()


@pytest.mark.slow
def test_a_grm_that_stops_answering_mid_run_ends_it_within_its_budget(tmp_path) -> None:
    """The judge answers step 1's 8 requests, then fails every request: the run ends in one
    line naming the endpoint after its bounded retries, keeping step 1's log."""
    served = []

    def after_step_1(messages):  # 503 from the 9th request on
        served.append(1)
        return 503 if len(served) > 8 else None

    with ChatServer(grm_policy, KEY, fail_if=after_step_1) as server:
        code, errors, seconds = _train_cli(
            tmp_path, "grm.backend=openai", f"grm.api.base_url={server.base_url}",
            "grm.api.model=grm", f"grm.api.api_key_env={KEY_ENV}", "grm.api.max_retries=2",
            "grm.api.backoff_initial_s=0.05", "grm.api.backoff_max_s=0.1",
            "trainer.max_steps=3")
    assert code == 2 and len(errors) == 1, errors
    assert "GRM endpoint grm at" in errors[0] and "at step 2/3" in errors[0]
    steps = [json.loads(x)["step"]
             for x in (tmp_path / "cpe-tiny" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0]
    assert seconds < 240


@pytest.mark.slow
def test_unparsed_judgements_warn_then_stop(tmp_path) -> None:
    """A judge whose every score fails to parse stops the run before its step is trained on;
    one that fails every other request (half of each step's 4 scores, over
    grm.max_parse_failure_frac=0.25) warns at step 1 and stops at step 2 (patience 2)."""
    common = ("grm.backend=openai", "grm.api.model=grm", f"grm.api.api_key_env={KEY_ENV}",
              "grm.max_retries=0", "post_edit.enabled=false")
    with ChatServer(lambda m: "I cannot score this.", KEY) as server:
        code, errors, _ = _train_cli(tmp_path / "a", *common,
                                     f"grm.api.base_url={server.base_url}",
                                     "trainer.max_steps=2")
    assert code == 2 and "scores of this step all failed to parse" in errors[0], errors
    assert "at step 1/2" in errors[0] and "'I cannot score this.'" in errors[0]

    served = []

    def every_other(messages):
        served.append(1)
        return "no scores here" if len(served) % 2 else grm_policy(messages)

    with ChatServer(every_other, KEY) as server:
        code, errors, _ = _train_cli(tmp_path / "b", *common,
                                     f"grm.api.base_url={server.base_url}",
                                     "grm.max_parse_failure_frac=0.25",
                                     "grm.parse_failure_patience=2", "trainer.max_steps=4")
    assert code == 2 and len(errors) == 1, errors
    assert "over grm.max_parse_failure_frac=0.25 of its judgements in steps 1-2" in errors[0]
    assert "(at step 3/4;" in errors[0]  # where the run stopped
    lines = (tmp_path / "b" / "cpe-tiny" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["grm/parse_failure_frac"] for x in lines] == [0.5, 0.5]

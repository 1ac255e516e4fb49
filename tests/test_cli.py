"""The `cpe-ray` command: real subprocesses, exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpe_ray.paths import REPO_ROOT


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cpe_ray", *args], input=stdin, text=True,
                          capture_output=True, cwd=REPO_ROOT, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], expected: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("cpe-ray: error: ") and expected in lines[0], lines[0]


def test_config_prints_resolved_yaml() -> None:
    proc = cli("config", "ppo.epochs=3")
    assert proc.returncode == 0, proc.stderr
    assert "  epochs: 3\n" in proc.stdout and "model_path: tiny" in proc.stdout


@pytest.mark.parametrize(("args", "expected"), [
    (("config", "ppo.kl_coeff=1"), "did you mean 'ppo.kl_coef'?"),
    (("config", "post_edit.ratio=3"), "post_edit.ratio = 3.0 is outside [0, 1]"),
    (("config", "--config", "nope.yaml"), "config file nope.yaml not found"),
    (("data-check", "prompts", "nope.jsonl"), "nope.jsonl"),
    (("grm-parse", "nope.txt"), "grm-parse: nope.txt is not a file"),
    (("grm-parse", "-", "grm.template_placeholders.persona_str=profile"),
     "grm.template_placeholders.persona_str = 'profile' is not one of: persona, question, answer"),
    (("config", "grm.retry_temperature=0"), "grm.retry_temperature = 0.0 is outside (0, inf)"),
    (("config", "cluster.address=[::1]:6379"), "cluster.address: the value [::1]:6379 is not "
                                               "valid YAML"),
])
def test_bad_input_is_one_line_and_exit_2(args: tuple[str, ...], expected: str) -> None:
    assert_one_line_error(cli(*args), expected)


def test_bad_record_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"persona": "a", "question": "q"}\n{"persona": "b"}\n')
    assert_one_line_error(cli("data-check", "prompts", str(bad)), f"{bad}:2")
    proc = cli("data-check", "prompts", str(bad), "--on-bad", "skip")
    assert proc.returncode == 0, proc.stderr
    assert "prompts: 1 records loaded, 1 skipped" in proc.stdout


def test_binary_config_is_one_line(tmp_path: Path) -> None:
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"run:\n  name: \xd0\x00\xff")
    assert_one_line_error(cli("train", "--config", str(binary)),
                          f"{binary}: not a text file (byte 0xd0 at offset 13 is not UTF-8)")


@pytest.mark.parametrize("text", ["", "# run:\n#   seed: 3\n", "\n\n"])
def test_a_config_file_that_sets_nothing_is_one_line(tmp_path: Path, text: str) -> None:
    """Naming a file that changes nothing is a mistake (a wrong or emptied file); the
    defaults are one `--config` less away."""
    empty = tmp_path / "empty.yaml"
    empty.write_text(text)
    assert_one_line_error(cli("train", "--config", str(empty)),
                          f"{empty} sets nothing (it is empty or only comments)")


def test_data_check_demo_sets() -> None:
    proc = cli("data-check", "personafeedback", "data/demo/personafeedback")
    assert proc.returncode == 0, proc.stderr
    assert " 0 skipped" in proc.stdout


def test_grm_parse_stdin() -> None:
    text = "<critique>ok</critique><scores>Helpfulness: 2\nPersonalization: 2\nNaturalness: 2</scores>"
    proc = cli("grm-parse", "-", stdin=text)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["scores"] == {"helpfulness": 2.0, "personalization": 2.0, "naturalness": 2.0}
    assert out["reward"] == pytest.approx(2.0)  # (0.35 + 0.40 + 0.25) x 2
    assert cli("grm-parse", "-", stdin="no scores").returncode == 1


def test_grm_parse_reports_the_labels_it_matched() -> None:
    """A release-format output: before, naturalness was missing (exit 1, reward 2.25); now the
    `Natural` label is matched and reported, and the reward is the release's 2.75."""
    text = ("<critique>\n太长。\n</critique>\n\n<scores>\nHelpfulness: 3分\nPersonalization: 3分\n"
            "Natural: 2分\n</scores>")
    proc = cli("grm-parse", "-", stdin=text)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["labels"] == {"helpfulness": "Helpfulness", "personalization": "Personalization",
                             "naturalness": "Natural"}
    assert out["reward"] == pytest.approx(2.75) and out["critique"] == "太长。"
    assert out["labels_tried"]["naturalness"] == ["naturalness", "natural", "自然度", "自然性"]
    # a new GRM's own label, declared with an override, is checked in the same command
    proc = cli("grm-parse", "-", "grm.label_aliases.naturalness=[Fluency]",
               stdin=text.replace("Natural:", "Fluency:"))
    out = json.loads(proc.stdout)
    assert proc.returncode == 0 and out["labels"]["naturalness"] == "Fluency"


def test_tiny_model_command(tmp_path: Path) -> None:
    proc = cli("tiny-model", str(tmp_path / "tiny"))
    assert proc.returncode == 0, proc.stderr
    tok = AutoTokenizer.from_pretrained(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    assert model.config.model_type == "qwen2"
    assert tok.eos_token == "<|im_end|>"

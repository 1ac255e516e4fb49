"""`cpe-ray sft | grm collect | grm train | rm train`: bad input is one line and exit 2 before
any actor starts; the `python -m launch.*` entrypoints run the same commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cpe_ray.cli import main
from cpe_ray.paths import REPO_ROOT

KEY_ENV = "CPE_RAY_TEST_STAGE_KEY"


def _bad(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


SFT_OK = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
PAIR_OK = '{"persona": "a cook", "question": "q", "chosen": "a", "rejected": "b"}\n'
INPUT_OK = '{"persona": "a cook", "question": "q", "answer": "a"}\n'
API = ["distill.api.base_url=http://127.0.0.1:9/v1", "distill.api.model=teacher",
       f"distill.api.api_key_env={KEY_ENV}"]


def cases(tmp: Path) -> list[tuple[list[str], str]]:
    no_assistant = '{"messages": [{"role": "user", "content": "hi"}]}\n'
    return [
        (["sft", "sft.data_path=nope.jsonl"], "SFT file not found"),
        (["sft", f"sft.data_path={_bad(tmp, 's.jsonl', SFT_OK + no_assistant)}"],
         f"{tmp / 's.jsonl'}:2: no assistant message"),
        (["sft", "sft.lrr=1"], "unknown key 'sft.lrr' in the command line; did you mean 'sft.lr'?"),
        (["sft", "policy.model_path=/nope/model"], "model path /nope/model does not exist"),
        (["grm", "collect"], "the endpoint needs distill.api.base_url and distill.api.model"),
        (["grm", "collect", *API], f"distill.api.api_key_env names ${KEY_ENV}, which is not set"),
        (["grm", "collect", *API, "distill.input_path=" + str(
            _bad(tmp, "i.jsonl", INPUT_OK + '{"persona": "x", "question": "q"}\n'))],
         f"{tmp / 'i.jsonl'}:2: missing required field 'answer'"),
        (["grm", "train", f"distill.output_path={tmp / 'none.jsonl'}"],
         "run `cpe-ray grm collect` first"),
        (["grm", "train", "distill.output_path=" + str(_bad(tmp, "j.jsonl", '{"key": "k"}\n'))],
         "lacks persona, question, answer, output, parsed"),
        (["rm", "train", "rm.data_path=nope.jsonl"], "pairwise file not found"),
        (["rm", "train", "rm.data_path=" + str(
            _bad(tmp, "p.jsonl", PAIR_OK + PAIR_OK.replace('"b"', '"a"')))],
         f"{tmp / 'p.jsonl'}:2: 'chosen' and 'rejected' are the same answer"),
        (["train", "grm.backend=bt", "grm.model_path=/m"],
         "post_edit.enabled needs critiques, which grm.backend=bt (a scalar reward model) "
         "cannot write"),
    ]


NUM_CASES = 12


def test_every_case_is_run(tmp_path) -> None:
    assert len(cases(tmp_path)) == NUM_CASES


@pytest.mark.parametrize("index", range(NUM_CASES))
def test_bad_input_is_one_line_before_any_actor(index, tmp_path, capsys, monkeypatch) -> None:
    import ray

    monkeypatch.chdir(tmp_path)  # relative paths as a user in another folder gives them
    monkeypatch.delenv(KEY_ENV, raising=False)
    args, expected = cases(tmp_path)[index]
    code = main([*args, f"run.output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("cpe-ray: error: "), err
    assert expected in err[0], err[0]
    assert not ray.is_initialized()
    assert not (tmp_path / "out").exists()  # nothing written either


def test_launch_entrypoints_run_the_same_commands(tmp_path) -> None:
    for module, args, expected in (
            ("launch.sft", ["sft.data_path=nope.jsonl"], "SFT file not found"),
            ("launch.grm", ["train", f"distill.output_path={tmp_path / 'x.jsonl'}"],
             "grm collect` first"),
            ("launch.rm", ["train", "rm.data_path=nope.jsonl"], "pairwise file not found")):
        proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                              text=True, cwd=REPO_ROOT, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr

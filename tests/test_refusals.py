"""Refused runs: bad data and unreachable models are caught before any model loads, with the config key,
the file and the line, and leave no run folder; the entry points print such errors (and Ctrl-C) without
a traceback and exit 2 / 130."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, compose_config

from anchorcoder.evaluation import run as eval_run
from anchorcoder.registry import ConfigError

MBPP = ROOT.parent / "shared" / "data" / "mbpp" / "mbpp.jsonl"


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(eval_run, "load_model", refuse)


def mbpp_with(tmp_path: Path, line: int, text: bytes | None) -> Path:
    """MBPP's file with line ``line`` (1-based) replaced by ``text`` (None: the line repeated)."""
    lines = MBPP.read_bytes().splitlines(keepends=True)
    lines[line - 1] = lines[line - 2] if text is None else text + b"\n"
    path = tmp_path / "mbpp_bad.jsonl"
    path.write_bytes(b"".join(lines))
    return path


def first_row(fields_removed: tuple[str, ...] = ()) -> bytes:
    row = json.loads(MBPP.read_bytes().splitlines()[0])
    return json.dumps({k: v for k, v in row.items() if k not in fields_removed}).encode()


@pytest.mark.parametrize(
    ("line", "text", "sha256", "expected"),
    [
        (7, b"\xff\xfe garbage \x80\x81", None, r"line 7 is not UTF-8 text"),
        (12, b'{"task_id": 12, "text": "unterminated', None, r"line 12 is not valid JSON"),
        (3, b"[1, 2, 3]", None, r"line 3 is not a JSON object"),
        (5, first_row(("test_list",)), None, r"line 5 lacks test_list"),
        (9, None, None, r"line 9: task_id \d+ again \(first at line 8\)"),
        (7, b'{"task_id": 7}', "default", r"has sha256 [0-9a-f]{64}, expected .*benchmark.sha256"),
    ],
    ids=["garbage bytes", "invalid JSON", "not an object", "missing field", "duplicate id", "wrong checksum"],
)
def test_bad_mbpp_data_is_refused_before_the_model_loads(tmp_path, no_model_load, line, text, sha256, expected):
    bad = mbpp_with(tmp_path, line, text)
    overrides = ["model=tiny-llama", "benchmark=mbpp", f"benchmark.data_file={bad}", "logger=none"]
    if sha256 is None:
        overrides.append("benchmark.sha256=null")
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=expected) as refused:
        eval_run.run_eval(compose_config(overrides=overrides), run_dir)
    assert "benchmark." in str(refused.value) and str(bad) in str(refused.value)
    assert not run_dir.exists()


def test_bad_humaneval_plus_and_code_ppl_data_are_refused_too(tmp_path, no_model_load):
    rows = [{"task_id": "HumanEval/0", "prompt": "", "entry_point": "f", "canonical_solution": "", "test": ""}] * 2
    path = tmp_path / "plus.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    plus = ["model=tiny-llama", "benchmark=humaneval_plus", f"benchmark.data_file={path}", "benchmark.sha256=null"]
    with pytest.raises(ConfigError, match=r"benchmark.data_file: .*plus.jsonl.gz line 2: task_id 'HumanEval/0' again"):
        eval_run.run_eval(compose_config(overrides=[*plus, "logger=none"]), tmp_path / "run")
    path.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ConfigError, match=r"benchmark.data_file: .*plus.jsonl.gz cannot be read"):
        eval_run.run_eval(compose_config(overrides=[*plus, "logger=none"]), tmp_path / "run")
    bad = mbpp_with(tmp_path, 4, b"not json")
    ppl = ["model=tiny-llama", "benchmark=code_ppl", f"benchmark.mbpp_data_file={bad}", "benchmark.mbpp_sha256=null"]
    with pytest.raises(ConfigError, match=r"benchmark.mbpp_data_file: .* line 4 is not valid JSON"):
        eval_run.run_eval(compose_config(overrides=[*ppl, "logger=none"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def cli(script: str, *overrides: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})}, timeout=300,
    )  # fmt: skip


def test_an_unreachable_hub_model_is_one_line_exit_2_and_no_run_folder(tmp_path):
    offline = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on 9
    run_dir = tmp_path / "run"
    for script, model in (("eval.py", "qwen2.5-coder-1.5b"), ("train.py", "codellama-7b")):
        done = cli(script, f"model={model}", "logger=none", f"hydra.run.dir={run_dir}", env=offline)
        assert done.returncode == 2, done.stderr
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "model.path=" in errors[0] and "Hugging Face cache" in errors[0], done.stderr
        assert "127.0.0.1" in errors[0] and "huggingface-cli download" in errors[0]
        assert "Traceback" not in done.stderr and not run_dir.exists()


@pytest.mark.parametrize(
    ("script", "override", "key"),
    [
        ("eval.py", "benchmark.limit=-1", "benchmark.limit"),
        ("eval.py", "generation.max_new_tokens=0", "max_new_tokens"),
        ("eval.py", "model.dtype=float7", "model.dtype"),
        ("train.py", "trainer.max_steps=-1", "trainer.max_steps"),
    ],
)
def test_a_config_error_is_its_message_alone_with_exit_2(tmp_path, script, override, key):
    done = cli(script, "model=tiny-llama", "logger=none", override, f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and key in done.stderr
    assert not (tmp_path / "run").exists()


def test_ctrl_c_prints_the_resume_line_and_exits_130(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "eval.py"), "model=tiny-llama", "logger=none", "generation.max_new_tokens=512",
         f"hydra.run.dir={run_dir}"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT,
        # a background job (CI's shell) inherits SIGINT ignored, and Python then installs no handler
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    log, deadline = run_dir / "generations.jsonl", time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not (log.exists() and log.read_text().count("\n")):
        time.sleep(0.2)  # until a sample is finished: the run is in its generation loop
    stderr = None
    for _ in range(3):  # an interrupt that lands in a finalizer is ignored by Python: press again, as a user would
        proc.send_signal(signal.SIGINT)
        try:
            stderr = proc.communicate(timeout=20)[1]
            break
        except subprocess.TimeoutExpired:
            continue
    if stderr is None:
        proc.kill()
        pytest.fail("eval.py did not stop on SIGINT")
    assert proc.returncode == 130, stderr
    assert "interrupted: finished samples are saved" in stderr and "Traceback" not in stderr, stderr

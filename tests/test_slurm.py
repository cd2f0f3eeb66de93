"""The sbatch templates and slurm/pipeline.sh, against fake ``sbatch``/``scontrol`` (tests/fake_bin)."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "slurm"
FAKE_BIN = ROOT / "tests" / "fake_bin"
STAGES = {"stage1_rollouts.sbatch": "generate_paired_rollouts", "stage2_importance.sbatch": "train_importance_net",
          "stage3_grpo.sbatch": "train_grpo_softmask"}
SLURM_ENV = {"SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "2",
             "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NUM_NODES": "3"}


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    path = f"{FAKE_BIN}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "FAKE_SBATCH_LOG": str(tmp_path / "sbatch.log"),
            "FAKE_SCONTROL_LOG": str(tmp_path / "scontrol.log"), **extra}


@pytest.fixture(scope="module")
def submitted(tmp_path_factory):
    """Run pipeline.sh once; return its stdout and the argument lists fake sbatch received."""
    tmp = tmp_path_factory.mktemp("pipeline")
    result = subprocess.run(
        ["bash", str(SLURM / "pipeline.sh"), "--model_name", "/models/my-llm/", "--task_name", "data/qa.jsonl",
         "--tag", "exp1", "--run_name", "r1", "--shards", "3", "--stage3", "--softmask delta --sampler cosine"],
        env=_env(tmp), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = (tmp / "sbatch.log").read_text().splitlines()
    return result.stdout, [line.split("\t") for line in lines]


def _user_args(calls: list[list[str]], template: str) -> list[str]:
    (call,) = [c for c in calls if f"slurm/{template}" in c]
    return call[call.index(f"slurm/{template}") + 1:]


def test_scripts_parse_with_bash_n():
    scripts = [*_shell_scripts(), FAKE_BIN / "sbatch", FAKE_BIN / "scontrol"]
    assert len(scripts) == 9
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"


@pytest.mark.parametrize("template", sorted(STAGES))
def test_templates_ask_for_requeue_on_preemption(template):
    text = (SLURM / template).read_text()
    warning = 600 if template == "stage3_grpo.sbatch" else 90  # stage 3 finishes a step and saves a 1.5B policy
    for directive in (f"--signal=SIGUSR1@{warning}", "--requeue", "--open-mode=append"):
        assert f"#SBATCH {directive}\n" in text, directive
    assert "B:USR1" not in text and "B:SIGUSR1" not in text, "the job steps, not only the batch shell, need it"
    assert 'srun "${cmd[@]}"' in text
    # stage 1 keeps no state; stage 3 exits 128 + SIGUSR1 when it could not requeue itself (no scontrol)
    assert ("|| requeue_if_signalled $?" in text) == (template != "stage2_importance.sbatch")
    assert ("#SBATCH --array=" in text) == (template == "stage1_rollouts.sbatch")


def _shell_scripts() -> list[Path]:
    return [*SLURM.glob("*.sbatch"), SLURM / "common.sh", SLURM / "pipeline.sh", ROOT / "scripts" / "make_vllm_env.sh",
            ROOT / "scripts" / "demo.sh"]


def test_arrays_that_can_be_empty_expand_on_bash_4_2():
    """bash < 4.4 (old cluster images: 4.2) calls a bare "${a[@]}" of an empty array unbound under set -u.

    No bash 4.2 here to run them on, so a static check: every array some script can leave empty
    (assigned ``()`` or filled by ``read -a``) is expanded only as ``${a[@]+"${a[@]}"}``.
    """
    texts = {path: path.read_text() for path in _shell_scripts()}
    maybe_empty = set()
    for text in texts.values():
        maybe_empty |= set(re.findall(r"(?:^|\s)(\w+)=\(\)", text, flags=re.M))
        maybe_empty |= set(re.findall(r"\bread -\w*a\w* (\w+)", text))
    assert {"resume", "stage1", "stage2", "stage3", "extra"} <= maybe_empty
    for path, text in texts.items():
        for name in maybe_empty:
            bare = re.findall(rf'(?<!\+)"\$\{{{name}\[[@*]\]\}}"', text)
            assert not bare, f"{path.name}: expand {name} as ${{{name}[@]+\"${{{name}[@]}}\"}}"


def test_guarded_expansion_keeps_every_argument(tmp_path):
    script = 'set -u; empty=(); some=("a b" c); printf "<%s>" ${empty[@]+"${empty[@]}"} ${some[@]+"${some[@]}"}'
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "<a b><c>"


def test_requeue_through_scontrol(monkeypatch, tmp_path):
    from pipeline.grpo.preemption import requeue_slurm_job

    for key, value in _env(tmp_path, SLURM_JOB_ID="77").items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    assert requeue_slurm_job() == 0
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "77"]
    monkeypatch.delenv("SLURM_JOB_ID")
    assert requeue_slurm_job() == 0, "not a SLURM job: nothing to requeue"


def test_requeue_without_scontrol_hands_over_to_the_template(monkeypatch, tmp_path, caplog):
    """A container without scontrol: one clear line, and the exit code the template's requeue_if_signalled takes."""
    from pipeline.grpo.preemption import REQUEUE_EXIT, requeue_slurm_job

    script = f"source slurm/common.sh >/dev/null; requeue_if_signalled {REQUEUE_EXIT}"
    subprocess.run(["bash", "-c", script], cwd=ROOT, env=_env(tmp_path, **SLURM_ENV), capture_output=True)
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "77"], "the host's shell requeues"
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol, not even for the retry through a shell
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    with caplog.at_level("WARNING"):
        assert requeue_slurm_job() == REQUEUE_EXIT == 128 + 10
    (record,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "could not requeue SLURM job 77" in record.getMessage() and "\n" not in record.getMessage()


def _expand(template: str, user_args: list[str], tmp_path: Path, **env: str) -> list[str]:
    """The command line the template runs for ``user_args``, as bash expands it."""
    text = (SLURM / template).read_text()
    block = text[text.index("# >>> command"):text.index("# <<< command")]
    script = f'set -euo pipefail\nsource slurm/common.sh >/dev/null\nset -- "$@"\n{block}\nprintf "%s\\0" "${{cmd[@]}}"'
    result = subprocess.run(["bash", "-c", script, "bash", *user_args], cwd=ROOT, capture_output=True,
                            env=_env(tmp_path, **SLURM_ENV, **env), timeout=30)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode().split("\0")[:-1]


def _parse(module_name: str, argv: list[str]) -> dict:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            pytest.xfail(f"{module_name}.py does not exist yet")
        raise
    return module.main.make_context(f"{module_name}.py", argv).params


@pytest.mark.parametrize("template", sorted(STAGES))
@pytest.mark.parametrize("restart", ["0", "1"])
def test_template_command_parses_with_the_stage_cli(template, restart, submitted, tmp_path):
    """What pipeline.sh submits, expanded by the template, is valid for the stage's own option parser."""
    user_args = _user_args(submitted[1], template)
    argv = _expand(template, user_args, tmp_path, SLURM_RESTART_COUNT=restart)
    assert argv[:2] == ["python", f"{STAGES[template]}.py"]
    params = _parse(STAGES[template], argv[2:])
    if template == "stage1_rollouts.sbatch":
        assert (params["shard_index"], params["num_shards"], params["tag"]) == (2, 4, "exp1")
        assert params["backend"] == "auto"
    else:
        assert params["devices"] == "2" and params["resume"] == (restart == "1")
    if template == "stage3_grpo.sbatch":
        assert params["num_nodes"] == 3 and params["softmask"] == "delta" and params["sampler"] == "cosine"


def test_pipeline_submits_a_dependency_chain(submitted):
    stdout, calls = submitted
    assert len(calls) == 3
    assert calls[0][0] == "--array=0-2" and "slurm/stage1_rollouts.sbatch" in calls[0]
    assert "--dependency=afterok:1001" in calls[1] and "slurm/stage2_importance.sbatch" in calls[1]
    assert "--dependency=afterok:1002" in calls[2] and "slurm/stage3_grpo.sbatch" in calls[2]
    for job in ("job 1001", "job 1002", "job 1003"):
        assert job in stdout
    rollouts = "rollout_dump/qa/my-llm/rollouts_exp1"  # the stage's own naming: dataset stem, model dir name
    stage2 = _user_args(calls, "stage2_importance.sbatch")
    assert stage2[stage2.index("--rollouts") + 1] == rollouts
    assert stage2[stage2.index("--out_dir") + 1] == "rollout_dump"  # the tree's root, as for stages 1 and 3
    stage3 = _user_args(calls, "stage3_grpo.sbatch")
    assert stage3[stage3.index("--importance_net") + 1] == "rollout_dump/qa/my-llm/importance_net/r1/export"


def test_pipeline_rejects_unknown_options(tmp_path):
    result = subprocess.run(["bash", str(SLURM / "pipeline.sh"), "--bogus", "1"], env=_env(tmp_path),
                            capture_output=True, text=True)
    assert result.returncode == 2 and "unknown option '--bogus'" in result.stderr
    assert not (tmp_path / "sbatch.log").exists()


@pytest.mark.parametrize("status, requeued", [(138, True), (143, True), (1, False)])
def test_a_signalled_step_requeues_the_job(status, requeued, tmp_path):
    script = f"source slurm/common.sh >/dev/null; requeue_if_signalled {status}"
    result = subprocess.run(["bash", "-c", script], cwd=ROOT, env=_env(tmp_path, **SLURM_ENV), capture_output=True)
    assert result.returncode == status
    log = tmp_path / "scontrol.log"
    assert (log.read_text().split() == ["requeue", "77"]) if requeued else not log.exists()

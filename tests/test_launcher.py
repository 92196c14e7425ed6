"""scripts/launch_tpu_pod.py --dry_run: the gcloud commands it would run (no network, nothing runs)."""

import os
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "launch_tpu_pod.py")
BASE = [
    "--name=grpo-test",
    "--zone=us-west4-a",
    "--project=my-project",
    "--accelerator_type=v5litepod-16",
    "--config=configs/gsm8k_qwen2_5.py",
    "--workdir=gs://my-bucket/runs/qwen",
    "--dry_run",
]
OVERRIDES = ["--config.grpo.steps=200", "--config.model.pretrained=/data/Qwen2.5 1.5B"]


def dry_run(*args, expect_ok=True):
    result = subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    if expect_ok:
        assert result.returncode == 0, result.stderr
    return result, [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def gcloud(commands, *verbs):
    """The commands that start with `gcloud compute tpus <verbs...>`."""
    prefix = ["gcloud", "compute", "tpus", *verbs]
    return [c for c in commands if c[: len(prefix)] == prefix]


def remote_command(ssh_command):
    (flag,) = [a for a in ssh_command if a.startswith("--command=")]
    return flag[len("--command=") :]


def train_argv(commands):
    """train.py's argv inside the detached `bash -c '...'` of the training ssh command."""
    (ssh,) = [c for c in gcloud(commands, "tpu-vm", "ssh") if "scripts/train.py" in remote_command(c)]
    words = shlex.split(remote_command(ssh))
    inner = shlex.split(words[words.index("-c") + 1])
    start = inner.index("scripts/train.py")
    return ssh, inner[start : inner.index(">", start)]


def test_create_install_train_stream_delete():
    result, commands = dry_run(*BASE, "--delete", "--", *OVERRIDES)
    assert result.stderr.count("error") == 0
    create = gcloud(commands, "tpu-vm", "create")
    assert create == [
        [
            "gcloud", "compute", "tpus", "tpu-vm", "create", "grpo-test",
            "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite",
            "--zone=us-west4-a", "--project=my-project",
        ]
    ]  # fmt: skip
    # The checkout goes to every worker and is installed there with the tpu extra.
    (archive,) = [c for c in commands if c[:1] == ["git"]]
    assert "archive" in archive and archive[-1] == "HEAD"
    (scp,) = gcloud(commands, "tpu-vm", "scp")
    assert "--worker=all" in scp and scp[-2:] != ["--worker=0"]
    ssh = gcloud(commands, "tpu-vm", "ssh")
    install = [c for c in ssh if "pip install" in remote_command(c)]
    assert len(install) == 1 and "--worker=all" in install[0]
    assert "-e '.[tpu]'" in remote_command(install[0])
    # train.py on all workers at once, with the config, workdir and overrides passed through verbatim.
    train_ssh, argv = train_argv(commands)
    assert "--worker=all" in train_ssh
    assert argv == [
        "scripts/train.py",
        "--config=configs/gsm8k_qwen2_5.py",
        "--workdir=gs://my-bucket/runs/qwen",
        *OVERRIDES,
    ]
    # Worker 0's log is streamed, then the slice is deleted; the order is create, install, train,
    # stream, delete.
    stream = [c for c in ssh if "tail" in remote_command(c)]
    assert len(stream) == 1 and "--worker=0" in stream[0]
    delete = gcloud(commands, "tpu-vm", "delete")
    assert delete == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "grpo-test", "--zone=us-west4-a",
         "--project=my-project", "--quiet"]
    ]  # fmt: skip
    order = [commands.index(c) for c in (create[0], install[0], train_ssh, stream[0], delete[0])]
    assert order == sorted(order) and commands[-1] == delete[0]


def test_reuse_skips_create_and_nothing_is_deleted_unless_asked():
    _, commands = dry_run(*BASE, "--reuse")
    assert not gcloud(commands, "tpu-vm", "create")
    assert not gcloud(commands, "queued-resources")
    assert not gcloud(commands, "tpu-vm", "delete")
    assert train_argv(commands)[1][:3] == [
        "scripts/train.py",
        "--config=configs/gsm8k_qwen2_5.py",
        "--workdir=gs://my-bucket/runs/qwen",
    ]
    _, setup = dry_run(*BASE, "--reuse", "--worker_setup=gcloud storage cp -r gs://b/model ~/model")
    ssh = [remote_command(c) for c in gcloud(setup, "tpu-vm", "ssh") if "--worker=all" in c]
    assert ssh[1] == "gcloud storage cp -r gs://b/model ~/model"  # after the install, before train.py
    assert "pip install" in ssh[0] and "scripts/train.py" in ssh[2]
    _, skipped = dry_run(*BASE, "--reuse", "--skip_install", "--detach")
    ssh = gcloud(skipped, "tpu-vm", "ssh")
    assert len(ssh) == 1 and "scripts/train.py" in remote_command(ssh[0])  # no install, no stream
    assert not gcloud(skipped, "tpu-vm", "scp")


def test_queued_resource_create_wait_and_delete():
    args = [a for a in BASE if not a.startswith("--accelerator_type")]
    _, commands = dry_run(*args, "--accelerator_type=v5p-128", "--queued", "--spot", "--delete")
    (create,) = gcloud(commands, "queued-resources", "create")
    assert create[5] == "grpo-test"
    assert {
        "--node-id=grpo-test",
        "--accelerator-type=v5p-128",
        "--runtime-version=v2-alpha-tpuv5",
        "--spot",
    } <= set(create)
    assert not gcloud(commands, "tpu-vm", "create")
    (poll,) = gcloud(commands, "queued-resources", "describe")
    assert "--format=value(state.state)" in poll
    (delete,) = gcloud(commands, "queued-resources", "delete")
    assert "--force" in delete and delete == commands[-1]


def test_delete_only_and_git_source():
    _, commands = dry_run("--name=grpo-test", "--zone=us-west4-a", "--dry_run", "--delete_only")
    assert commands == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "grpo-test", "--zone=us-west4-a", "--quiet"]
    ]
    _, commands = dry_run(
        *BASE, "--source=git", "--git_url=https://example.com/grpo_jax.git", "--git_ref=abc123"
    )
    assert not [c for c in commands if c[:1] == ["git"]] and not gcloud(commands, "tpu-vm", "scp")
    (install,) = [c for c in gcloud(commands, "tpu-vm", "ssh") if "pip install" in remote_command(c)]
    assert "git clone --quiet https://example.com/grpo_jax.git" in remote_command(install)
    assert "checkout --quiet abc123" in remote_command(install)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--", "--steps=3"], "--config.* overrides"),
        (["--accelerator_type=v9-8"], "--runtime_version"),
    ],
)
def test_bad_arguments_fail_with_one_line(extra, message):
    args = [
        a for a in BASE if not (a.startswith("--accelerator_type") and "--accelerator_type=v9-8" in extra)
    ]
    result, commands = dry_run(*args, *extra, expect_ok=False)
    assert result.returncode == 1 and not commands
    assert message in result.stderr.strip().splitlines()[-1]

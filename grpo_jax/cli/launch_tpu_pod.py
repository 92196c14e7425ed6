"""Run `scripts/train.py` on every worker of a Cloud TPU VM slice, from this checkout.

    python scripts/launch_tpu_pod.py --name=grpo-v5e16 --zone=us-west4-a --project=MY_PROJECT \
        --accelerator_type=v5litepod-16 --config=configs/gsm8k_qwen2_5.py --workdir=gs://BUCKET/runs/qwen \
        [--queued] [--spot] [--reuse] [--delete] [--dry_run] -- --config.grpo.steps=200 ...

Steps, each a `gcloud` command (printed before it runs; `--dry_run` prints them all, one per line,
shell-quoted, and runs none):

1. create the slice (`gcloud compute tpus tpu-vm create`, or with `--queued` a queued resource,
   `gcloud compute tpus queued-resources create`, then wait until it is ACTIVE). Without `--reuse`
   an existing slice of that name is detected (`describe`) and reused; `--reuse` skips the check.
2. install (`--skip_install` skips it): `git archive HEAD` of this checkout is copied to every worker
   (`tpu-vm scp --worker=all`) and installed there into a virtual environment with
   `pip install -e ".[tpu]"` (`--source=git --git_url=... --git_ref=...` clones on the workers instead).
   Uncommitted changes are not shipped.
   `--worker_setup=CMD` then runs CMD on every worker (e.g. copy the model and data from GCS).
3. train: `scripts/train.py --config=... --workdir=... [overrides after --]` starts on all workers at
   once (`tpu-vm ssh --worker=all`), detached, each writing `~/grpo_jax_train.log`. JAX finds the other
   workers by itself (`jax.distributed.initialize()` on a pod slice); only process 0 writes metrics.
   Use a `gs://` workdir on a multi-host slice: every worker writes its checkpoint shards there.
   A run still going on the slice is refused, not doubled.
4. stream worker 0's log until its run ends (`--detach` returns right after starting), then report
   the run's exit status.
5. with `--delete`, delete the slice (or the queued resource) at the end, also after a failure;
   `--delete_only` just deletes it.

Paths in `--config` are relative to the repository root on the workers; the config's data and
model paths must exist on every worker (or be on GCS).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

from absl import app, flags

_NAME = flags.DEFINE_string("name", None, "TPU VM (node) name; also the queued resource's name.")
_ZONE = flags.DEFINE_string("zone", None, "Zone, e.g. us-west4-a (v5e), us-east5-a (v5p).")
_PROJECT = flags.DEFINE_string("project", "", "GCP project (default: gcloud's configured project).")
_ACCELERATOR = flags.DEFINE_string("accelerator_type", "v5litepod-16", "e.g. v5litepod-16, v5p-128, v4-32.")
_RUNTIME = flags.DEFINE_string(
    "runtime_version", "", "TPU VM software version (default: by accelerator generation, see RUNTIMES)."
)
_CONFIG = flags.DEFINE_string("config", None, "Config file for scripts/train.py (path in the repository).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory for scripts/train.py; gs:// on a pod.")
_QUEUED = flags.DEFINE_bool("queued", False, "Create through a queued resource and wait for it.")
_SPOT = flags.DEFINE_bool("spot", False, "Spot capacity (cheaper, preemptible).")
_REUSE = flags.DEFINE_bool("reuse", False, "The slice exists: skip creating (and checking for) it.")
_SKIP_INSTALL = flags.DEFINE_bool("skip_install", False, "The workers already have this code installed.")
_SOURCE = flags.DEFINE_enum(
    "source", "local", ["local", "git"], "Ship `git archive HEAD` or clone on workers."
)
_GIT_URL = flags.DEFINE_string("git_url", "", "Repository to clone with --source=git.")
_GIT_REF = flags.DEFINE_string(
    "git_ref", "", "Commit/branch to check out with --source=git (default: the clone's)."
)
_EXTRAS = flags.DEFINE_string("extras", "tpu", "pip extras installed on the workers, e.g. tpu,hf.")
_REMOTE_DIR = flags.DEFINE_string("remote_dir", "grpo_jax", "Checkout directory on the workers (under ~).")
_WORKER_SETUP = flags.DEFINE_string(
    "worker_setup",
    "",
    "Shell command run on every worker after the install, e.g. copying the model and data there: "
    "'gcloud storage cp -r gs://BUCKET/Qwen2.5-7B gs://BUCKET/gsm8k ~/data/'.",
)
_ENV = flags.DEFINE_list("env", [], "KEY=VALUE environment variables for train.py on the workers.")
_DETACH = flags.DEFINE_bool("detach", False, "Start training and return without streaming the log.")
_DELETE = flags.DEFINE_bool("delete", False, "Delete the slice at the end (also after a failure).")
_DELETE_ONLY = flags.DEFINE_bool("delete_only", False, "Only delete the slice (or queued resource).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print every command, one per line, and run none.")
_QUEUE_TIMEOUT_S = flags.DEFINE_integer("queue_timeout_s", 6 * 3600, "How long to wait for a queued slice.")

# Default TPU VM software version per accelerator generation (Cloud TPU "TPU software versions").
RUNTIMES = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
LOG = "~/grpo_jax_train.log"
PID = "~/grpo_jax_train.pid"
RC = "~/grpo_jax_train.rc"
VENV = "~/grpo_jax_venv"


class LaunchError(Exception):
    pass


def runtime_for(accelerator_type: str) -> str:
    generation = accelerator_type.rsplit("-", 1)[0]
    if generation not in RUNTIMES:
        raise LaunchError(
            f"no default --runtime_version for {accelerator_type!r} (known generations: {sorted(RUNTIMES)}); "
            "pass --runtime_version"
        )
    return RUNTIMES[generation]


def _where(zone: str, project: str) -> list[str]:
    return [f"--zone={zone}"] + ([f"--project={project}"] if project else [])


def _remote(path: str) -> str:
    """A path under the worker's home directory, for a remote shell: `~` must stay unquoted."""
    assert path.startswith("~/")
    return "~/" + shlex.quote(path[2:])


class Plan:
    """The gcloud (and git) commands of one launch, as argument lists; `run` executes or prints them."""

    def __init__(
        self,
        *,
        name,
        zone,
        project="",
        accelerator_type="v5litepod-16",
        runtime_version="",
        queued=False,
        spot=False,
        extras="tpu",
        remote_dir="grpo_jax",
        source="local",
        git_url="",
        git_ref="",
        repo_root=None,
    ):
        self.name, self.zone, self.project = name, zone, project
        self.accelerator_type = accelerator_type
        self.runtime_version = runtime_version or runtime_for(accelerator_type)
        self.queued, self.spot, self.extras = queued, spot, extras
        self.remote_dir, self.source, self.git_url, self.git_ref = remote_dir, source, git_url, git_ref
        # The checkout this package runs from (an editable install: grpo_jax/cli/ -> the repository).
        self.repo_root = repo_root or os.path.dirname(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        )
        self.where = _where(zone, project)

    # -- the slice --------------------------------------------------------------------------------

    def create(self) -> list[str]:
        spot = ["--spot"] if self.spot else []
        if self.queued:
            return [
                "gcloud", "compute", "tpus", "queued-resources", "create", self.name,
                f"--node-id={self.name}", f"--accelerator-type={self.accelerator_type}",
                f"--runtime-version={self.runtime_version}", *self.where, *spot,
            ]  # fmt: skip
        return [
            "gcloud", "compute", "tpus", "tpu-vm", "create", self.name,
            f"--accelerator-type={self.accelerator_type}", f"--version={self.runtime_version}",
            *self.where, *spot,
        ]  # fmt: skip

    def describe(self) -> list[str]:
        return [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "describe",
            self.name,
            *self.where,
            "--format=value(state)",
        ]

    def queued_state(self) -> list[str]:
        return [
            "gcloud", "compute", "tpus", "queued-resources", "describe", self.name, *self.where,
            "--format=value(state.state)",
        ]  # fmt: skip

    def delete(self) -> list[str]:
        if self.queued:  # --force also deletes the slice the queued resource holds
            return ["gcloud", "compute", "tpus", "queued-resources", "delete", self.name, *self.where,
                    "--force", "--quiet"]  # fmt: skip
        return ["gcloud", "compute", "tpus", "tpu-vm", "delete", self.name, *self.where, "--quiet"]

    # -- on the workers ---------------------------------------------------------------------------

    def ssh(self, command: str, worker: str = "all") -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.name, *self.where, f"--worker={worker}",
                f"--command={command}"]  # fmt: skip

    @property
    def archive(self) -> str:
        return os.path.join("/tmp", f"{self.name}-grpo_jax.tar.gz")

    def pack(self) -> list[str]:
        return ["git", "-C", self.repo_root, "archive", "--format=tar.gz", f"--output={self.archive}", "HEAD"]

    def copy(self) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "scp", self.archive,
                f"{self.name}:grpo_jax.tar.gz", *self.where, "--worker=all"]  # fmt: skip

    def install_command(self) -> str:
        d = _remote("~/" + self.remote_dir)
        if self.source == "git":
            if not self.git_url:
                raise LaunchError("--source=git needs --git_url")
            fetch = f"rm -rf {d} && git clone --quiet {shlex.quote(self.git_url)} {d}"
            if self.git_ref:
                fetch += f" && git -C {d} checkout --quiet {shlex.quote(self.git_ref)}"
        else:
            fetch = f"rm -rf {d} && mkdir -p {d} && tar -xzf ~/grpo_jax.tar.gz -C {d}"
        spec = shlex.quote(f".[{self.extras}]" if self.extras else ".")
        # jax >= 0.7 needs Python >= 3.11; the TPU VM images (Ubuntu 22.04) ship 3.10, and Ubuntu's
        # python3.11 package comes without venv's ensurepip.
        python = (
            "PY=$(command -v python3.12 || command -v python3.11 || true); "
            'if [ -z "$PY" ]; then sudo apt-get -qq update && sudo DEBIAN_FRONTEND=noninteractive '
            "apt-get -qq install -y python3.11 python3.11-venv > /dev/null && PY=python3.11; fi; "
        )
        return (
            f"set -e; {fetch}; {python}rm -rf {VENV} && $PY -m venv {VENV} && "
            f"{VENV}/bin/pip install --quiet --upgrade pip && "
            f"cd {d} && {VENV}/bin/pip install --quiet -e {spec}"
        )

    def install(self) -> list[list[str]]:
        steps = [] if self.source == "git" else [self.pack(), self.copy()]
        return steps + [self.ssh(self.install_command())]

    def train_command(self, config: str, workdir: str, overrides=(), env=()) -> str:
        """Start train.py detached on a worker (refusing if a run is still going); its exit status goes
        to ~/grpo_jax_train.rc."""
        d = _remote("~/" + self.remote_dir)
        train = " ".join(
            shlex.quote(a)
            for a in ["scripts/train.py", f"--config={config}", f"--workdir={workdir}", *overrides]
        )
        exports = "".join(f"export {shlex.quote(e)}; " for e in env)
        inner = f"cd {d} && {exports}{VENV}/bin/python {train} > {LOG} 2>&1; echo $? > {RC}"
        return (
            f"if [ -f {PID} ] && kill -0 $(cat {PID}) 2>/dev/null; then "
            f"echo 'a grpo_jax run is still going on this worker (pid '$(cat {PID})')' >&2; exit 1; fi; "
            f"rm -f {RC}; nohup bash -c {shlex.quote(inner)} > /dev/null 2>&1 < /dev/null & echo $! > {PID}"
        )

    def train(self, config, workdir, overrides=(), env=()) -> list[str]:
        return self.ssh(self.train_command(config, workdir, overrides, env))

    def stream(self) -> list[str]:
        """Follow worker 0's log until its run exits, then print the run's exit status."""
        return self.ssh(
            f'tail -n +1 -F --pid=$(cat {PID}) {LOG}; echo "train.py exit status: $(cat {RC} 2>/dev/null)"',
            worker="0",
        )


def _print(command: list[str]) -> None:
    print(shlex.join(command), flush=True)


class Runner:
    """Runs commands (printing each first), or with dry_run only prints them."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def __call__(self, command: list[str], check: bool = True) -> int:
        _print(command)
        if self.dry_run:
            return 0
        code = subprocess.call(command)
        if check and code:
            raise LaunchError(f"command failed with exit status {code}: {shlex.join(command)}")
        return code

    def output(self, command: list[str]) -> str | None:
        """stdout of a query, or None when it fails (e.g. the slice does not exist)."""
        result = subprocess.run(command, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else None


def wait_until_active(plan: Plan, run: Runner, timeout_s: int) -> None:
    """Poll the queued resource until ACTIVE (its slice exists); fail on FAILED/SUSPENDED or timeout."""
    if run.dry_run:
        _print(plan.queued_state())  # polled every 30 s until it prints ACTIVE
        return
    deadline = time.time() + timeout_s
    while True:
        state = run.output(plan.queued_state())
        print(f"queued resource {plan.name}: {state}", flush=True)
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED"):
            raise LaunchError(f"queued resource {plan.name} is {state}")
        if time.time() > deadline:
            raise LaunchError(f"queued resource {plan.name} not ACTIVE after {timeout_s} s (last: {state})")
        time.sleep(30)


def launch(
    plan: Plan,
    run: Runner,
    *,
    config: str | None,
    workdir: str | None,
    overrides=(),
    env=(),
    worker_setup="",
    reuse=False,
    skip_install=False,
    detach=False,
    delete=False,
    delete_only=False,
    queue_timeout_s=6 * 3600,
) -> int:
    """Create/reuse, install, train, stream, delete: returns train.py's exit status on worker 0 when
    streamed (0 otherwise)."""
    if delete_only:
        run(plan.delete())
        return 0
    if not config or not workdir:
        raise LaunchError("--config and --workdir are required (or --delete_only)")
    status = 0
    try:
        exists = reuse or (not run.dry_run and run.output(plan.describe()) is not None)
        if exists:
            print(f"# reusing {plan.name}", flush=True)
        else:
            run(plan.create())
            if plan.queued:
                wait_until_active(plan, run, queue_timeout_s)
        if not skip_install:
            for command in plan.install():
                run(command)
        if worker_setup:
            run(plan.ssh(worker_setup))
        run(plan.train(config, workdir, overrides, env))
        if not detach:
            run(plan.stream())
            if not run.dry_run:
                rc = run.output(plan.ssh(f"cat {RC}", worker="0"))
                status = int(rc) if rc and rc.strip().isdigit() else 1
    finally:
        if delete:
            run(plan.delete(), check=False)
    return status


def main(argv):
    overrides = argv[1:]
    bad = [a for a in overrides if not a.startswith("--config.")]
    try:
        if bad:
            raise LaunchError(
                f"arguments after -- are passed to train.py and must be --config.* overrides: {bad}"
            )
        if not _NAME.value or not _ZONE.value:
            raise LaunchError("--name and --zone are required")
        bad_env = [e for e in _ENV.value if "=" not in e]
        if bad_env:
            raise LaunchError(f"--env entries must be KEY=VALUE: {bad_env}")
        plan = Plan(
            name=_NAME.value,
            zone=_ZONE.value,
            project=_PROJECT.value,
            accelerator_type=_ACCELERATOR.value,
            runtime_version=_RUNTIME.value,
            queued=_QUEUED.value,
            spot=_SPOT.value,
            extras=_EXTRAS.value,
            remote_dir=_REMOTE_DIR.value,
            source=_SOURCE.value,
            git_url=_GIT_URL.value,
            git_ref=_GIT_REF.value,
        )
        status = launch(
            plan,
            Runner(_DRY_RUN.value),
            config=_CONFIG.value,
            workdir=_WORKDIR.value,
            overrides=overrides,
            env=_ENV.value,
            worker_setup=_WORKER_SETUP.value,
            reuse=_REUSE.value,
            skip_install=_SKIP_INSTALL.value,
            detach=_DETACH.value,
            delete=_DELETE.value,
            delete_only=_DELETE_ONLY.value,
            queue_timeout_s=_QUEUE_TIMEOUT_S.value,
        )
    except LaunchError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    sys.exit(status)


def entry_point() -> None:
    """The `grpo-launch-tpu-pod` console entry point (also `python scripts/launch_tpu_pod.py`)."""
    app.run(main)


if __name__ == "__main__":
    entry_point()

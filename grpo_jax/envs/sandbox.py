"""A subprocess sandbox for model-written Python: the security boundary of the `python` tool
(docs/ARCHITECTURE.md, "Tool use").

`run_python(code, limits=...)` runs `code` as `main.py` in a fresh, throwaway working directory and returns
its (truncated) stdout and stderr, exit code and whether it was killed. Isolation comes from well-kept
tools, chosen at first use by a real probe (`isolation()`), which runs a script through each candidate and
checks that it has no network, no parent environment, cannot see this package's files and cannot write
outside its working directory:

  * `bwrap` (bubblewrap), when installed: user, network, pid, ipc, uts and mount namespaces; only `/usr`
    (with its `/bin`, `/lib` links) and the interpreter's prefix, read-only; `/work` and `/tmp` fresh.
  * `unshare` (util-linux): network, pid and mount namespaces (plus a user namespace with the caller mapped
    to root when the caller is not root), then inside them: a read-only tmpfs root holding `/usr` and the
    interpreter's prefix bound read-only, a fresh `/proc` of the new pid namespace, `/dev/{null,zero,
    random,urandom}`, size-limited tmpfs `/work` and `/tmp`, `chroot`, and `setpriv` drops every capability
    (and, for a root caller, switches to a random unprivileged uid so that RLIMIT_NPROC binds: the kernel
    never applies it to uid 0).

In both (bwrap drops capabilities itself), `prlimit` sets RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE,
RLIMIT_NPROC, RLIMIT_NOFILE and RLIMIT_CORE=0 on the interpreter, the environment is empty but for PATH,
HOME and LANG, the process runs in its own session (process group), output beyond `max_output_bytes` is cut
(and the run killed), and a run past `wall_time_s` is killed: SIGKILL to the process group, whose
pid-namespace init takes every process of the namespace with it (also ones that left the group with
setsid). The launcher dies with its parent
(PR_SET_PDEATHSIG), so a killed worker leaves nothing behind either.

FAIL CLOSED: with no working isolation `run_python` raises `SandboxUnavailable` (one line, why) unless the
caller passes `allow_unsandboxed=True`; then the code runs with the same rlimits, an empty environment and
a temporary working directory, but with the network and the file system of the caller (and a child that
calls setsid outlives the run: no pid namespace holds it).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time

_LAUNCH_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_CHILD_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/work", "LANG": "C.UTF-8"}
_PR_SET_PDEATHSIG = 1


class SandboxUnavailable(RuntimeError):
    """No isolation layer works here and the caller did not opt in to running model code without one."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SandboxLimits:
    """Resource limits of one sandboxed run.

    wall_time_s: wall-clock seconds before the whole run is killed.
    cpu_time_s: RLIMIT_CPU of the interpreter (SIGXCPU, then SIGKILL).
    memory_bytes: RLIMIT_AS of each process (a larger allocation raises MemoryError).
    file_size_bytes: RLIMIT_FSIZE (a larger write fails with SIGXFSZ / EFBIG).
    max_processes: RLIMIT_NPROC (a fork bomb gets EAGAIN).
    max_open_files: RLIMIT_NOFILE.
    max_output_bytes: stdout + stderr bytes kept; the run is killed once it writes more.
    disk_bytes: size of the tmpfs `/work` and `/tmp` (isolated backends only).
    """

    wall_time_s: float = 5.0
    cpu_time_s: int = 5
    memory_bytes: int = 512 * 2**20
    file_size_bytes: int = 16 * 2**20
    max_processes: int = 16
    max_open_files: int = 64
    max_output_bytes: int = 64 * 2**10
    disk_bytes: int = 64 * 2**20

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"SandboxLimits.{field.name} must be a positive number, got {value!r}")

    def prlimit_args(self) -> list[str]:
        return [
            f"--cpu={max(1, int(self.cpu_time_s))}:{max(1, int(self.cpu_time_s)) + 1}",  # SIGXCPU, then KILL
            f"--as={int(self.memory_bytes)}",
            f"--fsize={int(self.file_size_bytes)}",
            f"--nproc={int(self.max_processes)}",
            f"--nofile={int(self.max_open_files)}",
            "--core=0",
        ]


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """What one run did. `returncode` is the interpreter's exit status (128 + N: killed by signal N); None
    when the run was killed from outside (`timed_out` or `output_truncated`)."""

    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool
    output_truncated: bool
    backend: str
    wall_s: float


@dataclasses.dataclass(frozen=True)
class Isolation:
    """The probe's verdict: `backend` is "bwrap", "unshare" or None; `reason` says why (one line)."""

    backend: str | None
    reason: str


# ---------------------------------------------------------------------------------------------------------
# Command lines.
# ---------------------------------------------------------------------------------------------------------


def _interpreter() -> tuple[str, str]:
    """(the real Python binary, the prefix to bind read-only), without any virtual environment."""
    python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    if not python.startswith(prefix + os.sep):
        prefix = os.path.dirname(os.path.dirname(python))
    return python, prefix


# Runs as root of the new namespaces, before `chroot`: $1 new root (an empty directory), $2 the code file,
# $3 the interpreter prefix, $4 tmpfs size, then the command to run inside. Mounts are private to the mount
# namespace (unshare's default propagation), so none of them is seen outside.
_UNSHARE_SETUP = r"""set -e
R=$1; CODE=$2; PY=$3; SIZE=$4; shift 4
mount -t tmpfs -o size=1m,mode=755 sandbox-root "$R"
mkdir -p "$R/usr" "$R/work" "$R/tmp" "$R/proc" "$R/dev" "$R$PY"
mount --bind /usr "$R/usr"; mount -o remount,bind,ro "$R/usr"
if [ "$PY" != /usr ]; then mount --bind "$PY" "$R$PY"; mount -o remount,bind,ro "$R$PY"; fi
ln -s usr/bin "$R/bin"; ln -s usr/lib "$R/lib"; ln -s usr/lib64 "$R/lib64"; ln -s usr/sbin "$R/sbin"
mount -t tmpfs -o "size=$SIZE,mode=1777" sandbox-work "$R/work"
mount -t tmpfs -o "size=$SIZE,mode=1777" sandbox-tmp "$R/tmp"
mount -t proc proc "$R/proc"
for d in null zero random urandom; do touch "$R/dev/$d"; mount --bind "/dev/$d" "$R/dev/$d"; done
cp "$CODE" "$R/work/main.py"; chmod 644 "$R/work/main.py"
mount -o remount,bind,ro "$R"
set +e
chroot "$R" "$@"
exit $?
"""


def _inner_command(
    python: str, limits: SandboxLimits, *, drop_privileges: bool, drop_to_uid: int | None
) -> list[str]:
    """[setpriv: no capabilities, no new privileges, an unprivileged uid] → prlimit → empty env → python.
    bwrap drops capabilities and sets no-new-privs itself (and leaves none to drop them with)."""
    setpriv = (
        ["setpriv", "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all"] if drop_privileges else []
    )
    if drop_to_uid is not None:
        setpriv += [f"--reuid={drop_to_uid}", f"--regid={drop_to_uid}", "--clear-groups"]
    env = ["env", "-i", *(f"{k}={v}" for k, v in _CHILD_ENV.items())]
    cd = ["sh", "-c", 'cd /work && exec "$@"', "sh"]
    return [*setpriv, "prlimit", *limits.prlimit_args(), "--", *env, *cd, python, "-I", "-B", "main.py"]


def unshare_command(run_dir: str, limits: SandboxLimits, *, as_root: bool) -> list[str]:
    """The `unshare` backend's argv for a run whose code is `run_dir/main.py` (pure; tested)."""
    python, prefix = _interpreter()
    namespaces = ["--net", "--pid", "--fork", "--kill-child", "--mount", "--propagation=private"]
    if not as_root:  # An unprivileged caller needs a user namespace to mount; root keeps its own uid map.
        namespaces = ["--user", "--map-root-user", *namespaces]
    drop = (1 << 20) + secrets.randbelow(1 << 16) if as_root else None  # its own RLIMIT_NPROC count
    inner = _inner_command(python, limits, drop_privileges=True, drop_to_uid=drop)
    setup = [os.path.join(run_dir, "root"), os.path.join(run_dir, "main.py"), prefix, str(limits.disk_bytes)]
    return ["unshare", *namespaces, "--", "sh", "-c", _UNSHARE_SETUP, "sandbox", *setup, *inner]


def bwrap_command(run_dir: str, limits: SandboxLimits) -> list[str]:
    """The `bwrap` backend's argv for a run whose code is `run_dir/work/main.py` (pure; tested)."""
    python, prefix = _interpreter()
    args = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--clearenv"]
    args += ["--ro-bind", "/usr", "/usr"]
    for link in ("bin", "lib", "lib64", "sbin"):
        args += ["--symlink", f"usr/{link}", f"/{link}"]
    if prefix != "/usr":
        args += ["--ro-bind", prefix, prefix]
    args += ["--proc", "/proc", "--dev", "/dev", "--size", str(limits.disk_bytes), "--tmpfs", "/tmp"]
    args += ["--bind", os.path.join(run_dir, "work"), "/work", "--chdir", "/work", "--"]
    return args + _inner_command(python, limits, drop_privileges=False, drop_to_uid=None)


# ---------------------------------------------------------------------------------------------------------
# Running one process tree with limits.
# ---------------------------------------------------------------------------------------------------------


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: the preexec_fn below runs between fork and exec


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this process when its parent dies (a killed worker leaves no sandbox behind)."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _unsandboxed_preexec(limits: SandboxLimits):
    def preexec() -> None:
        _die_with_parent()
        cpu = max(1, int(limits.cpu_time_s))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        for name, value in (
            ("RLIMIT_AS", int(limits.memory_bytes)),
            ("RLIMIT_FSIZE", int(limits.file_size_bytes)),
            ("RLIMIT_NPROC", int(limits.max_processes)),
            ("RLIMIT_NOFILE", int(limits.max_open_files)),
            ("RLIMIT_CORE", 0),
        ):
            resource.setrlimit(getattr(resource, name), (value, value))

    return preexec


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _communicate(process: subprocess.Popen, limits: SandboxLimits) -> tuple[bytes, bytes, bool, bool]:
    """Reads stdout/stderr until EOF, the wall-clock limit or the output limit: (out, err, timed_out,
    truncated). On either limit the process group is killed."""
    deadline = time.monotonic() + limits.wall_time_s
    chunks = {process.stdout: bytearray(), process.stderr: bytearray()}
    selector = selectors.DefaultSelector()
    for stream in chunks:
        selector.register(stream, selectors.EVENT_READ)
    timed_out = truncated = False
    while selector.get_map():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        for key, _ in selector.select(timeout=min(remaining, 0.5)):
            data = os.read(key.fd, 65536)
            if not data:
                selector.unregister(key.fileobj)
                continue
            chunks[key.fileobj] += data
        if sum(len(c) for c in chunks.values()) > limits.max_output_bytes:
            truncated = True
            break
    selector.close()
    if timed_out or truncated:
        _kill_group(process)
    try:
        process.wait(timeout=max(0.1, deadline - time.monotonic()) if not (timed_out or truncated) else 5.0)
    except subprocess.TimeoutExpired:  # Output closed but the launcher lingers: the wall clock still rules.
        _kill_group(process)
        process.wait(timeout=5.0)
        timed_out = True
    out, err = bytes(chunks[process.stdout]), bytes(chunks[process.stderr])
    return out, err, timed_out, truncated


def _run(argv: list[str], limits: SandboxLimits, *, backend: str, cwd: str, preexec) -> SandboxResult:
    start = time.monotonic()
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PATH": _LAUNCH_PATH},
        cwd=cwd,
        start_new_session=True,
        preexec_fn=preexec,
        close_fds=True,
    )
    try:
        out, err, timed_out, truncated = _communicate(process, limits)
    finally:
        _kill_group(process)  # Nothing of the run outlives it, whatever happened above.
        if process.poll() is None:
            process.wait(timeout=5.0)
        process.stdout.close()
        process.stderr.close()
    keep = limits.max_output_bytes
    return SandboxResult(
        stdout=out[:keep].decode("utf-8", "replace"),
        stderr=err[: max(0, keep - len(out))].decode("utf-8", "replace"),
        returncode=None if (timed_out or truncated) else process.returncode,
        timed_out=timed_out,
        output_truncated=truncated,
        backend=backend,
        wall_s=time.monotonic() - start,
    )


def _run_with(backend: str, code: str, limits: SandboxLimits) -> SandboxResult:
    run_dir = tempfile.mkdtemp(prefix="grpo-sandbox-")
    try:
        os.makedirs(os.path.join(run_dir, "root"))
        work = os.path.join(run_dir, "work")
        os.makedirs(work)
        with open(os.path.join(run_dir, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        shutil.copy(os.path.join(run_dir, "main.py"), os.path.join(work, "main.py"))
        if backend == "unshare":
            argv = unshare_command(run_dir, limits, as_root=os.geteuid() == 0)
            return _run(argv, limits, backend=backend, cwd=run_dir, preexec=_die_with_parent)
        if backend == "bwrap":
            os.chmod(work, 0o777)  # bwrap keeps the caller's uid; the directory is ours to hand over.
            return _run(
                bwrap_command(run_dir, limits), limits, backend=backend, cwd=run_dir, preexec=_die_with_parent
            )
        if backend == "none":
            python, _ = _interpreter()
            argv = [python, "-I", "-B", "main.py"]
            return _run(argv, limits, backend=backend, cwd=work, preexec=_unsandboxed_preexec(limits))
        raise ValueError(f"unknown sandbox backend {backend!r}; known: bwrap, unshare, none")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# The probe and the entry point.
# ---------------------------------------------------------------------------------------------------------

_PROBE_SECRET = "GRPO_SANDBOX_PROBE_SECRET"

_PROBE_CODE = """
import os, socket, sys
problems = []
if os.environ.get({secret!r}):
    problems.append("sees the parent's environment")
if os.path.exists({host_file!r}):
    problems.append("sees the host's files")
try:
    socket.create_connection(("192.0.2.1", 9), timeout=0.5).close()
    problems.append("has a network")
except OSError as error:
    if error.errno not in (101, 99, 113):  # ENETUNREACH, EADDRNOTAVAIL, EHOSTUNREACH: no route at all
        problems.append("has a network (" + str(error) + ")")
try:
    open("/usr/.grpo_sandbox_probe", "w").close()
    problems.append("can write /usr")
except OSError:
    pass
open("written", "w").write("ok")
print("; ".join(problems) if problems else "isolated")
"""


def _probe(backend: str) -> str | None:
    """None if `backend` runs code with the isolation it promises, else why not (one line)."""
    required = {
        "bwrap": ("bwrap", "prlimit"),
        "unshare": ("unshare", "setpriv", "prlimit", "chroot"),
    }
    missing = [t for t in required.get(backend, ()) if shutil.which(t, path=_LAUNCH_PATH) is None]
    if missing:
        return f"{backend}: {', '.join(missing)} not installed"
    code = _PROBE_CODE.format(secret=_PROBE_SECRET, host_file=os.path.abspath(__file__))
    os.environ[_PROBE_SECRET] = "1"
    try:
        result = _run_with(backend, code, SandboxLimits(wall_time_s=10.0))
    except OSError as error:
        return f"{backend}: {error}"
    finally:
        os.environ.pop(_PROBE_SECRET, None)
    verdict = result.stdout.strip()
    if result.returncode != 0 or verdict != "isolated":
        detail = verdict or result.stderr.strip().splitlines()[-1:] or [f"exit {result.returncode}"]
        return f"{backend}: {detail if isinstance(detail, str) else detail[0]}"
    return None


@functools.cache
def isolation() -> Isolation:
    """Which isolation layer works on this machine (bwrap preferred, then unshare); probed once."""
    reasons = []
    for backend in ("bwrap", "unshare"):
        why_not = _probe(backend)
        if why_not is None:
            return Isolation(backend, f"{backend} probe passed")
        reasons.append(why_not)
    return Isolation(None, "no sandbox works here (" + "; ".join(reasons) + ")")


def run_python(
    code: str,
    *,
    limits: SandboxLimits | None = None,
    allow_unsandboxed: bool = False,
    backend: str | None = None,
) -> SandboxResult:
    """Runs model-written `code` in the sandbox (see the module docstring); never runs it unisolated unless
    `allow_unsandboxed`. `backend` forces "bwrap", "unshare" or "none" (tests); None: the probe's choice."""
    limits = limits or SandboxLimits()
    if backend is None:
        chosen = isolation()
        if chosen.backend is None:
            if not allow_unsandboxed:
                raise SandboxUnavailable(
                    f"python tool refuses to run model code: {chosen.reason}; pass allow_unsandboxed=True "
                    "to run it with rlimits only"
                )
            backend = "none"
        else:
            backend = chosen.backend
    elif backend == "none" and not allow_unsandboxed:
        raise SandboxUnavailable(
            "python tool: backend 'none' runs model code unisolated; needs allow_unsandboxed"
        )
    return _run_with(backend, code, limits)

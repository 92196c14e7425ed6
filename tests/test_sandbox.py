"""grpo_jax.envs.sandbox: model-written code tries to get out, and is contained (docs/ARCHITECTURE.md,
"Tool use"). Each attack runs as the `python` tool would run it; the test checks the result, the time it
took, that nothing leaked to the host and that no process of the run is left."""

import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from grpo_jax.envs import sandbox
from grpo_jax.envs.base import tool_observation
from grpo_jax.envs.config import EnvConfig
from grpo_jax.envs.tool_format import format_call
from grpo_jax.envs.tools import PythonTool

REPO = Path(__file__).resolve().parents[1]
WALL_S = 2.0
LIMITS = sandbox.SandboxLimits(wall_time_s=WALL_S, cpu_time_s=2, memory_bytes=256 * 2**20, max_processes=8)
SECRET = "grpo-sandbox-test-secret-7f3a"


# This test's folder for sandbox run folders (`own_sandbox_folder`): the checks below look only there and
# at the processes whose argv names it, not at another pytest worker's sandboxes (`pytest -n 2`).
_SANDBOX_TMP: list[Path] = []


@pytest.fixture(autouse=True)
def own_sandbox_folder(tmp_path, monkeypatch):
    """Sandbox run folders go under this test's own temp folder (`tempfile` here, TMPDIR for the worker
    processes a test starts), so "nothing left behind" is checked on this test's sandboxes alone."""
    folder = tmp_path / "sandbox_tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    _SANDBOX_TMP[:] = [folder]
    yield
    _SANDBOX_TMP.clear()


@pytest.fixture(scope="module")
def backend():
    chosen = sandbox.isolation()
    if chosen.backend is None:
        pytest.skip(f"no isolation layer on this machine: {chosen.reason}")
    return chosen.backend


def _pid_namespace_members(namespace: str) -> list[int]:
    """Host pids whose pid namespace is `namespace` ("pid:[inode]")."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") == namespace:
                    members.append(int(entry))
            except OSError:
                pass
    return members


def _sandbox_launchers() -> list[int]:
    """Host pids of this test's sandbox launchers (their argv names the run's `grpo-sandbox-` directory,
    under the test's own folder)."""
    mark = f"{_SANDBOX_TMP[0]}/grpo-sandbox-".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if mark in cmdline and int(entry) != os.getpid():
                found.append(int(entry))
    return found


def _run_dirs() -> list[Path]:
    return list(_SANDBOX_TMP[0].glob("grpo-sandbox-*"))


def _run(code: str, backend: str, limits=LIMITS) -> tuple[sandbox.SandboxResult, float]:
    start = time.monotonic()
    result = sandbox.run_python(code, limits=limits, backend=backend)
    elapsed = time.monotonic() - start
    assert elapsed < limits.wall_time_s + 3.0
    assert not _sandbox_launchers(), "a sandbox launcher outlived its run"
    return result, elapsed


NAMESPACE_LINE = 'import os\nprint(os.readlink("/proc/self/ns/pid"), flush=True)\n'


def _assert_namespace_empty(result: sandbox.SandboxResult) -> None:
    namespace = result.stdout.splitlines()[0]
    assert namespace.startswith("pid:[")
    assert namespace != os.readlink("/proc/self/ns/pid"), "the code ran in the caller's pid namespace"
    deadline = time.monotonic() + 2.0  # the kernel reaps a dead namespace's members asynchronously
    while _pid_namespace_members(namespace) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _pid_namespace_members(namespace) == []


def test_probe_chooses_a_layer_that_really_isolates(backend):
    assert backend in ("bwrap", "unshare")
    # The probe is a real check: the same script run without isolation is caught seeing the host.
    why_not = sandbox._probe("none")
    assert why_not is not None and "sees the host's files" in why_not


def test_no_network(backend):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    port = server.getsockname()[1]
    code = f"""
import socket
for address in [("127.0.0.1", {port}), ("1.1.1.1", 53)]:
    try:
        socket.create_connection(address, timeout=1).close()
        print("connected", address)
    except OSError as error:
        print("blocked", address, error.errno)
"""
    try:
        result, _ = _run(code, backend)
        with pytest.raises(BlockingIOError):
            server.accept()  # the host's listener never saw a connection
    finally:
        server.close()
    assert result.returncode == 0, result.stderr
    assert "connected" not in result.stdout and result.stdout.count("blocked") == 2


def test_no_writes_outside_the_working_dir_and_the_dir_is_thrown_away(backend, tmp_path):
    name = f"escaped-{uuid.uuid4().hex}.txt"  # a name of this run's own: no leftover can pass or fail it
    target = tmp_path / name
    code = f"""
for path in [{str(target)!r}, "/usr/{name}", "/{name}", "../{name}"]:
    try:
        open(path, "w").write("x")
        print("wrote", path)
    except OSError as error:
        print("refused", path, type(error).__name__)
open("inside.txt", "w").write("fine")
print("inside ok")
"""
    before = set(_run_dirs())
    result, _ = _run(code, backend)
    assert result.returncode == 0, result.stderr
    assert set(_run_dirs()) == before  # the run's directory is gone
    assert "wrote" not in result.stdout and "inside ok" in result.stdout
    assert not target.exists() and not Path(f"/{name}").exists() and not Path(f"/usr/{name}").exists()


def test_project_files_and_parent_environment_are_invisible(backend, monkeypatch):
    monkeypatch.setenv("GRPO_TEST_SECRET", SECRET)
    setup_py = REPO / "setup.py"
    assert setup_py.exists()
    code = f"""
import json, os
seen = {{"env": dict(os.environ)}}
for path in [{str(setup_py)!r}, "/proc/{os.getpid()}/environ", "/proc/1/environ", "/work/main.py"]:
    try:
        seen[path] = open(path, "rb").read().decode("utf-8", "replace")
    except OSError as error:
        seen[path] = "ERR " + type(error).__name__
print(json.dumps(seen))
"""
    result, _ = _run(code, backend)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert SECRET not in result.stdout and "GRPO_TEST_SECRET" not in result.stdout
    assert set(seen["env"]) <= {"PATH", "HOME", "LANG", "PWD", "OLDPWD", "SHLVL", "_"}
    assert seen[str(setup_py)].startswith("ERR")
    assert seen[f"/proc/{os.getpid()}/environ"].startswith("ERR")
    assert "seen" in seen["/work/main.py"]  # the working dir holds the program and nothing of the host


def test_fork_bomb_is_bounded_and_leaves_no_process(backend):
    code = (
        NAMESPACE_LINE
        + """
while True:
    try:
        os.fork()
    except OSError:
        pass
"""
    )
    result, elapsed = _run(code, backend)
    assert result.timed_out and result.returncode is None
    _assert_namespace_empty(result)


def test_children_that_leave_the_process_group_are_killed_too(backend):
    code = (
        NAMESPACE_LINE
        + """
import time
if os.fork() == 0:
    os.setsid()  # out of the launcher's process group: only the pid namespace still holds it
    time.sleep(60)
    os._exit(0)
print("parent exits", flush=True)
"""
    )
    result, elapsed = _run(code, backend)
    assert result.returncode == 0 and elapsed < WALL_S, result.stderr
    _assert_namespace_empty(result)


def test_ten_gigabytes_fail_to_allocate(backend):
    result, _ = _run("data = bytearray(10 * 2**30)\nprint('allocated')", backend)
    assert result.returncode == 1 and "MemoryError" in result.stderr and "allocated" not in result.stdout


def test_infinite_loop_is_killed_on_the_wall_clock(backend):
    result, elapsed = _run(NAMESPACE_LINE + "while True:\n    pass", backend)
    assert result.timed_out and elapsed >= WALL_S
    _assert_namespace_empty(result)


def test_cpu_time_limit_ends_a_busy_loop_before_the_wall_clock(backend):
    limits = sandbox.SandboxLimits(wall_time_s=5.0, cpu_time_s=1)
    result, elapsed = _run("while True:\n    pass", backend, limits)
    assert not result.timed_out and result.returncode == 128 + 24 and elapsed < 4.0  # SIGXCPU


def test_printing_100_megabytes_is_cut_and_the_caller_continues(backend):
    tool = PythonTool(limits=LIMITS, backend=backend)
    start = time.monotonic()
    observation, outcome = tool_observation(
        format_call("python", {"code": "import sys\nsys.stdout.write('x' * 100_000_000)"}), {"python": tool}
    )
    assert time.monotonic() - start < WALL_S + 3.0
    assert outcome.error is None and "output beyond" in outcome.message
    assert len(observation) < 2100  # ToolFormat().max_observation_chars plus tags
    observation, outcome = tool_observation(format_call("python", {"code": "print(6 * 7)"}), {"python": tool})
    assert outcome.message == "42" and observation == "\n<tool_response>42</tool_response>\n"


def test_timeouts_become_error_observations(backend):
    tool = PythonTool(limits=LIMITS, backend=backend)
    text = format_call("python", {"code": "import time\ntime.sleep(30)"})
    observation, outcome = tool_observation(text, {"python": tool})
    assert outcome.error == "timeout" and "error (timeout)" in observation


def test_allow_unsandboxed_is_the_only_way_to_run_without_isolation(monkeypatch):
    monkeypatch.setattr(sandbox, "isolation", lambda: sandbox.Isolation(None, "no sandbox works here (test)"))
    monkeypatch.setenv("GRPO_TEST_SECRET", SECRET)
    with pytest.raises(sandbox.SandboxUnavailable, match="refuses to run model code: no sandbox works here"):
        sandbox.run_python("print(1)")
    text = format_call("python", {"code": "print(1)"})
    _, outcome = tool_observation(text, {"python": PythonTool()})
    assert outcome.error == "sandbox_unavailable" and "\n" not in outcome.message
    with pytest.raises(sandbox.SandboxUnavailable):
        EnvConfig(env="python").env_factory()
    # Opted in: it runs, with the rlimits and an empty environment (but the caller's network and files).
    code = "import os\nprint(sorted(os.environ))"
    _, outcome = tool_observation(
        format_call("python", {"code": code}), {"python": PythonTool(allow_unsandboxed=True)}
    )
    assert (
        outcome.error is None and SECRET not in outcome.message and "GRPO_TEST_SECRET" not in outcome.message
    )
    EnvConfig(env="python", allow_unsandboxed=True).env_factory()()


def test_a_killed_worker_leaves_no_sandbox_behind(backend):
    """The pool SIGKILLs a stuck worker; the launcher dies with it (PR_SET_PDEATHSIG) and takes the pid
    namespace along."""
    import subprocess
    import sys

    code = NAMESPACE_LINE + "import time\ntime.sleep(60)"
    before = set(_run_dirs())
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from grpo_jax.envs import sandbox; "
            f"sandbox.run_python(sys.argv[1], backend={backend!r}, "
            "limits=sandbox.SandboxLimits(wall_time_s=60))",
            code,
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        deadline = time.monotonic() + 20.0
        while not _sandbox_launchers() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _sandbox_launchers(), "the sandbox never started"
        time.sleep(0.3)
    finally:
        worker.kill()
        worker.wait()
    deadline = time.monotonic() + 3.0
    while _sandbox_launchers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sandbox_launchers() == []
    for leftover in set(_run_dirs()) - before:  # a killed worker cannot remove its run directory
        shutil.rmtree(leftover, ignore_errors=True)


def test_command_lines_of_both_backends():
    """The argv each backend runs (pure): namespaces, read-only binds, dropped privileges, rlimits."""
    limits = sandbox.SandboxLimits(cpu_time_s=3, memory_bytes=2**28, max_processes=7)
    rlimits = ["--cpu=3:4", f"--as={2**28}", "--nproc=7", "--core=0"]
    as_root = sandbox.unshare_command("/tmp/grpo-sandbox-x", limits, as_root=True)
    assert as_root[:2] == ["unshare", "--net"] and "--user" not in as_root
    assert {"--pid", "--fork", "--kill-child", "--mount"} <= set(as_root)
    uid = next(a for a in as_root if a.startswith("--reuid="))
    assert (
        int(uid.split("=")[1]) >= 2**20 and "--bounding-set=-all" in as_root and "--no-new-privs" in as_root
    )
    assert all(r in as_root for r in rlimits) and as_root[-3:] == ["-I", "-B", "main.py"]
    assert as_root[as_root.index("env") + 1] == "-i"
    user = sandbox.unshare_command("/tmp/grpo-sandbox-x", limits, as_root=False)
    assert user[1:3] == ["--user", "--map-root-user"] and not any(a.startswith("--reuid") for a in user)
    bwrap = sandbox.bwrap_command("/tmp/grpo-sandbox-x", limits)
    assert bwrap[:5] == ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--clearenv"]
    assert bwrap[bwrap.index("--ro-bind") + 1 : bwrap.index("--ro-bind") + 3] == ["/usr", "/usr"]
    assert bwrap[bwrap.index("--bind") + 1 : bwrap.index("--bind") + 3] == [
        "/tmp/grpo-sandbox-x/work",
        "/work",
    ]
    assert "setpriv" not in bwrap and all(r in bwrap for r in rlimits)
    assert not any(a in ("/", "/work/main", "/root", "/home") for a in bwrap[: bwrap.index("--")])


def test_env_runner_timeout_kills_the_sandbox_in_its_worker(backend):
    """A python step that outlives the runner's own limit is cut by the worker's timer, which takes the
    sandbox down with it; the trajectory ends with an error observation and the next step runs."""
    import functools

    from grpo_jax.envs import EnvRunner, make_env

    tools = {"python": {"wall_time_s": 30.0, "backend": backend}}
    factory = functools.partial(make_env, "python", tools=tools, describe_tools=False)
    with EnvRunner(factory, timeout_s=1.0, num_workers=1, kill_grace_s=1.0) as runner:
        runner.reset([{"prompt": "p", "answer": "1"}] * 2)
        runner.step(["warm up"] * 2)  # both finish (no call); start the worker outside the timed part
        runner.reset([{"prompt": "p", "answer": "1"}] * 2)
        slow = format_call("python", {"code": "import time\ntime.sleep(30)"})
        start = time.monotonic()
        with pytest.warns(RuntimeWarning, match="1 time-outs"):
            out = runner.step([slow, format_call("python", {"code": "print(2 + 2)"})])
        assert time.monotonic() - start < 8.0
        assert out.dones.tolist() == [True, False] and "error (environment)" in out.observations[0]
        assert out.observations[1] == "\n<tool_response>4</tool_response>\n"
        assert _sandbox_launchers() == []

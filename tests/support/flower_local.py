"""Run dpfl on a local Flower simulation federation from Python (tests and benchmarks use it).

Flower's ``flwr run`` starts a detached local SuperLink, may try to install the app's dependencies
and phones home; this module gives each run a private ``FLWR_HOME``, free ports, an offline
environment, and stops by PID every process it caused to start.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository root: the Flower app (``pyproject.toml`` with ``[tool.flwr.app]``)."""
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 120.0, host: str = "127.0.0.1") -> None:
    """Block until something listens on ``host:port`` (a SuperLink that is still starting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nothing listens on {host}:{port} after {timeout:g} s"
                ) from None
            time.sleep(0.25)


def flower_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(home),
            # offline: never let a SuperLink try to install the app's dependencies
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    return env


def pids_matching(*needles: str) -> list[int]:
    """PIDs whose command line contains every needle (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if all(n in cmd for n in needles):
            out.append(int(entry.name))
    return out


def sigkill(pids: list[int]) -> None:
    """SIGKILL each of ``pids`` that still runs (a crash, no clean-up)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill(pids: list[int], timeout: float = 15.0) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def descendants(pid: int) -> list[int]:
    """``pid``'s children, grandchildren, ... (Linux /proc): helpers a SuperLink or SuperNode
    spawns may leave its process group."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def run_status(env: dict[str, str], connection: str) -> list[dict]:
    res = subprocess.run(
        [str(BIN / "flwr"), "ls", connection, "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    return json.loads(res.stdout).get("runs", [])


def run_config_arg(values: dict) -> str:
    """``--run-config`` text for a dict of config keys (strings quoted)."""
    parts = []
    for k, v in values.items():
        if isinstance(v, str):
            parts.append(f"{k}='{v}'")
        elif isinstance(v, bool):
            parts.append(f"{k}={'true' if v else 'false'}")
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts)


def local_simulation_home(home: Path) -> dict[str, str]:
    """Create ``home`` with a ``local`` simulation connection; return the environment to use."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n[superlink.local]\naddress = ":local:"\n'
    )
    return flower_env(home)


def stop_local_superlink(env: dict[str, str]) -> None:
    """``flwr run`` leaves its local SuperLink running detached: stop it by PID."""
    kill(pids_matching("flower-superlink", env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]))


def flwr_run(
    connection: str,
    values: dict,
    env: dict[str, str],
    *,
    federation_config: str | None = None,
    timeout: float = 3600,
    app: Path = ROOT,
    stream: bool = True,
) -> subprocess.CompletedProcess:
    """``flwr run <app> <connection> --stream`` with dpfl config ``values`` (``app``: the
    folder of the Flower app's pyproject.toml, dpfl's own by default). ``stream = False``:
    return once the run is submitted."""
    cmd = [str(BIN / "flwr"), "run", str(app), connection] + (["--stream"] if stream else [])
    if federation_config:
        cmd += ["--federation-config", federation_config]
    cmd += ["--run-config", run_config_arg(values)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def flwr_run_simulation(
    values: dict,
    num_supernodes: int,
    env: dict[str, str],
    cpus_per_client: float = 1,
    timeout: float = 3600,
    app: Path = ROOT,
) -> subprocess.CompletedProcess:
    """``flwr run <app> local --stream`` with dpfl config ``values`` on ``num_supernodes``
    nodes."""
    return flwr_run(
        "local",
        values,
        env,
        federation_config=(
            f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}"
        ),
        timeout=timeout,
        app=app,
    )


# --- deployments on loopback (tests and benchmarks) -----------------------------------------


def make_test_certs(out: Path, nodes: int = 0) -> Path:
    """Test-only TLS certificates and node keys (``scripts/make_test_certs.py``) in ``out``."""
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "make_test_certs.py"),
            str(out),
            "--nodes",
            str(nodes),
        ],
        check=True,
        capture_output=True,
    )
    return out


def deployment_home(home: Path, name: str, port: int, root_certificates: Path | None) -> dict:
    """``home`` with one SuperLink connection ``name`` on ``127.0.0.1:port`` (TLS verified
    against ``root_certificates``, or insecure when None); return the environment to use."""
    home.mkdir(parents=True, exist_ok=True)
    security = (
        f'root-certificates = "{root_certificates}"\n' if root_certificates else "insecure = true\n"
    )
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n[superlink.{name}]\n'
        f'address = "127.0.0.1:{port}"\n{security}'
    )
    return flower_env(home)


def superlink_command(port: int, certs: Path | None = None, node_auth: bool = False) -> list[str]:
    """``flower-superlink`` on loopback: TLS with ``certs`` (from :func:`make_test_certs`) or
    insecure, optionally with SuperNode authentication; never installs dependencies."""
    cmd = [str(BIN / "flower-superlink")]
    if certs is None:
        cmd.append("--insecure")
    else:
        cmd += [
            "--ssl-ca-certfile", str(certs / "ca.crt"),
            "--ssl-certfile", str(certs / "server.crt"),
            "--ssl-keyfile", str(certs / "server.key"),
        ]  # fmt: skip
    if node_auth:
        cmd.append("--enable-supernode-auth")
    return cmd + [
        "--disable-runtime-dependency-installation",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip


def supernode_command(
    port: int,
    partition: int,
    partitions: int,
    root_certificates: Path | None = None,
    auth_key: Path | None = None,
    max_retries: int | None = None,
) -> list[str]:
    """``flower-supernode`` for user ``partition`` against the SuperLink on ``port``."""
    cmd = [str(BIN / "flower-supernode")]
    cmd += ["--root-certificates", str(root_certificates)] if root_certificates else ["--insecure"]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    return cmd + [
        "--superlink", f"127.0.0.1:{port}",
        "--port", str(free_port()),
        "--node-config", f"partition-id={partition} num-partitions={partitions}",
    ]  # fmt: skip


class LoopbackFederation:
    """A SuperLink (insecure, its state in a database file) and SuperNodes on loopback, one per
    user, each keeping its own state in its own folder: a deployment that tests can crash and
    restart piece by piece. ``stop()`` ends every process it started, helpers included."""

    def __init__(
        self,
        root: Path,
        users: int,
        connection: str = "loopback",
        node_env: dict[int, dict[str, str]] | None = None,
        node_config: str = "",
    ) -> None:
        """``node_env``: extra environment variables of some users' SuperNodes (and so of the
        ClientApps they run); ``node_config``: extra ``key=value`` pairs for every node's
        ``--node-config``."""
        self.root, self.connection = root, connection
        self.node_env = node_env or {}
        self.node_config = node_config
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.database = root / "superlink.db"
        self.env = deployment_home(root / "flwr", connection, self.port, None)
        self.superlink: subprocess.Popen | None = None
        self.nodes: dict[int, subprocess.Popen] = {}
        self.partitions = users
        self.start_superlink()
        for user in range(users):
            self.start_node(user)

    def _spawn(self, cmd: list[str], name: str, extra: dict | None = None) -> subprocess.Popen:
        return subprocess.Popen(
            cmd,
            env={**self.env, **(extra or {})},
            stdout=open(self.logs / f"{name}.log", "a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start_superlink(self) -> None:
        cmd = superlink_command(self.port) + ["--database", str(self.database)]
        self.superlink = self._spawn(cmd, "superlink")
        wait_for_port(self.port)

    def start_node(self, user: int) -> None:
        cmd = supernode_command(self.port, user, self.partitions)
        cmd[-1] += f" state-dir='{self.root / f'node-{user}'}'"
        if self.node_config:
            cmd[-1] += f" {self.node_config}"
        self.nodes[user] = self._spawn(cmd, f"supernode-{user}", self.node_env.get(user))

    def helpers(self, pid: int) -> list[int]:
        """The processes ``pid`` started (SuperExec helpers, the ServerApps and ClientApps
        they run), by parentage or by ``--parent-pid``."""
        found = set(descendants(pid)) | set(pids_matching("--parent-pid", f" {pid} "))
        for helper in list(found):
            found |= set(descendants(helper))
        return sorted(found)

    def serverapps(self) -> list[int]:
        """The ServerApp processes of this SuperLink."""
        return pids_matching("flwr-serverapp", f":{self.port}")

    def kill_node(self, user: int, sig: int = signal.SIGKILL) -> None:
        """Stop user's SuperNode: SIGKILL (its SuperLink learns of it when its heartbeats stop)
        or SIGTERM (it leaves, deactivating itself first); its helpers are killed too."""
        proc = self.nodes.pop(user)
        helpers = self.helpers(proc.pid)
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        sigkill(helpers)

    def kill_superlink(self) -> None:
        """SIGKILL the SuperLink and everything it runs (the ServerApp too), as when its
        machine fails; its database file stays."""
        assert self.superlink is not None
        sigkill([self.superlink.pid, *self.helpers(self.superlink.pid)])
        self.superlink.wait()
        self.superlink = None

    def stop(self) -> None:
        procs = [p for p in [self.superlink, *self.nodes.values()] if p is not None]
        started = [p.pid for p in procs]
        kill(started + [h for pid in started for h in self.helpers(pid)])

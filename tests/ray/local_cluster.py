"""A Ray cluster of real `ray start` nodes on this machine, for the submission and multi-node
tests: a head (GCS, dashboard, job server) and worker nodes, each its own raylet with its own
resources, all on free ports, with token authentication on.

Every node is a `ray start --block` process this module started: stopping a node ends that
process tree and nothing else (never `ray stop`, which would end every Ray on the machine).
RAY_ADDRESS is set in every node's environment, so the cluster's own actors (Ray Train's
placement-group cleaner asks the State API whether its controller lives) find this cluster and
not another Ray instance of the same machine. The nodes keep their sessions in a temp dir of
their own, so `ray start` does not record this cluster as the machine's current one
(/tmp/ray/ray_current_cluster), which a later `ray.init()` would try to join after it is gone.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_ports() -> list[str]:
    """Every port a node opens, chosen free (Ray's defaults are fixed numbers that collide
    with any other Ray instance on the machine)."""
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]


@dataclass
class Node:
    process: subprocess.Popen
    log: Path

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """SIGKILL the node at once: `ray start`, its raylet and every worker it runs."""
        procs = [*self.descendants()]
        for proc in [psutil.Process(self.process.pid), *procs] if self.alive() else procs:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)
        self.process.wait(timeout=30)

    def stop(self, grace_s: float = 3.0) -> None:
        """SIGTERM the node's processes, then SIGKILL what is left after `grace_s`."""
        procs = self.descendants()
        if self.alive():
            procs.insert(0, psutil.Process(self.process.pid))
        for proc in procs:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        self.process.wait(timeout=10)

    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class LocalCluster:
    """Head plus worker nodes; `env` is what a client (driver, `fmray submit`) runs with."""

    workdir: Path
    head_cpus: int
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    nodes: list[Node] = field(default_factory=list)
    temp_dir: Path = field(
        # Short: Ray's unix socket paths live under it (at most 107 characters).
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="fmr-", dir="/tmp"))
    )

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_API_SERVER_ADDRESS"):
            env.pop(key, None)
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            # Appended, not prepended: `fmray` and `ray` are found, while the rest of the tools
            # stay as the suite has them (a second `ninja` first on PATH would make DeepSpeed
            # rebuild its cached CPU op, ~90 s, at every switch).
            PATH=f"{env.get('PATH', '')}{os.pathsep}{VENV_BIN}",
            # A dead node is noticed in ~3 s instead of ~15 s.
            RAY_health_check_initial_delay_ms="1000",
            RAY_health_check_period_ms="1000",
            RAY_health_check_failure_threshold="3",
        )
        return env

    def node_env(self) -> dict[str, str]:
        return {**self.env, "RAY_ADDRESS": self.gcs_address}

    def start_head(self) -> Node:
        args = [
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={self.gcs_port}",
            f"--ray-client-server-port={free_port()}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--num-cpus={self.head_cpus}",
            "--num-gpus=0",
            "--disable-usage-stats",
        ]
        node = self._start("head", args)
        self._wait_for_dashboard(node)
        return node

    def add_worker_node(self, num_cpus: int) -> Node:
        args = [
            f"--address={self.gcs_address}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            "--disable-usage-stats",
        ]
        known = self.alive_node_ids()
        node = self._start(f"worker{len(self.nodes)}", args)
        self._wait(lambda: self.alive_node_ids() - known, node, "the worker node to join")
        return node

    def _start(self, name: str, args: list[str]) -> Node:
        log = self.workdir / f"ray-{name}.log"
        process = subprocess.Popen(
            [RAY, "start", "--block", f"--temp-dir={self.temp_dir}", *node_ports(), *args],
            env=self.node_env(),
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        node = Node(process, log)
        self.nodes.append(node)
        return node

    def _wait_for_dashboard(self, node: Node) -> None:
        def job_server_up() -> bool:
            request = urllib.request.Request(
                f"{self.dashboard_url}/api/jobs/",
                headers={"Authorization": f"Bearer {self.token}"},
            )
            try:
                with urllib.request.urlopen(request, timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        self._wait(job_server_up, node, "the head's job server")
        self._wait(self.alive_node_ids, node, "the head's raylet")

    def _wait(self, ready, node: Node, what: str, timeout_s: float = 120) -> None:
        deadline = time.time() + timeout_s
        while not ready():
            if not node.alive() or time.time() > deadline:
                raise RuntimeError(f"{what} did not come up:\n{node.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def alive_node_ids(self) -> set[str]:
        """Ids of the nodes the GCS holds alive (the State API, authenticated)."""
        request = urllib.request.Request(
            f"{self.dashboard_url}/api/v0/nodes",
            headers={"Authorization": f"Bearer {self.token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                nodes = json.loads(response.read())["data"]["result"]["result"]
        except (OSError, KeyError, ValueError):
            return set()
        return {node["node_id"] for node in nodes if node.get("state") == "ALIVE"}

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

"""Simulated Ray clusters on one machine: `simulated_cluster`, ray.cluster_utils.Cluster in this process on
127.0.0.1; and `LoopbackNodes`, a cluster started as users start one, with `ray start` (a head and worker nodes,
each its own process tree with its own environment), on loopback only.

Ray rewrites 127.0.0.1 and `localhost` in `ray start --address` to the machine's network address, and refuses a
worker node when told not to (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0). Any other address of 127.0.0.0/8 it takes as
it is, so each node gets one of its own: the head 127.0.0.2, the workers 127.0.0.3, 127.0.0.4, ... Ray's servers
listen on every interface of such a node, so the nodes and every command that talks to them run in a network
namespace of their own (`unshare --net`, which needs root or CAP_SYS_ADMIN) whose only interface is `lo`: nothing
outside it can reach them, and they reach nothing outside it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

HEAD = "127.0.0.2"
PORT = 6379  # Ray's default: the namespace is new, so nothing else holds it
BIN = Path(sys.executable).parent
READY = """
import sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
want = set(sys.argv[2:])
deadline = time.monotonic() + 120
while {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} != want and time.monotonic() < deadline:
    time.sleep(0.5)
print(sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]))
"""


@contextmanager
def simulated_cluster(workdirs: Sequence[Path]) -> Iterator[tuple]:
    """(Cluster, [its worker nodes]): ray.cluster_utils.Cluster on 127.0.0.1, a head without CPUs and one node of
    1 CPU per `workdirs` entry (its MPAD_WORKDIR), shut down and removed on exit. Ray's files go to a short temp
    folder of their own (Unix socket paths must be short), Ray's address file (what `auto` reads) included: with
    RAY_TMPDIR pointing there while the cluster runs, Ray does not write it into /tmp/ray, and fail where that
    folder does not exist. RuntimeError if the head does not listen on 127.0.0.1."""
    from ray.cluster_utils import Cluster

    temp = Path(tempfile.mkdtemp(prefix="ray-"))
    (temp / "ray").mkdir()  # RAY_TMPDIR's folder for Ray, as /tmp/ray is /tmp's
    before = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = str(temp)
    try:
        head = {
            "node_ip_address": "127.0.0.1",
            "num_cpus": 0,
            "include_dashboard": False,
            "temp_dir": str(temp / "ray"),
        }
        cluster = Cluster(initialize_head=True, head_node_args=head)
        try:
            if not cluster.address.startswith("127.0.0.1:"):  # before anything would wait on it
                raise RuntimeError(f"the Ray head listens on {cluster.address}, not 127.0.0.1")
            yield cluster, [add_simulated_node(cluster, w) for w in workdirs]
        finally:
            cluster.shutdown()
    finally:
        if before is None:
            os.environ.pop("RAY_TMPDIR")
        else:
            os.environ["RAY_TMPDIR"] = before
        shutil.rmtree(temp, ignore_errors=True)


def add_simulated_node(cluster, workdir: Path):
    """A node of 1 CPU on 127.0.0.1 with `workdir` as its MPAD_WORKDIR, added to `cluster`."""
    return cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", env_vars={"MPAD_WORKDIR": str(workdir)})


def unavailable() -> str | None:
    """Why a network namespace cannot be made here (None: it can)."""
    try:
        done = subprocess.run(["unshare", "--net", "--", "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"`unshare --net` failed: {err}"
    return None if done.returncode == 0 else f"`unshare --net` failed: {done.stderr.strip()}"


class LoopbackNodes:
    """A head without CPUs (the coordinator's, 127.0.0.2:6379) and one worker node per `workdirs` entry, started
    with `ray start --block` in a network namespace of their own, each worker with its MPAD_WORKDIR."""

    def __init__(self, workdirs: Sequence[Path], cpus: int = 1):
        self.address = f"{HEAD}:{PORT}"
        self.temp = Path(tempfile.mkdtemp(prefix="ray-"))  # short: Ray's Unix socket paths must be
        self.holder = subprocess.Popen(
            ["unshare", "--net", "--", "sh", "-c", "ip link set lo up && echo up && exec sleep infinity"],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.workdirs, self.cpus = list(workdirs), cpus
        self.head: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        try:
            if self.holder.stdout.readline().strip() != "up":
                raise RuntimeError("the network namespace did not come up")
            self.head = self.start(["--head", f"--port={PORT}", "--num-cpus=0", "--include-dashboard=false"], HEAD, {})
            self.workers = [self.start_worker(i) for i in range(len(self.workdirs))]
            self.wait_for([HEAD, *(self.ip(i) for i in range(len(self.workdirs)))])
        except BaseException:
            self.close()
            raise

    @staticmethod
    def ip(worker: int) -> str:
        return f"127.0.0.{3 + worker}"

    def command(self, cmd: Sequence[str]) -> list[str]:
        """`cmd` as run inside the namespace."""
        return ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net", "--", *cmd]

    def start(self, args: Sequence[str], ip: str, env: dict[str, str]) -> subprocess.Popen:
        log = open(self.temp / f"ray-start-{ip}.log", "a")
        node = subprocess.Popen(
            self.command(
                [
                    str(BIN / "ray"),
                    "start",
                    "--block",
                    "--disable-usage-stats",
                    f"--node-ip-address={ip}",
                    f"--temp-dir={self.temp / ip}",
                    *args,
                ]
            ),  # fmt: skip
            env={**self.env(), **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as a whole, like a machine
        )
        return node

    def start_worker(self, i: int) -> subprocess.Popen:
        """Worker node i, with its MPAD_WORKDIR."""
        env = {"MPAD_WORKDIR": str(self.workdirs[i])}
        return self.start([f"--address={self.address}", f"--num-cpus={self.cpus}"], self.ip(i), env)

    def wait_for(self, ips: Sequence[str]) -> None:
        """Until exactly the nodes at `ips` are alive; AssertionError naming the ones there otherwise."""
        done = self.run([str(BIN / "python"), "-c", READY, self.address, *ips], timeout=180)
        logs = "".join(f"\n{log.name}: {log.read_text()[-1500:]}" for log in sorted(self.temp.glob("ray-start-*.log")))
        assert done.stdout.strip().splitlines()[-1:] == [str(sorted(ips))], done.stdout + done.stderr + logs

    def run(self, cmd: Sequence[str], cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
        """A command inside the namespace (its output captured, its exit status not checked)."""
        return subprocess.run(
            self.command(cmd), cwd=cwd, env=self.env(), capture_output=True, text=True, timeout=timeout
        )

    @staticmethod
    def env() -> dict[str, str]:
        """This environment without what the in-process `Cluster` of other tests sets: RAY_ENABLE_..._CLUSTER=0
        makes `ray start` refuse worker nodes."""
        return {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}

    def close(self) -> None:
        """Every node stopped: SIGTERM (`ray start --block` then stops its node's processes), SIGKILL after 3 s."""
        running = [n for n in [*self.workers, self.head] if n is not None and n.poll() is None]
        for node in running:
            os.killpg(node.pid, signal.SIGTERM)
        deadline = time.monotonic() + 3
        for node in running:
            try:
                node.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
        self.holder.kill()
        self.holder.wait()

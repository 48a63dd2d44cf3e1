"""A real two-node Slurm cluster on this host, for tests and for trying the sbatch templates.

    python tools/local_slurm.py start --dir /tmp/kslurm      # prints `export SLURM_CONF=…`
    SLURM_CONF=/tmp/kslurm/slurm.conf sbatch slurm/train.sbatch configs/demo.yaml …
    python tools/local_slurm.py stop --dir /tmp/kslurm

Debian's slurmctld + slurmd (22.05) and munge, started by hand (no systemd): munged with its socket and key
inside ``--dir``, ``slurmctld -c`` (clean state), and one ``slurmd -N nX`` per node, the two nodes being
this host under two names and ports.  Needs root (slurmd starts jobs as their user).  ``install()`` puts the
packages in with apt when they are missing.  Choices that matter, all measured on a 2-core container:

* ``cred_expire=5`` in AuthInfo: with the default 120 s every requeued job waits two minutes to start again.
* ``sched_interval=2,bf_interval=1``: a submitted job starts within about two seconds.
* ``proctrack/linuxproc`` + ``task/none``: no cgroups in a container.
* ``SlurmdParameters=config_overrides``: each node may declare more CPUs than the host has.
* ``scontrol show job`` forgets a finished job after MinJobAge (300 s): callers read job output from files.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol", "squeue", "scancel", "sacct")


class SlurmSetupError(RuntimeError):
    pass


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports (bound together so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _call(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)


def missing_binaries() -> list[str]:
    return [b for b in DAEMONS if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def install() -> None:
    """apt-get the Slurm + munge packages when a binary is missing (Debian, root)."""
    if not missing_binaries():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SlurmSetupError(f"Slurm binaries missing ({', '.join(missing_binaries())}) and cannot install them "
                              f"here (needs root and apt-get): install {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    done = _call(cmd, env)
    if done.returncode != 0:  # a fresh image may have no package lists yet
        _call(["apt-get", "update"], env)
        done = _call(cmd, env)
    if done.returncode != 0:
        raise SlurmSetupError(f"`{' '.join(cmd)}` failed:\n{done.stderr[-2000:]}")


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@dataclass
class LocalSlurm:
    """Files, ports and daemons of one local cluster under ``root``."""

    root: Path
    nodes: int = 2
    cpus_per_node: int = 2
    partition: str = "debug"
    hostname: str = field(default_factory=socket.gethostname)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def node_names(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.nodes + 1)]

    def env(self) -> dict[str, str]:
        """The environment a Slurm client (sbatch, squeue, …) needs to talk to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- setup ---------------------------------------------------------------------------------------------
    def write_config(self) -> None:
        r = self.root
        for d in ("state", "log", "run"):
            (r / d).mkdir(parents=True, exist_ok=True)
        for n in self.node_names:
            (r / "spool" / n).mkdir(parents=True, exist_ok=True)
        munge_dir, key_dir = r / "munge", r / "munge-key"
        munge_dir.mkdir(mode=0o755, exist_ok=True)
        key_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(munge_dir, 0o755)
        os.chmod(key_dir, 0o700)
        key = key_dir / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        ctld_port, *node_ports = _free_ports(1 + self.nodes)
        node_lines = "\n".join(
            f"NodeName={n} NodeHostname={self.hostname} NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus_per_node} "
            f"State=UNKNOWN" for n, p in zip(self.node_names, node_ports))
        self.conf.write_text(f"""\
ClusterName=kclip-local
SlurmctldHost={self.hostname}(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
AuthInfo=socket={munge_dir}/munge.socket.2,cred_expire=5
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
{node_lines}
PartitionName={self.partition} Nodes={",".join(self.node_names)} Default=YES MaxTime=INFINITE State=UP
""")

    def start(self, timeout: float = 60.0) -> None:
        install()
        self.write_config()
        r = self.root
        munge_dir = r / "munge"
        self._run([_sbin("munged"), "--force", f"--socket={munge_dir}/munge.socket.2",
                   f"--key-file={r}/munge-key/munge.key", f"--pid-file={r}/run/munged.pid",
                   f"--log-file={r}/log/munged.log", f"--seed-file={r}/munge-key/munged.seed"])
        self._run([_sbin("slurmctld"), "-c", "-f", str(self.conf)])
        for n in self.node_names:
            self._run([_sbin("slurmd"), "-N", n, "-f", str(self.conf)])
        self.wait_idle(timeout)

    def _run(self, cmd: list[str]) -> None:
        done = _call(cmd, self.env())
        if done.returncode != 0:
            raise SlurmSetupError(f"`{' '.join(cmd)}` exited {done.returncode}: {done.stderr.strip()[-1500:]} "
                                  f"(logs in {self.root / 'log'})")

    def wait_idle(self, timeout: float) -> None:
        """Until every node reports idle (nodes come up as unknown, then idle)."""
        deadline, states = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            done = _call(["sinfo", "-h", "-N", "-o", "%N %t"], self.env())
            states = done.stdout.strip()
            if done.returncode == 0 and states and all(line.split()[1] == "idle" for line in states.splitlines()):
                return
            time.sleep(0.5)
        raise SlurmSetupError(f"nodes not idle after {timeout:.0f} s (sinfo: {states!r}); see {self.root / 'log'}")

    # -- teardown ------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel every job, then stop the daemons by pid file (slurmd, slurmctld, munged).  Never raises."""
        if self.conf.exists():
            _call(["scancel", "--full", "--user", str(os.getuid())], self.env())
            time.sleep(1.0)
        pidfiles = [self.root / "run" / f"slurmd-{n}.pid" for n in self.node_names]
        pidfiles += [self.root / "run" / "slurmctld.pid", self.root / "run" / "munged.pid"]
        for pidfile in pidfiles:
            _kill_pidfile(pidfile)


def _kill_pidfile(pidfile: Path, grace: float = 10.0) -> None:
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Start or stop a two-node Slurm cluster on this host.")
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", type=Path, required=True, help="where config, state, logs and sockets live")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus-per-node", type=int, default=2)
    args = parser.parse_args(argv)
    cluster = LocalSlurm(args.dir.resolve(), nodes=args.nodes, cpus_per_node=args.cpus_per_node)
    try:
        if args.action == "start":
            cluster.start()
            print(f"export SLURM_CONF={cluster.conf}")
        else:
            cluster.stop()
    except SlurmSetupError as exc:
        print(f"local_slurm: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

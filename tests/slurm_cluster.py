"""A real single-node SLURM cluster for the tests: Debian's munged, slurmctld and slurmd, run as
root in the foreground, with their key, socket, state, pid and log files in one temporary
directory and free ports, so that another cluster's or a previous run's state plays no part.

Clients find it through SLURM_CONF (`Cluster.env`) and, while it runs, at the default path:
/etc/slurm/slurm.conf links to its config. Inside a job the executor plugin runs the rule through
`srun` after removing every SLURM_* variable but the job's identity, SLURM_CONF included
(snakemake-executor-plugin-slurm-jobstep 0.6.1), so that srun finds only the default path. A
file lock lets one such cluster run on the machine at a time.

No accounting daemon (slurmdbd needs a MySQL/MariaDB server), so `sacct` fails ("Slurm
accounting storage is disabled"); job states come from slurmctld, which `squeue --states=all`
reports for MinJobAge seconds after a job ends: the executor plugin's status command is
`squeue` (`--slurm-status-command squeue`; https://slurm.schedmd.com/slurm.conf.html#OPT_MinJobAge).
No cgroups either (containers rarely delegate them): processes are tracked through /proc.

`Cluster(shards=K)` gives the node K of SLURM's GPU shards (`GresTypes=shard`, gres.conf
`Name=shard Count=K`), the count-only GRES that lets K jobs share one GPU
(https://slurm.schedmd.com/gres.html#Sharding); the test node has no GPU, and shards alone
are only a count, which is what the packing test needs.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel")
DEBIAN_PACKAGES = "slurmctld slurmd slurm-client munge"
SBIN = ("/usr/sbin", "/sbin")
DEFAULT_CONF = Path("/etc/slurm/slurm.conf")  # where srun looks without SLURM_CONF (Debian's build)
LOCK = Path("/tmp/diamond-test-slurm-cluster.lock")


def which(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def why_unavailable() -> str | None:
    """None when a cluster can be started here, else the reason (for pytest.skip)."""
    missing = [n for n in PROGRAMS if which(n) is None]
    if missing:
        return (f"SLURM/munge not installed ({', '.join(missing)} missing); as root, "
                f"`apt-get install {DEBIAN_PACKAGES}` (scripts/setup.sh --test does)")
    if os.geteuid() != 0:
        return "slurmd must run as root to launch jobs; run the test as root"
    if DEFAULT_CONF.exists() and not DEFAULT_CONF.is_symlink():
        return f"{DEFAULT_CONF} configures another cluster on this machine; the test cluster would replace it"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("/proc/meminfo has no MemTotal")


@dataclass
class Cluster:
    root: Path
    partition: str = "debug"
    cpus: int = 2
    shards: int = 0  # GPU shards on the node (count-only GRES), none by default
    ctld_debug: str = "info"  # slurmctld's log level; debug2 logs each periodic time-limit check
    node: str = field(default_factory=socket.gethostname)
    procs: list[subprocess.Popen] = field(default_factory=list)
    lock: object = None

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def ctld_log(self) -> Path:
        return self.root / "log" / "slurmctld.log"

    @property
    def env(self) -> dict[str, str]:
        """Environment for SLURM clients (sbatch, squeue, snakemake's executor plugin)."""
        return {"SLURM_CONF": str(self.conf)}

    def write_config(self) -> None:
        r = self.root
        for d in ("munge", "ctld", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
            os.chmod(r / d, 0o700)
        # RealMemory below the machine's: slurmd refuses to register a node with less than configured
        memory = machine_memory_mb() * 9 // 10
        gres = f" Gres=gpu:1,shard:{self.shards}" if self.shards else ""
        if self.shards:
            # gres/shard needs a gres/gpu to divide ("requires that gres/gpu also be configured"):
            # a stand-in device file, which slurmd only checks exists (read from slurm.conf's directory)
            (r / "nvidia0").touch()
            (r / "gres.conf").write_text(f"Name=gpu File={r / 'nvidia0'}\nName=shard Count={self.shards}\n")
        self.conf.write_text(f"""\
ClusterName=diamondtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r / 'munge' / 'munge.socket'}
StateSaveLocation={r / 'ctld'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldDebug={self.ctld_debug}
# timestamped lines (LogTimeFormat iso8601_ms, the default)
SlurmctldLogFile={self.ctld_log}
SlurmdDebug=info
# no cgroups: track job processes through /proc, bind no tasks
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# a job over its time limit gets SIGTERM, then SIGKILL after KillWait seconds (the default)
OverTimeLimit=0
KillWait=30
# finished jobs stay visible to `squeue --states=all` this long (the plugin's status command)
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=60
# the node is what this file says, even with more CPUs than the machine has (no DRAIN)
SlurmdParameters=config_overrides
{"GresTypes=gpu,shard" if self.shards else ""}
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={memory}{gres} State=UNKNOWN
PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, *cmd: str, log_name: str | None = None) -> None:
        """Start a daemon in the foreground, its output to log/NAME.log (slurmd -D logs to stderr
        when slurm.conf names no log file; slurmctld also writes SlurmctldLogFile, timestamped)."""
        log = open(self.root / "log" / (log_name or f"{Path(cmd[0]).name}.log"), "w")
        self.procs.append(subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT,
                                           env={**os.environ, **self.env}, start_new_session=True))

    def run(self, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **self.env})

    def start(self, timeout: float = 60) -> None:
        self.lock = LOCK.open("w")
        fcntl.flock(self.lock, fcntl.LOCK_EX)  # waits for another test cluster to stop
        self.write_config()
        DEFAULT_CONF.parent.mkdir(parents=True, exist_ok=True)
        DEFAULT_CONF.unlink(missing_ok=True)  # a link (why_unavailable), left by a killed test run
        DEFAULT_CONF.symlink_to(self.conf)
        m = self.root / "munge"
        subprocess.run([which("mungekey"), "--create", f"--keyfile={m / 'munge.key'}"],
                       check=True, capture_output=True)
        self._spawn(which("munged"), "--foreground", "--force", f"--key-file={m / 'munge.key'}",
                    f"--socket={m / 'munge.socket'}", f"--pid-file={m / 'munged.pid'}",
                    f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}")
        self._wait(lambda: (m / "munge.socket").exists(), timeout, "munged did not create its socket")
        # -i: ignore state a previous cluster left (there is none in a fresh directory)
        self._spawn(which("slurmctld"), "-D", "-i", "-f", str(self.conf), log_name="slurmctld-stderr.log")
        self._spawn(which("slurmd"), "-D", "-f", str(self.conf))
        self._wait(self.node_idle, timeout, "the node did not come up idle")

    def node_idle(self) -> bool:
        p = self.run("sinfo", "--noheader", "--format=%T", "--nodes", self.node)
        return p.returncode == 0 and p.stdout.strip() == "idle"

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{what} ({', '.join(dead) + ' exited; ' if dead else ''}logs:\n{self.logs()})")
            time.sleep(0.5)

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}"
                         for p in sorted((self.root / "log").glob("*")))

    def stop(self) -> None:
        """Cancel every job, then stop the daemons (slurmd, slurmctld, munged) and wait for them."""
        if self.procs:
            self.run("scancel", "--full", "--partition", self.partition)
            deadline = time.monotonic() + 60  # KillWait, then SIGKILL
            while time.monotonic() < deadline and self.run("squeue", "--noheader").stdout.strip():
                time.sleep(1)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()
        if DEFAULT_CONF.is_symlink() and DEFAULT_CONF.resolve() == self.conf.resolve():
            DEFAULT_CONF.unlink()
        if self.lock is not None:
            self.lock.close()  # releases the flock
            self.lock = None

#!/usr/bin/env python3
"""An emulated cluster on one Linux machine, for running dpvit across "hosts" with MPICH.

Each host is a network namespace (``dpvit-h0``, ``dpvit-h1``, ...) with its own host name,
joined by a veth pair to a bridge in the root namespace; traffic between hosts crosses the
links, optionally shaped to a bandwidth with ``tc tbf``. Needs root and iproute2.

    sudo launch/cluster.py up --hosts 2 --rate 1gbit   # (again: replaces the cluster)
    sudo launch/cluster.py status                      # hosts, addresses, rate, link bytes
    sudo launch/cluster.py run -- mpirun -n 4 -ppn 2 python -m dpvit.train --run-dir runs/c
    sudo launch/cluster.py down                        # removes everything up created

``run`` runs the command here, in the root namespace, with MPICH's Hydra pointed at the
hosts through the environment (so that it works for an ``mpirun`` anywhere inside the
command): HYDRA_LAUNCHER=ssh with ``launch/cluster-ssh`` as the "ssh" (it maps a host name to
its namespace and runs the command there, with a /etc/hosts in which the launching machine's
name is the bridge address, so that the proxies can call back to mpirun), and the cluster's
hostfile unless the command names its hosts (``-f``, ``-hosts``). It also selects MPICH's
OFI/TCP netmod: with the wheel's default, UCX, ranks reach other namespaces through shared
memory and no byte crosses the links. Variables already set in the environment win.
docs/cluster.md has the details and numbers measured on it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PREFIX = "dpvit"
BRIDGE = f"{PREFIX}-br0"
NETNS_RE = re.compile(rf"^{PREFIX}-h(\d+)$")
VETH_RE = re.compile(rf"^{PREFIX}-v(\d+)$")
SUBNET = "198.18.0"  # 198.18.0.0/15 is reserved for benchmarking networks (RFC 2544)
BRIDGE_ADDR = f"{SUBNET}.1"
HOST_IF = "eth0"  # the link's name inside each host
MAX_HOSTS = 200
STATE_DIR = Path(os.environ.get("DPVIT_CLUSTER_DIR", "/run/dpvit-cluster"))
HERE = Path(__file__).resolve().parent
SSH = HERE / "cluster-ssh"
STATE_FILES = ("cluster.json", "hostfile", "hosts")
PRIVATE_ENV = "DPVIT_CLUSTER_PRIVATE"  # run --private: directories each host has its own of

#: Environment for MPI jobs across the hosts (setdefault: the caller's values win).
MPI_ENV = {
    "MPIR_CVAR_CH4_NETMOD": "ofi",  # TCP sockets between hosts (UCX would use shared memory)
    "FI_PROVIDER": "tcp",  # libfabric's TCP provider, not shm or sockets
    "FI_TCP_IFACE": HOST_IF,  # the host's link, not its loopback
    "DPVIT_NUM_THREADS": "1",  # the hosts share this machine's cores
}


def host_name(i: int) -> str:
    return f"{PREFIX}-h{i}"


def host_addr(i: int) -> str:
    return f"{SUBNET}.{11 + i}"


def veth_name(i: int) -> str:
    return f"{PREFIX}-v{i}"


def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a command; on failure raise with its stderr."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise SystemExit(f"cluster: `{' '.join(cmd)}` failed ({done.returncode}): "
                         f"{done.stderr.strip()}")
    return done


def need_root() -> None:
    if os.geteuid() != 0:
        raise SystemExit("cluster: needs root (network namespaces, links, tc)")
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            raise SystemExit(f"cluster: `{tool}` not found (install iproute2 / util-linux)")


def our_namespaces() -> list[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return sorted((n for n in names if NETNS_RE.match(n)), key=lambda n: int(n.split("h")[-1]))


def our_links() -> list[str]:
    out = sh("ip", "-o", "link", "show", check=False).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]
    return [n for n in names if VETH_RE.match(n) or n == BRIDGE]


def load_state() -> dict:
    path = STATE_DIR / "cluster.json"
    if not path.is_file():
        raise SystemExit(f"cluster: not up (no {path}); run `{sys.argv[0]} up --hosts K`")
    return json.loads(path.read_text())


# -- up / down ---------------------------------------------------------------------------------


def rate_bits(rate: str) -> int:
    """'100mbit' -> 100_000_000 (tc's units: bit, kbit, mbit, gbit; bare numbers are bits)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)(?:bit)?", rate.strip().lower())
    if not match:
        raise SystemExit(f"cluster: --rate {rate!r}: use a tc rate such as 100mbit or 1gbit")
    return int(float(match[1]) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[match[2]])


def shape(dev: str, rate: str | None, netns: str | None = None) -> None:
    """A token bucket on the egress of dev: both ends of a link get one, so both directions are
    limited. The bucket holds 1 ms at the rate but at least 64 KiB (one GSO segment)."""
    ns = ["-n", netns] if netns else []
    if rate is None:
        sh("tc", *ns, "qdisc", "del", "dev", dev, "root", check=False)
        return
    burst = max(rate_bits(rate) // 8 // 1000, 64 * 1024)
    sh("tc", *ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
       "burst", str(burst), "latency", "50ms")


def up(hosts: int, rate: str | None) -> None:
    if not 1 <= hosts <= MAX_HOSTS:
        raise SystemExit(f"cluster: --hosts must be 1..{MAX_HOSTS}")
    if rate is not None and rate.lower() in ("unlimited", "none", "0"):
        rate = None
    if rate is not None:
        rate_bits(rate)
    down(quiet=True)
    try:
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{BRIDGE_ADDR}/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for i in range(hosts):
            ns, veth = host_name(i), veth_name(i)
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", HOST_IF, "netns", ns)
            sh("ip", "link", "set", veth, "master", BRIDGE)
            sh("ip", "link", "set", veth, "up")
            sh("ip", "-n", ns, "addr", "add", f"{host_addr(i)}/24", "dev", HOST_IF)
            sh("ip", "-n", ns, "link", "set", HOST_IF, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            shape(veth, rate)
            shape(HOST_IF, rate, netns=ns)
        write_state(hosts, rate)
    except BaseException:
        down(quiet=True)
        raise
    print(f"cluster: {hosts} host(s) up, rate {rate or 'unlimited'}; state in {STATE_DIR}")


def write_state(hosts: int, rate: str | None) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    names = [host_name(i) for i in range(hosts)]
    state = {"hosts": names, "addresses": [host_addr(i) for i in range(hosts)],
             "links": [veth_name(i) for i in range(hosts)], "bridge": BRIDGE,
             "bridge_address": BRIDGE_ADDR, "rate": rate}
    (STATE_DIR / "cluster.json").write_text(json.dumps(state, indent=1) + "\n")
    # one slot per host; `mpirun -ppn N` places N ranks on each
    (STATE_DIR / "hostfile").write_text("".join(f"{n}\n" for n in names))
    # every host's name, and the launching machine's, as each host sees them
    lines = ["127.0.0.1 localhost", f"{BRIDGE_ADDR} {os.uname().nodename} {PREFIX}-launcher"]
    lines += [f"{host_addr(i)} {n}" for i, n in enumerate(names)]
    (STATE_DIR / "hosts").write_text("\n".join(lines) + "\n")


def remove_state() -> None:
    """The files `up` and `run --private` made, then the directory if that left it empty
    (never a tree: DPVIT_CLUSTER_DIR may name a directory that holds other things)."""
    for name in STATE_FILES:
        (STATE_DIR / name).unlink(missing_ok=True)
    shutil.rmtree(STATE_DIR / "private", ignore_errors=True)
    with contextlib.suppress(OSError):
        STATE_DIR.rmdir()


def stop_processes(ns: str) -> None:
    """Processes still inside a host (started through this cluster): TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
        pids = [int(p) for p in sh("ip", "netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and sh("ip", "netns", "pids", ns, check=False).stdout:
            time.sleep(0.1)


def down(quiet: bool = False) -> None:
    for ns in our_namespaces():
        stop_processes(ns)
    for link in our_links():
        if link != BRIDGE:
            sh("ip", "link", "del", link, check=False)
    for ns in our_namespaces():
        sh("ip", "netns", "del", ns, check=False)
    if BRIDGE in our_links():
        sh("ip", "link", "del", BRIDGE, check=False)
    remove_state()
    left = our_namespaces() + our_links()
    if left:
        raise SystemExit(f"cluster: could not remove {', '.join(left)}")
    if not quiet:
        print("cluster: down")


# -- status ------------------------------------------------------------------------------------


def link_bytes(link: str) -> tuple[int, int]:
    """(bytes into the host, bytes out of the host) of a host's link, read on the bridge side."""
    stats = Path("/sys/class/net") / link / "statistics"
    return int((stats / "tx_bytes").read_text()), int((stats / "rx_bytes").read_text())


def status() -> None:
    state = load_state()
    print(f"bridge {state['bridge']} {state['bridge_address']}/24, "
          f"rate {state['rate'] or 'unlimited'}")
    print(f"hostfile {STATE_DIR / 'hostfile'}, names {STATE_DIR / 'hosts'}")
    print(f"{'host':<10} {'address':<14} {'link':<10} {'bytes in':>14} {'bytes out':>14} "
          f"{'processes':>9}")
    for name, addr, link in zip(state["hosts"], state["addresses"], state["links"], strict=True):
        rx, tx = link_bytes(link)
        procs = len(sh("ip", "netns", "pids", name, check=False).stdout.split())
        print(f"{name:<10} {addr:<14} {link:<10} {rx:>14} {tx:>14} {procs:>9}")


# -- run / ssh ---------------------------------------------------------------------------------


def run(cmd: list[str], private: list[str]) -> None:
    load_state()
    if not cmd:
        raise SystemExit("cluster: run needs a command after --")
    env = dict(os.environ)
    for key, value in MPI_ENV.items():
        env.setdefault(key, value)
    env.setdefault("HYDRA_LAUNCHER", "ssh")
    env.setdefault("HYDRA_LAUNCHER_EXEC", str(SSH))
    env.setdefault("HYDRA_HOST_FILE", str(STATE_DIR / "hostfile"))
    if private:
        env[PRIVATE_ENV] = ":".join(str(Path(p).resolve()) for p in private)
    try:  # the command replaces this process: signals and the exit status are its own
        os.execvpe(cmd[0], cmd, env)
    except OSError as exc:
        raise SystemExit(f"cluster: cannot run {cmd[0]}: {exc}") from exc


def private_dir(host: str, path: str | os.PathLike) -> Path:
    """Where host's own copy of a `run --private` directory lives, seen from outside."""
    return STATE_DIR / "private" / host / Path(path).resolve().relative_to("/")


def ssh(argv: list[str]) -> None:
    """Hydra's ssh: ``cluster-ssh [-x] [-o OPT] ... HOST COMMAND...``; runs COMMAND with sh in
    HOST's namespace (it replaces this process, as ssh stands for the remote command), with
    the host's name (a UTS namespace), the cluster's /etc/hosts and the host's own copy of
    each `run --private` directory (bind mounts, in the mount namespace of `ip netns exec`,
    which the rest of the machine does not see)."""
    args = list(argv)
    while args and args[0].startswith("-"):
        opt = args.pop(0)
        if opt in ("-o", "-p", "-l", "-i", "-F", "-E", "-J") and args:
            args.pop(0)
    if not args:
        raise SystemExit("cluster-ssh: usage: cluster-ssh [options] HOST COMMAND...")
    host, command = args[0].split("@")[-1], " ".join(args[1:])
    state = load_state()
    names = dict(zip(state["addresses"], state["hosts"], strict=True))
    names.update({n: n for n in state["hosts"]})
    if host not in names:
        raise SystemExit(f"cluster-ssh: unknown host {host!r}; the hosts: {state['hosts']}")
    ns = names[host]
    mounts = [(STATE_DIR / "hosts", "/etc/hosts")]
    for path in filter(None, os.environ.get(PRIVATE_ENV, "").split(":")):
        own = private_dir(ns, path)
        own.mkdir(parents=True, exist_ok=True)
        Path(path).mkdir(parents=True, exist_ok=True)
        mounts.append((own, path))
    script = " && ".join([*(f"mount --bind {shlex.quote(str(a))} {shlex.quote(str(b))}"
                            for a, b in mounts),
                          f"hostname {ns}", 'exec sh -c "$0"'])
    os.execvp("ip", ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c", script,
                     command or "exec sh"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ssh"]:  # before argparse: ssh's options are not ours
        ssh(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    p_up = sub.add_parser("up", help="create (or re-create) the hosts")
    p_up.add_argument("--hosts", type=int, required=True, help="how many hosts (1-200)")
    p_up.add_argument("--rate", default=None,
                      help="bandwidth of each link in each direction, a tc rate such as 100mbit "
                      "or 1gbit (default: unlimited)")
    sub.add_parser("down", help="remove the hosts, links, bridge and state")
    sub.add_parser("status", help="hosts, addresses, rate and link byte counters")
    p_run = sub.add_parser("run", help="run a command (mpirun ...) across the hosts")
    p_run.add_argument("--private", action="append", default=[], metavar="DIR",
                       help="give each host its own empty copy of DIR (as a node-local disk), "
                       "kept under the state dir as private/HOST/DIR until `down`")
    p_run.add_argument("cmd", nargs=argparse.REMAINDER)
    sub.add_parser("ssh", help="what Hydra calls as ssh: ssh [options] HOST COMMAND...")
    args = parser.parse_args(argv)
    need_root()
    if args.action == "up":
        up(args.hosts, args.rate)
    elif args.action == "down":
        down()
    elif args.action == "status":
        status()
    else:
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        run(cmd, args.private)
    return 0


if __name__ == "__main__":
    sys.exit(main())

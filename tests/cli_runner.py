"""diffkern's command line in subprocesses, alone or under torchrun (gloo, one thread per process), for
tests/test_distributed.py and tests/test_train.py."""
import hashlib
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


def environment():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, TESTS]))
    env.pop("WORLD_SIZE", None)
    return env


def torchrun(nproc, args, timeout=180, extra=()):
    """diffkern's CLI under torchrun with nproc CPU processes (gloo); nproc 0: without torchrun."""
    launcher = [] if nproc == 0 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                                      *extra]
    command = [sys.executable, *launcher, "-m", "diffkern", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment(), cwd=ROOT)


def snapshot(folder):
    """Every file under folder with its bytes' hash."""
    state = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                state[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return state


def worker_pids(parent):
    """PIDs of the processes torchrun started (children of its agent) with their LOCAL_RANK."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            found[int(env.get(b"LOCAL_RANK", b"-1"))] = int(pid)
        except (OSError, ValueError, IndexError):
            continue
    return found

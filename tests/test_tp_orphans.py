"""Tensor-parallel ranks never outlive the process that started them: when the caller dies in the
middle of a long call, every rank stops within seconds instead of finishing the call for nobody."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

SCRIPT = textwrap.dedent("""
    import sys
    import zoo

    if __name__ == "__main__":
        model = zoo.load(sys.argv[1], tp=2, max_batch_size=1, max_seq_len=2048)
        print("PIDS", *model.rank_pids, flush=True)
        model.generate([1, 2, 3], max_new_tokens=2000, ignore_eos=True)  # long: the caller dies meanwhile
        print("FINISHED", flush=True)
""")


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ranks_stop_within_seconds_when_the_caller_is_killed(checkpoint, tmp_path):
    script = tmp_path / "caller.py"
    script.write_text(SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's zoo
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    caller = subprocess.Popen([sys.executable, str(script), checkpoint("llama3_gqa")], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = caller.stdout.readline()  # after the ranks loaded
        assert line.startswith("PIDS"), line
        pids = [int(p) for p in line.split()[1:]]
        time.sleep(1.0)  # inside generate() now
        assert all(_running(p) for p in pids)
        caller.kill()  # SIGKILL: no atexit, no close(): only the ranks' own watch can stop them
        caller.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_running(p) for p in pids):
            time.sleep(0.1)
        left = [p for p in pids if _running(p)]
        assert not left, f"ranks {left} still run 10 s after their caller died"
    finally:
        if caller.poll() is None:
            caller.kill()
        for pid in pids if "pids" in locals() else []:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)

"""Server processes for the tests: start `python -m zoo.serve ...` on a free loopback port, wait
until it answers /health, stop it; and whether a process is still running."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import httpx
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_S = 90


def start_server(args: list[str], log_path) -> tuple[subprocess.Popen, str]:
    """`python -m zoo.serve --port 0 *args`, its output in log_path -> (process, base URL) once it
    answers /health; the test fails (with the log's tail) if it exits or is not up in time."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "zoo.serve", "--port", "0", *args], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        return proc, wait_until_listening(proc, log_path)
    except BaseException:
        stop_process(proc)
        raise


def wait_until_listening(proc: subprocess.Popen, log_path) -> str:
    """The URL the server printed ('[zoo] listening on URL'), once GET /health answers 200."""
    deadline = time.monotonic() + START_TIMEOUT_S
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        if url is None:
            m = re.search(r"\[zoo\] listening on (http://\S+)", log_path.read_text())
            url = m.group(1) if m else None
        if url is not None:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    pytest.fail(f"the server did not come up in {START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")


def stop_process(proc: subprocess.Popen, timeout_s: float = 15) -> None:
    """SIGTERM, then SIGKILL if it has not exited within timeout_s."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def process_running(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False

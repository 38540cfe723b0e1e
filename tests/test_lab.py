"""`make lab` starts JupyterLab on the notebooks with the project's kernel and answers its status API."""
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_make_lab_starts_a_server_that_answers_its_status_api(root, tmp_path):
    port, token = _free_port(), "datalens-test"
    args = f"--no-browser --ip=127.0.0.1 --port={port} --IdentityProvider.token={token}"  # make adds --allow-root for root (CI)
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path), "JUPYTER_CONFIG_DIR": str(tmp_path / "config")}
    proc = subprocess.Popen(["make", "-s", "lab", f"LAB_ARGS={args}"], cwd=root, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, status = time.monotonic() + 120, None  # a hang guard, not a speed bound
        while status is None and time.monotonic() < deadline:
            assert proc.poll() is None, "make lab exited before the server answered"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2) as r:
                    status = json.loads(r.read())
            except OSError:
                time.sleep(0.5)
        assert status is not None and "started" in status
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/kernelspecs?token={token}", timeout=5) as r:
            assert "python3" in json.loads(r.read())["kernelspecs"]  # the venv's kernel, installed by make venv
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)

"""Opening a page the way a person would: headless Chromium (Debian's `chromium`, which .ci/run installs)."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--host-resolver-rules=MAP * ~NOTFOUND",  # no host resolves
         "--virtual-time-budget=5000"]


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: .ci/run installs Debian's chromium package before make test")
        pytest.skip("chromium is not installed here (apt-get install chromium); CI installs it and runs this test")
    return exe


def open_offline(html: Path, screenshot: Path) -> dict:
    """Load ``html`` from disk with every host unresolvable; return the counts of images present and
    decoded (the page records them on load) and the remote URLs the page refers to. Writes a screenshot."""
    exe = chromium()
    url = html.resolve().as_uri()
    dom = subprocess.run([exe, *FLAGS, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    subprocess.run([exe, *FLAGS, "--window-size=1200,1600", f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
    body = re.search(r"<body[^>]*>", dom)
    attrs = dict(re.findall(r'data-([a-z-]+)="(\d+)"', body.group(0))) if body else {}
    return {"images": int(attrs.get("images", -1)), "loaded": int(attrs.get("images-loaded", -1)),
            "remote": re.findall(r'(?:src|href)="(https?:[^"]+)"', html.read_text())}

"""Opening a page the way a person would: headless Chromium (Debian's `chromium`, which `make test` installs)."""
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
        pytest.fail("chromium is not installed: `make test` installs Debian's chromium package (apt-get as root); "
                    "elsewhere install a chromium on PATH")
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

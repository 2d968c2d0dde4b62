"""Open the built documentation in headless Chromium: each page must render with no
console message (errors, failed loads) and show typeset maths. Screenshots go to
`<site>/_screenshots/`.

    python scripts/check_site.py site
"""

import functools
import http.server
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

PAGES = {"home": "", "api": "api/batch-norm/"}
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=8000",
]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    sys.exit("no Chromium found; install Debian's `chromium` package")


def _run(browser: str, args: list[str]) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [browser, *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )


def main(site: str) -> int:
    root = Path(site).resolve()
    if not (root / "index.html").exists():
        sys.exit(f"{root} holds no built site; run `mkdocs build --strict` first")
    handler = functools.partial(_Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    shots = root / "_screenshots"
    shots.mkdir(exist_ok=True)
    browser = _chromium()
    failures = []
    try:
        for name, page in PAGES.items():
            url = base + page
            dom = _run(browser, ["--enable-logging=stderr", "--v=0", "--dump-dom", url])
            console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
            maths = len(re.findall(r'class="katex"', dom.stdout))
            _run(
                browser,
                ["--window-size=1280,1600", f"--screenshot={shots / name}.png", url],
            )
            print(
                f"{url}: {maths} formulas typeset, {len(console)} console messages, "
                f"screenshot {shots / name}.png"
            )
            if dom.returncode != 0 or not dom.stdout.strip():
                failures.append(f"{url}: Chromium failed ({dom.returncode})")
            if console:
                failures.append(f"{url}: console messages:\n  " + "\n  ".join(console))
            if maths == 0:
                failures.append(f"{url}: no typeset maths (KaTeX did not render)")
            if not (shots / f"{name}.png").exists():
                failures.append(f"{url}: no screenshot")
    finally:
        server.shutdown()
    for failure in failures:
        print("FAILED:", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "site"))

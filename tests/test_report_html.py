"""report.html of a real (tiny) run, rendered by headless Chromium: loads without errors, every
image decodes, the table of contents' links land, the page is compact, and a screenshot can be
taken.

Needs the Debian ``chromium`` package (CI installs it; there a missing browser is a failure,
elsewhere the test is skipped).
"""

from __future__ import annotations

import html
import importlib.util
import json
import re
import shutil
import subprocess

from helpers import missing, train

#: Injected at the top of a copy of the page: records script errors, console errors and image
#: load failures, and after the load event writes them, every image's status, the table of
#: contents' links, any in-page link without its target, and the page height into the DOM.
PROBE = """<script>
window.__probe = {errors: []};
window.addEventListener("error", function (e) {
  var t = e.target;
  window.__probe.errors.push(t && t.tagName ? "failed to load " + t.tagName : String(e.message));
}, true);
var origError = console.error;
console.error = function () {
  window.__probe.errors.push("console.error: " + Array.from(arguments).join(" "));
  origError.apply(console, arguments);
};
window.addEventListener("load", function () {
  var images = Array.from(document.images).map(function (img) {
    return {alt: img.alt, complete: img.complete, naturalWidth: img.naturalWidth};
  });
  var links = Array.from(document.querySelectorAll("nav.toc a")).map(function (a) {
    return a.getAttribute("href");
  });
  var unresolved = Array.from(document.querySelectorAll("a[href^='#']")).filter(function (a) {
    return document.getElementById(a.getAttribute("href").slice(1)) === null;
  }).map(function (a) { return a.getAttribute("href"); });
  var pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify({images: images, errors: window.__probe.errors, toc: links,
                                    unresolved: unresolved,
                                    height: document.documentElement.scrollHeight});
  document.body.appendChild(pre);
});
</script>"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        missing("chromium", "apt-get install -y chromium")
    return found


def _browser(url: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    profile.mkdir(exist_ok=True)
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={profile}", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


def test_report_renders_in_chromium_without_errors(tmp_path):
    if importlib.util.find_spec("matplotlib") is None:  # the figures are part of the page
        missing("matplotlib", 'pip install -e ".[plots]"')
    run = tmp_path / "run"
    train(run, "--max-steps", "8", "--log-every", "2")
    page = run / "report" / "report.html"
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))

    result = _browser(probed.as_uri(), tmp_path, "--dump-dom", "--virtual-time-budget=10000",
                      "--window-size=1200,900", "--enable-logging=stderr", "--v=0")
    assert result.returncode == 0, result.stderr[-2000:]
    match = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
    assert match, result.stdout[-2000:]
    status = json.loads(html.unescape(match.group(1)))
    assert status["errors"] == []
    # curves, learning rate, accuracy against compute, confusion matrix, misclassified images,
    # 8 rollout overlays
    assert len(status["images"]) >= 4 + 8
    assert "Test accuracy against training FLOPs" in [img["alt"] for img in status["images"]]
    broken = [img for img in status["images"]
              if not img["complete"] or img["naturalWidth"] <= 0]
    assert broken == []
    # a table of contents whose links all land on a section, and a compact page (it was
    # 3400 px tall at this width before the figures shared rows, 2100 with them stacked)
    assert status["toc"] == ["#summary", "#curves", "#learning-rate", "#confusion",
                             "#per-class", "#compute", "#misclassified", "#attention"]
    assert status["unresolved"] == []
    assert status["height"] < 1900, status["height"]
    console = [line for line in result.stderr.splitlines()
               if "CONSOLE" in line or "Uncaught" in line]
    assert console == []

    shot = tmp_path / "report.png"
    result = _browser(page.as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1200,2400")
    assert result.returncode == 0 and shot.stat().st_size > 10_000, result.stderr[-2000:]

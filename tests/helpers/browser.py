"""Headless Chromium for the tests: open a local HTML page, check that its media really load and
play, take screenshots. Driven over the DevTools protocol (CDP) on a websocket (`websockets`, a core
dependency), so nothing beyond Debian's `chromium` package is needed.

    with Browser() as browser:               # or the `browser` fixture (tests/conftest.py)
        report = browser.check_page(path)    # PageReport
        assert not report.problems(), report.problems()
        browser.screenshot(path, "shot.png", width=1100, height=800)

What `check_page` checks, per element, in the page's own DOM after the load event:
<video>: readyState >= 2 (HAVE_CURRENT_DATA), duration > 0, videoWidth > 0, no MediaError, and that
currentTime advances after a muted play() (so the codec decodes, not only the container parses);
<img>: complete with naturalWidth > 0; every href/src that points to a local file: that file exists;
console errors, uncaught exceptions and failed loads (Log/Runtime events) are collected too.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from websockets.sync.client import connect

log = logging.getLogger(__name__)

CHROMIUM_PACKAGE = "chromium"  # Debian/Ubuntu package name: apt-get install chromium
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Headless, and nothing that reaches the network (component updates, sync, field trials, QUIC);
# --no-sandbox because CI runs as root, where Chromium's sandbox refuses to start.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--disable-dev-shm-usage", "--mute-audio",
    "--autoplay-policy=no-user-gesture-required", "--hide-scrollbars", "--no-default-browser-check",
)

# Runs inside the page: waits for each medium, plays videos, returns what the DOM says about them.
_CHECK_MEDIA_JS = r"""
async (playMs, loadMs) => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const until = async (pred, ms) => {
    const t0 = performance.now();
    while (!pred() && performance.now() - t0 < ms) await sleep(25);
    return pred();
  };
  const media = [];
  for (const v of document.querySelectorAll('video')) {
    v.muted = true; v.loop = false;
    if (v.preload === 'none') { v.preload = 'auto'; v.load(); }
    await until(() => v.readyState >= 2 || v.error, loadMs);
    const r = {kind: 'video', src: v.currentSrc || v.src, readyState: v.readyState,
               duration: v.duration, videoWidth: v.videoWidth, videoHeight: v.videoHeight,
               error: v.error ? `MediaError ${v.error.code}: ${v.error.message}` : null,
               currentTimeAdvance: 0, decodedFrames: 0, playError: null};
    if (!v.error && v.readyState >= 2) {
      v.currentTime = 0;
      await until(() => !v.seeking, loadMs);
      const t0 = v.currentTime;
      try { await v.play(); } catch (e) { r.playError = String(e); }
      await until(() => v.currentTime - t0 >= playMs / 1000 || v.ended || v.error, playMs + loadMs);
      r.currentTimeAdvance = v.currentTime - t0;
      v.pause();
      const q = v.getVideoPlaybackQuality ? v.getVideoPlaybackQuality() : null;
      r.decodedFrames = q ? q.totalVideoFrames : 0;
      if (v.error) r.error = `MediaError ${v.error.code}: ${v.error.message}`;
    }
    r.loaded = !r.error && r.readyState >= 2 && r.duration > 0 && r.videoWidth > 0;
    r.played = r.loaded && !r.playError && r.currentTimeAdvance > 0;
    media.push(r);
  }
  for (const img of document.querySelectorAll('img')) {
    await until(() => img.complete, loadMs);
    const ok = img.complete && img.naturalWidth > 0;
    media.push({kind: 'img', src: img.currentSrc || img.src, loaded: ok, played: null,
                naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight,
                error: ok ? null : 'image did not decode (naturalWidth 0)'});
  }
  const refs = [];
  for (const el of document.querySelectorAll('[href], [src]')) {
    const url = el.href || el.src;
    if (typeof url === 'string' && url) refs.push({tag: el.tagName.toLowerCase(), url});
  }
  return JSON.stringify({media, refs, title: document.title});
}
"""


def find_chromium() -> str | None:
    """The Chromium executable ($CHROMIUM, else the first of CHROMIUM_NAMES on PATH), or None."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageReport:
    """What one page did in the browser. `media`: one dict per <video>/<img> (keys: kind, src, loaded,
    played (None for images), error, and readyState/duration/videoWidth/currentTimeAdvance/
    decodedFrames for videos, naturalWidth for images)."""
    path: Path
    title: str
    media: list[dict] = field(default_factory=list)
    broken_links: list[str] = field(default_factory=list)   # local href/src whose file is missing
    external_links: list[str] = field(default_factory=list)  # http(s) etc.: a self-contained page has none
    console_errors: list[str] = field(default_factory=list)

    @property
    def videos(self) -> list[dict]:
        return [m for m in self.media if m["kind"] == "video"]

    @property
    def images(self) -> list[dict]:
        return [m for m in self.media if m["kind"] == "img"]

    def problems(self) -> list[str]:
        """Every failure, one line each; [] when all media loaded (videos also played)."""
        out = []
        for m in self.media:
            if not m["loaded"] or m["played"] is False:
                out.append(f"{m['kind']} {m['src']}: loaded={m['loaded']} played={m['played']} "
                           f"error={m.get('error')} playError={m.get('playError')} "
                           f"readyState={m.get('readyState')}")
        out += [f"broken link: {u}" for u in self.broken_links]
        out += [f"console: {e}" for e in self.console_errors]
        return out


class _Cdp:
    """One websocket to the browser; commands are matched to replies by id, events are kept."""

    def __init__(self, ws_url: str, timeout: float):
        self.ws = connect(ws_url, max_size=None, open_timeout=timeout)
        self.timeout = timeout
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float | None = None) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"CDP {method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_event(self, method: str, session: str, timeout: float | None = None) -> dict:
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for i, ev in enumerate(self.events):
                if ev["method"] == method and ev.get("sessionId") == session:
                    return self.events.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {method} within {timeout or self.timeout} s")
            self.events.append(json.loads(self.ws.recv(timeout=remaining)))

    def close(self) -> None:
        self.ws.close()


class Browser:
    """One headless Chromium process with a fresh, empty profile; each page opens in its own tab."""

    def __init__(self, executable: str | None = None, timeout: float = 30.0):
        self.executable = executable or find_chromium()
        if not self.executable:
            raise FileNotFoundError(f"no Chromium on PATH; install it: apt-get install {CHROMIUM_PACKAGE}")
        self.timeout = timeout
        self.profile = Path(tempfile.mkdtemp(prefix="megavla-chromium-"))
        self.proc = subprocess.Popen(
            [self.executable, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
             "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            self.cdp = _Cdp(self._devtools_url(), timeout)
        except BaseException:
            self.close()
            raise

    def _devtools_url(self) -> str:
        # With port 0 Chromium picks a free port and writes "PORT\n/devtools/browser/ID" here.
        active = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.stderr else ""
                raise RuntimeError(f"{self.executable} exited with {self.proc.returncode}: {err}")
            lines = active.read_text().split("\n") if active.exists() else []
            if len(lines) >= 2 and lines[0].strip() and lines[1].strip():
                return f"ws://127.0.0.1:{lines[0].strip()}{lines[1].strip()}"
            time.sleep(0.05)
        raise TimeoutError(f"{self.executable} wrote no {active} within {self.timeout} s")

    # ------------------------------------------------------------------------------ tabs
    def _open(self, path: Path, width: int, height: int) -> tuple[str, str]:
        target = self.cdp.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.cdp.send(f"{domain}.enable", session=session)
        self.cdp.send("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                      session=session)
        # A missing file would load Chromium's error page, whose DOM has no media to fail on.
        if not Path(path).is_file():
            self._close_tab(target)
            raise FileNotFoundError(f"{path}: no such page")
        nav = self.cdp.send("Page.navigate", {"url": Path(path).resolve().as_uri()}, session=session)
        if nav.get("errorText"):
            self._close_tab(target)
            raise RuntimeError(f"{path}: Chromium could not open it ({nav['errorText']})")
        self.cdp.wait_event("Page.loadEventFired", session)
        return target, session

    def _close_tab(self, target: str) -> None:
        self.cdp.send("Target.closeTarget", {"targetId": target})

    def _evaluate(self, session: str, expression: str, timeout: float | None = None):
        result = self.cdp.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                    "returnByValue": True}, session=session,
                               timeout=timeout)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def _console_errors(self, session: str) -> list[str]:
        errors, kept = [], []
        for ev in self.cdp.events:
            if ev.get("sessionId") != session:
                kept.append(ev)
                continue
            p = ev.get("params", {})
            if ev["method"] == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                errors.append(d.get("exception", {}).get("description") or d.get("text", "exception"))
            elif ev["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif ev["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                entry = p["entry"]
                errors.append(f"{entry.get('text')} {entry.get('url', '')}".strip())
        self.cdp.events = kept
        return errors

    # ------------------------------------------------------------------------------ API
    def check_page(self, path: str | Path, play_ms: int = 400, load_ms: int = 10000,
                   width: int = 1200, height: int = 900) -> PageReport:
        """Open `path` (a local HTML file), wait for load, check every <video> and <img>, every local
        href/src, and collect console errors. Videos are played (muted) for `play_ms` each."""
        path = Path(path).resolve()
        target, session = self._open(path, width, height)
        try:
            n_videos = self._evaluate(session, "document.querySelectorAll('video').length")
            budget = self.timeout + n_videos * (play_ms + 2 * load_ms) / 1000
            raw = json.loads(self._evaluate(session, f"({_CHECK_MEDIA_JS})({play_ms}, {load_ms})", budget))
            report = PageReport(path=path, title=raw["title"], media=raw["media"])
            for ref in raw["refs"]:
                url = urlparse(ref["url"])
                if url.scheme == "file":
                    if not Path(unquote(url.path)).exists():
                        report.broken_links.append(f"<{ref['tag']}> {ref['url']}")
                elif url.scheme not in ("data", "blob", "about", "javascript"):
                    report.external_links.append(f"<{ref['tag']}> {ref['url']}")
            time.sleep(0.05)  # let late Log events (failed loads) arrive before they are read
            self.cdp.send("Runtime.evaluate", {"expression": "0"}, session=session)
            report.console_errors = self._console_errors(session)
            return report
        finally:
            self._close_tab(target)

    def evaluate(self, path: str | Path, expression: str, width: int = 1200, height: int = 900):
        """Open `path`, evaluate the JavaScript `expression` after load (a Promise is awaited) and
        return its JSON value: for checks of a page's own behaviour (sliders, seeking)."""
        target, session = self._open(Path(path).resolve(), width, height)
        try:
            return self._evaluate(session, expression)
        finally:
            self._close_tab(target)

    def screenshot(self, path: str | Path, out_png: str | Path, width: int = 1200, height: int = 900,
                   full_page: bool = False, settle_ms: int = 1500) -> Path:
        """PNG of `path` as rendered at width x height (full_page: the whole scroll height, capped at
        4 * height). Videos are paused at their first frame so the picture is reproducible."""
        target, session = self._open(Path(path).resolve(), width, height)
        try:
            self._evaluate(session, "Promise.all([...document.querySelectorAll('video')].map(v => "
                                    "new Promise(r => { v.pause(); if (v.readyState >= 4) r(); "
                                    "else { v.addEventListener('canplaythrough', r); v.addEventListener('error', r);"
                                    " setTimeout(r, 5000); } })))")
            time.sleep(settle_ms / 1000)
            params: dict = {"format": "png"}
            if full_page:
                h = self._evaluate(session, "document.documentElement.scrollHeight")
                params.update(captureBeyondViewport=True,
                              clip={"x": 0, "y": 0, "width": width, "height": min(int(h), 4 * height), "scale": 1})
            data = self.cdp.send("Page.captureScreenshot", params, session=session)["data"]
            out_png = Path(out_png)
            out_png.parent.mkdir(parents=True, exist_ok=True)
            out_png.write_bytes(base64.b64decode(data))
            return out_png
        finally:
            self._close_tab(target)

    def close(self) -> None:
        cdp = getattr(self, "cdp", None)
        if cdp is not None:
            try:
                cdp.send("Browser.close", timeout=5)
            except Exception:  # noqa: BLE001 - the process is killed below either way
                pass
            cdp.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

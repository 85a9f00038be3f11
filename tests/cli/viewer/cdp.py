"""A headless chromium driven as a person would drive it: real mouse and key events through the
DevTools protocol, over the browser's debugging pipe (file descriptors 3 and 4, messages ended
by a NUL byte), so no WebSocket library is needed."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

KEYS = {"Delete": ("Delete", 46), "Escape": ("Escape", 27)}


class Browser:
    def __init__(self, executable: str, profile: Path) -> None:
        ours_in, theirs_out = os.pipe()  # the browser writes fd 4, we read
        theirs_in, ours_out = os.pipe()  # we write, the browser reads fd 3

        def pipes() -> None:  # in the child: its fds 3 and 4
            a, b = os.dup(theirs_in), os.dup(theirs_out)
            os.dup2(a, 3, inheritable=True)
            os.dup2(b, 4, inheritable=True)

        self.process = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,900",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=pipes, close_fds=False, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(theirs_in)
        os.close(theirs_out)
        self.reader, self.writer = ours_in, ours_out
        self.buffer, self.next_id, self.session = b"", 0, None

    def call(self, method: str, params: dict | None = None, timeout: float = 60) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self.writer, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self.buffer:
                if time.monotonic() > deadline:
                    raise TimeoutError(method)
                chunk = os.read(self.reader, 1 << 16)
                if not chunk:
                    raise RuntimeError("the browser closed its pipe")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\0", 1)
            answer = json.loads(line)
            if answer.get("id") == self.next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget",
                                 {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable")
        self.call("Page.navigate", {"url": url})

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except RuntimeError:
                value = None
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(expression)

    def mouse(self, kind: str, x: float, y: float, pressed: bool = False) -> None:
        self.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left",
                                               "buttons": 1 if pressed else 0, "clickCount": 1})

    def click(self, x: float, y: float) -> None:
        self.mouse("mouseMoved", x, y)
        self.mouse("mousePressed", x, y, True)
        self.mouse("mouseReleased", x, y)

    def drag(self, x1: float, y1: float, x2: float, y2: float, steps: int = 5) -> None:
        self.mouse("mouseMoved", x1, y1)
        self.mouse("mousePressed", x1, y1, True)
        for k in range(1, steps + 1):
            self.mouse("mouseMoved", x1 + (x2 - x1) * k / steps, y1 + (y2 - y1) * k / steps,
                       True)
        self.mouse("mouseReleased", x2, y2)

    def key(self, key: str, ctrl: bool = False) -> None:
        code, vk = KEYS[key] if key in KEYS else (
            f"Key{key.upper()}" if key.isalpha() else f"Digit{key}", ord(key.upper()))
        base = {"key": key, "code": code, "windowsVirtualKeyCode": vk,
                "modifiers": 2 if ctrl else 0}
        text = {"text": key} if len(key) == 1 and not ctrl else {}
        self.call("Input.dispatchKeyEvent", {"type": "keyDown", **base, **text})
        self.call("Input.dispatchKeyEvent", {"type": "keyUp", **base})

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        os.close(self.reader)
        os.close(self.writer)

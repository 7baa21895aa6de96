"""python/serve.py run for real, for the tests and the benchmarks: the
server in a process of its own on a free port (Server), and plain HTTP
requests to it (http_request; multipart for uploads), with nothing but the
standard library on the client side."""
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

SERVE = Path(__file__).resolve().parents[1] / "serve.py"


class Server:
    """python/serve.py running in a process of its own on a free port."""

    def __init__(self, args, timeout=180):
        self.proc = subprocess.Popen([sys.executable, str(SERVE), "--port", "0", *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.lines = []
        deadline = time.monotonic() + timeout
        self.url = None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if line.startswith("serving http://"):
                self.url = line.split()[1].split("?")[0]
                break
        if self.url is None:
            self.stop()
            raise AssertionError("serve.py did not start:\n" + "".join(self.lines)[-3000:])
        # Keep reading its output so that the pipe never fills up.
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def pid(self):
        return self.proc.pid

    def log(self):
        return "".join(self.lines)

    def status(self, field="VmRSS"):
        """A field of the server's /proc status in kB (VmRSS: resident memory)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(field)

    def open_files(self):
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def get(self, path, headers=None):
        return http_request(self.url + path.lstrip("/"), headers=headers)

    def get_json(self, path, headers=None):
        status, _, body = self.get(path, headers)
        assert status == 200, (status, body[:500])
        return json.loads(body)

    def upload(self, path, files, headers=None):
        """POST files [(name, bytes)] as multipart field 'image' to path."""
        body, content_type = multipart([("image", name, data) for name, data in files])
        return http_request(self.url + path.lstrip("/"), data=body,
                            headers=dict(headers or {}, **{"Content-Type": content_type}))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def http_request(url, data=None, headers=None, method=None, timeout=60):
    """(status, headers, body bytes) of one request; HTTP errors are answers too."""
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers, err.read()


def multipart(fields):
    """A multipart/form-data body of [(field, filename, bytes)]; (body, content type)."""
    boundary = "dlbhc-test-boundary-7d1f9a"
    parts = []
    for field, name, data in fields:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
                     f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                     .encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"

"""Test-only: when WHISPERD_TEST_AUDIT names a file, every socket.connect and getaddrinfo the
process makes is appended to it (sys.addaudithook), so a test can prove a URL was refused
without any connection attempt or name lookup (tests/test_fetch.py puts this dir on PYTHONPATH)."""

import os
import sys

_PATH = os.environ.get("WHISPERD_TEST_AUDIT")

if _PATH:
    def _hook(event, args):
        if event in ("socket.connect", "socket.getaddrinfo"):
            target = args[1] if event == "socket.connect" else args[:2]
            fd = os.open(_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, f"{event} {target!r}\n".encode())
            finally:
                os.close(fd)

    sys.addaudithook(_hook)

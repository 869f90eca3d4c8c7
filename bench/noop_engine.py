#!/usr/bin/env python3
"""A WhisperX stand-in that does nothing: records when its first instruction ran, writes a minimal result.

common.write_noop_engine() copies it with `python -IS` in the shebang, so its start-up is the
cheapest a Python engine can have. Only builtin or frozen modules are imported (time, os, sys)
for the same reason. The server passes the engine only an allow-list of variables, FAKE_WHISPERX_*
among them. FAKE_WHISPERX_LOG: append time.time() of the first instruction, one per
line. FAKE_WHISPERX_SLEEP: sleep that many seconds before writing the result (holds the queue).
"""
import time

T_START = time.time()

import os  # noqa: E402
import sys  # noqa: E402

log = os.environ.get("FAKE_WHISPERX_LOG")
if log:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, b"%.6f\n" % T_START)  # one write on O_APPEND: lines stay whole when runs overlap
    os.close(fd)
args = sys.argv[1:]
output_dir = args[args.index("--output_dir") + 1]
stem = os.path.splitext(os.path.basename(args[0]))[0]
time.sleep(float(os.environ.get("FAKE_WHISPERX_SLEEP", "0")))
with open(os.path.join(output_dir, stem + ".json"), "w") as out:
    out.write('{"segments": [{"text": " Noop.", "start": 0.0, "end": 1.0}], "language": "en"}')

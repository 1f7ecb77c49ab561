#!/usr/bin/env python3
"""Run one short shell command in the lab's dom0 over the serial socket (lab.py --keep, or a boot
with xenlab.run=0) and print its output: serial_sh.py [-t timeout] 'command'.
Sends slowly: Xen's serial receive ring is small and drops characters typed fast."""
import argparse
import os
import re
import socket
import sys
import time
import uuid

ap = argparse.ArgumentParser()
ap.add_argument("-t", "--timeout", type=float, default=120)
ap.add_argument("command")
args = ap.parse_args()
tag = "XL" + uuid.uuid4().hex[:8]
sock = socket.socket(socket.AF_UNIX)
sock.connect(os.path.join(os.environ.get("XENLAB_DIR", "/var/tmp/colo-xenlab"), "serial.sock"))
sock.settimeout(1)
line = f'{args.command}; echo "{tag}"-rc=$?\n'.encode()
for i in range(0, len(line), 8):
    sock.sendall(line[i : i + 8])
    time.sleep(0.04)
done = re.compile((tag + r"-rc=(\d+)").encode())
buf, t0 = b"", time.monotonic()
while time.monotonic() - t0 < args.timeout and not done.search(buf):
    try:
        buf += sock.recv(65536)
    except TimeoutError:
        pass
text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]|\r", "", buf.decode(errors="replace"))
m = done.search(buf)
print(text.split(f'{tag}"-rc=$?', 1)[-1].rsplit(f"{tag}-rc=", 1)[0].lstrip("\n"), end="")
print(f"[rc={m.group(1).decode() if m else 'TIMEOUT'}]")
sys.exit(0 if m and m.group(1) == b"0" else 1)

"""Records every attempt to reach a host other than loopback (tests put this folder on PYTHONPATH).

Python imports sitecustomize at start-up, so `python train.py` runs unchanged while an audit
hook appends each non-loopback DNS lookup or connect to the file named by NETGUARD_LOG.
"""

import os
import sys

_LOG = os.environ.get("NETGUARD_LOG")
_LOCAL = {"127.0.0.1", "localhost", "::1", "0.0.0.0", "", None}


def _hook(event, args):
    if event == "socket.getaddrinfo":
        host = args[0]
    elif event == "socket.connect":
        address = args[1]
        host = address[0] if isinstance(address, tuple) else None  # AF_UNIX paths are local
    else:
        return
    if isinstance(host, bytes):
        host = host.decode()
    if host not in _LOCAL:
        with open(_LOG, "a") as f:
            f.write(f"{event} {host}\n")


if _LOG:
    sys.addaudithook(_hook)

"""What the appliance's boot scripts found, for ``/readyz`` and the web page.

On the image, ``memento-edge-firstboot`` (root, every boot) writes a JSON status file (setting
``device_status``, default ``/run/memento-edge-device/status.json``): whether ``memento-edge.txt`` was
applied or refused and why, the hostname, the USB gadget link's subnet, where a generated API token is
kept, and what the Wi-Fi check found. It holds no secret. This module only reads it:

- :func:`public_status` - the part anyone may see (``/readyz``): states and reasons, no token location.
- :func:`local_view` - for a client on the device itself or on the USB cable: the first-boot summary and,
  while ``/etc/memento-edge/initial-token`` exists, the generated token (so a user without SSH can always
  get in). Anyone who can reach the USB gadget link holds the board.

Off the appliance (a laptop, the test suite) the file is absent and both return ``None``.
"""
from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any, Dict, Optional

# Keys of the status file that /readyz may show (the rest is for local clients only).
_PUBLIC_KEYS = ("hostname", "firstboot", "wifi", "imager")


def read_status(path: Path) -> Optional[Dict[str, Any]]:
    """The status document, or None when there is none (or it is unreadable: readiness must answer)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def public_status(path: Path) -> Optional[Dict[str, Any]]:
    """The shareable part of the status: first-boot state and errors, Wi-Fi state; None off the appliance."""
    doc = read_status(path)
    if doc is None:
        return None
    return {k: doc[k] for k in _PUBLIC_KEYS if k in doc}


def is_local_client(remote_addr: Optional[str], doc: Dict[str, Any]) -> bool:
    """True for loopback and for an address on the USB gadget link (the subnet named in the status)."""
    try:
        addr = ipaddress.ip_address((remote_addr or "").split("%")[0])
    except ValueError:
        return False
    if addr.is_loopback:
        return True
    subnet = (doc.get("usb") or {}).get("subnet")
    try:
        return subnet is not None and addr in ipaddress.ip_network(subnet)
    except (TypeError, ValueError):
        return False


def local_view(path: Path, remote_addr: Optional[str]) -> Optional[Dict[str, Any]]:
    """The full status plus the generated token for a local/USB client; None for anyone else."""
    doc = read_status(path)
    if doc is None or not is_local_client(remote_addr, doc):
        return None
    view = dict(doc)
    token_file = doc.get("token_file")
    view["token"] = None
    if token_file:
        try:
            view["token"] = Path(token_file).read_text(encoding="utf-8").strip() or None
        except OSError:
            view["token"] = None  # deleted by the owner after reading it: nothing to show
    return view

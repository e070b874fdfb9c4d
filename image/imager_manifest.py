"""Write a Raspberry Pi Imager OS list for a built image, so that Imager 2.x offers OS customisation for it.

    python3 image/imager_manifest.py image/out/memento-edge-<v>-pizero2w-arm64.img.xz
    rpi-imager --repo image/out/memento-edge-<v>-pizero2w-arm64.rpi-imager-manifest

Imager 2.x customises a local image only when an OS list says how (`init_format`, rpi-imager
doc/os_customisation_formats.md); this one says "cloudinit", which makes Imager write user-data,
network-config and meta-data to the FAT partition - what memento-edge-firstboot reads. The fields are the
ones the OS list schema requires (rpi-imager doc/json-schema/os-list-schema.json). Standard library only.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import lzma
import sys
from pathlib import Path
from typing import Any, Dict

# Imager's device tag for 64-bit images on the Pi 3 family, which includes the Zero 2 W.
DEVICES = ["pi3-64bit"]


def manifest(xz: Path) -> Dict[str, Any]:
    """The OS list for one .img.xz (sizes and sha256 of the compressed file and of the image inside)."""
    raw_hash, raw_size = hashlib.sha256(), 0
    with lzma.open(xz, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            raw_hash.update(chunk)
            raw_size += len(chunk)
    xz_hash = hashlib.sha256(xz.read_bytes()).hexdigest()
    day = datetime.datetime.fromtimestamp(xz.stat().st_mtime, datetime.timezone.utc).date().isoformat()
    return {"os_list": [{
        "name": "memento-edge (Raspberry Pi Zero 2 W)",
        "description": "Debian bookworm arm64 appliance running memento-edge; customisation via cloud-init files "
                       "read by memento-edge-firstboot (user name, password and keyboard are not used)",
        "icon": "", "url": xz.resolve().as_uri(), "release_date": day,
        "extract_size": raw_size, "extract_sha256": raw_hash.hexdigest(),
        "image_download_size": xz.stat().st_size, "image_download_sha256": xz_hash,
        "devices": DEVICES, "init_format": "cloudinit", "architecture": "arm64",
    }]}


def main(argv: list) -> int:
    """Write <image>.rpi-imager-manifest next to the .img.xz given."""
    if len(argv) != 1 or not argv[0].endswith(".img.xz"):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    xz = Path(argv[0])
    out = xz.with_name(xz.name[:-len(".img.xz")] + ".rpi-imager-manifest")
    out.write_text(json.dumps(manifest(xz), indent=2) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""Extracts the ELF vmlinux from a bzImage using the setup header's payload
offset and length and the matching Debian decompressor (lz4, zstd, xz, gzip)."""
import struct
import subprocess
import sys

DECOMPRESSORS = [
    (b"\x02\x21\x4c\x18", ["lz4", "-dc"]),
    (b"\x28\xb5\x2f\xfd", ["zstd", "-dc"]),
    (b"\xfd7zXZ\x00", ["xz", "-dc"]),
    (b"\x1f\x8b", ["gzip", "-dc"]),
]


def main(src: str, dst: str) -> int:
    data = open(src, "rb").read()
    if len(data) < 0x260 or data[0x202:0x206] != b"HdrS":
        sys.exit(f"{src}: not a bzImage (no HdrS setup header)")
    setup_sects = data[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = data[start : start + payload_length]
    for magic, cmd in DECOMPRESSORS:
        if payload.startswith(magic):
            # lz4's legacy frames are followed by the payload size; the tools
            # stop at the end of the stream and may complain about trailing data.
            out = subprocess.run(cmd, input=payload, capture_output=True).stdout
            break
    else:
        sys.exit(f"{src}: unknown payload compression {payload[:4].hex()}")
    if out[:4] != b"\x7fELF":
        sys.exit(f"{src}: decompressed payload is not an ELF file")
    open(dst, "wb").write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))

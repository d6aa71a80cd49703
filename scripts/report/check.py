#!/usr/bin/python3
"""Check a report directory as a browser and the plotter would see it.

Usage: scripts/report/check.py DIR [FIGURE...]

Fails (exit 1, one line per problem) unless DIR/index.html exists and
parses, every image and link it references inside DIR exists, every .png
is a PNG (signature and IHDR chunk with a non-zero size) and every .svg an
XML document whose root is <svg>, every DIR/raw/*.json the plotter reads
fits schema.py, and each FIGURE named (e.g. vm-dirty) is on the page.
"""
import html.parser
import json
import os
import struct
import sys
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import schema  # noqa: E402


class Refs(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if (tag, k) in (("img", "src"), ("a", "href")) and v:
                self.refs.append(v)


def png_problem(path):
    with open(path, "rb") as f:
        head = f.read(33)
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        return "not a PNG (bad signature)"
    if head[12:16] != b"IHDR":
        return "not a PNG (no IHDR chunk first)"
    w, h = struct.unpack(">II", head[16:24])
    if not w or not h:
        return f"PNG of size {w}x{h}"
    return None


def svg_problem(path):
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return f"not XML: {e}"
    if root.tag not in ("svg", "{http://www.w3.org/2000/svg}svg"):
        return f"root element is {root.tag}, not svg"
    return None


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__.strip())
    d, want = argv[1], argv[2:]
    problems = []
    page = os.path.join(d, "index.html")
    if not os.path.isfile(page):
        sys.exit(f"check: no {page}")
    p = Refs()
    with open(page) as f:
        p.feed(f.read())
    local = [r for r in p.refs if "://" not in r and not r.startswith("#")]
    for r in local:
        path = os.path.join(d, r)
        if not os.path.isfile(path):
            problems.append(f"{r}: referenced by index.html, missing")
        elif r.endswith(".png") and png_problem(path):
            problems.append(f"{r}: {png_problem(path)}")
        elif r.endswith(".svg") and svg_problem(path):
            problems.append(f"{r}: {svg_problem(path)}")
    images = sorted({r for r in local if r.endswith((".png", ".svg"))})
    if not images:
        problems.append("index.html shows no figure")
    for name in want:
        for ext in (".png", ".svg"):
            if name + ext not in images:
                problems.append(f"{name}{ext}: not on the page")
    raw = os.path.join(d, "raw")
    for name in schema.FILES:
        path = os.path.join(raw, name)
        if os.path.exists(path):
            with open(path) as f:
                try:
                    data = json.load(f)
                except json.JSONDecodeError as e:
                    problems.append(f"raw/{name}: not JSON: {e}")
                    continue
            problems += [f"raw/{name}: {e}" for e in schema.check_file_data(name, data)[:5]]
    for pr in problems:
        print(f"check: {pr}")
    if problems:
        sys.exit(1)
    print(f"check: {page}: {len(images)} images, all valid; raw JSON fits")


if __name__ == "__main__":
    main(sys.argv)

#!/usr/bin/python3
"""Turn a benchmark's output into one raw result file of scripts/report.sh.

Usage:
  collect.py dirty --where host|nested --kernel K --image I LOG OUT
      LOG: output of `ldt-vmm bench dirty --json` (also a console log with
      those lines in it); OUT gets {"meta", "where", "config", "runs"}.
  collect.py ldt-bench --kernel K --image I LOG OUT
      LOG: a guest console log with ldt-bench's JSON lines; OUT gets
      {"meta", "guest", "rows"}.
  collect.py check NAME FILE
      exit 1 with the problems if FILE does not fit what the figures read
      for NAME (a file name of schema.FILES, e.g. migrate-nested.json).

The meta object says when (UTC), where (this machine), at which git
revision, and on which kernel and image the numbers were measured.  Every
file is checked against schema.py before it is written.
"""
import datetime
import json
import os
import platform
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import schema  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def git_revision():
    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "diff", "--quiet", "HEAD", "--"],
                               capture_output=True).returncode != 0
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine():
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            mem_gib = int(f.readline().split()[1]) / 2**20
    except OSError:
        mem_gib = 0
    osname = "Linux"
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    osname = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    kvm = ", /dev/kvm: PVM (kvm_pvm)" if os.path.isdir("/sys/module/kvm_pvm") else ""
    return (f"{platform.node()}: {os.cpu_count()} x {cpu}, {mem_gib:.0f} GiB, "
            f"{osname}, host kernel {platform.release()}{kvm}")


def meta(kernel, image):
    return {
        "date": datetime.datetime.now(datetime.timezone.utc)
        .replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "machine": machine(),
        "git": git_revision(),
        "kernel": kernel,
        "image": image,
    }


def json_lines(path, prefix):
    """The JSON objects starting with `prefix` in a (console) log."""
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            line = line.replace("\r", "").strip()
            start = line.find(prefix)
            if start < 0:
                continue
            try:
                out.append(json.loads(line[start:]))
            except json.JSONDecodeError:
                pass  # a line cut by console noise: not a result
    return out


def write_checked(name, data, out):
    errs = schema.check_file_data(name, data)
    if errs:
        sys.exit(f"collect: {out}: the results do not fit {name}: "
                 + "; ".join(errs[:5]))
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, out)
    print(f"collect: {out}")


def opts(args, names):
    got = {}
    rest = []
    it = iter(args)
    for a in it:
        if a in names:
            got[a[2:]] = next(it, None)
        else:
            rest.append(a)
    missing = [n for n in names if n[2:] not in got or got[n[2:]] is None]
    if missing or len(rest) != 2:
        sys.exit(__doc__.strip())
    return got, rest


def cmd_dirty(args):
    o, (log, out) = opts(args, ["--where", "--kernel", "--image"])
    lines = json_lines(log, '{"bench":"dirty"')
    if not lines:
        sys.exit(f"collect: {log}: no `ldt-vmm bench dirty --json` lines")
    data = {"meta": meta(o["kernel"], o["image"]), "where": o["where"],
            "config": lines[0]["config"], "runs": [x["result"] for x in lines]}
    write_checked(f"dirty-{o['where']}.json", data, out)


def cmd_ldt_bench(args):
    o, (log, out) = opts(args, ["--kernel", "--image"])
    rows = json_lines(log, '{"bench":')
    guest = [r for r in rows if r["bench"] == "meta"]
    rows = [r for r in rows if r["bench"] != "meta"]
    if not guest or not rows:
        sys.exit(f"collect: {log}: no ldt-bench meta line or no results")
    data = {"meta": meta(o["kernel"], o["image"]), "guest": guest[0], "rows": rows}
    write_checked("ldt-bench.json", data, out)


def cmd_check(args):
    if len(args) != 2 or args[0] not in schema.FILES:
        sys.exit(f"usage: collect.py check {{{','.join(schema.FILES)}}} FILE")
    name, path = args
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"collect: {path}: not JSON: {e}")
    errs = schema.check_file_data(name, data)
    if errs:
        sys.exit(f"collect: {path} does not fit {name}: " + "; ".join(errs[:5]))
    print(f"collect: {path} fits {name}")


def main(argv):
    cmds = {"dirty": cmd_dirty, "ldt-bench": cmd_ldt_bench, "check": cmd_check}
    if len(argv) < 2 or argv[1] not in cmds:
        sys.exit(__doc__.strip())
    cmds[argv[1]](argv[2:])


if __name__ == "__main__":
    main(sys.argv)

"""What the figures read: the raw result files of scripts/report.sh and a
checker for them.

Each raw file is one JSON object with a "meta" object (where and when it
was measured) and its results.  A spec is a Python value that mirrors the
JSON: a dict of key -> spec (every key required; a key ending in "?" is
optional), a one-element list [spec] (a list of those), a type or tuple of
types, or a set of allowed strings.  `check(value, spec)` returns a list of
"where: what is wrong" strings, empty when the value fits.
"""

NUM = (int, float)

META = {
    "date": str,  # ISO 8601, UTC
    "machine": str,  # host name, CPU, cores, memory, OS, host kernel, KVM kind
    "git": str,  # revision of the checkout (with "-dirty" if modified)
    "kernel": str,  # the kernel the measured code ran on
    "image": str,  # the guest image / payload measured
}

# `ldt-vmm bench dirty --json`, one object per mode (vmm/src/bench/dirty.rs).
DIRTY_RUN = {
    "mode": str,
    "write_ms_median": NUM,
    "write_ratio_vs_untracked": NUM,
    "harvest_ms_median": NUM,
    "write_ms_rounds": [NUM],
    "harvest_ms_rounds": [NUM],
    "pages_written": int,
    "pages_reported": int,
    "missed": int,
    "false_positives": int,
}
DIRTY = {
    "meta": META,
    "where": {"host", "nested"},
    "config": {
        "working_set_pages": int,
        "write_pages": int,
        "bytes_per_page": int,
        "rounds": int,
    },
    "runs": [DIRTY_RUN],
}

# ldt-bench's JSON lines (tests/guest/bench.c), by experiment.
LDT_BENCH_ROWS = {
    "write": {"tracker": str, "ws_mib": int, "write_ms_best": NUM,
              "write_ms_mean": NUM},
    "timeline": {"tracker": str, "interval": int, "interval_ms": NUM,
                 "ops_per_s": NUM, "collect_ms": NUM},
    "kv": {"tracker": str, "period_s": NUM, "ops_per_s": NUM, "rounds": int,
           "collect_ms_mean": NUM},
    "redis": {"tracker": str, "period_s": NUM, "ops_per_s": NUM,
              "rounds": int, "collect_ms_mean": NUM},
    "collect": {"tracker": str, "region_mib": int, "written_pct": int,
                "collect_ms": NUM},
}
LDT_BENCH = {
    "meta": META,
    "guest": {"mode": {"short", "full"}, "kernel": str, "cpus": int},
    "rows": [dict],  # each checked against LDT_BENCH_ROWS[row["bench"]]
}

# scripts/bench-migrate-nested.sh --json FILE (the migration engineer's).
MIGRATE_RUN = {
    "mode": str,
    "run": int,
    "total_ms": NUM,
    "downtime_ms": NUM,
    "rounds": int,
    "sent_mb": NUM,
    "memcheck_pass": bool,
    "throughput": {"idle_pages_s": NUM, "t_s": [NUM], "interval_s?": [NUM],
                   "pages_s": [NUM]},
    "events": [{"t_s": NUM,
                "what": {"migration-start", "round", "switch-over", "resumed"}}],
    "breakdown_ms": dict,
}
# A migration that failed is listed with its error only.
MIGRATE_FAILED_RUN = {"mode": str, "run": int, "rate?": int, "error": str}
# Each run is checked against one of the two (check_file_data).
MIGRATE = {"meta": META, "runs": [dict]}

# Raw file name (in DIR/raw/) -> spec.
FILES = {
    "ldt-bench.json": LDT_BENCH,
    "dirty-host.json": DIRTY,
    "dirty-nested.json": DIRTY,
    "migrate-nested.json": MIGRATE,
}


def _name(t):
    if t == NUM:
        return "number"
    if isinstance(t, tuple):
        return " or ".join(_name(x) for x in t)
    return {str: "string", int: "integer", bool: "boolean", dict: "object",
            list: "list", float: "number"}.get(t, str(t))


def check(value, spec, where="$"):
    """Problems of `value` against `spec`, as "where: what" strings."""
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return [f"{where}: expected an object, got {type(value).__name__}"]
        errs = []
        for key, sub in spec.items():
            optional = key.endswith("?")
            key = key.rstrip("?")
            if key not in value:
                if not optional:
                    errs.append(f"{where}: missing \"{key}\"")
                continue
            errs += check(value[key], sub, f"{where}.{key}")
        return errs
    if isinstance(spec, list):
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {type(value).__name__}"]
        errs = []
        for i, item in enumerate(value):
            errs += check(item, spec[0], f"{where}[{i}]")
        return errs
    if isinstance(spec, set):
        if value not in spec:
            return [f"{where}: {value!r} is not one of {sorted(spec)}"]
        return []
    types = spec if isinstance(spec, tuple) else (spec,)
    # bool is an int in Python; JSON keeps them apart.
    if isinstance(value, bool) and bool not in types:
        return [f"{where}: expected {_name(spec)}, got a boolean"]
    if not isinstance(value, types):
        return [f"{where}: expected {_name(spec)}, got {type(value).__name__}"]
    return []


def check_file_data(name, data):
    """Problems of a raw file's parsed contents (`name` as in FILES)."""
    errs = check(data, FILES[name])
    if name == "ldt-bench.json" and isinstance(data.get("rows"), list):
        for i, row in enumerate(data["rows"]):
            bench = row.get("bench") if isinstance(row, dict) else None
            if bench not in LDT_BENCH_ROWS:
                errs.append(f"$.rows[{i}]: unknown \"bench\" {bench!r}")
                continue
            errs += check(row, LDT_BENCH_ROWS[bench], f"$.rows[{i}]")
    if name == "migrate-nested.json" and isinstance(data.get("runs"), list):
        for i, run in enumerate(data["runs"]):
            if not isinstance(run, dict):
                continue  # reported by the check above
            failed = "error" in run
            errs += check(run, MIGRATE_FAILED_RUN if failed else MIGRATE_RUN, f"$.runs[{i}]")
            tp = None if failed else run.get("throughput")
            if isinstance(tp, dict) and isinstance(tp.get("t_s"), list):
                for key in ("pages_s", "interval_s"):
                    if isinstance(tp.get(key), list) and len(tp[key]) != len(tp["t_s"]):
                        errs.append(f"$.runs[{i}].throughput: t_s has {len(tp['t_s'])} "
                                    f"values, {key} {len(tp[key])}")
    if isinstance(data, dict) and isinstance(data.get("runs"), list) \
            and not data["runs"]:
        errs.append("$.runs: empty")
    return errs

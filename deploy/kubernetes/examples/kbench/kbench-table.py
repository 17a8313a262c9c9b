#!/usr/bin/env python3
"""Prints the kbench table from the fio JSON outputs of kbench.fio, one file per volume.

    kbench-table.py [--baseline NAME] RESULT.json...

Each file is one volume, named after the file (default-block.json is "default-block").
For every volume the table gives 4 KiB random read and write latency at queue depth 1
(mean completion latency, lower is better), 4 KiB random read and write IOPS at queue
depth 64 and 128 KiB sequential read and write bandwidth (higher is better), and each
figure as a ratio to the same figure of the baseline volume (a hostPath directory on the
same node in the Kubernetes example): for latency a ratio above 1 is slower than the
baseline, for IOPS and bandwidth a ratio below 1 is.

Standard library only: the Job's image needs python3 and fio, nothing else. Exit status 2
with one "kbench-table: error: ..." line on bad input (a missing file, not fio's JSON, a
profile missing, fio reporting an error, no baseline).
"""

import argparse
import json
import os
import sys

# (row label, fio job name, figure, unit)
PROFILES = [
    ("4k rand read QD1 latency", "rand-read-4k-qd1", "lat", "us"),
    ("4k rand write QD1 latency", "rand-write-4k-qd1", "lat", "us"),
    ("4k rand read QD64", "rand-read-4k-qd64", "iops", "IOPS"),
    ("4k rand write QD64", "rand-write-4k-qd64", "iops", "IOPS"),
    ("128k seq read QD16", "seq-read-128k-qd16", "bw", "MiB/s"),
    ("128k seq write QD16", "seq-write-128k-qd16", "bw", "MiB/s"),
]


class BadInput(Exception):
    pass


def load(path):
    """{job name: {"lat": us, "iops": n, "bw": MiB/s}} from one fio JSON output."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror}") from e
    # fio may print lines (its nbd engine, warnings) before the JSON object.
    start = text.find("{")
    if start < 0:
        raise BadInput(f"{path} holds no fio JSON output")
    try:
        doc = json.loads(text[start:])
    except json.JSONDecodeError as e:
        raise BadInput(f"{path} is not fio JSON output: {e}") from e
    jobs = doc.get("jobs") if isinstance(doc, dict) else None
    if not isinstance(jobs, list):
        raise BadInput(f"{path} has no 'jobs' list: not fio --output-format=json output")
    out = {}
    for job in jobs:
        name = job.get("jobname")
        if job.get("error", 0):
            raise BadInput(f"{path}: fio reports error {job['error']} for job {name}")
        direction = "write" if "write" in str(name) else "read"
        d = job.get(direction) or {}
        if not d.get("total_ios"):
            raise BadInput(f"{path}: job {name} completed no {direction}s")
        try:
            out[name] = {
                "lat": d["lat_ns"]["mean"] / 1000.0,
                "iops": float(d["iops"]),
                "bw": d["bw_bytes"] / 1048576.0,
            }
        except (KeyError, TypeError) as e:
            raise BadInput(f"{path}: job {name} lacks {e} in its {direction} figures") from e
    for _, job, _, _ in PROFILES:
        if job not in out:
            raise BadInput(f"{path} has no result for job {job} (was it made with kbench.fio?)")
    return out


def cell(value, base, what):
    digits = 1 if what != "iops" else 0
    text = f"{value:.{digits}f}"
    if base:
        text += f" ({value / base:.2f}x)"
    return text


def table(volumes, baseline):
    """The table as lines: one row per profile, one column per volume."""
    names = [baseline] + [n for n in volumes if n != baseline]
    header = ["profile"] + [n + (" (baseline)" if n == baseline else "") for n in names]
    rows = [header]
    for label, job, what, unit in PROFILES:
        base = volumes[baseline][job][what]
        rows.append([f"{label} ({unit})"] + [cell(volumes[n][job][what], base, what) for n in names])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return lines


def main(argv):
    parser = argparse.ArgumentParser(
        prog="kbench-table",
        description="Prints the kbench table (latency, IOPS, bandwidth, ratios to a baseline) "
        "from fio JSON outputs of kbench.fio, one file per volume named after it.",
    )
    parser.add_argument("--baseline", default="hostpath",
                        help="the volume the others are compared to (default: hostpath)")
    parser.add_argument("results", nargs="+", metavar="RESULT.json",
                        help="fio --output-format=json output of kbench.fio, one per volume")
    args = parser.parse_args(argv)
    volumes = {}
    for path in args.results:
        name = os.path.basename(path)
        if name.endswith(".json"):
            name = name[: -len(".json")]
        if name in volumes:
            raise BadInput(f"two results for volume {name}")
        volumes[name] = load(path)
    if args.baseline not in volumes:
        raise BadInput(f"no result for the baseline volume {args.baseline} "
                       f"(have: {', '.join(volumes)}); name it with --baseline")
    for _, job, what, _ in PROFILES:
        if volumes[args.baseline][job][what] <= 0:
            raise BadInput(f"the baseline's {job} {what} is 0: no ratio can be made")
    print(f"kbench: {len(volumes)} volume(s); figures with their ratio to {args.baseline} "
          "(latency: above 1x is slower; IOPS, MiB/s: below 1x is slower)")
    for line in table(volumes, args.baseline):
        print(line)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BadInput as e:
        print(f"kbench-table: error: {e}", file=sys.stderr)
        sys.exit(2)

"""Benchmark: the shard's per-entry work, envelope → ``<entry>`` XML (reader.build_entry).

    .venv/bin/python loadtest/bench_entry_build.py [--baseline-rev b5967eb~1] [--rounds 5]

Three ways over the same 50,000 tweet-like entries on 1,000 nodes, in interleaved rounds,
each in a fresh process, CPU time per entry (process_time: the neighbours' load counts less):
  old   the pool of ``--baseline-rev`` on version 1 envelopes (what it reads)
  v1    this pool on version 1 envelopes (entries written before the upgrade)
  v2    this pool on version 2 envelopes (the entry's XML stored by the producer)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loadtest.bench_publish import baseline_tree  # noqa: E402

CHILD = r"""
import gc, pickle, sys, time
from scalepub.shard.reader import build_entry
stream = pickle.load(open(sys.argv[1], "rb"))
nodes = {}
gc.collect()
gc.disable()
t = time.process_time_ns()
for sid, raw in stream:
    build_entry(sid, raw, nodes)
print((time.process_time_ns() - t) / len(stream))
"""


def streams(tmp: Path) -> dict[int, Path]:
    """The same entries as version 1 and version 2 envelopes, pickled for the children."""
    import pickle

    from loadtest.bench_decode import envelopes
    from scalepub.envelope import decode, encode

    base = envelopes(50_000, 1_000)
    out = {}
    for version in (1, 2):
        path = tmp / f"v{version}.pickle"
        path.write_bytes(pickle.dumps([(sid, encode(decode(raw), version))
                                       for sid, raw in base]))
        out[version] = path
    return out


def run(pythonpath: str, data: Path) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, str(data)], capture_output=True,
                         text=True, check=True, env={"PYTHONPATH": pythonpath})
    return float(out.stdout) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline-rev", default="b5967eb~1")
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args()
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="bench-entry-"))
    data = streams(tmp)
    old = baseline_tree(opts.baseline_rev)
    modes = {"old": (old, data[1]), "v1": (str(REPO), data[1]), "v2": (str(REPO), data[2])}
    got: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(opts.rounds):
        for mode, (path, stream) in modes.items():
            got[mode].append(run(path, stream))
    base = statistics.median(got["old"])
    print("| way | us/entry (median) | min | x old |")
    print("|---|---:|---:|---:|")
    labels = {"old": f"pool of {opts.baseline_rev}, version 1 envelopes",
              "v1": "this pool, version 1 envelopes", "v2": "this pool, version 2 envelopes"}
    for mode, values in got.items():
        med = statistics.median(values)
        print(f"| {labels[mode]} | {med:.2f} | {min(values):.2f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()

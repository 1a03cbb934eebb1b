"""Where a pool's CPU goes: a summary of py-spy raw profiles (bench_publish.py --profile DIR).

    .venv/bin/python loadtest/profile_summary.py DIR/*.txt

For each file: the share of the shard processes' samples spent in each of a few parts of the
per-entry and per-IQ work (inclusive: a function and what it calls), then the top functions by
their own samples. py-spy samples only threads that run (no --idle), so shares are of CPU.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

# Part of the shard's work -> frames (function names, as py-spy prints them) that make it.
PARTS = {
    "envelope -> <entry> (build_entry)": ("build_entry",),
    "  of which msgpack/field checks": ("decode_wire", "decode_fields"),
    "  of which the XML (entry_part / entry_from_tail)": ("entry_part", "entry_from_tail"),
    "batcher (add, next_batch, done)": ("add (scalepub/shard/batcher.py", "next_batch",
                                        "done (scalepub/shard/batcher.py"),
    "Redis reads (XREADGROUP reply, fenced read)": ("read_new", "_read_new", "read_own_pending"),
    "Redis acks (XACK)": ("scalepub/shard/acks.py",),
    "publish IQ bytes (publish_iq)": ("publish_iq",),
    "replies (link: judge, reply_of, _on_reply)": ("_first_look", "_on_reply"),
    "socket writes and reads (asyncio transports)": ("selector_events.py",),
    "metrics (prometheus_client)": ("prometheus_client",),
}


def summary(path: Path) -> str:
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if not frames or not count.isdigit():
            continue
        parts = frames.split(";")  # process frames (command lines may hold ";") first
        starts = [i for i, f in enumerate(parts) if f.startswith("shard_main (")]
        if not starts:  # the shard processes only (not the supervisor, not the forkserver)
            continue
        stacks[tuple(parts[starts[0] + 1:])] += int(count)
    total = sum(stacks.values()) or 1
    lines = [f"## {path.stem}: {total:,} samples (100 Hz) in the shard processes", "",
             "| part | share of shard CPU |", "|---|---:|"]
    for part, keys in PARTS.items():
        hit = sum(n for st, n in stacks.items() if any(k in f for f in st for k in keys))
        lines.append(f"| {part} | {hit / total:.1%} |")
    own: Counter[str] = Counter()
    for st, n in stacks.items():
        if st:
            own[st[-1]] += n
    lines += ["", "| top functions by own samples | share |", "|---|---:|"]
    lines += [f"| `{fn}` | {n / total:.1%} |" for fn, n in own.most_common(12)]
    return "\n".join(lines)


def main() -> None:
    for arg in sys.argv[1:]:
        print(summary(Path(arg)))
        print()


if __name__ == "__main__":
    main()

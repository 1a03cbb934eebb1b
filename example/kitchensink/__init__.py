"""Models with odd field types and odd node rules: what docs/reliability.md §4 is tested on."""

"""The shard pool: stream consumers that publish to XMPP (never imports Django)."""

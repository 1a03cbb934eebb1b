"""The XMPP side shared by the pool and the tools: the publisher link, the batch wire format,
a subscriber (``scalepub tail``) and node affiliations (``scalepub authorize``).

Never imports Django; the pool (``scalepub.shard``) and the CLI use it.
"""

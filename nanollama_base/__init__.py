"""The bottom layer every other folder may import, and which imports nothing of ours: the on-disk
token-shard format (`shards`), files written atomically (`files`), and the one way a command
fails (`cli`)."""

"""Job entrypoints for `ray job submit`, cluster YAML, runtime env and install scripts."""

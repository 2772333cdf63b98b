"""The embedded default (``soupkit demo``): a tiny world built in-process, nothing downloaded."""

"""The embedded demo: local registries as regions, replication and GC end to end."""

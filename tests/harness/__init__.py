"""Test harness: real registries, a real broker, and fault-injecting proxies."""

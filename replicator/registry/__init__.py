"""Async client for the OCI distribution API."""

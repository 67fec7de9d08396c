"""Tests that build network namespaces with real WireGuard (need root; see tests/conftest.py)."""

"""natfail: high availability for WireGuard behind one public address."""

__version__ = "0.1.0"

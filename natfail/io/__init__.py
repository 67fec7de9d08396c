"""The edges: every I/O boundary sits behind a small typing.Protocol."""

"""Benchmarks for mvserver, run against real server and simulator processes on 127.0.0.1 (see bench/README.md)."""

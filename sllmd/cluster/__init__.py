"""Cluster: the pure Raft core (`raft`), its LMDB persistence (`raft_storage`), and the peer shell."""

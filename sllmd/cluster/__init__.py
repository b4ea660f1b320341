"""Cluster membership and replication: the Raft shell on the peer transport, node status, and the
replicated state machine."""

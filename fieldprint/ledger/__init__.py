"""Supervisor: the provenance path (Merkle transparency log, signed checkpoints, receipts)."""

"""Ledger storage backends behind one small interface."""

"""Speculative decoding, measured offline: how many drafted tokens serving would accept (`acceptance.py`)."""

"""Autograd ops behind the public API: custom ops over the torch and Triton implementations."""

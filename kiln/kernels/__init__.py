"""Triton kernel launchers: each asserts layout and dtype, allocates, picks config and grid."""

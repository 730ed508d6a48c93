"""Kernel tests run on the CPU through Triton's interpreter when there is no CUDA device
(TRITON_INTERPRET is set in tests/conftest.py, before any kernel is imported)."""

"""Compiled and Triton backends of flatkern's ops.

Each backend module exposes ``unavailable_reason(device)`` (``None`` when it
can run on ``device``) and one Python entry per op it implements, with the
same signature as the reference in ``flatkern.reference``.
"""

"""The compiled op and its kernels.

- ``op.py``: the schemas of ``flatkern::hessian_trace`` (and its backward, the fused
  value-and-grad, ``end_to_end``), the fake kernels, and the plain-torch kernels used
  when the C++ extension is missing;
- ``families.py``: the one encoding of the measurement families;
- ``triton/``: the CUDA kernels (Triton);
- the CPU kernels are the C++ extension ``flatkern._C`` (``csrc/ops/``).

``docs/ARCHITECTURE.md`` follows one call through all of them.
"""

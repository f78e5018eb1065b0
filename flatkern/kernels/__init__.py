"""The compiled ops of flatkern, one module per dispatch key.

- ``schemas.py``: the op schemas (``flatkern::hessian_trace``, its backward, the fused
  value-and-grad, ``end_to_end``); importing it loads ``flatkern._C`` (C++ CPU and Autograd
  kernels) and registers the rest;
- ``routing.py``: the routing table, one record per kernel, read by ``backend=``, the fake
  kernels, the error messages and the tests;
- ``families.py``: the registry of measurement families (codes, operands, norms);
- ``fake.py``: fake kernels (``torch.compile``, ``opcheck``);
- ``autograd.py``: the Python twin of the C++ autograd formula (no extension; the Triton interpreter);
- ``reference_kernel.py``: the plain-torch CPU kernels (no extension);
- ``triton/``: the CUDA kernels, imported only when a CUDA tensor (or the interpreter) needs them;
- the C++ kernels are in ``csrc/ops/{cpu,autograd}`` (the extension ``flatkern._C``).

This module imports nothing (the command line reads ``BACKENDS`` before importing torch).
``docs/ARCHITECTURE.md`` follows one call through all of them.
"""

#: the names ``backend=`` takes, everywhere (ops, optimizer, command line, benchmarks)
BACKENDS = ("auto", "torch", "cpp", "triton")

"""Compute kernels behind a boundary: each has one entry point, a fast implementation and,
beside it, a short readable reference that a test holds equal to it.

- ``dct_quant.quantize_and_read`` (fast) and ``dct_quant_reference.quantize_and_read``:
  Step 1 of the paper's defense (8x8 block-DCT quantization), read back at chosen pixels
  (the crop, or Algorithm 3's remap). ``planes`` holds the fast path's data layout.

The defenses (``defenses/dct_quant.py``, ``defenses/dct_distort.py``) call the fast entry
point; how it splits a batch over CPU threads is set by a
:class:`prepdefense.cpu_workers.CPUWorkers`.
"""

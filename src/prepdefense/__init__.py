"""prepdefense: input-preprocessing defenses against adversarial examples, and the
adaptive attacks (BPDA, EOT, BPDA+EOT, learned BPDA, projected EOT-PGD) that test them.

Implements Qiu et al., "An Efficient Preprocessing-based Approach to Mitigate Advanced
Adversarial Attacks" (DCT quantization with a learned table + random grid distortion),
its seven baselines and its evaluation, as batched, seeded, device-agnostic PyTorch.

Conventions (``shared/spec/PROTOCOL.md``): images are float NCHW RGB tensors in [0, 1];
models normalise inside ``forward``; randomness comes only from an explicit
``torch.Generator``.
"""

__version__ = "0.1.0"

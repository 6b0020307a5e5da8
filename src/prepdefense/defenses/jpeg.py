"""``jpeg``: JPEG compression and decompression, batched in torch (PROTOCOL.md "Baseline defenses").

The defense of Table 5 / Fig. 4 ("JPEG at quality 75"). It reproduces what
``PIL.Image.save(format="JPEG", quality=q)`` followed by decoding does with Pillow's
libjpeg-turbo, step by step, for a whole batch at once:

1. quantise the [0,1] image to 8-bit samples as numpy, torch and Pillow users do,
   ``round(clip(x, 0, 1) * 255)`` computed in the input's own floating type (float32 for
   float32, float16 and bfloat16 inputs, float64 for float64; round half to even), see
   :func:`to_8bit`;
2. RGB -> YCbCr with libjpeg's 16-bit fixed-point tables (``jccolor.c``), integer output;
3. chroma subsampling 4:2:0 (Pillow's default at every quality): the full-resolution plane is
   padded by edge replication to a multiple of 16 wide and an even height, averaged over 2x2
   boxes with libjpeg's alternating rounding bias 1, 2, 1, 2, ... (``jcsample.c``,
   ``h2v2_downsample``), and the downsampled plane padded to whole blocks by repeating its
   last row (``jcprepct.c``);
4. per component: edge-replicate to whole 8x8 blocks, level shift -128, libjpeg's integer
   "islow" DCT (``jfdctint.c``, output ``8 * coef``), division by ``8 * Q`` rounding half away
   from zero (``jcdctmgr.c``), dequantisation, integer inverse DCT (``jidctint.c``), +128,
   clamp to 0..255, with the IJG quality-scaled Annex K tables (``jcparam.c``:
   ``scale = 5000 // q`` below 50, else ``200 - 2q``; ``(base * scale + 50) // 100`` clamped
   to 1..255, baseline);
5. libjpeg's default "fancy" (triangular) h2v2 upsampling of the chroma planes
   (``jdsample.c``): weights 9/3/3/1 over the nearest chroma samples, rounding +8 / +7
   for even / odd output columns, borders replicated;
6. YCbCr -> RGB with libjpeg's fixed-point tables (``jdcolor.c``), clamp, divide by 255.

Steps 2-6 are an integer emulation of libjpeg-turbo's default code paths (the ones Pillow
uses). Where it matches Pillow, and by how much it can differ (``tests/test_jpeg.py``):

* given the same 8-bit image, the output equals Pillow's ``save(format="JPEG", quality=q)``
  + decode bit for bit: asserted on uniform and binary (0/255) noise, checkerboards, smooth
  synthetic images and ImageNet photos, sizes 1x1 to 299x299 (whole MCUs and not), every
  quality 1..100, 4:2:0, 4:4:4 and greyscale;
* for a float image, so does Pillow's round trip of ``np.round(np.clip(x, 0, 1) * 255)``
  computed in the tensor's own type (``(x.numpy() * 255).round().astype(np.uint8)`` for a
  float32 tensor) -- the usual conversion, and the one the project's PNG writer uses;
* a caller who makes the 8-bit image another way gets other samples wherever the two
  conversions disagree, and the JPEG then differs around them. Exact (float64) rounding of a
  float32 tensor disagrees with float32 rounding where ``255 x`` lies within float32 rounding
  of a half (this module used to round exactly, which is why noise images seemed to differ
  from Pillow). Against Pillow's round trip of the exactly rounded image, 20 of 200
  ``torch.rand`` 224x224 images differ, by at most 11/255, in at most 798 of 150,528 samples
  (1.8e-4 of all samples), and 30 of 200 ImageNet photos resized in float32 to 224x224, by at
  most 12/255, in at most 5,549 samples (5.1e-4 of all); pass a float64 tensor to get exact
  rounding.

The output is the same on every device and batch size. Not differentiable: attacks go through
it with BPDA.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F

from ._registry import register
from .base import Defense, check_images
from .block_dct import from_blocks, pad_to_blocks, to_blocks

__all__ = ["JPEG", "to_8bit", "jpeg_compress", "jpeg_compress_qualities", "quality_scaled_table", "LUMINANCE_TABLE", "CHROMINANCE_TABLE"]

#: JPEG standard (ITU T.81, Annex K.1) luminance quantisation table, quality 50.
LUMINANCE_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
#: JPEG standard (Annex K.2) chrominance quantisation table, quality 50.
CHROMINANCE_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
) + ((99,) * 8,) * 4

# libjpeg fixed-point colour conversion (SCALEBITS = 16).
_SCALEBITS = 16
_ONE_HALF = 1 << (_SCALEBITS - 1)


def _fix(v: float) -> int:
    return int(v * (1 << _SCALEBITS) + 0.5)


_SUBSAMPLING_ALIASES = {"4:2:0": "4:2:0", "2": "4:2:0", "4:4:4": "4:4:4", "0": "4:4:4"}


def quality_scaled_table(base, quality: int) -> torch.Tensor:
    """IJG quality scaling of a base table (libjpeg ``jpeg_set_quality`` with baseline clamp).

    Args:
        base: 8x8 nested sequence or tensor (a quality-50 table).
        quality: 1..100 (values outside are clamped, as libjpeg does).

    Returns:
        int64 tensor (8, 8) with entries in 1..255.
    """
    q = min(max(int(quality), 1), 100)
    scale = 5000 // q if q < 50 else 200 - 2 * q
    t = torch.as_tensor(base, dtype=torch.int64)
    return torch.div(t * scale + 50, 100, rounding_mode="floor").clamp(1, 255)


def _rgb_to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    """libjpeg ``rgb_ycc_convert`` on integer samples 0..255: (N,3,H,W) -> (N,3,H,W), same dtype."""
    r, g, b = rgb.unbind(dim=1)
    half_m1 = _ONE_HALF - 1
    y = _fix(0.29900) * r + _fix(0.58700) * g + _fix(0.11400) * b + _ONE_HALF
    cb = -_fix(0.16874) * r - _fix(0.33126) * g + _fix(0.50000) * b + (128 << _SCALEBITS) + half_m1
    cr = _fix(0.50000) * r - _fix(0.41869) * g - _fix(0.08131) * b + (128 << _SCALEBITS) + half_m1
    return torch.stack([y, cb, cr], dim=1) >> _SCALEBITS


def _ycbcr_to_rgb(ycc: torch.Tensor) -> torch.Tensor:
    """libjpeg ``ycc_rgb_convert`` on integer samples: (N,3,H,W) -> (N,3,H,W) in 0..255, same dtype."""
    y, cb, cr = ycc.unbind(dim=1)
    cb = cb - 128
    cr = cr - 128
    r = y + ((_fix(1.40200) * cr + _ONE_HALF) >> _SCALEBITS)
    b = y + ((_fix(1.77200) * cb + _ONE_HALF) >> _SCALEBITS)
    g = y + ((-_fix(0.34414) * cb - _fix(0.71414) * cr + _ONE_HALF) >> _SCALEBITS)
    return torch.stack([r, g, b], dim=1).clamp(0, 255)


def _downsample_h2v2(plane: torch.Tensor) -> torch.Tensor:
    """libjpeg ``h2v2_downsample``: 2x2 box sums with bias 1,2,1,2,... per output column, >> 2.

    Shape: (N, C, H, W) integer, H and W even -> (N, C, H/2, W/2).
    """
    n, c, h, w = plane.shape
    s = plane.reshape(n, c, h // 2, 2, w // 2, 2).sum(dim=(3, 5))
    bias = torch.ones(w // 2, dtype=plane.dtype, device=plane.device)
    bias[1::2] = 2
    return (s + bias) >> 2


def _fancy_upsample_h2v2(plane: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """libjpeg ``h2v2_fancy_upsample`` (triangular filter) of a chroma plane, cropped to out_h x out_w.

    Each output sample mixes the nearest chroma sample (weight 3 per axis) with the next
    nearest (weight 1): vertical sums are exact, then ``(3 * this + neighbour + 8) >> 4`` for
    even and ``+ 7`` for odd output columns; rows and columns past the border replicate it.

    Shape: (N, C, h, w) integer with h = ceil(out_h/2), w = ceil(out_w/2) -> (N, C, out_h, out_w).
    """
    n, c, h, w = plane.shape
    p = F.pad(plane.double(), (1, 1, 1, 1), mode="replicate").to(plane.dtype)
    centre = p[:, :, 1:-1, :]
    above = p[:, :, :-2, :]
    below = p[:, :, 2:, :]
    # Vertical pass: output row 2i uses row i-1, row 2i+1 uses row i+1 (exact integers).
    col_even = 3 * centre + above  # (N, C, h, w+2)
    col_odd = 3 * centre + below
    rows = torch.stack([col_even, col_odd], dim=3).reshape(n, c, 2 * h, w + 2)
    this = rows[:, :, :, 1:-1]
    left = rows[:, :, :, :-2]
    right = rows[:, :, :, 2:]
    even = (3 * this + left + 8) >> 4
    odd = (3 * this + right + 7) >> 4
    out = torch.stack([even, odd], dim=4).reshape(n, c, 2 * h, 2 * w)
    return out[:, :, :out_h, :out_w]


# libjpeg's "islow" integer DCT constants: FIX(c) = round(c * 2**13) (jfdctint.c, jidctint.c).
_CONST_BITS = 13
_PASS1_BITS = 2
_F0298 = 2446
_F0390 = 3196
_F0541 = 4433
_F0765 = 6270
_F0899 = 7373
_F1175 = 9633
_F1501 = 12299
_F1847 = 15137
_F1961 = 16069
_F2053 = 16819
_F2562 = 20995
_F3072 = 25172


def _descale(v: torch.Tensor, n: int) -> torch.Tensor:
    """libjpeg ``DESCALE``: divide by 2**n rounding half up (arithmetic shift)."""
    return (v + (1 << (n - 1))) >> n


def _odd_rotation(i0, i1, i2, i3):
    """The odd part shared by the islow forward and inverse DCT (Loeffler et al. figure 8)."""
    z1 = i0 + i3
    z2 = i1 + i2
    z3 = i0 + i2
    z4 = i1 + i3
    z5 = (z3 + z4) * _F1175
    z1 = z1 * -_F0899
    z2 = z2 * -_F2562
    z3 = z3 * -_F1961 + z5
    z4 = z4 * -_F0390 + z5
    return i0 * _F0298 + z1 + z3, i1 * _F2053 + z2 + z4, i2 * _F3072 + z2 + z3, i3 * _F1501 + z1 + z4


def _fdct_islow_1d(d: torch.Tensor, first_pass: bool) -> torch.Tensor:
    """One pass of libjpeg's ``jpeg_fdct_islow`` over the last axis (length 8) (integer)."""
    x = d.unbind(-1)
    tmp0, tmp7 = x[0] + x[7], x[0] - x[7]
    tmp1, tmp6 = x[1] + x[6], x[1] - x[6]
    tmp2, tmp5 = x[2] + x[5], x[2] - x[5]
    tmp3, tmp4 = x[3] + x[4], x[3] - x[4]
    tmp10, tmp13 = tmp0 + tmp3, tmp0 - tmp3
    tmp11, tmp12 = tmp1 + tmp2, tmp1 - tmp2
    if first_pass:
        out0 = (tmp10 + tmp11) << _PASS1_BITS
        out4 = (tmp10 - tmp11) << _PASS1_BITS
        bits = _CONST_BITS - _PASS1_BITS
    else:
        out0 = _descale(tmp10 + tmp11, _PASS1_BITS)
        out4 = _descale(tmp10 - tmp11, _PASS1_BITS)
        bits = _CONST_BITS + _PASS1_BITS
    z1 = (tmp12 + tmp13) * _F0541
    out2 = _descale(z1 + tmp13 * _F0765, bits)
    out6 = _descale(z1 - tmp12 * _F1847, bits)
    o7, o5, o3, o1 = _odd_rotation(tmp4, tmp5, tmp6, tmp7)
    out1, out3, out5, out7 = (_descale(v, bits) for v in (o1, o3, o5, o7))
    return torch.stack([out0, out1, out2, out3, out4, out5, out6, out7], dim=-1)


def _idct_islow_1d(d: torch.Tensor, first_pass: bool) -> torch.Tensor:
    """One pass of libjpeg's ``jpeg_idct_islow`` over the last axis (length 8) (integer)."""
    x = d.unbind(-1)
    z1 = (x[2] + x[6]) * _F0541
    tmp2 = z1 - x[6] * _F1847
    tmp3 = z1 + x[2] * _F0765
    tmp0 = (x[0] + x[4]) << _CONST_BITS
    tmp1 = (x[0] - x[4]) << _CONST_BITS
    tmp10, tmp13 = tmp0 + tmp3, tmp0 - tmp3
    tmp11, tmp12 = tmp1 + tmp2, tmp1 - tmp2
    o0, o1, o2, o3 = _odd_rotation(x[7], x[5], x[3], x[1])
    bits = _CONST_BITS - _PASS1_BITS if first_pass else _CONST_BITS + _PASS1_BITS + 3
    outs = (tmp10 + o3, tmp11 + o2, tmp12 + o1, tmp13 + o0, tmp13 - o0, tmp12 - o1, tmp11 - o2, tmp10 - o3)
    return torch.stack([_descale(v, bits) for v in outs], dim=-1)


def _code_component(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Encode and decode one component plane of 8-bit samples with quantisation ``table``.

    Edge-replicates to whole 8x8 blocks (libjpeg's ``expand_right_edge`` /
    ``expand_bottom_edge``), level shifts by -128, runs libjpeg's integer "islow" DCT
    (rows then columns; output ``8 * coef``), quantises by ``8 * Q`` rounding half away from
    zero (``jcdctmgr.c``), dequantises, runs the integer inverse DCT (columns then rows), adds
    128, clamps to 0..255 and crops the padding. Integer arithmetic throughout, so it is exact
    and identical on every device and batch size.

    Shape: (N, C, H, W) integer -> (N, C, H, W) same integer dtype.
    """
    h, w = plane.shape[-2:]
    padded, _ = pad_to_blocks(plane.double() - 128.0, 8, mode="replicate")
    blocks = to_blocks(padded).to(plane.dtype)  # (N, C, Hb, Wb, 8, 8): rows, columns
    rows = _fdct_islow_1d(blocks, first_pass=True)
    coef8 = _fdct_islow_1d(rows.transpose(-1, -2), first_pass=False).transpose(-1, -2)
    q = table.to(device=plane.device, dtype=plane.dtype)
    div = 8 * q
    levels = torch.sign(coef8) * torch.div(coef8.abs() + div // 2, div, rounding_mode="floor")
    deq = levels * q
    cols = _idct_islow_1d(deq.transpose(-1, -2), first_pass=True).transpose(-1, -2)
    samples = (_idct_islow_1d(cols, first_pass=False) + 128).clamp(0, 255)
    return from_blocks(samples)[:, :, :h, :w]


def to_8bit(x: torch.Tensor) -> torch.Tensor:
    """The 8-bit image Pillow would be given: ``round(clip(x, 0, 1) * 255)`` in x's floating type.

    The product and the rounding (half to even) are done in float64 for a float64 input and in
    float32 otherwise (float16 and bfloat16 are widened first, exactly), as
    ``(x.numpy().clip(0, 1) * 255).round().astype(np.uint8)`` does. For a float32 tensor this
    is not always the nearest integer to the exact ``255 x``: where that lies within float32
    rounding (2**-17 or less) of a half, the float32 product can land on the half and round the
    other way. Following the usual conversion keeps :func:`jpeg_compress` equal to Pillow's
    round trip of the image a user would save.

    Shape: (N, C, H, W) floating -> (N, C, H, W) int32 in 0..255.
    """
    work = x.detach()
    if work.dtype != torch.float64:
        work = work.float()
    return torch.round(work.clamp(0.0, 1.0) * 255.0).int()


def _normalise_subsampling(subsampling: Union[str, int]) -> str:
    key = str(subsampling).strip()
    if key not in _SUBSAMPLING_ALIASES:
        raise ValueError(f"subsampling must be '4:2:0' (Pillow's default) or '4:4:4', got {subsampling!r}")
    return _SUBSAMPLING_ALIASES[key]


def jpeg_compress(x: torch.Tensor, quality: int = 75, subsampling: Union[str, int] = "4:2:0") -> torch.Tensor:
    """JPEG round trip of a batch, as Pillow's ``save(format="JPEG", quality=quality)`` + decode.

    Args:
        x: images in [0, 1]; 3 channels (RGB, YCbCr 4:2:0 or 4:4:4) or 1 (greyscale, one
            luminance component, as Pillow's mode "L"). Made 8-bit by :func:`to_8bit`
            (rounding in x's own floating type).
        quality: JPEG quality 1..100 (Pillow's default 75).
        subsampling: ``"4:2:0"`` (Pillow's default for every quality; also ``2``) or
            ``"4:4:4"`` (``0``).

    Returns:
        The decoded images in [0, 1] (multiples of 1/255), same shape, dtype and device.

    Shape: (N, C, H, W) -> (N, C, H, W).
    """
    return jpeg_compress_qualities(x, (quality,), subsampling)[0]


def jpeg_compress_qualities(x: torch.Tensor, qualities: Sequence[int], subsampling: Union[str, int] = "4:2:0") -> torch.Tensor:
    """:func:`jpeg_compress` at several qualities, sharing the colour conversion and subsampling.

    Shape: (N, C, H, W) -> (len(qualities), N, C, H, W).
    """
    check_images(x)
    if x.shape[1] not in (1, 3):
        raise ValueError(f"JPEG needs 1 or 3 channels, got {x.shape[1]}")
    mode = _normalise_subsampling(subsampling)
    n, c, h, w = x.shape
    # int32 is enough: libjpeg's integer transforms are designed for 32-bit accumulators.
    samples = to_8bit(x)
    if c == 1:
        outs = [_code_component(samples, quality_scaled_table(LUMINANCE_TABLE, q)) for q in qualities]
        return (torch.stack(outs).double() / 255.0).to(x.dtype)
    ycc = _rgb_to_ycbcr(samples)
    if mode == "4:2:0":
        # libjpeg pads the full-resolution rows to whole 16-sample MCUs on the right and to a
        # whole 2-row group at the bottom (jcsample.c, jcprepct.c), averages 2x2, and pads the
        # *downsampled* plane down to whole blocks by repeating its last row (done by
        # _code_component's edge replication).
        full = F.pad(ycc[:, 1:].double(), (0, (-w) % 16, 0, h % 2), mode="replicate").int()
        chroma_in = _downsample_h2v2(full)
    else:
        chroma_in = ycc[:, 1:]
    outs = []
    for q in qualities:
        y = _code_component(ycc[:, :1], quality_scaled_table(LUMINANCE_TABLE, q))
        coded = _code_component(chroma_in, quality_scaled_table(CHROMINANCE_TABLE, q))
        if mode == "4:4:4":
            chroma = coded
        else:
            # Only the ceil(H/2) x ceil(W/2) real chroma samples feed the upsampler (jdmainct.c).
            coded = coded[:, :, : (h + 1) // 2, : (w + 1) // 2]
            if coded.shape[-1] > 2:
                chroma = _fancy_upsample_h2v2(coded, h, w)
            else:  # libjpeg falls back to plain 2x2 replication for chroma 1-2 samples wide
                chroma = coded.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)[:, :, :h, :w]
        outs.append(_ycbcr_to_rgb(torch.cat([y, chroma], dim=1)))
    return (torch.stack(outs).double() / 255.0).to(x.dtype)


class JPEG(Defense):
    """JPEG compression at a fixed quality (deterministic, non-differentiable; PROTOCOL.md ``jpeg``).

    Args:
        quality: JPEG quality (default 75).
        subsampling: chroma subsampling, ``"4:2:0"`` (Pillow's default) or ``"4:4:4"``.

    Shape: (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self, quality: int = 75, subsampling: Union[str, int] = "4:2:0") -> None:
        super().__init__()
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"quality must be in 1..100, got {quality}")
        self.quality = int(quality)
        self.subsampling = _normalise_subsampling(subsampling)

    def apply(self, x: torch.Tensor, params=None) -> torch.Tensor:
        return jpeg_compress(x, self.quality, self.subsampling)

    def extra_repr(self) -> str:
        return f"quality={self.quality}, subsampling={self.subsampling}"


register("jpeg", help="JPEG compression at quality 75 (Pillow/libjpeg-compatible, batched)")(JPEG)

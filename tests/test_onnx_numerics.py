"""ONNX quantized ops, one by one, against the exporter's own weights dequantized here in numpy (issue 14.4).

For every MatMulNBits and GatherBlockQuantized node of an exported tiny checkpoint this reads the packed data, scales
and zero points from model.onnx(.data), dequantizes them following the com.microsoft contrib op specs (written out
below, independent of qwen_edge.export.onnx_quant), and checks

  (a) the dequantized weight against the checkpoint's float weight: every element within half a quantization step
      of it (x (1 + 1e-4), plus the distance to the block's representable range for a value the grid clips), and
  (b) onnxruntime running that node alone (same initializers and attributes) against numpy: MatMulNBits at
      accuracy_level 0 within 1e-5 of sum|x||W| per output, at its exported accuracy_level (int8 activations) within
      the bound int8 rounding of x allows; GatherBlockQuantized rows equal to the numpy rows within 2^bits x 2^-22
      of a step (fp32 rounding).

Each check also runs a negative control on the same data: scales x1.01, or every zero point off by one, must break
it, so the tolerances are shown to be tight enough to catch a wrong scale or zero point.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from qwen_edge.model.checkpoint import Checkpoint  # noqa: E402

MS = "com.microsoft"
SCALE_ERR = 1.01
FLOAT_SLACK = 1e-4
"""Of half a step: the exporter rounds w * (1 / scale) in float32 (measured up to 1.4e-5 for 8 bits)."""
REL0 = 1e-5
"""MatMulNBits at accuracy_level 0 (fp32 compute) vs float64 numpy: |y - ref| <= REL0 * (|x| @ |W|.T) (measured
3e-7)."""

# (arch, quant, options): symmetric and asymmetric, int4 and int8, block sizes 32/64/128 (128 > hidden 64: padded
# blocks), 4- and 8-bit LM heads, GatherBlockQuantized 4- and 8-bit, tied (a view of the LM head) and untied.
CONFIGS = {
    "int4-asym-b32-head4-tied": ("tiny-qwen2", "int4", {"symmetric": False, "block_size": 32, "lm_head_bits": 4}),
    "int4-sym-b32-head4-tied": ("tiny-qwen2", "int4", {"block_size": 32, "lm_head_bits": 4}),
    "int4-sym-b64-head8-untied": ("tiny-qwen2-untied", "int4", {"block_size": 64}),
    "int4-asym-b128-head4-untied": ("tiny-qwen2-untied", "int4",
                                    {"symmetric": False, "block_size": 128, "lm_head_bits": 4}),
    "int8-asym-b128-head8-untied": ("tiny-qwen2-untied", "int8", {"symmetric": False, "block_size": 128}),
    "int8-sym-b32-head8-tied": ("tiny-qwen2", "int8", {"block_size": 32}),
    "int8-asym-b64-head8-tied": ("tiny-qwen2", "int8", {"symmetric": False, "block_size": 64}),
}


# --- the contrib op specs, in numpy ----------------------------------------------------------------------------
def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [..., m] -> [..., m * 8 / bits] values, low-order bits first (MatMulNBits / GatherBlockQuantized)."""
    if bits == 8:
        return packed.astype(np.int32)
    assert bits == 4
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1).astype(np.int32)


def zero_points(zp: np.ndarray | None, bits: int, n: int, blocks: int) -> np.ndarray:
    """[n, blocks] integer zero points: the stored (packed for 4 bits, padded to whole bytes per row) or the default
    2^(bits-1) of a uint8 weight without them."""
    if zp is None:
        return np.full((n, blocks), 1 << (bits - 1), dtype=np.int32)
    return unpack(zp.reshape(n, -1), bits)[:, :blocks]


def dequant(data: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, bits: int, block: int,
            k: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(W [n, k] float64, scale and zero point per element) of block-quantized rows: `data` is [n, blocks, blob]
    (MatMulNBits B) or [n, blocks * blob] (GatherBlockQuantized, quantize_axis=1), scales [n, blocks]."""
    n = data.shape[0]
    q = unpack(data.reshape(n, -1), bits)
    blocks = q.shape[1] // block
    assert scales.shape == (n, blocks), (scales.shape, n, blocks)
    z = zero_points(zp, bits, n, blocks)
    s_el = np.repeat(scales.astype(np.float64), block, axis=1)
    z_el = np.repeat(z, block, axis=1)
    w = (q - z_el) * s_el
    k = k or q.shape[1]
    return w[:, :k], s_el[:, :k], z_el[:, :k]


def source_error_ratio(w_deq: np.ndarray, s_el: np.ndarray, z_el: np.ndarray, bits: int,
                       w_src: np.ndarray) -> float:
    """max over elements of |W_deq - W| / (|scale| / 2 + how far W lies outside the block's representable range):
    at most 1 (+ float slack) when every weight went to its nearest grid point."""
    levels = (1 << bits) - 1
    a, b = (0 - z_el) * s_el, (levels - z_el) * s_el
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    outside = np.maximum(lo - w_src, 0) + np.maximum(w_src - hi, 0)
    tol = np.abs(s_el) / 2 + outside
    err = np.abs(w_deq - w_src)
    zero = tol == 0  # an all-zero block: scale 0, exact
    assert np.all(err[zero] == 0)
    return float((err[~zero] / tol[~zero]).max())


# --- the exported model ------------------------------------------------------------------------------------------
class Exported:
    def __init__(self, art, ckpt_dir):
        self.model = onnx.load(str(art / "model.onnx"), load_external_data=True)
        self.proto = {t.name: t for t in self.model.graph.initializer}
        bare = onnx.load(str(art / "model.onnx"), load_external_data=False)
        self.stored = {t.name: t for t in bare.graph.initializer}  # external data locations (the tied view)
        self.arrays: dict[str, np.ndarray] = {}
        self.ckpt = Checkpoint(ckpt_dir)

    def array(self, name: str) -> np.ndarray | None:
        if not name:
            return None
        if name not in self.arrays:
            self.arrays[name] = numpy_helper.to_array(self.proto[name])
        return self.arrays[name]

    def nodes(self, op: str):
        return [n for n in self.model.graph.node if n.op_type == op]

    def source(self, weight_init: str) -> np.ndarray:
        """The checkpoint weight a quantized initializer stands for ([N, K], rows fused as the exporter fuses)."""
        base = weight_init.rsplit(".weight", 1)[0]
        if base == "lm_head":
            names = [self.ckpt.lm_head_name()]
        elif base == "model.embed_tokens":
            names = ["model.embed_tokens.weight"]
        elif base.endswith(".attn.qkv_proj"):
            pre = base[:-len(".attn.qkv_proj")] + ".self_attn."
            names = [pre + p + "_proj.weight" for p in "qkv"]
        elif base.endswith(".attn.o_proj"):
            names = [base[:-len(".attn.o_proj")] + ".self_attn.o_proj.weight"]
        elif base.endswith(".mlp.gate_up_proj"):
            pre = base[:-len("gate_up_proj")]
            names = [pre + "gate_proj.weight", pre + "up_proj.weight"]
        elif base.endswith(".mlp.down_proj"):
            names = [base + ".weight"]
        else:
            raise AssertionError(f"no checkpoint weight known for {weight_init}")
        return np.concatenate([self.ckpt.tensor(n) for n in names]).astype(np.float64)


_CACHE: dict[str, Exported] = {}


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def model(request, exported, synth_ckpt) -> Exported:
    cfg = request.param
    if cfg not in _CACHE:
        arch, quant, opts = CONFIGS[cfg]
        _CACHE.clear()  # one model in memory at a time
        _CACHE[cfg] = Exported(exported(arch, "onnx", quant, **opts), synth_ckpt(arch))
    m = _CACHE[cfg]
    m.cfg = cfg
    return m


def attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def mnb_weight(m: Exported, node, scales: np.ndarray | None = None, zp: np.ndarray | None = None):
    a = attrs(node)
    b = m.array(node.input[1])
    s = m.array(node.input[2]) if scales is None else scales
    z = m.array(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    z = z if zp is None else zp
    assert b.dtype == np.uint8 and b.shape == (a["N"], -(-a["K"] // a["block_size"]), a["block_size"] * a["bits"] // 8)
    return dequant(b, s.astype(np.float32), z, a["bits"], a["block_size"], a["K"])


def off_by_one(m: Exported, node_zp: str, bits: int, n: int, blocks: int) -> np.ndarray:
    """Zero points one higher than stored (or than the default 2^(bits-1)), in the stored packing."""
    z = zero_points(m.array(node_zp) if node_zp else None, bits, n, blocks)
    z = np.where(z < (1 << bits) - 1, z + 1, z - 1).astype(np.uint8)
    if bits == 4:
        if blocks % 2:
            z = np.pad(z, ((0, 0), (0, 1)))
        z = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
    return z


# --- (a) stored weights against the checkpoint ----------------------------------------------------------------------
def test_matmulnbits_weights_match_the_checkpoint(model):
    m = model
    nodes = m.nodes("MatMulNBits")
    arch, quant, opts = CONFIGS[m.cfg]
    bits = 4 if quant == "int4" else 8
    heads = [n for n in nodes if n.name.startswith("/lm_head/")]
    assert len(nodes) == 2 * 4 + 1 and len(heads) == 1
    worst, neg_s, neg_z = {}, np.inf, np.inf
    for node in nodes:
        a = attrs(node)
        head = node in heads
        assert a["bits"] == (opts.get("lm_head_bits", 8) if head else bits)
        if not head:
            assert a["block_size"] == opts["block_size"]
        asym = len(node.input) > 3 and node.input[3] != ""
        assert asym == (opts.get("symmetric") is False)
        w_src = m.source(node.input[1])
        assert w_src.shape == (a["N"], a["K"])
        w, s_el, z_el = mnb_weight(m, node)
        ratio = source_error_ratio(w, s_el, z_el, a["bits"], w_src)
        worst[node.name] = ratio
        assert ratio <= 1 + FLOAT_SLACK, f"{node.name}: |W_deq - W| reaches {ratio:.4f} x half a step"
        # negative controls: a 1% wrong scale and zero points off by one are far outside that tolerance
        w_bad, s_bad, z_bad = mnb_weight(m, node, scales=m.array(node.input[2]) * SCALE_ERR)
        neg_s = min(neg_s, source_error_ratio(w_bad, s_bad, z_bad, a["bits"], w_src))
        assert neg_s > 1.01, node.name
        blocks = m.array(node.input[2]).shape[1]
        zp_bad = off_by_one(m, node.input[3] if asym else "", a["bits"], a["N"], blocks)
        w_bad, s_bad, z_bad = mnb_weight(m, node, zp=zp_bad)
        neg_z = min(neg_z, source_error_ratio(w_bad, s_bad, z_bad, a["bits"], w_src))
        assert neg_z > 1.5, node.name
    print(m.cfg, "max |W_deq-W| / (step/2):", round(max(worst.values()), 6),
          f"scale x1.01: {neg_s:.4g}, zero point +-1: {neg_z:.4g}")


def test_gather_block_quantized_weights_match_the_checkpoint(model):
    m = model
    arch, quant, opts = CONFIGS[m.cfg]
    (node,) = m.nodes("GatherBlockQuantized")
    a = attrs(node)
    tied = arch == "tiny-qwen2"
    bits = opts.get("lm_head_bits", 8) if tied else (4 if quant == "int4" else 8)
    block = (model_head(m)[1]["block_size"] if tied else opts["block_size"])
    assert (a["bits"], a["block_size"], a["gather_axis"], a["quantize_axis"]) == (bits, block, 0, 1)
    data, scales = m.array(node.input[0]), m.array(node.input[2])
    zp = m.array(node.input[3]) if len(node.input) > 3 else None
    assert (zp is not None) == (opts.get("symmetric") is False)
    w_src = m.source("model.embed_tokens.weight")
    assert data.ndim == 2 and data.shape[0] == w_src.shape[0]
    w, s_el, z_el = dequant(data, scales, zp, bits, block, w_src.shape[1])
    ratio = source_error_ratio(w, s_el, z_el, bits, w_src)
    print(m.cfg, "GBQ max |W_deq-W| / (step/2):", round(ratio, 6))
    assert ratio <= 1 + FLOAT_SLACK
    w_bad, s_bad, z_bad = dequant(data, scales * SCALE_ERR, zp, bits, block, w_src.shape[1])
    assert source_error_ratio(w_bad, s_bad, z_bad, bits, w_src) > 1.01
    zp_bad = off_by_one(m, node.input[3] if zp is not None else "", bits, data.shape[0], scales.shape[1])
    w_bad, s_bad, z_bad = dequant(data, scales, zp_bad, bits, block, w_src.shape[1])
    assert source_error_ratio(w_bad, s_bad, z_bad, bits, w_src) > 1.5


def model_head(m: Exported):
    (head,) = [n for n in m.nodes("MatMulNBits") if n.name.startswith("/lm_head/")]
    return head, attrs(head)


# --- (b) onnxruntime running each node alone -----------------------------------------------------------------------
def run_one(op: str, inputs: list[tuple[str, np.ndarray | None]], feed: dict[str, np.ndarray], out_dim: int,
            **attributes) -> np.ndarray:
    """One com.microsoft node in its own session: inputs are (name, initializer array or None for a graph input)."""
    inits, graph_inputs, names = [], [], []
    for name, arr in inputs:
        names.append(name)
        if arr is None:
            x = feed[name]
            elem = TensorProto.FLOAT if x.dtype == np.float32 else TensorProto.INT64
            graph_inputs.append(helper.make_tensor_value_info(name, elem, list(x.shape)))
        elif name:
            inits.append(numpy_helper.from_array(arr, name))
    node = helper.make_node(op, names, ["y"], domain=MS, **attributes)
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    g = helper.make_graph([node], op, graph_inputs, [out], inits)
    mp = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)], ir_version=10)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(mp.SerializeToString(), so, providers=["CPUExecutionProvider"])
    y = sess.run(["y"], feed)[0]
    assert y.shape[-1] == out_dim
    return y


def mnb_run(m: Exported, node, x: np.ndarray, level: int, scales=None, zp=None, force_zp=False) -> np.ndarray:
    a = attrs(node)
    a["accuracy_level"] = level
    z_name = node.input[3] if len(node.input) > 3 else ""
    z = zp if zp is not None else m.array(z_name)
    if force_zp:
        z_name = z_name or "zp"
    inputs = [("x", None), (node.input[1], m.array(node.input[1])),
              (node.input[2], m.array(node.input[2]) if scales is None else scales)]
    if z_name:
        inputs.append((z_name, z))
    return run_one("MatMulNBits", inputs, {"x": x}, a["N"], **a)


def test_matmulnbits_op_matches_numpy(model):
    """Each MatMulNBits alone vs x @ W_deq.T in float64. accuracy_level 0 (fp32 compute): |y - ref| <= 1e-5 *
    (|x| @ |W|.T), measured 3e-7. Exported accuracy_level (4: x rounded to int8 per block, scale max|x|/127):
    |y - ref| <= 1.05 * (|W| @ max|x|/254 + 1e-5 * (|x| @ |W|.T)), the worst case of that rounding (measured 0.42
    of it)."""
    m = model
    rng = np.random.default_rng(7)
    worst0, worst4, least = 0.0, 0.0, np.inf
    for node in m.nodes("MatMulNBits"):
        a = attrs(node)
        x = rng.standard_normal((2, 3, a["K"])).astype(np.float32)
        w, _, _ = mnb_weight(m, node)
        ref = x.astype(np.float64) @ w.T
        mag = np.abs(x).astype(np.float64) @ np.abs(w).T
        y0 = mnb_run(m, node, x, 0)
        r0 = float((np.abs(y0 - ref) / (REL0 * mag + 1e-12)).max())
        worst0 = max(worst0, r0)
        assert r0 <= 1, f"{node.name}: accuracy_level 0 off by {r0:.3g} x tolerance"
        level = a.get("accuracy_level", 0)
        if level == 4:
            amax = np.abs(x).max(axis=-1, keepdims=True).astype(np.float64)
            bound = 1.05 * (amax / 254 * np.abs(w).sum(axis=1) + REL0 * mag)
            y4 = mnb_run(m, node, x, 4)
            r4 = float((np.abs(y4 - ref) / bound).max())
            worst4 = max(worst4, r4)
            assert r4 <= 1, f"{node.name}: accuracy_level 4 off by {r4:.3g} x its int8 bound"
        # negative controls (fp32 compute): the scales the kernel reads x1.01, every zero point off by one
        bad = mnb_run(m, node, x, 0, scales=m.array(node.input[2]) * np.float32(SCALE_ERR))
        neg = float((np.abs(bad - ref) / (REL0 * mag + 1e-12)).max())
        least = min(least, neg)
        assert neg > 5, node.name
        asym = len(node.input) > 3 and node.input[3] != ""
        blocks = m.array(node.input[2]).shape[1]
        zp_bad = off_by_one(m, node.input[3] if asym else "", a["bits"], a["N"], blocks)
        bad = mnb_run(m, node, x, 0, zp=zp_bad, force_zp=True)
        neg = float((np.abs(bad - ref) / (REL0 * mag + 1e-12)).max())
        least = min(least, neg)
        assert neg > 5, node.name
        if not asym:  # and the default zero point (no input) is the 2^(bits-1) numpy assumed
            z_default = off_by_one(m, "", a["bits"], a["N"], blocks)
            z_default = np.full_like(z_default, 0x88 if a["bits"] == 4 else 0x80)
            y_def = mnb_run(m, node, x, 0, zp=z_default, force_zp=True)
            np.testing.assert_array_equal(y_def, y0)
    print(m.cfg, f"MatMulNBits worst err/tol: level0 {worst0:.3g}, level4 {worst4:.3g}; "
          f"scale x1.01 / zero point +-1 at least {least:.3g} x tol")


def test_gather_block_quantized_op_matches_numpy(model):
    """GatherBlockQuantized alone: gathered rows == numpy dequantized rows within 2^bits x 2^-22 x |scale| per element
    (fp32 rounding of values up to 2^bits steps; measured 0 for 4 bits, 4.6e-6 x |scale| for 8); a 1% wrong scale or
    a zero point off by one (errors of 1e-2 x |q - zp| and 1 x |scale|) breaks it."""
    m = model
    (node,) = m.nodes("GatherBlockQuantized")
    a = attrs(node)
    data, scales = m.array(node.input[0]), m.array(node.input[2])
    z_name = node.input[3] if len(node.input) > 3 else ""
    zp = m.array(z_name)
    n = data.shape[0]
    ids = np.array([[0, 1, n - 1, 151643], [12345, 7, 7, n - 2]], dtype=np.int64)
    w, s_el, _ = dequant(data, scales, zp, a["bits"], a["block_size"])

    def run(sc=scales, z=zp, z_in=z_name):
        inputs = [(node.input[0], data), ("ids", None), (node.input[2], sc)] + ([(z_in, z)] if z_in else [])
        return run_one("GatherBlockQuantized", inputs, {"ids": ids}, w.shape[1], **a)

    y = run()
    assert y.shape == ids.shape + (w.shape[1],)
    tol = (1 << a["bits"]) * 2.0 ** -22 * np.abs(s_el[ids]) + 1e-30  # fp32 rounding at 2^bits x |scale|
    ratio = float((np.abs(y - w[ids]) / tol).max())
    print(m.cfg, f"GBQ worst err/tol {ratio:.3g}")
    assert ratio <= 1
    assert (np.abs(run(sc=scales * np.float32(SCALE_ERR)) - w[ids]) / tol).max() > 100
    bad_zp = off_by_one(m, z_name, a["bits"], n, scales.shape[1])
    assert (np.abs(run(z=bad_zp, z_in=z_name or "zp") - w[ids]) / tol).max() > 100


def test_tied_embedding_view_is_the_lm_head(model):
    """Tied + quantized: the GatherBlockQuantized inputs are views over the LM head's MatMulNBits bytes (same file
    range), read back as the same numbers, and gathering row r gives row r of the head's dequantized weight."""
    m = model
    arch = CONFIGS[m.cfg][0]
    if arch != "tiny-qwen2":
        pytest.skip("untied: the embedding has its own table")
    head, ha = model_head(m)
    (gbq,) = m.nodes("GatherBlockQuantized")

    def where(name):
        t = m.stored[name]
        assert t.data_location == TensorProto.EXTERNAL, name
        return tuple(e.value for e in t.external_data if e.key in ("location", "offset", "length"))

    pairs = [(gbq.input[0], head.input[1]), (gbq.input[2], head.input[2])]
    if len(head.input) > 3 and head.input[3]:
        pairs.append((gbq.input[3], head.input[3]))
    else:
        assert len(gbq.input) < 4 or not gbq.input[3]
    for view, own in pairs:
        assert view != own and where(view) == where(own), (view, own)
        np.testing.assert_array_equal(m.array(view).reshape(-1), m.array(own).reshape(-1))
    w_head, _, _ = mnb_weight(m, head)
    z = m.array(gbq.input[3]) if len(gbq.input) > 3 else None
    w_emb, _, _ = dequant(m.array(gbq.input[0]), m.array(gbq.input[2]), z, attrs(gbq)["bits"],
                          attrs(gbq)["block_size"], ha["K"])
    np.testing.assert_array_equal(w_emb, w_head)

"""The fused Qwen2/Qwen3 decoder graph: GroupQueryAttention with rotary, skip RMS norms, packed projections."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto

from ..model.checkpoint import Checkpoint
from ..families import family_of
from ..formats.onnx_graph import MS, GraphBuilder
from .onnx_lora import LoraLinear
from .gptq import quantize_rows_gptq
from .onnx_imatrix import quantize_rows_weighted
from .onnx_quant import QuantLayout, quantize_rows
from .onnx_source import Source

INT64_MAX = np.iinfo(np.int64).max
LM_HEAD_INT8_BLOCK = 128
"""Default block of an int8 LM head: verify KL on qwen2.5-0.5b is the same as at 32 (0.0428), and fp32 scales
drop from 1 to 0.25 bit/weight, about 25% less LM head time per token."""
POSITION_IDS = "position_ids"
"""int64 [batch, sequence_length]: each token's rotary position, fed by every caller (qwen-edge's backend,
onnxruntime-genai, optimum; optimum treats a Qwen graph without it as legacy and says so). In a padded batch it is
the count of real tokens before the token (transformers: `attention_mask.cumsum(-1) - 1`), whichever side the
padding is on: transformers pads on the left, onnxruntime-genai 0.18 on the right (it masks trailing pad ids only).
Rotary runs as its own node (RotaryEmbedding) on these positions, not inside GroupQueryAttention: onnxruntime
1.32's GroupQueryAttention reads only the first element of position_ids on a prompt (every row offset alike) but
each row's own on a decode step, so no one feeding makes both paddings exact there (a left-padded row was 0.54 off
on its second token in a unit test of the op; a right-padded row's decode would see its pads' slots as distance)."""
LOGITS_TO_KEEP = "logits_to_keep"
"""Optional int64 [1] input: how many trailing positions get logits (default 1: the last; 0 or more than the chunk:
all). The `logits` output is declared [batch, 1, vocab], the default's shape: onnxruntime-genai, which does not feed
this input, reads that static 1 as a pruned LM head and takes the one row as the last position's, so its prefill
runs the head once instead of once per prompt token (as its builder's `prune_lm_head`). Feeding N > 1 returns N
rows (onnxruntime then logs a shape warning); qwen-edge's backend feeds 1, or the chunk length for every position."""


@dataclass
class QuantPlan:
    """How each kind of weight is stored: float dtype, MatMulNBits bits for linears and LM head, embeddings."""

    quant: str
    float_dtype: type = np.float32
    linear_bits: int | None = None
    lm_head_bits: int | None = None
    quantize_embeddings: bool = False
    block_size: int = 32
    lm_head_block_size: int | None = None
    symmetric: bool = True
    accuracy_level: int = 4
    kv_dtype: type | None = None
    """KV cache (and GroupQueryAttention) dtype; None: the float dtype. When it differs, Casts wrap the attention:
    onnxruntime's CPU GQA has no float32-query/float16-cache kernel (it would cast the whole cache every step)."""
    importance: dict[str, np.ndarray] | None = None
    """`--imatrix`: importance of each input column by checkpoint weight name; those weights get the weighted scale
    search (onnx_imatrix), the rest round-to-nearest."""
    hessian: dict[str, np.ndarray] | None = None
    """`--gptq`: U (gptq.inverse_factor of the calibration inputs' Hessian) by checkpoint weight name; those weights
    get GPTQ's error-compensated codes (with the importance-weighted block scales when `importance` has them)."""

    @property
    def elem(self) -> int:
        return TensorProto.FLOAT16 if self.float_dtype == np.float16 else TensorProto.FLOAT

    @property
    def kv(self) -> type:
        return self.kv_dtype or self.float_dtype

    @property
    def kv_elem(self) -> int:
        return TensorProto.FLOAT16 if self.kv == np.float16 else TensorProto.FLOAT

    @property
    def float_name(self) -> str:
        return "fp16" if self.float_dtype == np.float16 else "fp32"


@dataclass
class BuildRecord:
    """What the builder stored: type per weight initializer and the bytes that belong to weights."""

    tensor_types: dict[str, str] = field(default_factory=dict)
    weight_bytes: int = 0
    embedding: str = ""


class DecoderBuilder:
    """Emits the decoder into a GraphBuilder, streaming each weight from the checkpoint to the data file in row
    chunks: memory stays bounded by a chunk (and a quantized tensor's scales), not by the largest tensor."""

    def __init__(self, ckpt: Checkpoint, g: GraphBuilder, plan: QuantPlan, context_length: int,
                 lora: dict[str, LoraLinear] | None = None):
        self.ckpt, self.g, self.plan, self.ctx = ckpt, g, plan, context_length
        self.lora = lora or {}
        """Linears that get a LoRA branch fed from graph inputs (onnx_lora; only a separate-adapter export)."""
        self.a = ckpt.arch
        self.fam = family_of(ckpt.arch)
        self.src = Source(ckpt)
        self.rec = BuildRecord()

    # --- weights ---------------------------------------------------------------------------------------------
    def _float(self, name: str, arr: np.ndarray) -> str:
        out = self.g.init(name, np.ascontiguousarray(arr, dtype=self.plan.float_dtype))
        self.rec.tensor_types[name] = self.plan.float_name
        self.rec.weight_bytes += self.g.init_bytes[name]
        return out

    def _float_stream(self, name: str, shape: tuple[int, ...], chunks) -> str:
        """A float weight written chunk by chunk (the embedding table, a float LM head, a transposed linear)."""
        dt = self.plan.float_dtype
        out = self.g.init_chunks(name, dt, shape, (c.astype(dt, copy=False) for c in chunks))
        self.rec.tensor_types[name] = self.plan.float_name
        self.rec.weight_bytes += self.g.init_bytes[name]
        return out

    def _float_table(self, name: str, src: str | None = None) -> str:
        """A [rows, hidden] float table stored as it is, row chunk by row chunk (Gather table or Gemm transB head);
        `src` defaults to the embedding table."""
        src = src or self.name("embed_tokens")
        return self._float_stream(name, self.src.shape([src]), self.src.rows([src]))

    def head_block(self) -> int:
        """The LM head's block size: the plan's, else 128 for int8 (capped at hidden size) and block_size for int4."""
        p = self.plan
        if p.lm_head_block_size is None:
            cap = 1 << (max(self.a.hidden_size, 16).bit_length() - 1)
            p.lm_head_block_size = (max(p.block_size, min(LM_HEAD_INT8_BLOCK, cap)) if p.lm_head_bits == 8
                                    else p.block_size)
        return p.lm_head_block_size

    def _quantized(self, name: str, src: list[str], bits: int, block: int | None = None,
                   flat: bool = False) -> tuple[str, str, str, QuantLayout]:
        """Block-quantized weight (the row-wise concatenation of the checkpoint tensors `src`): data [N, blocks,
        blob] for MatMulNBits, or [N, blocks x blob] (`flat`) for a GatherBlockQuantized table. The data streams to
        the file chunk by chunk as it is quantized; only the scales (and zero points) wait for the last row."""
        n, k = self.src.shape(src)
        q = QuantLayout(n, k, bits, block or self.plan.block_size, self.plan.symmetric)
        scales: list[np.ndarray] = []
        zps: list[np.ndarray] = []

        imp = (self.plan.importance or {}).get(src[0])  # fused parts (q/k/v, gate/up) share their input
        hess = (self.plan.hessian or {}).get(src[0])

        def data():
            for x in self.src.rows(src):
                if hess is not None:
                    d, sc, zp = quantize_rows_gptq(x, q.bits, q.block_size, hess, imp)
                elif imp is not None:
                    d, sc, zp = quantize_rows_weighted(x, q.bits, q.block_size, imp)
                else:
                    d, sc, zp = quantize_rows(x, q.bits, q.block_size, q.symmetric)
                scales.append(sc)
                if zp is not None:
                    zps.append(zp)
                yield d

        b = self.g.init_chunks(name, np.uint8, (n, q.blocks * q.blob) if flat else q.data_shape, data())
        s = self.g.init(name + "_scales", np.concatenate(scales).astype(self.plan.float_dtype))
        z = self.g.init(name + "_zp", np.concatenate(zps)) if zps else ""
        self.rec.tensor_types[name] = q.type_name
        self.rec.weight_bytes += sum(self.g.init_bytes[n] for n in (b, s, z) if n)
        return b, s, z, q

    def linear(self, x: str, name: str, w: list[str], bias: list[str] | None, bits: int | None) -> str:
        """y = x @ w.T + bias, for w the checkpoint tensors (HF [out, in] layout) fused by rows and bias theirs:
        MatMulNBits when quantized, else MatMul (+Add) on the transposed weight."""
        n, k = self.src.shape(w)
        b_arr = self.src.tensor(bias) if bias is not None else None
        if bits:
            b, s, z, _ = self._quantized(f"{name}.weight_Q{bits}", w, bits)
            inputs = [x, b, s, z, ""]
            if b_arr is not None:
                inputs.append(self._float(f"{name}.bias", b_arr))
            while inputs and inputs[-1] == "":
                inputs.pop()
            y = self.g.op("MatMulNBits", inputs, f"/{name}/MatMulNBits", domain=MS, K=k, N=n, bits=bits,
                          block_size=self.plan.block_size, accuracy_level=self.plan.accuracy_level)
        else:
            wt = self._float_stream(f"{name}.weight", (k, n), self.src.columns_t(w))
            y = self.g.op("MatMul", [x, wt], f"/{name}/MatMul")
            if b_arr is not None:
                y = self.g.op("Add", [y, self._float(f"{name}.bias", b_arr)], f"/{name}/Add")
        return self.lora_branch(x, y, name)

    def lora_branch(self, x: str, y: str, name: str) -> str:
        """y + (x @ A) @ B for a linear with LoRA inputs (A [in, r], B [r, out]; empty by default), else y."""
        lin = self.lora.get(name)
        if lin is None:
            return y
        g, dt = self.g, self.plan.float_dtype
        n = sum(lin.out_features)
        a = g.init(lin.a, np.zeros((lin.in_features, 0), dtype=dt))  # overridable: fed, or empty (no adapter)
        g.add_input(lin.a, self.plan.elem, [lin.in_features, lin.rank_dim])
        b = g.init(lin.b, np.zeros((0, n), dtype=dt))
        g.add_input(lin.b, self.plan.elem, [lin.rank_dim, n])
        xa = g.op("MatMul", [x, a], f"/{name}/lora_A/MatMul")
        xab = g.op("MatMul", [xa, b], f"/{name}/lora_B/MatMul")
        return g.op("Add", [y, xab], f"/{name}/lora/Add")

    def names(self, role: str, i: int | None = None) -> list[str]:
        """Checkpoint names of an ONNX role of block `i`, from the family's tensor map."""
        return self.fam.checkpoint_names(self.a, role, i)

    def name(self, role: str, i: int | None = None) -> str:
        (n,) = self.names(role, i)
        return n

    def t(self, name: str) -> np.ndarray:
        """A small checkpoint tensor (a norm weight) as float32."""
        return self.src.tensor([name])

    # --- graph -------------------------------------------------------------------------------------------------
    def build(self) -> BuildRecord:
        a, g, p = self.a, self.g, self.plan
        ids = g.add_input("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
        mask = g.add_input("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])
        pos = g.add_input(POSITION_IDS, TensorProto.INT64, ["batch_size", "sequence_length"])
        attn_in = self.attention_inputs(ids, mask) + self.rotary_caches() + (pos,)

        x = self.embedding(ids)
        resid = x
        prev = None
        from ..log import progress

        for i in progress(range(a.num_layers), desc="write ONNX", unit="layer"):
            pre = f"model.layers.{i}"
            w_in = self._float(self.name("input_layernorm", i), self.t(self.name("input_layernorm", i)))
            if prev is None:
                h = g.op("SimplifiedLayerNormalization", [x, w_in], f"/{pre}/input_layernorm/SLN",
                         axis=-1, epsilon=a.rms_norm_eps, stash_type=1)
            else:
                h, _, _, resid = g.node("SkipSimplifiedLayerNormalization", [prev, resid, w_in],
                                        f"/{pre}/input_layernorm/SkipSLN", domain=MS,
                                        outputs=[f"/{pre}/input_layernorm/output_0", "", "",
                                                 f"/{pre}/input_layernorm/output_3"], epsilon=a.rms_norm_eps)
            attn = self.attention(i, h, attn_in)
            h2, _, _, resid = g.node("SkipSimplifiedLayerNormalization",
                                     [attn, resid, self._float(self.name("post_attention_layernorm", i),
                                                               self.t(self.name("post_attention_layernorm", i)))],
                                     f"/{pre}/post_attention_layernorm/SkipSLN", domain=MS,
                                     outputs=[f"/{pre}/post_attention_layernorm/output_0", "", "",
                                              f"/{pre}/post_attention_layernorm/output_3"], epsilon=a.rms_norm_eps)
            prev = self.mlp(i, h2)
        final = g.node("SkipSimplifiedLayerNormalization",
                       [prev, resid, self._float(self.name("norm"), self.t(self.name("norm")))],
                       "/model/norm/SkipSLN", domain=MS, outputs=["/model/norm/output_0"], epsilon=a.rms_norm_eps)[0]
        # One LM head, on the last `logits_to_keep` positions only: an overridable initializer (a graph input with a
        # default of 1) so onnxruntime-genai, which does not feed it, gets the last position alone (see
        # LOGITS_TO_KEEP); our backend feeds 1, or S for every position.
        keep = g.init(LOGITS_TO_KEEP, np.array([1], dtype=np.int64))
        g.add_input(LOGITS_TO_KEEP, TensorProto.INT64, [1])
        y = self.lm_head(self.kept_rows(final, ids, mask, keep), self.lm_head_weights(), "kept")
        if p.float_dtype != np.float32:
            y = g.op("Cast", [y], "/lm_head/Cast", to=TensorProto.FLOAT)
        g.node("Identity", [y], "/lm_head/Identity", outputs=["logits"])
        g.add_output("logits", TensorProto.FLOAT, ["batch_size", 1, a.vocab_size])
        g.outputs.insert(0, g.outputs.pop())  # logits first, as in onnxruntime-genai's own models
        return self.rec

    def attention_inputs(self, ids: str, mask: str) -> tuple[str, str, str]:
        """(seqlens_k, total_sequence_length, attention_bias) for every GroupQueryAttention, from the mask.

        Each row's cache holds all `total_sequence_length` positions, padding included (the KV layout of a padded
        batch in transformers and optimum), so seqlens_k is total - 1 for every row; the mask's zeros become an
        additive bias on those keys, and the rotary angle of each token comes from `position_ids`. That makes a
        left- or right-padded row exact: GroupQueryAttention alone takes a row's length from seqlens_k and assumes
        its tokens start at cache slot 0, which left padding breaks (the mask-sum seqlens_k, this graph's
        earlier form, was off by up to 0.44 on the tiny model's padded row). Rotary positions follow the same
        layout (see POSITION_IDS). The bias is [batch, 1, S, total]: GroupQueryAttention broadcasts batch and heads
        but not the query positions."""
        g = self.g
        dt = self.plan.kv
        shape = g.op("Shape", [mask], "/model/attn_mask/Shape")
        total = g.op("Gather", [shape, g.const_i64(1)], "/model/attn_mask/Gather", axis=0)
        total_len = g.op("Cast", [total], "/model/attn_mask/total_seq_len", to=TensorProto.INT32)
        last = g.op("Cast", [g.op("Sub", [total, g.const_i64(1)], "/model/attn_mask/Sub")],
                    "/model/attn_mask/last", to=TensorProto.INT32)
        batch = g.op("Shape", [mask], "/model/attn_mask/batch", start=0, end=1)
        seqlens_k = g.op("Expand", [last, batch], "/model/attn_mask/seqlens_k")
        # half the dtype's lowest value: a score plus it stays finite, so a row with every key masked (a left pad's
        # own query) averages instead of dividing 0 by 0, and no NaN reaches the cache
        masked = g.init("/model/attn_mask/masked_value", np.array(np.finfo(dt).min / 2, dtype=dt))
        zero = g.init("/model/attn_mask/zero", np.array(0, dtype=dt))
        pad = g.op("Equal", [mask, g.const_i64(0)], "/model/attn_mask/Equal")
        bias = g.op("Where", [pad, masked, zero], "/model/attn_mask/Where")
        bias = g.op("Unsqueeze", [bias, g.const_i64([1, 2])], "/model/attn_mask/Unsqueeze")
        seq = g.op("Shape", [ids], "/model/attn_mask/seq", start=1, end=2)
        full = g.op("Concat", [batch, g.const_i64([1]), seq, g.op("Shape", [mask], "/model/attn_mask/total", start=1)],
                    "/model/attn_mask/bias_shape", axis=0)
        return seqlens_k, total_len, g.op("Expand", [bias, full], "/model/attn_mask/attention_bias")

    def kept_rows(self, final: str, ids: str, mask: str, keep: str) -> str:
        """The hidden states the LM head runs on: per row, the last n = logits_to_keep positions of this run (0, or
        more than the run's S: all S), ending at the row's last real token as far as the run allows. A run without
        trailing padding (any left-padded or unpadded row) ends at slot S - 1; a right-padded row (onnxruntime-genai
        pads a batch on the right) ends at its last real token, so the default n = 1 is that row's next-token
        logits and not its last pad's. Rows move by min(trailing pads, S - n): with n = S every slot, in order."""
        g = self.g
        seq = g.op("Shape", [ids], "/lm_head/keep/S", start=1, end=2)  # [1]
        n = g.op("Where", [g.op("Greater", [keep, g.const_i64([0])], "/lm_head/keep/Positive"),
                           g.op("Min", [keep, seq], "/lm_head/keep/Min"), seq], "/lm_head/keep/n")
        chunk = g.op("Slice", [mask, g.op("Neg", [seq], "/lm_head/keep/NegS"), g.const_i64([int(INT64_MAX)]),
                               g.const_i64([1])], "/lm_head/keep/chunk_mask")  # [B, S]: this run's columns
        s0 = g.op("Squeeze", [seq], "/lm_head/keep/S0")
        slots = g.op("Range", [g.const_i64(1), g.op("Add", [s0, g.const_i64(1)], "/lm_head/keep/S1"), g.const_i64(1)],
                     "/lm_head/keep/slots")  # 1..S: the last real slot scores highest
        last = g.op("ArgMax", [g.op("Cast", [g.op("Mul", [chunk, slots], "/lm_head/keep/Mul")], "/lm_head/keep/Cast",
                                    to=TensorProto.FLOAT)], "/lm_head/keep/last", axis=1, keepdims=1)  # [B, 1]
        s_minus_1 = g.op("Sub", [seq, g.const_i64([1])], "/lm_head/keep/Sm1")
        trailing = g.op("Sub", [s_minus_1, last], "/lm_head/keep/trailing")
        shift = g.op("Min", [trailing, g.op("Sub", [seq, n], "/lm_head/keep/room")], "/lm_head/keep/shift")
        j = g.op("Range", [g.op("Sub", [s0, g.op("Squeeze", [n], "/lm_head/keep/n0")], "/lm_head/keep/first"), s0,
                           g.const_i64(1)], "/lm_head/keep/j")  # S - n .. S - 1
        idx = g.op("Sub", [j, shift], "/lm_head/keep/idx")  # [B, n]
        full = g.op("Concat", [g.op("Shape", [idx], "/lm_head/keep/idx_shape"), g.const_i64([self.a.hidden_size])],
                    "/lm_head/keep/gather_shape", axis=0)
        idx3 = g.op("Expand", [g.op("Unsqueeze", [idx, g.const_i64([2])], "/lm_head/keep/Unsqueeze"), full],
                    "/lm_head/keep/Expand")
        return g.op("GatherElements", [final, idx3], "/lm_head/keep/Gather", axis=1)

    def rotary_caches(self) -> tuple[str, str]:
        a = self.a
        inv = 1.0 / (a.rope_theta ** (np.arange(0, a.head_dim, 2, dtype=np.float64) / a.head_dim))
        freqs = np.outer(np.arange(self.ctx, dtype=np.float64), inv)
        cos = self.g.init("cos_cache", np.cos(freqs).astype(self.plan.kv))  # GQA inputs: the attention's dtype
        sin = self.g.init("sin_cache", np.sin(freqs).astype(self.plan.kv))
        return cos, sin

    def embedding(self, ids: str) -> str:
        a, p, g = self.a, self.plan, self.g
        tied = a.tie_word_embeddings
        emb_bits = (p.lm_head_bits if tied else p.linear_bits) if p.quantize_embeddings else None
        if tied and p.lm_head_bits and p.quantize_embeddings:
            # Stored once: the LM head's MatMulNBits data, gathered by GatherBlockQuantized.
            self._head_q = self._quantized(f"lm_head.weight_Q{p.lm_head_bits}", self.names("embed_tokens"),
                                           p.lm_head_bits, self.head_block())
            self.rec.embedding = f"tied: GatherBlockQuantized on the int{p.lm_head_bits} LM head data"
            b, s, z, q = self._head_q
            # Views of the head's bytes, not the head's own initializers: onnxruntime prepacks the LM head and frees
            # its copy, while the Gather's view stays file-backed and only the gathered rows are ever paged in.
            view = g.alias("model.embed_tokens.weight_view", b, [q.n, q.blocks * q.blob])
            s = g.alias("model.embed_tokens.scales_view", s)
            z = g.alias("model.embed_tokens.zp_view", z) if z else ""
            return self._gather_quantized(ids, view, s, z, q)
        if tied and not p.lm_head_bits:
            # Stored once: a float table, gathered here and used by the LM head's Gemm (transB).
            self._head_f = self._float_table("model.embed_tokens.weight")
            self.rec.embedding = f"tied: one {p.float_name} table for Gather and the LM head Gemm"
            return g.op("Gather", [self._head_f, ids], "/model/embed_tokens/Gather", axis=0)
        if emb_bits:
            qd = self._quantized(f"model.embed_tokens.weight_Q{emb_bits}", self.names("embed_tokens"), emb_bits,
                                 flat=True)
            self.rec.embedding = f"{'tied, stored twice' if tied else 'untied'}: int{emb_bits} GatherBlockQuantized"
            return self._gather_quantized(ids, *qd)
        table = self._float_table("model.embed_tokens.weight")
        self.rec.embedding = (f"tied, stored twice: {p.float_name} Gather table beside the int{p.lm_head_bits} LM head"
                              if tied else f"untied: {p.float_name} Gather table")
        return g.op("Gather", [table, ids], "/model/embed_tokens/Gather", axis=0)

    def _gather_quantized(self, ids: str, b: str, s: str, z: str, q: QuantLayout) -> str:
        """GatherBlockQuantized over 2-D [N, blocks x blob] data (stored so: a Reshape of a weight would be
        constant-folded by onnxruntime into an anonymous copy of the whole table)."""
        y = self.g.op("GatherBlockQuantized", [b, ids, s] + ([z] if z else []), "/model/embed_tokens/GBQ", domain=MS,
                      bits=q.bits, block_size=q.block_size, gather_axis=0, quantize_axis=1)
        if q.blocks * q.block_size != q.k:
            y = self.g.op("Slice", [y, self.g.const_i64([0]), self.g.const_i64([q.k]), self.g.const_i64([-1])],
                          "/model/embed_tokens/Slice")
        return y

    def lm_head_weights(self):
        a, p = self.a, self.plan
        if a.tie_word_embeddings and getattr(self, "_head_q", None) is not None:
            return ("q", self._head_q)
        if a.tie_word_embeddings and getattr(self, "_head_f", None) is not None:
            return ("f", self._head_f)
        w = self.names("lm_head") or self.names("embed_tokens")
        if p.lm_head_bits:
            return ("q", self._quantized(f"lm_head.weight_Q{p.lm_head_bits}", w, p.lm_head_bits, self.head_block()))
        return ("f", self._float_table("lm_head.weight", w[0]))

    def lm_head(self, x: str, head, tag: str) -> str:
        g, a = self.g, self.a
        kind, w = head
        if kind == "q":
            b, s, z, q = w
            inputs = [x, b, s] + ([z] if z else [])
            return g.op("MatMulNBits", inputs, f"/lm_head/{tag}/MatMulNBits", domain=MS, K=q.k, N=q.n, bits=q.bits,
                        block_size=q.block_size, accuracy_level=self.plan.accuracy_level)
        flat = g.op("Reshape", [x, g.const_i64([-1, a.hidden_size])], f"/lm_head/{tag}/Reshape")
        y = g.op("Gemm", [flat, w], f"/lm_head/{tag}/Gemm", transB=1)
        shp = g.op("Concat", [g.op("Shape", [x], f"/lm_head/{tag}/Shape", start=0, end=2), g.const_i64([a.vocab_size])],
                   f"/lm_head/{tag}/Concat", axis=0)
        return g.op("Reshape", [y, shp], f"/lm_head/{tag}/Reshape2")

    def attention(self, i: int, h: str, attn_in: tuple[str, ...]) -> str:
        """One layer's attention; `attn_in`: seqlens_k, total_sequence_length, attention_bias, cos and sin caches,
        position_ids. Rotary runs before the attention (com.microsoft RotaryEmbedding at the fed positions), not
        inside it (see POSITION_IDS)."""
        a, g, p = self.a, self.g, self.plan
        pre = f"model.layers.{i}"
        w = self.names("qkv_proj", i)
        bias = self.names("qkv_proj.bias", i) or None
        qkv = self.linear(h, f"{pre}.attn.qkv_proj", w, bias, p.linear_bits)
        kv_shape = ["batch_size", a.num_kv_heads, "past_sequence_length", a.head_dim]
        past_k = g.add_input(f"past_key_values.{i}.key", p.kv_elem, kv_shape)
        past_v = g.add_input(f"past_key_values.{i}.value", p.kv_elem, kv_shape)
        cast = p.kv_elem != p.elem  # attention runs in the cache's dtype, between two Casts
        q, k, v = g.node("Split", [qkv, g.const_i64([a.q_size, a.kv_size, a.kv_size])], f"/{pre}/attn/qkv_split",
                         n_out=3, axis=-1)
        if a.qk_norm:
            q = self.head_norm(q, self.name("q_norm", i), a.num_heads, f"/{pre}/attn/q_norm")
            k = self.head_norm(k, self.name("k_norm", i), a.num_kv_heads, f"/{pre}/attn/k_norm")
        if cast:
            q, k, v = (g.op("Cast", [x], f"/{pre}/attn/Cast_{j}", to=p.kv_elem) for j, x in enumerate((q, k, v)))
        seqlens_k, total_len, attn_bias, cos, sin, pos = attn_in
        q, k = (g.op("RotaryEmbedding", [x, pos, cos, sin], f"/{pre}/attn/{n}_rotary", domain=MS, num_heads=heads,
                     interleaved=0) for x, n, heads in ((q, "q", a.num_heads), (k, "k", a.num_kv_heads)))
        present = [f"present.{i}.key", f"present.{i}.value"]
        out = g.node("GroupQueryAttention", [q, k, v, past_k, past_v, seqlens_k, total_len, "", "", "", attn_bias],
                     f"/{pre}/attn/GQA", domain=MS, outputs=[f"/{pre}/attn/GQA/output_0"] + present,
                     num_heads=a.num_heads, kv_num_heads=a.num_kv_heads, scale=float(a.head_dim ** -0.5),
                     do_rotary=0, local_window_size=-1)[0]
        if cast:
            out = g.op("Cast", [out], f"/{pre}/attn/Cast_out", to=p.elem)
        for name in present:
            g.add_output(name, p.kv_elem, ["batch_size", a.num_kv_heads, "total_sequence_length", a.head_dim])
        return self.linear(out, f"{pre}.attn.o_proj", self.names("o_proj", i), None, p.linear_bits)

    def head_norm(self, x: str, weight: str, heads: int, name: str) -> str:
        g, a = self.g, self.a
        r = g.op("Reshape", [x, g.const_i64([0, 0, heads, a.head_dim])], f"{name}/Reshape1")
        n = g.op("SimplifiedLayerNormalization", [r, self._float(weight, self.t(weight))], f"{name}/SLN",
                 axis=-1, epsilon=a.rms_norm_eps, stash_type=1)
        return g.op("Reshape", [n, g.const_i64([0, 0, heads * a.head_dim])], f"{name}/Reshape2")

    def mlp(self, i: int, h: str) -> str:
        a, g, p = self.a, self.g, self.plan
        pre = f"model.layers.{i}"
        gu = self.linear(h, f"{pre}.mlp.gate_up_proj", self.names("gate_up_proj", i), None, p.linear_bits)
        gate, up = g.node("Split", [gu, g.const_i64([a.intermediate_size, a.intermediate_size])], f"/{pre}/mlp/Split",
                          n_out=2, axis=-1)
        sig = g.op("Sigmoid", [gate], f"/{pre}/mlp/act/Sigmoid")
        act = g.op("Mul", [g.op("Mul", [gate, sig], f"/{pre}/mlp/act/Mul"), up], f"/{pre}/mlp/Mul")
        return self.linear(act, f"{pre}.mlp.down_proj", self.names("down_proj", i), None, p.linear_bits)

"""A fidelity checkpoint: a tiny Qwen briefly trained (deterministically) on the shipped text so its outputs are peaked."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .artifact import ArtifactWriter
from ..errors import NotAvailable, QwenEdgeError
from ..text.evaltext import eval_text

DEFAULT_STEPS = 100
SEQ_LEN = 128
BATCH = 8
LR = 1e-2


def training_token_stream(tokenizer: Any, text: dict[str, Any] | None = None) -> list[int]:
    """Every document and chat of the evaluation text, each followed by <|endoftext|>, as one id stream."""
    text = text or eval_text()
    eot = tokenizer.token_to_id("<|endoftext|>")
    out: list[int] = []
    for doc in text["documents"]:
        out += tokenizer.encode(doc["text"], parse_special=False) + [eot]
    for chat in text["chats"]:
        out += tokenizer.encode_chat(chat, add_generation_prompt=False) + [eot]
    return out


def fidelity_key(arch: str, seed: int, steps: int) -> str:
    """A hash of everything the trained weights depend on (this file, the text, the synth code, the options)."""
    h = hashlib.sha256(f"{arch}|{seed}|{steps}|{SEQ_LEN}|{BATCH}|{LR}".encode())
    pkg = Path(__file__).resolve().parent.parent
    for rel in ("model/train.py", "model/synth.py", "families/base.py", "families/qwen2.py", "families/qwen3.py",
                "data/eval_text.json"):
        h.update((pkg / rel).read_bytes())
    return h.hexdigest()[:16]


def _import_torch():
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise NotAvailable("training the fidelity checkpoint needs torch and transformers: "
                           "pip install 'qwen-edge[verify]'") from None
    return torch, AutoModelForCausalLM


def train_fidelity_checkpoint(out_dir: str | os.PathLike, arch: str = "tiny-qwen3-256", seed: int = 0,
                              steps: int = DEFAULT_STEPS, threads: int = 2, log: Any = None) -> Path:
    """Synthesize `arch`, train it on the evaluation text for `steps` steps, write a bf16 HF checkpoint dir.

    Deterministic for a given torch build and thread count: fixed seeds, deterministic algorithms, eager
    attention. The softmax, the embedding and head updates are restricted to the ids that occur in the text (a
    tiny model with the full 151,936-row table would spend its time there); the other ids keep their small random
    logits, so the trained distributions are peaked over the text's vocabulary. The default arch has 256-multiple
    rows, so every quantization applies to it as named (the verify gate is calibrated on it).
    """
    torch, AutoModelForCausalLM = _import_torch()
    from .checkpoint import expected_tensors
    from ..families import get_model
    from .safetensors_io import f32_to_bf16, write_safetensors
    from .synth import synth
    from ..text.tokenizer import Tokenizer

    spec = get_model(arch)
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="qwen-edge-fidelity-") as tmp:
        src = synth(arch, Path(tmp) / "synth", seed=seed)
        tok = Tokenizer.from_dir(src)
        stream = training_token_stream(tok)
        prev_threads = torch.get_num_threads()
        prev_det = torch.are_deterministic_algorithms_enabled()
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        try:
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager")
            model.train()
            losses = _train(torch, model, stream, steps, seed, log)
        finally:
            torch.set_num_threads(prev_threads)
            torch.use_deterministic_algorithms(prev_det)
        state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
        names = expected_tensors(spec.arch)
        missing = [n for n in names if n not in state]
        if missing:
            raise QwenEdgeError(f"{arch}: trained model lacks tensors {missing[:3]}")
        items = [(n, "BF16", names[n], f32_to_bf16(np.ascontiguousarray(state[n]))) for n in sorted(names)]
        with ArtifactWriter(out) as w:
            for f in src.iterdir():
                if f.name != "model.safetensors" and f.is_file():
                    shutil.copyfile(f, w.dir / f.name)
            meta = {"format": "pt", "qwen_edge_fidelity": arch, "seed": str(seed), "steps": str(steps),
                    "final_loss": f"{losses[-1]:.4f}", "tokens": str(len(stream))}
            write_safetensors(w.dir / "model.safetensors", items, metadata=meta)
            w.commit(None)
    return out


def _train(torch: Any, model: Any, stream: list[int], steps: int, seed: int, log: Any) -> list[float]:
    """AdamW on the text's vocabulary only: the embedding and head rows of the ids that occur in the text are
    trained as a small table (copied back into the full ones after), so a step costs the same whatever the
    vocabulary size; the other rows would get zero gradients and stay as they are anyway."""
    used = sorted(set(stream))
    remap = {t: i for i, t in enumerate(used)}
    sub_ids = torch.tensor([remap[t] for t in stream], dtype=torch.long)
    used_t = torch.tensor(used, dtype=torch.long)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = head is embed
    emb_sub = torch.nn.Parameter(embed.detach()[used_t].clone())
    head_sub = emb_sub if tied else torch.nn.Parameter(head.detach()[used_t].clone())
    skip = {id(embed), id(head)}
    params = [p for p in model.parameters() if id(p) not in skip] + [emb_sub] + ([] if tied else [head_sub])
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    n_windows = len(stream) - SEQ_LEN - 1
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        lr = LR * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, n_windows, (BATCH,), generator=gen).tolist()
        x = torch.stack([sub_ids[s:s + SEQ_LEN] for s in starts])
        y = torch.stack([sub_ids[s + 1:s + SEQ_LEN + 1] for s in starts])
        hidden = model.model(inputs_embeds=torch.nn.functional.embedding(x, emb_sub)).last_hidden_state
        logits = hidden @ head_sub.T
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, len(used)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if log is not None and (step % 50 == 0 or step == steps - 1):
            log(f"step {step:4d}  loss {losses[-1]:.3f}  {time.perf_counter() - t0:.0f}s")
    with torch.no_grad():
        embed[used_t] = emb_sub
        if not tied:
            head[used_t] = head_sub
    return losses

"""Runs inside the optimum virtualenv (tests/test_optimum.py builds it): opens qwen-edge ONNX artifacts as a Hugging
Face user does and prints what it saw as one JSON object on stdout.

    python optimum_check.py '{"artifacts": {"fp32": DIR, ...}, "prompt": [ids], "short": [ids], "new_tokens": N,
                              "text": "..."}'

Per artifact: whether the Qwen3 head_dim fix was applied (see below), the log lines optimum wrote while loading (a
"legacy" warning would be there), the graph's input names, greedy `generate` ids for `prompt`, the last-position
logits of `prompt` and `short` alone and as a left-padded batch of two (and that batch's greedy ids and every
step's logits), full-sequence logits of a right-padded batch, what `pipeline("text-generation")` returned for
`text`, and the chat template's ids for it as a user message. The pytest side compares these with qwen-edge's."""

from __future__ import annotations

import io
import json
import logging
import sys
import warnings


def main() -> None:
    req = json.loads(sys.argv[1])
    import numpy as np
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer, pipeline

    log = io.StringIO()
    handler = logging.StreamHandler(log)
    for name in ("optimum", "transformers"):
        logging.getLogger(name).addHandler(handler)
    from importlib.metadata import version

    out: dict = {"versions": {p: version(p) for p in ("optimum-onnx", "optimum", "transformers", "torch",
                                                       "onnxruntime")}}
    prompt, short, n_new = req["prompt"], req["short"], req["new_tokens"]
    for label, path in req["artifacts"].items():
        log.seek(0), log.truncate()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = ORTModelForCausalLM.from_pretrained(path)
        r: dict = {"load_log": log.getvalue().splitlines() + [str(w.message) for w in caught],
                   "inputs": sorted(model.input_names)}
        head_dim = getattr(model.config, "head_dim", None)
        r["head_dim_fix"] = bool(head_dim and model.embed_size_per_head != head_dim)
        if r["head_dim_fix"]:
            # optimum-onnx 0.1.0 sizes the first (empty) cache hidden_size / num_attention_heads wide, not head_dim
            # (Qwen3 states head_dim; 0.6B: 128, not 64): the README's one-line fix for Qwen3
            model.embed_size_per_head = head_dim
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        # greedy as qwen-edge decodes it: the artifact's generation_config.json (the source's) may sample or penalize
        gen = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, repetition_penalty=1.0,
                   pad_token_id=pad)
        ones = torch.ones(1, len(prompt), dtype=torch.long)
        r["greedy"] = model.generate(torch.tensor([prompt]), attention_mask=ones, **gen)[0, len(prompt):].tolist()

        def last_logits(ids, mask):
            with torch.no_grad():
                return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, -1].numpy()

        alone = [last_logits([p], [[1] * len(p)])[0] for p in (prompt, short)]
        width = max(len(prompt), len(short))
        left = [[pad] * (width - len(p)) + p for p in (prompt, short)]
        left_mask = [[0] * (width - len(p)) + [1] * len(p) for p in (prompt, short)]
        batch = last_logits(left, left_mask)
        r["left_batch_max_diff"] = float(max(np.abs(batch[i] - alone[i]).max() for i in range(2)))
        r["left_batch_argmax"] = [int(x.argmax()) for x in batch]
        r["alone_argmax"] = [int(x.argmax()) for x in alone]
        # greedy generate on the batch and on each prompt alone: ids, and every step's scores (logits) compared
        scored = dict(gen, output_scores=True, return_dict_in_generate=True)
        b = model.generate(torch.tensor(left), attention_mask=torch.tensor(left_mask), **scored)
        r["left_batch_greedy"] = b.sequences[:, width:].tolist()
        r["alone_greedy"], diffs = [], []
        for i, p in enumerate((prompt, short)):
            a = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), **scored)
            r["alone_greedy"].append(a.sequences[0, len(p):].tolist())
            for sb, sa in zip(b.scores, a.scores):  # min_new_tokens sets the stop ids' scores to -inf on both sides
                sa, sb = sa[0].numpy(), sb[i].numpy()
                diffs.append(float(np.abs(np.where(np.isfinite(sa), sb - sa, 0)).max()))
        r["left_batch_decode_max_diff"] = max(diffs)
        # a right-padded batch through the session with logits_to_keep = 0: every position's logits, row by row as
        # each prompt gets them alone
        def full_logits(rows, mask):
            feeds = {"input_ids": np.array(rows), "attention_mask": np.array(mask),
                     "position_ids": np.maximum(np.cumsum(mask, 1) - 1, 0), "logits_to_keep": np.array([0])}
            for i in model.session.get_inputs():
                if i.name.startswith("past_key_values"):
                    feeds[i.name] = np.zeros((len(rows), i.shape[1], 0, i.shape[3]),
                                             dtype=np.float16 if "16" in i.type else np.float32)
            return model.session.run(["logits"], feeds)[0]

        right = [p + [pad] * (width - len(p)) for p in (prompt, short)]
        full = full_logits(right, [[1] * len(p) + [0] * (width - len(p)) for p in (prompt, short)])
        r["right_full_shape"] = list(full.shape)
        r["right_full_max_diff"] = float(max(np.abs(full[i, :len(p)] - full_logits([p], [[1] * len(p)])[0]).max()
                                             for i, p in enumerate((prompt, short))))
        tok = AutoTokenizer.from_pretrained(path)
        pipe = pipeline("text-generation", model=model, tokenizer=tok)
        r["pipeline_text"] = pipe(req["text"], **gen)[0]["generated_text"]
        r["pipeline_ids"] = list(pipe(req["text"], return_tensors=True, **gen)[0]["generated_token_ids"])
        r["text_ids"] = tok(req["text"], add_special_tokens=False)["input_ids"]
        r["chat_ids"] = list(tok.apply_chat_template([{"role": "user", "content": req["text"]}], tokenize=True,
                                                     add_generation_prompt=True))
        out[label] = r
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Peer side of bench/extraction.py: per-text mean residual at every layer, with one library.

Run with a peer environment's python; see common.py for the protocol. Spec keys:

- ``library``: ``transformer-lens`` (HookedTransformer.run_with_cache), ``transformer-lens-4``
  (TransformerBridge.run_with_cache) or ``nnsight`` (a trace saving every layer's output);
- ``model_dir``: a plain Hugging Face folder; ``threads``;
- ``batches``: the benchmark's batches, each a list of token-id lists (the same grouping
  emoscope uses); ``starts``: for each batch, the first position of each text that enters its
  mean (the mean runs from there to the text's last token);
- ``warmup_batches``, ``warmup_starts``: a small piece of the same, for the untimed first run;
- ``out``: where ``finish`` writes the means, ``[texts in batch order, layers, hidden]``.

Batches are padded on the right: with causal attention, padding after a text's last token
cannot change that text's activations, and position ids need no correction. Building the padded
tensors, the forward pass and the per-text means are all inside the timed work.
"""

from __future__ import annotations

from typing import Any

import torch
from common import load_hf, serve


def padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def mean_weights(rows: list[list[int]], starts: list[int], width: int) -> torch.Tensor:
    """``[batch, width, 1]`` averaging weights: 1/n on positions start..len-1 of each row."""
    column = torch.arange(width).unsqueeze(0)
    start = torch.tensor(starts).unsqueeze(1)
    end = torch.tensor([len(r) for r in rows]).unsqueeze(1)
    weights = ((column >= start) & (column < end)).float()
    return (weights / weights.sum(dim=1, keepdim=True)).unsqueeze(-1)


def means_of(hidden: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Per-layer ``[batch, pos, hidden]`` activations -> ``[batch, layers, hidden]`` means."""
    return torch.stack([(h.float() * weights).sum(dim=1) for h in hidden], dim=1)


def setup_transformer_lens(spec: dict[str, Any]) -> Any:
    """HookedTransformer for a Llama-family folder that TransformerLens does not list by name.

    ``HookedTransformer.from_pretrained`` accepts only names in OFFICIAL_MODEL_NAMES, and
    SmolLM2 is not one of them. Its own loading functions do accept a local folder, though:
    ``get_pretrained_model_config`` reads ``config.json`` (LlamaForCausalLM -> rotary, RMSNorm,
    gated MLP, grouped-query attention, rotary base from ``rope_parameters``) and
    ``get_pretrained_state_dict`` converts the weights of an already-loaded HF model with
    ``convert_llama_weights``. This is what ``from_pretrained`` itself does after resolving the
    name. No weight processing (no LayerNorm folding, no centering), so ``hook_resid_post`` is
    the block output exactly as in the HF model.
    """
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    hf_model, tokenizer = load_hf(spec["model_dir"])
    cfg = loading.get_pretrained_model_config(
        spec["model_dir"], fold_ln=False, device="cpu", dtype=torch.float32
    )
    state_dict = loading.get_pretrained_state_dict(
        spec["model_dir"], cfg, hf_model, dtype=torch.float32
    )
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model.eval()
    del hf_model
    n_layers = cfg.n_layers
    names = {f"blocks.{i}.hook_resid_post" for i in range(n_layers)}

    def forward(ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        _, cache = model.run_with_cache(
            ids, attention_mask=mask, return_type=None, names_filter=lambda n: n in names
        )
        return [cache[f"blocks.{i}.hook_resid_post"] for i in range(n_layers)]

    return forward, tokenizer.pad_token_id or 0


def setup_transformer_lens_4(spec: dict[str, Any]) -> Any:
    """TransformerLens 4 has no HookedTransformer; TransformerBridge wraps the HF model itself.

    ``boot_transformers`` takes a local folder (and switches the model to eager attention, so
    its hooks can see attention patterns).
    """
    from transformer_lens.model_bridge import TransformerBridge

    _, tokenizer = load_hf(spec["model_dir"])
    bridge = TransformerBridge.boot_transformers(
        spec["model_dir"], device="cpu", dtype=torch.float32, tokenizer=tokenizer
    )
    bridge.eval()
    n_layers = bridge.cfg.n_layers
    names = {f"blocks.{i}.hook_resid_post" for i in range(n_layers)}

    def forward(ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        _, cache = bridge.run_with_cache(
            ids, attention_mask=mask, return_type=None, names_filter=lambda n: n in names
        )
        return [cache[f"blocks.{i}.hook_resid_post"] for i in range(n_layers)]

    return forward, tokenizer.pad_token_id or 0


def setup_nnsight(spec: dict[str, Any]) -> Any:
    """nnsight wrapping the loaded HF model; one trace saves every decoder layer's output.

    The trace stops right after the last layer (``tracer.stop()``), so the LM head is skipped,
    as it is by emoscope and by the other peers.
    """
    from nnsight import TransformersModel

    hf_model, tokenizer = load_hf(spec["model_dir"])
    model = TransformersModel(hf_model, tokenizer=tokenizer)
    layers = model.model.layers
    n_layers = len(hf_model.model.layers)

    def forward(ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        saved: list[Any] = []  # created outside: names first bound in the block are lost on stop
        with model.trace({"input_ids": ids, "attention_mask": mask}) as tracer:
            for i in range(n_layers):
                out = layers[i].output
                saved.append((out[0] if isinstance(out, tuple) else out).save())
            tracer.stop()
        return [s.value if hasattr(s, "value") else s for s in saved]

    return forward, tokenizer.pad_token_id or 0


SETUPS = {
    "transformer-lens": setup_transformer_lens,
    "transformer-lens-4": setup_transformer_lens_4,
    "nnsight": setup_nnsight,
}


def main() -> None:
    def setup(spec: dict[str, Any]) -> dict[str, Any]:
        forward, pad_id = SETUPS[spec["library"]](spec)
        return {"forward": forward, "pad_id": pad_id, "spec": spec}

    def run(state: dict[str, Any], batches: list, starts: list) -> list[torch.Tensor]:
        out = []
        with torch.inference_mode():
            for rows, first in zip(batches, starts):
                ids, mask = padded(rows, state["pad_id"])
                hidden = state["forward"](ids, mask)
                out.append(means_of(hidden, mean_weights(rows, first, ids.shape[1])))
        return out

    def work(state: dict[str, Any]) -> list[torch.Tensor]:
        return run(state, state["spec"]["batches"], state["spec"]["starts"])

    def warmup(state: dict[str, Any]) -> list[torch.Tensor]:
        spec = state["spec"]
        return run(
            state,
            spec.get("warmup_batches", spec["batches"]),
            spec.get("warmup_starts", spec["starts"]),
        )

    def finish(state: dict[str, Any], result: list[torch.Tensor]) -> dict[str, Any]:
        means = torch.cat(result)
        torch.save(means, state["spec"]["out"])
        return {"shape": list(means.shape)}

    serve(setup, work, finish, warmup)


if __name__ == "__main__":
    main()

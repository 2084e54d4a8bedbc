"""Peer side of bench/steering.py: steered greedy generation with one library.

Run with a peer environment's python; see common.py for the protocol. Spec keys:

- ``library``: ``repeng`` (ControlModel + a ControlVector built directly from the given
  directions, no training) or ``steering-vectors`` (SteeringVector applied as a context manager
  around ``model.generate``);
- ``model_dir``, ``threads``;
- ``prompts``: chat-formatted prompts as token-id lists (emoscope's tokenisation), all decoded as
  one left-padded batch;
- ``layers`` and ``vector``: the same vector is added to the output of each of these decoder
  blocks (index ``i`` = output of block ``i``, which is where both libraries add);
- ``max_new_tokens``: generated for every row, EOS ignored (the generation config's EOS is
  removed, so an EOS is just another token, as with emoscope's ``stop_at_eos=False``).

The timed work is padding the batch and ``model.generate`` (greedy) under the steering;
``finish`` returns each row's new token ids.
"""

from __future__ import annotations

from typing import Any

import torch
from common import load_hf, serve


def left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def setup_repeng(model: Any, layers: list[int], vector: torch.Tensor) -> Any:
    """repeng wraps each chosen block in a ControlModule that adds the control to its output."""
    import numpy as np
    from repeng import ControlModel, ControlVector

    controlled = ControlModel(model, layers)
    directions = {layer: np.asarray(vector.numpy(), dtype=np.float32) for layer in layers}
    controlled.set_control(ControlVector(model.config.model_type, directions), coeff=1.0)

    def generate(**kwargs: Any) -> torch.Tensor:
        return controlled.generate(**kwargs)

    return generate


def setup_steering_vectors(model: Any, layers: list[int], vector: torch.Tensor) -> Any:
    """steering-vectors hooks the output of each chosen decoder block while the context is open."""
    from steering_vectors import SteeringVector

    steering = SteeringVector(
        layer_activations={layer: vector.clone() for layer in layers}, layer_type="decoder_block"
    )

    def generate(**kwargs: Any) -> torch.Tensor:
        with steering.apply(model, multiplier=1.0):
            return model.generate(**kwargs)

    return generate


SETUPS = {"repeng": setup_repeng, "steering-vectors": setup_steering_vectors}


def main() -> None:
    def setup(spec: dict[str, Any]) -> dict[str, Any]:
        model, tokenizer = load_hf(spec["model_dir"])
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # Generate exactly max_new_tokens whatever the model picks: no EOS at all.
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = pad_id
        vector = torch.tensor(spec["vector"], dtype=torch.float32)
        generate = SETUPS[spec["library"]](model, list(spec["layers"]), vector)
        width = max(len(row) for row in spec["prompts"])
        return {"spec": spec, "generate": generate, "pad_id": pad_id, "width": width}

    def run(state: dict[str, Any], new_tokens: int) -> torch.Tensor:
        ids, mask = left_padded(state["spec"]["prompts"], state["pad_id"])
        with torch.inference_mode():
            return state["generate"](
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=state["pad_id"],
            )

    def work(state: dict[str, Any]) -> torch.Tensor:
        return run(state, state["spec"]["max_new_tokens"])

    def warmup(state: dict[str, Any]) -> torch.Tensor:
        return run(state, 4)

    def finish(state: dict[str, Any], result: torch.Tensor) -> dict[str, Any]:
        return {"tokens": result[:, state["width"] :].tolist()}

    serve(setup, work, finish, warmup)


if __name__ == "__main__":
    main()

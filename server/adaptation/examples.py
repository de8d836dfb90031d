"""How an edit becomes a training batch; the server, fine-tuning jobs and the bench share it."""

from __future__ import annotations

import torch

# How an edit becomes training examples; the benchmark replays edits with the same builder.
EDIT_MAX_TOKENS = 256
EDIT_MAX_EXAMPLES = 4
# Share of edits (with text after them) trained as fill-in-the-middle prompts. An IDE asks
# for completions inside documents, so FIM is most of what is served; the rest stays
# prefix-only for completions at the end of a file and plain /v1/completions prompts.
EDIT_FIM_RATIO = 0.75


def edit_example_builder(tokenizer, max_tokens: int = EDIT_MAX_TOKENS, max_examples: int = EDIT_MAX_EXAMPLES):
    from code_signals import ExampleBuilder

    return ExampleBuilder(tokenizer, max_tokens=max_tokens, max_examples=max_examples, fim_ratio=EDIT_FIM_RATIO)



def example_batch(example) -> dict:
    """One TrainingExample as a batch of one row (examples differ in length)."""
    return {
        "input_ids": torch.tensor([list(example.input_ids)], dtype=torch.long),
        "loss_weights": torch.tensor([list(example.loss_weights)], dtype=torch.float32),
        "token_classes": torch.tensor([[int(c) for c in example.token_classes]], dtype=torch.long),
        "example_weights": torch.tensor([example.weight], dtype=torch.float32),
        "task": getattr(example, "edit_type", None),
    }

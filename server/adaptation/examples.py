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
DOCUMENT_CHUNKS = 4  # chunks of a newly opened document that join its session's replay buffer


def edit_example_builder(tokenizer, max_tokens: int = EDIT_MAX_TOKENS, max_examples: int = EDIT_MAX_EXAMPLES):
    from code_signals import ExampleBuilder

    return ExampleBuilder(tokenizer, max_tokens=max_tokens, max_examples=max_examples, fim_ratio=EDIT_FIM_RATIO)



def document_examples(builder, text: str, path: str | None, language: str | None = None) -> list:
    """Examples of an opened document's first chunks: its identifiers and style (replayed at low weight)."""
    return builder.from_file(text, path=path, language=language, max_examples=DOCUMENT_CHUNKS)


def example_batch(example, device=None) -> dict:
    """One TrainingExample as a batch of one row."""
    return examples_batch([example], device)


def examples_batch(examples, device=None) -> dict:
    """TrainingExamples as a batch, one row each, right-padded (padding: attention mask 0, weight 0),
    on ``device`` (the model's; default the CPU). Weights stay float32 whatever the model's dtype.

    The task is the first example's (the new edit's; replayed rows follow it).
    """
    width = max(len(ex.input_ids) for ex in examples)

    def rows(values, pad, dtype):
        return torch.tensor([list(v) + [pad] * (width - len(v)) for v in values], dtype=dtype, device=device)

    return {
        "input_ids": rows((ex.input_ids for ex in examples), 0, torch.long),
        "attention_mask": rows(([1] * len(ex.input_ids) for ex in examples), 0, torch.long),
        "loss_weights": rows((ex.loss_weights for ex in examples), 0.0, torch.float32),
        "token_classes": rows(([int(c) for c in ex.token_classes] for ex in examples), 0, torch.long),
        "example_weights": torch.tensor([ex.weight for ex in examples], dtype=torch.float32, device=device),
        "task": getattr(examples[0], "edit_type", None),
    }

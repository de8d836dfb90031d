"""The model as ``dynarank serve`` loads it on this CPU, for the benchmarks that time the serving path."""

from __future__ import annotations


def load_served_model(name: str, dtype: str, threads: int, progress: bool = True):
    """``(model, tokenizer, precision)``: ``name`` (embedded name or directory) at ``dtype`` as the server
    resolves it on the CPU, with torch set to ``threads`` threads."""
    import torch

    from server.devices import resolve_dtype
    from server.models import load_serving_model, resolve_model

    torch.set_num_threads(threads)
    precision = resolve_dtype(dtype, torch.device("cpu"))
    model, tokenizer = load_serving_model(resolve_model(name, progress=progress), precision)
    return model, tokenizer, precision

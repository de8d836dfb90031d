"""``--device`` / ``--dtype`` (server/devices.py, Settings, `dynarank serve`) and the serve and adapt
paths on a bfloat16 model: every tensor follows the model's device and dtype, persistence goes
through the CPU. CUDA variants and the stream tests carry the ``gpu`` marker (scripts/gpu-check)."""

from __future__ import annotations

import itertools
import statistics
import subprocess
import sys
import threading
import time

import pytest
import torch
from pydantic import ValidationError

from server import cli, devices
from server.config import Settings
from server.devices import DeviceError, load_dtype, resolve_device, resolve_dtype, serving_stream, training_stream
from tests.conftest import build_tiny_model
from tests.helpers import free_port

CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for an absent CUDA device")
CODE = "def area(width, height):\n    return width * height\n\n\ndef perimeter(width, height):\n    return 2 * ("


def fake_cuda(monkeypatch, count: int, bf16: bool = True) -> None:
    """A machine whose torch was built with CUDA and that sees ``count`` devices."""
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)


# -- resolving --device and --dtype --------------------------------------------------------------


def test_cpu_and_auto_resolve_on_this_machine():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:x", "cuda:0:1", "mps", "", "cpu:0"])
def test_malformed_device_names_the_accepted_forms(text):
    with pytest.raises(DeviceError, match=r"unknown device .*: use auto, cpu, cuda or cuda:N"):
        resolve_device(text)


@no_cuda
def test_cuda_on_this_machine_is_a_clear_error():
    with pytest.raises(DeviceError, match=r"^cuda requested but "):
        resolve_device("cuda")


def test_cuda_index_beyond_the_visible_devices(monkeypatch):
    fake_cuda(monkeypatch, 1)
    with pytest.raises(DeviceError) as err:
        resolve_device("cuda:1")
    assert str(err.value) == "cuda:1 requested but only 1 CUDA device is visible"
    assert resolve_device("cuda:0") == resolve_device("cuda") == resolve_device("auto") == torch.device("cuda", 0)
    fake_cuda(monkeypatch, 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="only 2 CUDA devices are visible"):
        resolve_device("cuda:2")


def test_cuda_build_without_a_visible_device(monkeypatch):
    fake_cuda(monkeypatch, 0)
    with pytest.raises(DeviceError, match=r"^cuda:0 requested but no CUDA device is visible"):
        resolve_device("cuda:0")
    assert resolve_device("auto") == torch.device("cpu")


def test_dtypes(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    for name in ("float32", "bfloat16", "float16"):
        assert resolve_dtype(name, cpu) == resolve_dtype(name.upper(), gpu) == name
        assert load_dtype(name) == getattr(torch, name)
    assert resolve_dtype("auto", cpu) == resolve_dtype("int8", cpu) == "int8"  # measured fastest on this CPU
    assert load_dtype("int8") == torch.float32  # the int8 copies come beside the float32 weights
    with pytest.raises(DeviceError, match="^int8 is for the CPU"):
        resolve_dtype("int8", gpu)
    monkeypatch.setattr(devices, "CPU_AUTO_DTYPE", "bfloat16")  # were bfloat16 the CPU choice:
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", cpu) == "bfloat16"
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", cpu) == "float32"  # no emulated bfloat16 on the CPU
    fake_cuda(monkeypatch, 1, bf16=True)
    assert resolve_dtype("auto", gpu) == "bfloat16"
    fake_cuda(monkeypatch, 1, bf16=False)
    assert resolve_dtype("auto", gpu) == "float16"
    with pytest.raises(DeviceError, match="unknown dtype 'float64': use auto, float32, bfloat16, float16, int8"):
        resolve_dtype("float64", cpu)


# -- Settings and `dynarank serve` ---------------------------------------------------------------


def test_settings_fields(monkeypatch):
    assert (Settings().device, Settings().dtype) == ("auto", "auto")
    assert Settings(device=" CPU ", dtype="BFloat16").model_dump(include={"device", "dtype"}) == {
        "device": "cpu", "dtype": "bfloat16"}
    with pytest.raises(ValidationError, match="unknown device 'gpu'"):
        Settings(device="gpu")
    with pytest.raises(ValidationError, match="dtype"):
        Settings(dtype="float64")
    fake_cuda(monkeypatch, 1)
    assert Settings(device="cuda:0").device == "cuda:0"
    with pytest.raises(ValidationError, match="int8 is for the CPU"):
        Settings(device="cuda:0", dtype="int8")
    assert Settings(device="cpu", dtype="INT8").dtype == "int8"
    with pytest.raises(ValidationError, match="cuda:1 requested but only 1 CUDA device is visible"):
        Settings(device="cuda:1")


@no_cuda
def test_serve_on_an_absent_device_exits_2_naming_the_flag():
    result = subprocess.run([sys.executable, "-m", "server", "serve", "--device", "cuda", "--port", str(free_port())],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("dynarank serve: error: argument --device: cuda requested but "), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_absent_device_from_the_environment_names_the_variable(monkeypatch, capsys):
    fake_cuda(monkeypatch, 1)
    monkeypatch.setenv("DYNARANK_DEVICE", "cuda:3")
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "dynarank serve: error: environment DYNARANK_DEVICE: cuda:3 requested but only 1 CUDA device is visible"


@pytest.mark.parametrize("device", DEVICES)
def test_load_model_reads_weights_in_the_dtype_onto_the_device(tiny_dir, device):
    from server.models import load_model

    model, _ = load_model(tiny_dir, dtype=torch.bfloat16, device=torch.device(device))
    assert {(p.dtype, p.device.type) for p in model.parameters()} == {(torch.bfloat16, device)}
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    default, _ = load_model(tiny_dir)
    assert {(p.dtype, p.device.type) for p in default.parameters()} == {(torch.float32, "cpu")}


# -- the adapt and serve paths on a bfloat16 model ------------------------------------------------


def bf16_model(tokenizer, device):
    return build_tiny_model("llama", len(tokenizer)).to(device=device, dtype=torch.bfloat16)


def example(tokenizer, weight: float = 1.0):
    from code_signals.examples import TrainingExample

    ids = tokenizer(CODE)["input_ids"]
    half = len(ids) // 2
    return TrainingExample(input_ids=ids, loss_weights=[0.0] * half + [1.0] * (len(ids) - half),
                           token_classes=[0] * len(ids), edit_type="new_code", path="geometry.py",
                           language="python", weight=weight)


@pytest.mark.parametrize("device", DEVICES)
def test_examples_batch_is_on_the_device(tokenizer, device):
    from server.adaptation.examples import example_batch, examples_batch

    short = example(tokenizer)
    short.input_ids, short.loss_weights, short.token_classes = (v[:5] for v in
                                                                 (short.input_ids, short.loss_weights, short.token_classes))
    batch = examples_batch([example(tokenizer, 3.0), short], device=device)
    tensors = {k: v for k, v in batch.items() if torch.is_tensor(v)}
    assert set(tensors) == {"input_ids", "attention_mask", "loss_weights", "token_classes", "example_weights"}
    assert {v.device.type for v in tensors.values()} == {device}
    assert (batch["loss_weights"].dtype, batch["example_weights"].dtype) == (torch.float32, torch.float32)
    assert batch["attention_mask"][1].tolist() == [1] * 5 + [0] * (batch["input_ids"].shape[1] - 5)
    assert batch["example_weights"].tolist() == [3.0, 1.0]
    assert example_batch(short, device)["input_ids"].device.type == device


@pytest.mark.parametrize("device", DEVICES)
def test_adapt_and_generate_on_a_bf16_model(tokenizer, device):
    from adapter_core import LoraLinear, new_session_adapter
    from server.adaptation.learner import adapt_on_example
    from server.engines.base import GenerationRequest
    from server.engines.hf import HFEngine

    model = bf16_model(tokenizer, device)
    adapter, policy = new_session_adapter(model)
    with training_stream(device):
        stats, snap = adapt_on_example(model, adapter, policy, example(tokenizer))
    assert not stats.skipped and snap is not None
    assert {(t.dtype, t.device.type) for t in (*snap.A.values(), *snap.B.values())} == {(torch.float32, device)}

    seen = []
    lora = next(m for m in model.modules() if isinstance(m, LoraLinear))
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((out.dtype, out.device.type)))
             for m in (lora, model.get_output_embeddings())]
    engine = HFEngine(model, tokenizer, "tiny")
    try:
        greedy = list(engine.generate(GenerationRequest(prompt=CODE, max_tokens=4), snap))
        # A prompt ending mid-identifier is healed: the engine masks the logits to the allowed tokens.
        sampled = list(engine.generate(GenerationRequest(prompt="def perim", max_tokens=4, temperature=0.8, seed=1),
                                       snap))
    finally:
        for hook in hooks:
            hook.remove()
    assert sum(len(c.token_ids) for c in greedy) == 4 and sampled[-1].finish_reason is not None
    assert seen and set(seen) == {(torch.bfloat16, device)}  # LoRA adds in the base's dtype; bf16 logits


@pytest.mark.parametrize("device", DEVICES)
def test_job_checkpoint_saves_from_and_restores_to_the_adapter_device(tokenizer, device, tmp_path):
    from adapter_core import new_session_adapter, train_step
    from server.adaptation import job_checkpoint
    from server.adaptation.examples import example_batch

    model = bf16_model(tokenizer, device)
    adapter, policy = new_session_adapter(model)
    train_step(model, adapter, example_batch(example(tokenizer), device), policy)
    job_checkpoint.save(tmp_path, "ftjob-1", adapter, policy, {"step": 1})
    ckpt = job_checkpoint.load(tmp_path, "ftjob-1")
    assert {t.device.type for t in ckpt.optimizer.values()} == {"cpu"}
    resumed, _ = new_session_adapter(model, snapshot=ckpt.snapshot, policy_state=ckpt.policy_state)
    job_checkpoint.restore_optimizer(resumed, ckpt.optimizer)
    moments = [v for p in resumed.parameters() for k, v in resumed.optimizer.state[p].items() if k != "step"]
    assert moments and {(v.dtype, v.device.type) for v in moments} == {(torch.float32, device)}
    stats = train_step(model, resumed, example_batch(example(tokenizer), device), policy)  # AdamW accepts them
    assert not stats.skipped


@pytest.mark.parametrize("device", DEVICES)
def test_store_writes_through_the_cpu_and_loads_onto_its_device(tokenizer, device, tmp_path):
    from adapter_core import new_session_adapter
    from server.store import AdapterStore

    adapter, _ = new_session_adapter(bf16_model(tokenizer, device))
    snap = adapter.snapshot()
    AdapterStore(tmp_path, "tiny").save(None, "demo", snap)
    on_cpu = AdapterStore(tmp_path, "tiny").load(None, "demo")
    placed = AdapterStore(tmp_path, "tiny", device=torch.device(device)).load(None, "demo")
    assert {t.device.type for t in on_cpu.A.values()} == {"cpu"}
    assert {(t.dtype, t.device.type) for t in placed.A.values()} == {(torch.float32, device)}
    assert placed.metadata["lineage"] == on_cpu.metadata["lineage"]
    for name in snap.modules:
        torch.testing.assert_close(placed.delta(name), snap.delta(name))


def test_streams_are_no_ops_off_cuda():
    with training_stream("cpu"), serving_stream(torch.device("cpu")):
        assert torch.ones(2).sum().item() == 2.0


# -- CUDA only -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_runs_below_serving_on_streams_of_their_own():
    device = resolve_device("cuda")
    default = torch.cuda.current_stream(device)
    with training_stream(device):
        training = torch.cuda.current_stream(device)
    with serving_stream(device):
        serving = torch.cuda.current_stream(device)
    assert training != default and serving != default and training != serving
    assert serving.priority < training.priority  # lower number: scheduled first


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_publishing_during_a_generation_does_not_stall_it(tokenizer):
    """Token gaps of a generation while another thread publishes versions (clones on the training
    stream, as after each step) stay within 1 ms (p95) of the gaps of the same generation alone."""
    from adapter_core import new_session_adapter
    from server.engines.base import GenerationRequest
    from server.engines.hf import HFEngine

    device = resolve_device("cuda")
    model = bf16_model(tokenizer, device)
    adapter, _ = new_session_adapter(model)
    engine = HFEngine(model, tokenizer, "tiny")
    serving = adapter.snapshot(bump=False)
    request = GenerationRequest(prompt=CODE, max_tokens=200)

    def gaps() -> list[float]:
        stamps = [time.perf_counter() for chunk in engine.generate(request, serving) if chunk.token_ids]
        return [b - a for a, b in itertools.pairwise(stamps)]

    gaps()  # warm-up: kernels, allocator
    alone = gaps()
    stop, published = threading.Event(), []

    def publish() -> None:
        while not stop.is_set():
            with training_stream(device):
                published.append(adapter.snapshot())
            stop.wait(0.002)  # a server publishes once per train step, not back to back

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    try:
        loaded = gaps()
    finally:
        stop.set()
        thread.join(timeout=120)
    assert len(published) >= 2, "versions must be published during the generation"
    p95_alone, p95_loaded = (statistics.quantiles(xs, n=20)[-1] for xs in (alone, loaded))
    assert p95_loaded <= p95_alone + 1e-3, (p95_alone, p95_loaded)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_vllm_greedy_parity_on_cuda(smollm2_path, tmp_path):
    """The hf engine and vLLM on the same GPU, same fp32 weights and adapter: the same greedy tokens."""
    from server.engines.vllm.options import vllm_available

    if not vllm_available():
        pytest.skip("vLLM is not installed (dynarank install-vllm)")
    from adapter_core import inject_adapters
    from bench.bench_engines import hetero_snapshot
    from server.engines.base import GenerationRequest
    from server.engines.hf import HFEngine
    from server.engines.vllm.engine import VLLMEngine
    from server.models import load_model

    device = resolve_device("cuda")
    model, tokenizer = load_model(smollm2_path, dtype=torch.float32, device=device)
    snap = hetero_snapshot(inject_adapters(model), version=1).to(device)
    hf = HFEngine(model, tokenizer, "smollm2-135m")
    vllm = VLLMEngine(smollm2_path, tokenizer, "smollm2-135m", data_dir=tmp_path, r_max=16, max_loras=2,
                      max_model_len=1024, max_num_seqs=4, kv_cache_gib=1, dtype="float32",
                      gpu_memory_utilization=0.3)
    try:
        assert vllm.wait_loaded(snap)
        request = GenerationRequest(prompt="def fibonacci(n):", max_tokens=32)
        for adapter in (None, snap):
            h = [t for c in hf.generate(request, adapter) for t in c.token_ids]
            v = [t for c in vllm.generate(request, adapter) for t in c.token_ids]
            agree = next((i for i, (x, y) in enumerate(zip(h, v)) if x != y), min(len(h), len(v)))
            assert agree >= 24, (adapter is not None, agree, h, v)
    finally:
        vllm.close()

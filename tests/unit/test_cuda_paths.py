"""Every CUDA-only branch of the package, run on this CPU-only build (tests/fake_cuda.py says how):
Inductor lowering of branches traced on CPU tensors, dtype flow on fake CUDA tensors, and the
policies under faked device properties (sm70, sm75, sm80, sm89, sm90)."""

from __future__ import annotations

import datetime
import importlib.util
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity

from gpt2repro import checkpoint, fp8, loss, metrics, parallel, profiling, settings
from gpt2repro import distributed as D
from gpt2repro.config import TrainConfig
from gpt2repro.data import to_device
from gpt2repro.devices import GiB
from gpt2repro.engine import make_scaler
from gpt2repro.errors import out_of_memory_message
from gpt2repro.model import GPT, GPTConfig
from gpt2repro.optim import MuonAdamW
from gpt2repro.precision import precision, resolve_dtype
from tests.fake_cuda import GPUS, cuda_parameters, fake_gpu

V, V_PADDED, C, N = 100, 128, 32, 300  # vocabulary (padded), width, tokens: three chunks of 128


def branch_forced(monkeypatch) -> None:
    """The fused loss takes its CUDA branch (torch.mm into fp32) on CPU tensors."""
    monkeypatch.setattr(loss, "_has_fp32_output_gemm", lambda t: True)


def loss_inputs(dtype=torch.float32):
    torch.manual_seed(0)
    hidden = torch.randn(N, C, dtype=dtype, requires_grad=True)
    weight = (0.1 * torch.randn(V_PADDED, C, dtype=dtype)).requires_grad_()
    targets = torch.randint(0, V, (N,))
    targets[::7] = -1
    return hidden, weight, targets


# ----- Inductor lowering ---------------------------------------------------------------------


def test_the_fused_loss_cuda_branch_compiles_with_inductor_in_16_bit(monkeypatch):
    # torch.compile'd training in bfloat16 takes this branch on a GPU: Dynamo traces the autograd.Function and
    # Inductor lowers its graph, the same way for every device up to the kernel it picks. The addmm form of the
    # branch failed here (tuned_addmm() takes no out_dtype, pytorch/pytorch#163880); what may remain on a CPU
    # is only Inductor's refusal to pick a kernel for an fp32-output matmul off CUDA.
    branch_forced(monkeypatch)
    hidden, weight, targets = loss_inputs()

    def step(hidden, weight, targets):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss.linear_cross_entropy(hidden, weight, targets, vocab_size=V, chunk_size=128)

    torch._dynamo.reset()
    try:
        torch.compile(step, backend="inductor", fullgraph=True)(hidden, weight, targets).backward()
    except Exception as e:  # the lowering's own error, wrapped by torch.compile: what the assertion reads
        text = str(e)
        assert "tuned_addmm" not in text and "out_dtype is only supported for CUDA or XPU" in text, text[-2000:]
        assert "target: aten.mm.dtype" in text, text[-2000:]  # the CUDA branch's matmul, reached and lowered
    finally:
        torch._dynamo.reset()


@pytest.fixture
def cpu_fp32_output_matmul():
    """A CPU kernel for aten::mm.dtype (cuBLAS's: 16-bit inputs, products summed in fp32), for this test only."""
    library = torch.library.Library("aten", "IMPL")
    library.impl("mm.dtype", lambda a, b, out_dtype: torch.mm(a.to(out_dtype), b.to(out_dtype)), "CPU")
    yield
    library._destroy()


def test_the_fused_loss_cuda_branch_equals_the_fp32_loss_to_bfloat16_rounding(monkeypatch, cpu_fp32_output_matmul):
    # The branch's numbers, on a CPU standing in for cuBLAS: loss and both gradients as F.cross_entropy's in fp32.
    branch_forced(monkeypatch)
    hidden, weight, targets = loss_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = loss.linear_cross_entropy(hidden, weight, targets, vocab_size=V, chunk_size=128)
    fused_grads = torch.autograd.grad(fused, (hidden, weight))
    plain = F.cross_entropy((hidden @ weight.t())[:, :V], targets, ignore_index=-1)
    plain_grads = torch.autograd.grad(plain, (hidden, weight))
    assert fused.item() == pytest.approx(plain.item(), rel=1e-2)
    for got, want in zip(fused_grads, plain_grads, strict=True):
        assert (got - want).norm() <= 2e-2 * want.norm()


def test_the_cuda_branch_adds_each_chunks_product_into_the_fp32_sum_in_place(monkeypatch, cpu_fp32_output_matmul):
    # No second (V, C) fp32 accumulator per chunk: the sum is the same tensor throughout (the product, the one
    # temporary, is what the planner counts).
    branch_forced(monkeypatch)
    torch.manual_seed(0)
    acc, a, b = torch.randn(8, 5), torch.randn(8, 3, dtype=torch.bfloat16), torch.randn(3, 5, dtype=torch.bfloat16)
    expected = acc + a.float() @ b.float()
    assert loss._add_product_fp32(acc, a, b) is acc
    torch.testing.assert_close(acc, expected)


# ----- device and dtype flow on fake CUDA tensors --------------------------------------------


class Ctx:
    """What autograd gives an autograd.Function's forward and backward (autograd itself aborts on fake CUDA)."""

    needs_input_grad = (True, True, False)

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


@pytest.mark.parametrize(
    ("param_dtype", "compute_dtype"),
    [(torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16)],
)
def test_the_fused_loss_on_cuda_keeps_its_loss_and_weight_gradient_in_fp32(param_dtype, compute_dtype):
    # DDP: fp32 weights under autocast; FSDP: 16-bit gathered ones. On CUDA tensors the fp32-output branch runs.
    with fake_gpu("sm90") as mode, mode:
        hidden = torch.empty(N, C, dtype=param_dtype, device="cuda")
        weight = torch.empty(V_PADDED, C, dtype=param_dtype, device="cuda")
        targets = torch.randint(0, V, (N,), device="cuda")
        assert loss._has_fp32_output_gemm(hidden)
        ctx = Ctx()
        value = loss._LinearCrossEntropy.forward(ctx, hidden, weight, targets, V, 128, compute_dtype, True)
        grad_h, grad_w, n_targets = ctx.saved_tensors
        assert value.dtype == torch.float32 and value.device.type == "cuda"
        assert grad_w.dtype == torch.float32 and grad_h.dtype == compute_dtype and grad_h.shape == (N, C)
        grad_hidden, grad_weight, *rest = loss._LinearCrossEntropy.backward(ctx, torch.ones((), device="cuda"))
        assert grad_hidden.dtype == grad_weight.dtype == param_dtype and grad_hidden.device.type == "cuda"
        assert rest == [None] * 5


# ----- policies under faked device properties ------------------------------------------------

# kind: (auto dtype, fp8 allowed, Newton-Schulz dtype, peak FLOP/s in that dtype)
POLICY = {
    "sm70": ("float16", False, torch.float32, 125e12),
    "sm75": ("float16", False, torch.float32, 65e12),
    "sm80": ("bfloat16", False, torch.bfloat16, 312e12),
    "sm89": ("bfloat16", True, torch.bfloat16, 121e12),
    "sm90": ("bfloat16", True, torch.bfloat16, 989e12),
}


@pytest.mark.parametrize("kind", list(GPUS))
def test_each_gpu_generation_gets_its_dtype_fp8_compile_loss_and_peak(kind):
    dtype, fp8_allowed, ns_dtype, peak = POLICY[kind]
    with fake_gpu(kind) as mode:
        assert resolve_dtype("auto", "cuda") == dtype  # not emulated bfloat16 below sm80
        scaler = make_scaler(dtype, "cuda")  # float16 scales the loss; bfloat16 keeps 1.0, and skips non-finite steps
        assert scaler.is_enabled() and scaler.get_scale() == (2.0**16 if dtype == "float16" else 1.0)
        if fp8_allowed and importlib.util.find_spec("torchao") is not None:
            fp8.check_supported("cuda:0")
        elif not fp8_allowed:
            with pytest.raises(ValueError, match="compute capability 8.9 or newer"):
                fp8.check_supported("cuda:0")
        # The settled run on one of these GPUs: everything auto decided from the device's properties.
        settled = settings.settle(TrainConfig(optimizer="muon"), settings.Machine.this("cuda:0", 8, 8))
        assert (settled.dtype, settled.compile, settled.fused_loss, settled.device) == (dtype, "true", "false", "cuda")
        assert settled.peak_tflops * 1e12 == peak and settled.gpu_memory_gb * GiB == GPUS[kind][2]
        model = cuda_parameters(GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=1, n_head=2, n_embd=C)), mode)
        assert MuonAdamW(model, settled).ns_dtype == ns_dtype


def test_tf32_is_switched_on_for_fp32_matmuls_on_cuda_only():
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        precision("float32", "cpu")
        assert not torch.backends.cuda.matmul.allow_tf32
        with fake_gpu("sm80"):
            assert precision("float32", "cuda")[0] == "float32"
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


# ----- the profiler's and the memory snapshot's CUDA guards ----------------------------------


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))


CUDA_INFO = D.DistInfo(device="cuda:0")


def test_the_profiler_records_cuda_activity_and_ends_the_memory_history_after_the_first_step(tmp_path):
    made = []

    class Profile:
        def __init__(self, **kwargs):
            made.append(kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def export_chrome_trace(self, path):
            Path(path).write_text("{}")

    history = Recorder()
    watchdog = D.Watchdog(60, D.DistInfo())
    with (
        fake_gpu("sm90"),
        mock.patch.object(profiling, "profile", Profile),
        mock.patch("torch.cuda.memory._record_memory_history", history),
    ):
        profiler = profiling.StepProfiler("2:2", False, tmp_path, CUDA_INFO, watchdog)
        for step in (1, 2, 3):
            with profiler.step(step):
                pass
    assert made == [
        dict(
            activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
            record_shapes=True,
            profile_memory=True,
            with_stack=False,
        )
    ]
    assert history.calls == [((), {"enabled": None})]  # stopped once, after step 1
    assert (tmp_path / "profile" / "rank0" / "steps_2-2.pt.trace.json").exists()


def test_an_out_of_memory_on_cuda_writes_the_allocator_snapshot_and_names_it(tmp_path):
    history, written = Recorder(), []

    def dump(path):
        written.append(path)
        Path(path).write_bytes(b"snapshot")

    with (
        fake_gpu("sm90"),
        mock.patch("torch.cuda.memory._record_memory_history", history),
        mock.patch("torch.cuda.memory._dump_snapshot", dump),
    ):
        with pytest.raises(torch.OutOfMemoryError) as caught, profiling.memory_snapshot_on_oom(tmp_path, CUDA_INFO):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    path = tmp_path / "profile" / "rank0" / "oom_memory_snapshot.pickle"
    assert history.calls == [((), {"stacks": "python", "max_entries": profiling.MEMORY_HISTORY_ENTRIES})]
    assert written == [str(path)] and caught.value.memory_snapshot == path
    message = out_of_memory_message(caught.value)
    assert message.startswith("out of GPU memory (CUDA out of memory.") and f"what held the memory: {path}" in message


# ----- NCCL: the process group, barriers and device ids --------------------------------------


def test_init_joins_nccl_on_this_ranks_gpu(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    joined, set_device = Recorder(), Recorder()
    with (
        fake_gpu("sm90"),
        mock.patch("torch.cuda.set_device", set_device),
        mock.patch("torch.distributed.init_process_group", joined),
    ):
        info = D.init("auto", timeout_s=600)
    assert info.device == "cuda:1" and set_device.calls == [(("cuda:1",), {})]
    assert joined.calls == [
        (
            (),
            {
                "backend": "nccl",
                "timeout": datetime.timedelta(seconds=D.backend_timeout_s(600)),
                "device_id": torch.device("cuda:1"),
            },
        )
    ]
    assert D.os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"


def test_an_nccl_barrier_names_this_ranks_gpu():
    barrier = Recorder()
    with (
        fake_gpu("sm90"),
        mock.patch("torch.cuda.current_device", return_value=3),
        mock.patch("torch.distributed.get_backend", return_value="nccl"),
        mock.patch("torch.distributed.barrier", barrier),
    ):
        D._barrier()
    assert barrier.calls == [((), {"group": None, "device_ids": [3]})]


def test_ddp_on_cuda_is_given_the_local_gpu():
    wrapped = Recorder()
    info = D.DistInfo(rank=5, local_rank=1, world_size=8, device="cuda:1")
    with fake_gpu("sm90"), mock.patch.object(parallel, "DDP", wrapped):
        parallel.wrap(torch.nn.Linear(2, 2), parallel.Layout(info, dp_rank=5, dp_size=8), compile_on=False)
    ((args, kwargs),) = wrapped.calls
    assert kwargs == {"device_ids": [1], "gradient_as_bucket_view": True}


def test_the_stop_vote_on_cuda_copies_into_pinned_memory_and_waits_for_its_event():
    events = []

    class Event:
        def __init__(self):
            self.log = []
            events.append(self)

        def record(self):
            self.log.append("record")

        def synchronize(self):
            self.log.append("synchronize")

    pinned = Recorder()

    def pin(t):
        pinned(t.shape)
        return t

    with fake_gpu("sm90"), mock.patch("torch.cuda.Event", Event), mock.patch.object(torch.Tensor, "pin_memory", pin):
        vote = D.StopVote(D.DistInfo(device="cuda:0"), (15, 10))
        vote.average_loss_and_count_requests(torch.tensor(2.0), request=10)
        assert vote.agreed() == 10
    assert pinned.calls == [((torch.Size([2]),), {})]
    assert [e.log for e in events] == [["record", "synchronize"]]


def test_batches_for_cuda_go_through_pinned_memory():
    pinned = []
    moved = []
    real_to = torch.Tensor.to

    def pin(t):
        pinned.append(t.shape)
        return t

    def to(t, *args, **kwargs):
        moved.append((args, kwargs))
        return real_to(t, "cpu")

    rows = torch.arange(10).reshape(2, 5).numpy()
    with mock.patch.object(torch.Tensor, "pin_memory", pin), mock.patch.object(torch.Tensor, "to", to):
        x, y = to_device(rows, "cuda:0", pin=True)
    assert pinned == [torch.Size([2, 5])] and moved == [(("cuda:0",), {"non_blocking": True})]
    assert x.tolist() == [[0, 1, 2, 3], [5, 6, 7, 8]] and y.tolist() == [[1, 2, 3, 4], [6, 7, 8, 9]]


def test_the_cuda_rng_state_is_checkpointed_and_restored():
    saved, restored = torch.arange(4, dtype=torch.uint8), Recorder()
    with (
        fake_gpu("sm90"),
        mock.patch("torch.cuda.get_rng_state", return_value=saved),
        mock.patch("torch.cuda.set_rng_state", restored),
    ):
        state = checkpoint.rng_state()
        checkpoint.set_rng_state(state)
    assert torch.equal(state["cuda"], saved) and torch.equal(restored.calls[0][0][0], saved)


def test_timings_wait_for_the_gpus_queued_work():
    synchronized = Recorder()
    with fake_gpu("sm90"), mock.patch("torch.cuda.synchronize", synchronized):
        result, seconds = metrics.timed("cuda:0", lambda: 7)
    assert result == 7 and seconds >= 0 and synchronized.calls == [(("cuda:0",), {})] * 2


def test_mingpts_trainer_picks_the_gpu_when_there_is_one():
    from gpt2repro.trainer import Trainer, TrainerConfig

    class Model(torch.nn.Module):
        def to(self, device):
            self.moved_to = device
            return self

    with fake_gpu("sm80"):
        trainer = Trainer(Model(), [], None, TrainerConfig())
    assert trainer.device == "cuda" and trainer.model.moved_to == "cuda"

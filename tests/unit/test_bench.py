"""`photoninfer bench` end to end on a tiny random model on the CPU: every workload and peer selection, the JSON
report with its metadata, the PNG, the profile; the agreement metric on crafted outputs. No timing asserted."""

import json
import os
import subprocess
import sys

import pytest
import torch

from photoninfer.bench.metrics import agreement
from photoninfer.bench.workloads import nano_vllm_batch
from photoninfer.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory):
    """One cache for the module, so the tiny random model is built once."""
    return str(tmp_path_factory.mktemp("bench_cache"))


def run_bench(tmp_path, monkeypatch, cache, *args) -> dict:
    monkeypatch.setenv("PHOTONINFER_CACHE", cache)
    out = tmp_path / "bench.json"
    argv = ["--log-level", "WARNING", "bench", "--random-shape", "tiny", "--device", "cpu", "--prompt-len", "12",
            "--out", str(out), *args]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["meta"]["command"] == "photoninfer " + " ".join(argv)
    return report


def git_head() -> str | None:
    import photoninfer

    done = subprocess.run(["git", "-C", os.path.dirname(photoninfer.__file__), "rev-parse", "HEAD"],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


# ---- the agreement metric ------------------------------------------------------------------------------

def test_agreement_counts_the_prefix_before_the_first_difference():
    reference = [[5, 6, 7, 8], [1, 2], [9, 9, 9, 9]]
    assert agreement(reference, reference) == 1.0
    assert agreement([[5, 6, 0, 8], [1, 2], [9, 9, 9, 9]], reference) == pytest.approx((0.5 + 1 + 1) / 3)
    assert agreement([[0, 6, 7, 8], [1, 0], [9, 9, 9, 0]], reference) == pytest.approx((0 + 0.5 + 0.75) / 3)
    # a shorter output counts only the tokens it has, even when they all match
    assert agreement([[5, 6], [1, 2], [9]], reference) == pytest.approx((0.5 + 1 + 0.25) / 3)
    with pytest.raises(ValueError, match="2 outputs but 3"):
        agreement([[1], [2]], reference)


# ---- workloads and shapes ------------------------------------------------------------------------------

def test_nano_vllm_workload_is_seeded_and_within_its_length_range():
    batch = nano_vllm_batch(256, 100, 1024, vocab_size=1000, seed=0)
    assert len(batch.prompts) == len(batch.output_lens) == batch.concurrency == 256
    lengths = [len(p) for p in batch.prompts] + batch.output_lens
    assert min(lengths) >= 100 and max(lengths) <= 1024 and len(set(lengths)) > 100
    assert all(2 <= t < 1000 for p in batch.prompts for t in p)
    again = nano_vllm_batch(256, 100, 1024, vocab_size=1000, seed=0)
    assert again.prompts == batch.prompts and again.output_lens == batch.output_lens
    assert nano_vllm_batch(256, 100, 1024, vocab_size=1000, seed=1).output_lens != batch.output_lens


@pytest.mark.parametrize("shape, family, parameters", [
    ("llama-3.2-1b", "LlamaForCausalLM", 1_235_814_400),
    ("qwen3-0.6b", "Qwen3ForCausalLM", 596_049_920),
    ("smollm2-135m", "LlamaForCausalLM", 134_515_008),
])
def test_random_shapes_have_the_published_parameter_counts(shape, family, parameters):
    from transformers import AutoModelForCausalLM

    from photoninfer.bench.random_model import shape_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape_config(shape))
    assert type(model).__name__ == family
    assert sum(p.numel() for p in model.parameters()) == parameters


# ---- end to end ----------------------------------------------------------------------------------------

def test_standard_workload_beside_hf_eager_with_metadata_png_and_profile(tmp_path, monkeypatch, bench_cache,
                                                                        capsys):
    report = run_bench(tmp_path, monkeypatch, bench_cache, "--concurrency", "1,3", "--output-len", "6",
                       "--profile", "2", "--profile-steps", "2")
    printed = capsys.readouterr().out
    assert "photoninfer" in printed and "profile at concurrency 2: host" in printed
    assert f"written to {tmp_path / 'bench.json'} and {tmp_path / 'bench.png'}" in printed
    meta = report["meta"]
    assert meta["device_type"] == "cpu" and meta["cpu"] and meta["torch_threads"] == torch.get_num_threads()
    assert meta["versions"]["torch"] == torch.__version__ and meta["versions"]["transformers"]
    assert "triton" in meta["versions"]
    assert meta["git"]["commit"] == git_head()
    assert meta["peers"] == ["hf-eager"]  # the CPU's default: no compiled peer
    assert meta["engine_options"]["device"] == "cpu" and meta["engine_options"]["max_num_seqs"] == 256
    assert meta["workload"] == {"name": "standard", "ttft_prompt_len": 12, "ignore_eos": True, "greedy": True,
                                "concurrency": [1, 3], "prompt_len": 12, "output_len": 6}
    rows = {(r["engine"], r["concurrency"]): r for r in report["results"]}
    assert set(rows) == {(e, c) for e in ("hf-eager", "photoninfer") for c in (1, 3)}
    for (engine, concurrency), row in rows.items():
        assert row["output_tokens"] == 6 * concurrency and row["prompt_tokens"] == 12 * concurrency
        assert row["output_tok_per_s"] > 0
    # float32 on the CPU: PhotonInfer's greedy tokens are HF's, token for token
    assert rows[("photoninfer", 3)]["agreement"] == 1.0 and rows[("hf-eager", 3)]["agreement"] is None
    for engine in ("hf-eager", "photoninfer"):
        assert report["engines"][engine]["error"] is None
        timings = report["engines"][engine]
        assert timings["startup_s"] > 0 and 0 < timings["ttft_min_s"] <= timings["ttft_s"] <= timings["ttft_p90_s"]
    ours = report["engines"]["photoninfer"]["info"]
    assert ours["kv_cache_blocks"] > 0 and ours["dtype"] == "float32" and ours["attention_backend"]
    assert ours["cuda_graph_sizes"] is None  # no graphs on the CPU
    [profile] = report["profile"]
    assert profile["concurrency"] == 2 and profile["steps"] == 2 and profile["decode_only"]
    assert profile["host_ms_per_step"] > 0 and profile["device_ms_per_step"] is None  # no device on the CPU
    assert 0 < len(profile["top_ops_by_self_cpu_time"]) <= 15
    assert (tmp_path / "bench.png").read_bytes().startswith(PNG_MAGIC)


def test_nano_vllm_workload_beside_both_hf_peers(tmp_path, monkeypatch, bench_cache):
    # the eager backend keeps compilation fast on the CPU while going through transformers' auto-compile
    report = run_bench(tmp_path, monkeypatch, bench_cache, "--workload", "nano-vllm", "--num-requests", "3",
                       "--len-range", "8,16", "--peers", "hf-eager,hf-compiled", "--hf-compile-backend", "eager")
    expected = nano_vllm_batch(3, 8, 16, vocab_size=512, seed=0)
    assert report["meta"]["workload"]["num_requests"] == 3
    assert [r["engine"] for r in report["results"]] == ["hf-eager", "hf-compiled", "photoninfer"]
    for row in report["results"]:
        assert row["label"] == "nano-vllm" and row["concurrency"] == 3
        assert row["output_tokens"] == sum(expected.output_lens)
        assert row["prompt_tokens"] == sum(len(p) for p in expected.prompts)
    assert report["engines"]["hf-compiled"]["info"]["compiled"] is True
    assert report["engines"]["hf-compiled"]["error"] is None
    assert all(r["agreement"] == 1.0 for r in report["results"] if r["engine"] != "hf-eager")
    assert (tmp_path / "bench.png").read_bytes().startswith(PNG_MAGIC)


def test_a_peer_that_fails_to_compile_is_recorded_and_the_bench_goes_on(tmp_path, monkeypatch, bench_cache):
    report = run_bench(tmp_path, monkeypatch, bench_cache, "--workload", "none", "--peers", "hf-compiled",
                       "--hf-compile-backend", "no-such-backend")
    assert "no-such-backend" in report["engines"]["hf-compiled"]["error"]
    assert report["engines"]["photoninfer"]["error"] is None and report["engines"]["photoninfer"]["ttft_s"] > 0
    assert report["results"] == [] and report["meta"]["agreement_reference"] is None


def test_no_peers_and_bad_options_are_clear_errors(tmp_path, monkeypatch, bench_cache, capsys):
    monkeypatch.setenv("PHOTONINFER_CACHE", bench_cache)
    base = ["bench", "--random-shape", "tiny", "--device", "cpu", "--out", str(tmp_path / "b.json")]
    assert main([*base, "--peers", "hf-eager,vllm"]) == 2
    assert "unknown peer(s) vllm" in capsys.readouterr().err
    assert main([*base, "--concurrency", "1,x"]) == 2
    assert "--concurrency must be comma-separated positive integers" in capsys.readouterr().err
    assert main([*base, "--workload", "nano-vllm", "--len-range", "50,10"]) == 2
    assert "0 < min <= max" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_without_matplotlib_the_json_is_written_with_a_warning(tmp_path, monkeypatch, caplog):
    from photoninfer.bench.runner import write_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    report = {"meta": {"workload": {"name": "none"}}, "engines": {}, "results": [], "profile": []}
    with caplog.at_level("WARNING"):
        assert write_report(report, str(tmp_path / "r.json")) is None
    assert json.loads((tmp_path / "r.json").read_text()) == report
    assert not (tmp_path / "r.png").exists()
    assert "matplotlib is not installed" in caplog.text


def test_profile_summary_counts_launches_and_device_time_per_step():
    """The CUDA half of the profile summary, on crafted profiler events (the CPU has no device events)."""
    from types import SimpleNamespace as Event

    from torch.autograd import DeviceType

    from photoninfer.bench.profile import summarize

    cpu, gpu = DeviceType.CPU, DeviceType.CUDA
    events = [Event(name="cudaLaunchKernel", device_type=cpu, device_time_total=0)] * 6 + [
        Event(name="cuLaunchKernelEx", device_type=cpu, device_time_total=0),  # a Triton kernel
        Event(name="cudaGraphLaunch", device_type=cpu, device_time_total=0),
        Event(name="cudaMemcpyAsync", device_type=cpu, device_time_total=0),
        Event(name="aten::mm", device_type=cpu, device_time_total=900),  # its kernel's time, counted once below
        Event(name="gemv_kernel", device_type=gpu, device_time_total=900),
        Event(name="rms_norm_kernel", device_type=gpu, device_time_total=100),
    ]
    averages = [
        Event(key="aten::mm", count=4, device_type=cpu, self_cpu_time_total=300, self_device_time_total=900),
        Event(key="cudaLaunchKernel", count=6, device_type=cpu, self_cpu_time_total=100, self_device_time_total=0),
        Event(key="gemv_kernel", count=4, device_type=gpu, self_cpu_time_total=0, self_device_time_total=900),
        Event(key="rms_norm_kernel", count=2, device_type=gpu, self_cpu_time_total=0, self_device_time_total=100),
    ]
    summary = summarize(events, averages, steps=2, device=torch.device("cuda"))
    assert summary["device_ms_per_step"] == 0.5  # (900 + 100) us over 2 steps
    assert summary["kernel_launches_per_step"] == 4.0  # 6 + 1 + 1 launches over 2 steps; the memcpy is not one
    assert summary["device_kernels_per_step"] == 1.0
    assert [op["name"] for op in summary["top_ops_by_self_device_time"]] == ["gemv_kernel", "rms_norm_kernel"]
    assert summary["top_ops_by_self_device_time"][0] == {"name": "gemv_kernel", "calls_per_step": 2.0,
                                                         "self_ms_per_step": 0.45, "percent": 90.0}
    assert [op["name"] for op in summary["top_ops_by_self_cpu_time"]] == ["aten::mm", "cudaLaunchKernel"]
    assert summary["top_ops_by_self_cpu_time"][0]["percent"] == 75.0


def test_device_gaps_count_idle_time_once_and_name_the_kernels_around_it():
    from types import SimpleNamespace as Event

    from photoninfer.bench.profile import device_gaps

    def kernel(name, start, end):
        return Event(name=name, time_range=Event(start=start, end=end))

    # a, then b overlapping a's end (PDL), a 5 us gap, c, a 3 us gap, d inside c's time (counted once), e
    events = [kernel("b", 8, 20), kernel("a", 0, 10), kernel("c", 25, 40), kernel("d", 30, 35),
              kernel("e", 43, 50), Event(name="no range", time_range=None)]
    gaps = device_gaps(events, steps=1)
    assert gaps["device_idle_ms_per_step"] == 0.008  # (25 - 20) + (43 - 40) us
    assert gaps["top_device_gaps"] == [{"after": "b", "before": "c", "idle_ms_per_step": 0.005},
                                       {"after": "c", "before": "e", "idle_ms_per_step": 0.003}]


def test_git_commit_outside_a_checkout_comes_from_the_environment(tmp_path, monkeypatch):
    from photoninfer.bench.environment import git_state

    monkeypatch.delenv("PHOTONINFER_GIT_COMMIT", raising=False)
    assert git_state(str(tmp_path)) == {"commit": None, "dirty": None, "source": "environment"}
    monkeypatch.setenv("PHOTONINFER_GIT_COMMIT", "abc123")
    assert git_state(str(tmp_path))["commit"] == "abc123"


def test_a_named_commit_wins_over_a_stale_checkout(monkeypatch):
    """The lent GPU machine's copy can hold a .git from an older commit: the named commit is the one measured."""
    from photoninfer.bench.environment import git_state

    monkeypatch.setenv("PHOTONINFER_GIT_COMMIT", "abc123")
    assert git_state(os.path.dirname(__file__)) == {"commit": "abc123", "dirty": None, "source": "environment"}

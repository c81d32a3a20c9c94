"""The engines a benchmark runs: PhotonInfer and its HF transformers peers, behind one small interface.

Each engine is built by `start()` (timed as its start-up), then `generate(batch)` returns each request's output
token ids; `prepare(batch)` is an untimed pass for engines that compile per shape. Every request generates
exactly its output length with EOS ignored.

- hf-eager: `generate()` with the dynamic KV cache, the plain reference.
- hf-compiled: `generate(cache_implementation="static", compile_config=...)`: a static KV cache and the
  decoding forward compiled by transformers' own auto-compile, which 5.x generate() applies once the cache is
  static (compiling `model.forward` by hand, the older recipe, would also compile every prefill shape).
  Compilation happens per shape, so each batch is generated once untimed before it is timed.
"""

from __future__ import annotations

import os
from dataclasses import asdict

import torch

from photoninfer.bench.workloads import Batch
from photoninfer.config import EngineConfig
from photoninfer.errors import ConfigError
from photoninfer.sampling_params import SamplingParams

OURS = "photoninfer"
HF_EAGER = "hf-eager"
HF_COMPILED = "hf-compiled"
PEERS = (HF_EAGER, HF_COMPILED)


def default_peers(device: torch.device) -> list[str]:
    """Both HF modes on a GPU; on the CPU compiling costs minutes and gains little, so eager only."""
    return [HF_EAGER, HF_COMPILED] if device.type == "cuda" else [HF_EAGER]


def parse_peers(text: str | None, device: torch.device) -> list[str]:
    if text is None:
        return default_peers(device)
    names = [p.strip() for p in text.split(",") if p.strip() and p.strip() != "none"]
    unknown = [p for p in names if p not in PEERS]
    if unknown:
        raise ConfigError(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)} or none")
    return list(dict.fromkeys(names))


class PhotonInferEngine:
    name = OURS

    def __init__(self, config: EngineConfig):
        self.config = config
        self.llm = None

    def start(self) -> None:
        from photoninfer.llm import LLM

        fields = {k: v for k, v in asdict(self.config).items() if k != "model"}
        self.llm = LLM(self.config.model, **fields)

    def info(self) -> dict:
        engine = self.llm.engine
        runner = engine.runner
        graphs = getattr(runner, "graphs", None)  # getattr: the runner's internals move faster than this report
        attention = getattr(getattr(runner, "model", None), "attention", None)
        return {"kv_cache_blocks": engine.block_manager.num_blocks, "block_size": engine.block_manager.block_size,
                "max_model_len": engine.max_model_len, "dtype": str(engine.dtype).removeprefix("torch."),
                "attention_backend": type(attention).__name__ if attention is not None else None,
                "cuda_graph_sizes": list(getattr(graphs, "sizes", [])) if graphs is not None else None}

    def prepare(self, batch: Batch) -> None:
        pass

    def generate(self, batch: Batch) -> list[list[int]]:
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in batch.output_lens]
        return [o.outputs[0].token_ids for o in self.llm.generate(batch.prompts, params)]

    def close(self) -> None:
        self.llm = None


def hf_load_args(model_path: str) -> tuple[str, dict]:
    """from_pretrained's arguments for an HF directory or a .gguf file (which HF dequantizes)."""
    if model_path.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(model_path)), {"gguf_file": os.path.basename(model_path)}
    return model_path, {}


class HFEngine:
    """HF transformers' own generate(). Prompts of different lengths are left-padded into one batch, and the
    whole batch runs for the longest output (generate() is static batching); only the requested tokens count."""

    name = HF_EAGER

    def __init__(self, model_path: str, dtype: torch.dtype, device: torch.device):
        self.model_path, self.dtype, self.device = model_path, dtype, device
        self.model = None

    def start(self) -> None:
        from transformers import AutoModelForCausalLM

        path, kwargs = hf_load_args(self.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype, **kwargs).to(self.device).eval()
        # No EOS in the generation config: generate() then neither stops at EOS nor bans it (ignore_eos)
        self.model.generation_config.eos_token_id = None

    def info(self) -> dict:
        return {"attn_implementation": getattr(self.model.config, "_attn_implementation", None)}

    def prepare(self, batch: Batch) -> None:
        pass

    def _generate_kwargs(self) -> dict:
        return {}

    def generate(self, batch: Batch) -> list[list[int]]:  # generate() runs under no_grad itself
        ids, mask = _left_padded(batch.prompts, self.device)
        longest = max(batch.output_lens)
        out = self.model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=longest,
                                  min_new_tokens=longest, pad_token_id=0, **self._generate_kwargs())
        new = out[:, ids.shape[1]:].tolist()
        return [row[:n] for row, n in zip(new, batch.output_lens)]

    def close(self) -> None:
        self.model = None


class HFCompiledEngine(HFEngine):
    name = HF_COMPILED

    def __init__(self, model_path: str, dtype: torch.dtype, device: torch.device, backend: str = "inductor",
                 mode: str | None = None):
        super().__init__(model_path, dtype, device)
        self.backend = backend
        self.mode = mode if mode is not None else ("reduce-overhead" if device.type == "cuda" else "default")

    def start(self) -> None:
        from transformers import CompileConfig

        super().start()
        self.compile_config = CompileConfig(backend=self.backend, mode=self.mode)
        if self.device.type != "cuda":
            self.compile_config._compile_all_devices = True  # transformers auto-compiles only on accelerators otherwise
        # every (batch, cache length) is a new graph: allow more than dynamo's default of 8 before it gives up
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))

    def _generate_kwargs(self) -> dict:
        return {"cache_implementation": "static", "compile_config": self.compile_config}

    def info(self) -> dict:
        return {**super().info(), "backend": self.backend, "mode": self.mode,
                "compiled": getattr(self.model, "_compiled_call", None) is not None}

    def prepare(self, batch: Batch) -> None:
        self.generate(batch)  # compiles (and captures graphs) for this batch's shapes
        if getattr(self.model, "_compiled_call", None) is None:
            raise RuntimeError("transformers did not compile the forward: its auto-compile criteria were not met "
                               "(static cache, supported device, no offloading)")

    def close(self) -> None:
        super().close()
        torch._dynamo.reset()


def _left_padded(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def build_engine(name: str, config: EngineConfig, dtype: torch.dtype, device: torch.device,
                 compile_backend: str = "inductor", compile_mode: str | None = None):
    if name == OURS:
        return PhotonInferEngine(config)
    if name == HF_EAGER:
        return HFEngine(config.model, dtype, device)
    if name == HF_COMPILED:
        return HFCompiledEngine(config.model, dtype, device, compile_backend, compile_mode)
    raise ConfigError(f"unknown engine {name!r}")

"""The decoder: Llama-3.x, SmolLM2 and Qwen3 in one model, told apart by ModelConfig flags
(q/k-norm, rope scaling, tied embeddings, attention bias).

q/k/v and gate/up are fused into single Linear layers when the checkpoint is loaded.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch
from torch import nn
from tqdm import tqdm

from photoninfer.config import ModelConfig
from photoninfer.errors import ModelLoadError
from photoninfer.model.layers import Linear, RMSNorm, RotaryEmbedding, default_weight_loader, silu_and_mul


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x, positions, rope: RotaryEmbedding, kv_cache, backend, meta):
        return self.attend(self.qkv_proj(x), positions, rope, kv_cache, backend, meta)

    def attend(self, qkv, positions, rope: RotaryEmbedding, kv_cache, backend, meta):
        """The layer after its q/k/v projection: qkv [T, q_size + 2 kv_size] -> o_proj's output."""
        return self.o_proj(self.attention(qkv, positions, rope, kv_cache, backend, meta))

    def attention(self, qkv, positions, rope: RotaryEmbedding, kv_cache, backend, meta):
        """qkv [T, q_size + 2 kv_size] -> the heads' outputs [T, q_size], o_proj's input."""
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        # Qwen3 normalizes each head before rotating it: the backend does it (decode kernels fuse it)
        qk_norm = (self.q_norm, self.k_norm) if self.q_norm is not None else None
        out = backend.forward(q, k, v, positions, rope, kv_cache, meta, qk_norm)  # rotates, writes K/V, attends
        return out.reshape(num_tokens, self.q_size)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = silu_and_mul  # the Triton kernel on CUDA (CausalLM.use_kernels)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.norm_linear = None  # kernels/norm_linear.py on CUDA (CausalLM.use_kernels)
        self.decode_linears = False  # q/k/v, o and down through norm_linear.decode_linear too (use_kernels)
        # the MLP as one norm_linear.fused_mlp kernel for up to FUSED_MLP_MAX_M rows: its float32 output goes to the
        # next layer's norm (or the final one), which rounds it to the model dtype (use_kernels)
        self.fused_mlp = False
        # kernels/decode_gemv.py (use_kernels) for one-row steps: q/k/v with the input norm inside, and o, their
        # weights loaded into registers while the kernels before them run; None where q/k/v keeps a norm kernel
        self.decode_gemv = None

    def forward(self, x, residual, positions, rope, kv_cache, backend, meta):
        if _fuses_norms(self.norm_linear, x, residual):
            return self._forward_fused_norms(x, residual, positions, rope, kv_cache, backend, meta)
        x, residual = self._input_norm(x, residual)
        x = self.self_attn(x, positions, rope, kv_cache, backend, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

    def _input_norm(self, x, residual):
        """(norm(x + residual), x + residual); the first layer has no residual yet: (norm(x), x)."""
        if residual is None:
            return self.input_layernorm(x), x
        return self.input_layernorm(x, residual)

    def _forward_fused_norms(self, x, residual, positions, rope, kv_cache, backend, meta):
        """Decode-sized batches: the norms (and the residual adds before them) run inside the linear layer
        that follows, and SiLU·mul inside gate/up: up to 3 kernels fewer per layer (kernels/norm_linear.py;
        q/k/v only for short rows, where it pays). With `decode_linears` the other projections run on the
        same kernel family, so the whole layer is PDL kernels (kernels/pdl.py); with `fused_mlp`, up to
        FUSED_MLP_MAX_M rows, gate/up and down are one kernel whose float32 output the next norm takes. With
        `decode_gemv`, a one-row step runs q/k/v (the input norm inside) and o on kernels/decode_gemv.py."""
        kernels, attn, norm, gemv = self.norm_linear, self.self_attn, self.input_layernorm, self.decode_gemv
        one_row = gemv is not None and gemv.takes(attn.qkv_proj.weight, x.shape[0], x.device)
        if one_row:
            qkv, residual = gemv.decode_gemv(x, attn.qkv_proj.weight, attn.qkv_proj.bias, norm_weight=norm.weight,
                                             eps=norm.eps, residual=residual)
        elif x.shape[-1] <= kernels.FUSE_QKV_MAX_K:
            qkv, residual = kernels.fused_norm_linear(x, norm.weight, norm.eps, attn.qkv_proj.weight,
                                                      attn.qkv_proj.bias, residual=residual)
        else:
            x, residual = self._input_norm(x, residual)
            qkv = self._linear(attn.qkv_proj, x)
        return self._after_qkv(qkv, residual, one_row, positions, rope, kv_cache, backend, meta)

    def gathers_embedding(self, embedding: torch.Tensor, input_ids: torch.Tensor) -> bool:
        """Whether this (first) layer takes the step's token ids instead of their embedding rows
        (forward_from_ids): a one-row step that decode_gemv runs."""
        weight = self.self_attn.qkv_proj.weight  # takes() checks its dtype: the embedding's must match
        gemv = self.decode_gemv
        return (gemv is not None and gemv.GATHER_EMBEDDING and input_ids.shape[0] == 1
                and embedding.dtype == weight.dtype and embedding.is_contiguous()
                and gemv.takes(weight, 1, embedding.device))

    def forward_from_ids(self, embedding, input_ids, positions, rope, kv_cache, backend, meta):
        """forward(embedding[input_ids], None, ...) where gathers_embedding: q/k/v's kernel reads the token's row
        itself, so no gather kernel opens the step (one kernel less, and q/k/v's weights load from the step's
        start)."""
        attn, norm = self.self_attn, self.input_layernorm
        qkv, residual = self.decode_gemv.decode_gemv(embedding, attn.qkv_proj.weight, attn.qkv_proj.bias,
                                                     norm_weight=norm.weight, eps=norm.eps, token_ids=input_ids)
        return self._after_qkv(qkv, residual, True, positions, rope, kv_cache, backend, meta)

    def _after_qkv(self, qkv, residual, one_row, positions, rope, kv_cache, backend, meta):
        """Attention, o and the MLP of _forward_fused_norms, from q/k/v's output."""
        kernels, attn, mlp, gemv = self.norm_linear, self.self_attn, self.mlp, self.decode_gemv
        x = attn.attention(qkv, positions, rope, kv_cache, backend, meta)
        norm = self.post_attention_layernorm
        if self.fused_mlp and x.shape[0] <= kernels.FUSED_MLP_MAX_M:
            out = torch.empty((x.shape[0], attn.o_proj.weight.shape[0]), dtype=torch.float32, device=x.device)
            if one_row and gemv.takes(attn.o_proj.weight, x.shape[0], x.device):
                x = gemv.decode_gemv(x, attn.o_proj.weight, attn.o_proj.bias, zero=out)
            else:
                x = kernels.decode_linear(x, attn.o_proj.weight, weights_ahead=True, zero=out,
                                          next_weight=mlp.gate_up_proj.weight)
            return kernels.fused_mlp(x, norm.weight, norm.eps, mlp.gate_up_proj.weight, mlp.down_proj.weight, out,
                                     residual)
        x = self._linear(attn.o_proj, x, weights_ahead=True)  # o's weights load while attention runs
        act, residual = kernels.fused_norm_linear(x, norm.weight, norm.eps, mlp.gate_up_proj.weight,
                                                  residual=residual, gated=True)
        return self._linear(mlp.down_proj, act), residual

    def _linear(self, layer: Linear, x, weights_ahead: bool = False):
        """The layer on norm_linear.decode_linear where decode_linears, else its own forward. `weights_ahead` after
        a latency-bound kernel (attention): the weights load while it runs."""
        if self.decode_linears:
            return self.norm_linear.decode_linear(x, layer.weight, layer.bias, weights_ahead=weights_ahead)
        return layer(x)


def _fuses_norms(kernels, x, residual=None) -> bool:
    """Whether kernels/norm_linear.py (None where not in use) takes this batch: decode-sized, bf16/fp16 (the model
    dtype, the residual's: x may be the previous layer's float32 fused_mlp output)."""
    dtype = x.dtype if residual is None else residual.dtype
    return kernels is not None and x.shape[0] <= kernels.MAX_M and dtype in kernels.DTYPES


def _dense(*linears) -> bool:
    """Plain dense weights, which the fused norm+linear kernel reads (quantized formats keep their own)."""
    return all(type(linear) is Linear for linear in linears)


class CausalLM(nn.Module):
    """Embeddings -> N decoder layers -> final norm; `compute_logits` applies the LM head.

    `attention` is the attention backend (runner/attention.py), set by the runner before the first forward."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.attention = None
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)
        self.fast_path = False  # the CPU fast path's forward (cpu_fast.py), set by use_cpu_fast_path()
        self.norm_linear = None  # kernels/norm_linear.py for the final norm + LM head (use_kernels)

    def use_kernels(self) -> None:
        """Fused Triton kernels for the norms and SiLU·mul (CUDA); the torch code stays their reference."""
        from photoninfer.kernels import decode_gemv, norm_linear
        from photoninfer.kernels.pdl import use_pdl
        from photoninfer.kernels.activation import silu_and_mul as silu_and_mul_kernel

        # decode_linear beats cuBLAS only as a PDL kernel among PDL kernels (H100: Llama-3.2-1B 16 rows 10.3k
        # tok/s without PDL against cuBLAS's 11.9k); without PDL (before Hopper) cuBLAS keeps them
        decode_linears = norm_linear.DECODE_LINEARS and use_pdl(self.embed_tokens.weight.device) > 0
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.use_kernel()
            elif isinstance(module, MLP):
                module.act = silu_and_mul_kernel
            elif isinstance(module, DecoderLayer) and _dense(module.self_attn.qkv_proj, module.mlp.gate_up_proj):
                module.norm_linear = norm_linear
                module.decode_linears = decode_linears and _dense(module.self_attn.o_proj, module.mlp.down_proj)
                # o, on decode_linear, zeroes fused_mlp's accumulator
                module.fused_mlp = norm_linear.FUSED_MLP and module.decode_linears
                # where q/k/v would otherwise wait on a norm kernel (rows wider than FUSE_QKV_MAX_K)
                wide = module.self_attn.qkv_proj.weight.shape[1] > norm_linear.FUSE_QKV_MAX_K
                module.decode_gemv = decode_gemv if module.decode_linears and wide else None
        if self.lm_head is None or _dense(self.lm_head):
            self.norm_linear = norm_linear

    def use_cpu_fast_path(self) -> None:
        """Run the forward of cpu_fast.py (packed weights on the CPU, torch attention backend)."""
        self.fast_path = True

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden]. kv_caches[i]: [2, blocks, block, Hkv, D];
        `meta` is what the attention backend's prepare() built for this batch."""
        if self.fast_path:
            from photoninfer.model.cpu_fast import fast_forward

            return fast_forward(self, input_ids, positions, kv_caches, meta)
        # a gather over all output elements: nn.Embedding's index_select runs few blocks for a few ids
        # (13 us for 16 ids of Llama-3.2-1B on an H100, against ~2 us)
        x, residual = self._decoder(input_ids, positions, kv_caches, meta)
        x, _ = self.norm(x, residual)
        return x

    def _decoder(self, input_ids, positions, kv_caches, meta):
        """(x, residual) after the last layer: the final norm of their sum is what forward returns."""
        table, steps = self.embed_tokens.weight, zip(self.layers, kv_caches)
        first, kv_cache = next(steps)
        if first.gathers_embedding(table, input_ids):
            x, residual = first.forward_from_ids(table, input_ids, positions, self.rope, kv_cache, self.attention, meta)
        else:
            x, residual = first(table[input_ids], None, positions, self.rope, kv_cache, self.attention, meta)
        for layer, kv_cache in steps:
            x, residual = layer(x, residual, positions, self.rope, kv_cache, self.attention, meta)
        return x, residual

    def all_logits(self, input_ids, positions, kv_caches, meta, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """raw_logits(forward(...)): every row's logits, as a decode step needs them, or with `rows` those rows'
        only (a prefill's last tokens). Decode-sized batches (of rows) run the final norm inside the LM head
        (kernels/norm_linear.py); for a lone prefill, norming only its last row there took Llama-3.2-1B's
        128-token prefill graph from 1,443 to 1,429 us (H100)."""
        if self.fast_path:
            hidden = self.forward(input_ids, positions, kv_caches, meta)
            return self.raw_logits(hidden if rows is None else hidden[rows])
        x, residual = self._decoder(input_ids, positions, kv_caches, meta)
        if rows is not None:
            x, residual = x[rows], residual[rows]
        if not _fuses_norms(self.norm_linear, x, residual):
            x, _ = self.norm(x, residual)
            return self.raw_logits(x)
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits, _ = self.norm_linear.fused_norm_linear(x, self.norm.weight, self.norm.eps, head, residual=residual)
        return logits

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, hidden] -> float32 logits [T, vocab]."""
        return self.raw_logits(hidden).float()

    def raw_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head's output in its own dtype: a greedy step takes its arg-max without a float32 copy
        (at batch 256 that copy of Llama-3's logits is 0.1 ms of a 2 ms step)."""
        if self.lm_head is None:
            return torch.nn.functional.linear(hidden, self.embed_tokens.weight)
        return self.lm_head(hidden)

    # ---- weight loading ----------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, object]], source: str, total: Optional[int] = None):
        """Hand each HF-named tensor to its parameter's `weight_loader` (fused layers get a row slice), then
        let every layer finish its weights (packing). Every parameter must be filled exactly once."""
        targets = dict(self._weight_targets())
        filled: set[str] = set()
        for name, tensor in tqdm(weights, total=total, desc="Loading weights", unit="tensor", leave=False):
            if name not in targets:
                if name == "lm_head.weight" and self.lm_head is None:
                    continue  # some tied checkpoints still store the head
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                raise ModelLoadError(f"{source}: unexpected tensor {name!r} for {self.config.architecture}")
            param, rows = targets[name]
            try:
                getattr(param, "weight_loader", default_weight_loader)(param, tensor, rows)
            except ModelLoadError as e:
                raise ModelLoadError(f"{source}: tensor {name!r}: {e}") from e
            filled.add(name)
        missing = sorted(set(targets) - filled)
        if missing:
            raise ModelLoadError(f"{source}: missing tensor(s) {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        for module in self.modules():
            if hasattr(module, "process_weights_after_loading"):
                module.process_weights_after_loading()

    def _weight_targets(self) -> Iterator[tuple[str, tuple[nn.Parameter, Optional[slice]]]]:
        """HF tensor name -> (our parameter, row slice inside it for fused layers)."""
        cfg = self.config
        yield "model.embed_tokens.weight", (self.embed_tokens.weight, None)
        yield "model.norm.weight", (self.norm.weight, None)
        if self.lm_head is not None:
            yield "lm_head.weight", (self.lm_head.weight, None)
        q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
        qkv_rows = {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            for part, rows in qkv_rows.items():
                yield f"{p}self_attn.{part}_proj.weight", (attn.qkv_proj.weight, rows)
                if attn.qkv_proj.bias is not None:
                    yield f"{p}self_attn.{part}_proj.bias", (attn.qkv_proj.bias, rows)
            yield f"{p}self_attn.o_proj.weight", (attn.o_proj.weight, None)
            if attn.q_norm is not None:
                yield f"{p}self_attn.q_norm.weight", (attn.q_norm.weight, None)
                yield f"{p}self_attn.k_norm.weight", (attn.k_norm.weight, None)
            yield f"{p}mlp.gate_proj.weight", (mlp.gate_up_proj.weight, slice(0, inter))
            yield f"{p}mlp.up_proj.weight", (mlp.gate_up_proj.weight, slice(inter, 2 * inter))
            yield f"{p}mlp.down_proj.weight", (mlp.down_proj.weight, None)
            yield f"{p}input_layernorm.weight", (layer.input_layernorm.weight, None)
            yield f"{p}post_attention_layernorm.weight", (layer.post_attention_layernorm.weight, None)

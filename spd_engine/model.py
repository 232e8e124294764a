"""The reference model: embed | decoder layers [a, b) at cache positions | final norm | LM head.

Pipeline stages, the vanilla decoder and the draft module's tower are all built from ``forward_layers``
over a contiguous layer range; embedding, final norm and head stay separate so each can live where the
schedule needs it. Every op goes through :mod:`spd_engine.ops`, so ``backend`` routes the whole forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Sequence

import torch
import torch.nn.functional as F

from . import ops
from .config import ModelConfig
from .errors import UserError
from .kv_cache import KVCache
from .weights import load_state_dict


@dataclass(frozen=True)
class AnchorCapture:
    """Where :meth:`Model.forward_layers` stores anchor hidden states: ``out[..., i, :]`` receives the
    residual-stream state of every row after ``layers_done[i]`` layers; ``out`` is (T, k, H) for one sequence
    or (B, T, k, H) for a batch. A layer count forward_layers does not run (0: the embedding) is the caller's
    to fill. The buffer belongs to the caller (allocated once), so a captured step writes in place."""
    layers_done: tuple[int, ...]
    out: torch.Tensor


def check_shape(name: str, tensor: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``tensor`` if it has ``shape``; otherwise a UserError naming it (a checkpoint for another config)."""
    if tuple(tensor.shape) != tuple(shape):
        raise UserError(f"tensor '{name}' has shape {list(tensor.shape)}, the config needs {list(shape)}")
    return tensor


@dataclass(frozen=True)
class LayerPlans:
    """Plans (``ops.plan_*``, host side, once) for the decoder layers of one fixed-shape step: outputs and
    workspaces allocated once, so every layer's ops launch without allocating. One set serves all the layers
    of a stage: they run one after another, and each buffer is consumed before the next layer rewrites it.
    The two norms have separate plans, so no norm reads the residual buffer it writes. A None member (the
    torch backend, or inputs a backend's kernels do not cover) runs that op unplanned."""
    attention: object = None
    input_norm: object = None
    post_norm: object = None
    mlp: object = None

    @classmethod
    def for_step(cls, model: "Model", cache: KVCache, cache_layer: int, first_layer: int, tokens: int = 1
                 ) -> "LayerPlans":
        """Plans for ``tokens`` new tokens of one sequence per step, over ``cache`` (its slot ``cache_layer``
        holds model layer ``first_layer``; every slot has the same shape)."""
        cfg, backend = model.config, model.backend
        layer = model.layers[first_layer]
        x_shape = (1, tokens, cfg.hidden_size)
        return cls(
            attention=ops.plan_attention((1, tokens, cfg.num_heads, cfg.head_dim), *cache.layer(cache_layer)[:2],
                                         backend=backend),
            input_norm=ops.plan_rms_norm(x_shape, model.dtype, layer.input_norm, backend=backend),
            post_norm=ops.plan_rms_norm(x_shape, model.dtype, layer.post_norm, backend=backend),
            mlp=ops.plan_swiglu_mlp(x_shape, layer.gate_up, layer.down, backend=backend),
        )


_NO_PLANS = LayerPlans()


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # (H,)
    qkv: torch.Tensor  # (Hq*D + 2*Hkv*D, H): q, k and v stacked so one GEMV produces all three
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None  # (D,) Qwen3 only
    k_norm: torch.Tensor | None
    o_proj: torch.Tensor  # (H, Hq*D)
    post_norm: torch.Tensor  # (H,)
    gate_up: torch.Tensor  # (2F, H): gate then up, one GEMV
    down: torch.Tensor  # (H, F)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str, cfg: ModelConfig) -> "LayerWeights":
        H, F, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        rows = {"q": cfg.q_size, "k": cfg.kv_size, "v": cfg.kv_size}

        def take(name, *shape):
            key = prefix + name
            if key not in sd:
                raise UserError(f"checkpoint lacks tensor '{key}'")
            return check_shape(key, sd.pop(key), shape)

        attn, mlp = "self_attn.", "mlp."
        bias = (torch.cat([take(attn + f"{p}_proj.bias", rows[p]) for p in "qkv"]) if cfg.attention_bias else None)
        return cls(
            input_norm=take("input_layernorm.weight", H),
            qkv=torch.cat([take(attn + f"{p}_proj.weight", rows[p], H) for p in "qkv"]),
            qkv_bias=bias,
            q_norm=take(attn + "q_norm.weight", D) if cfg.qk_norm else None,
            k_norm=take(attn + "k_norm.weight", D) if cfg.qk_norm else None,
            o_proj=take(attn + "o_proj.weight", H, cfg.q_size),
            post_norm=take("post_attention_layernorm.weight", H),
            gate_up=torch.cat([take(mlp + "gate_proj.weight", F, H), take(mlp + "up_proj.weight", F, H)]),
            down=take(mlp + "down_proj.weight", H, F),
        )

    @staticmethod
    def shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...] | None]:
        """Each field's shape for ``cfg`` (None: the family has no such tensor)."""
        H, F, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        qkv_rows = cfg.q_size + 2 * cfg.kv_size
        return {"input_norm": (H,), "qkv": (qkv_rows, H), "qkv_bias": (qkv_rows,) if cfg.attention_bias else None,
                "q_norm": (D,) if cfg.qk_norm else None, "k_norm": (D,) if cfg.qk_norm else None,
                "o_proj": (H, cfg.q_size), "post_norm": (H,), "gate_up": (2 * F, H), "down": (H, F)}

    def to(self, device) -> "LayerWeights":
        return LayerWeights(**{k: None if v is None else v.to(device) for k, v in vars(self).items()})


class Model:
    """Weights plus the forward pieces. Stateless: all sequence state lives in a :class:`KVCache`.

    A pipeline rank may hold only part of the weights: layers it does not run are None, and a stage rank
    holds no embedding, final norm or head.
    """

    def __init__(self, config: ModelConfig, embed: torch.Tensor | None, layers: Sequence[LayerWeights | None],
                 norm: torch.Tensor | None, lm_head: torch.Tensor | None, backend: str = "auto"):
        self.config = config
        self.embed_weight = embed
        self.layers = list(layers)
        self.norm_weight = norm
        self.lm_head_weight = lm_head
        self.backend = backend
        self._rope_cache: dict = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32, device="cpu",
                        backend: str = "auto", layers: Collection[int] | None = None,
                        embeddings_and_head: bool = True) -> "Model":
        """Load a HF directory. ``layers`` (default: all) and ``embeddings_and_head`` choose which weights are
        read at all, so one pipeline rank holds only its own."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise UserError(f"model directory '{model_dir}' does not exist")
        cfg = ModelConfig.from_dir(model_dir)

        def wanted(name: str) -> bool:
            if name.startswith("model.layers."):
                return layers is None or int(name.split(".")[2]) in layers
            return embeddings_and_head

        sd = load_state_dict(model_dir, dtype, keep=wanted)
        return cls.from_state_dict(cfg, sd, device=device, backend=backend, layers=layers,
                                   embeddings_and_head=embeddings_and_head)

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, sd: dict[str, torch.Tensor], device="cpu",
                        backend: str = "auto", layers: Collection[int] | None = None,
                        embeddings_and_head: bool = True) -> "Model":
        sd = dict(sd)
        held = [LayerWeights.from_state_dict(sd, f"model.layers.{i}.", cfg).to(device)
                if layers is None or i in layers else None for i in range(cfg.num_layers)]
        if not embeddings_and_head:
            return cls(cfg, None, held, None, None, backend=backend)
        if "model.embed_tokens.weight" not in sd:
            raise UserError("checkpoint lacks 'model.embed_tokens.weight'")
        table = (cfg.vocab_size, cfg.hidden_size)
        embed = check_shape("model.embed_tokens.weight", sd.pop("model.embed_tokens.weight"), table)
        head = sd.pop("lm_head.weight", None)
        if head is None and not cfg.tie_word_embeddings:
            raise UserError("checkpoint lacks 'lm_head.weight' and the config does not tie embeddings")
        if head is not None and not cfg.tie_word_embeddings:
            check_shape("lm_head.weight", head, table)
        norm = sd.pop("model.norm.weight", None)
        if norm is None:
            raise UserError("checkpoint lacks 'model.norm.weight'")
        check_shape("model.norm.weight", norm, (cfg.hidden_size,))
        embed = embed.to(device)
        head = embed if cfg.tie_word_embeddings else head.to(device)  # tied: a stored head copy is ignored, as in HF
        return cls(cfg, embed, held, norm.to(device), head, backend=backend)

    # ------------------------------------------------------------------ properties
    def _any_weight(self) -> torch.Tensor:
        if self.embed_weight is not None:
            return self.embed_weight
        return next(layer.input_norm for layer in self.layers if layer is not None)

    @property
    def device(self) -> torch.device:
        return self._any_weight().device

    @property
    def dtype(self) -> torch.dtype:
        return self._any_weight().dtype

    def new_cache(self, capacity: int, num_layers: int | None = None, batch: int = 1) -> KVCache:
        cfg = self.config
        return KVCache(num_layers or cfg.num_layers, capacity, cfg.num_kv_heads, cfg.head_dim,
                       self.dtype, self.device, batch=batch)

    def rope_tables(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (capacity, D/2) in float32, built once per capacity (HF computes them in float32 too)."""
        key = (capacity, self.device)
        if key not in self._rope_cache:
            inv_freq = self.config.inverse_frequencies()
            freqs = torch.outer(torch.arange(capacity, dtype=torch.float32), inv_freq)
            self._rope_cache[key] = (freqs.cos().to(self.device), freqs.sin().to(self.device))
        return self._rope_cache[key]

    # ------------------------------------------------------------------ forward pieces
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, H) hidden states."""
        return F.embedding(token_ids, self.embed_weight)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(hidden, self.norm_weight, self.config.rms_norm_eps, backend=self.backend)[0]

    def lm_head(self, normed: torch.Tensor) -> torch.Tensor:
        return F.linear(normed, self.lm_head_weight)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(hidden))

    def attention_block(self, layer: LayerWeights, x: torch.Tensor, attend) -> torch.Tensor:
        """qkv projection (+ Qwen biases / q-k norms), ``attend(q, k, v) -> (B, T, Hq, D)``, output projection.

        ``attend`` owns rotary and the cache: the cached decoder passes ``attention_with_kvcache``; the draft
        module's training passes a masked full-sequence attention.
        """
        cfg = self.config
        B, T, _ = x.shape
        qkv = F.linear(x, layer.qkv, layer.qkv_bias)
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(B, T, cfg.num_heads, cfg.head_dim)
        k = k.view(B, T, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(B, T, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = ops.rms_norm(q, layer.q_norm, cfg.rms_norm_eps, backend=self.backend)[0]
            k = ops.rms_norm(k, layer.k_norm, cfg.rms_norm_eps, backend=self.backend)[0]
        out = attend(q, k, v)  # may answer only the first rows' queries (see decoder_layer's ``keep``)
        return F.linear(out.reshape(B, out.shape[1], cfg.q_size), layer.o_proj)

    def decoder_layer(self, layer: LayerWeights, hidden: torch.Tensor, residual: torch.Tensor | None, attend,
                      keep: int | None = None, plans: LayerPlans | None = None):
        """One decoder layer in the fused-residual form: returns (branch output, residual stream).

        The layer's true output is ``branch + residual``; deferring that add lets it fuse into the next
        layer's input RMSNorm. With ``keep``, every row is a key but only the first ``keep`` rows leave the
        layer (``attend`` answers their queries only): the rest of the layer runs on those rows alone.
        ``plans`` (for this step's shape) make the norms and the MLP write into buffers planned once.
        """
        eps = self.config.rms_norm_eps
        plans = plans or _NO_PLANS
        x, residual = ops.rms_norm(hidden, layer.input_norm, eps, residual, backend=self.backend,
                                   plan=plans.input_norm)
        hidden = self.attention_block(layer, x, attend)
        if keep is not None:
            residual = residual[:, :keep]
        x, residual = ops.rms_norm(hidden, layer.post_norm, eps, residual, backend=self.backend, plan=plans.post_norm)
        return ops.swiglu_mlp(x, layer.gate_up, layer.down, backend=self.backend, plan=plans.mlp), residual

    def forward_layers(self, hidden: torch.Tensor, start: int, end: int, cache: KVCache,
                       anchors: AnchorCapture | None = None, cache_offset: int = 0, advance=None,
                       plans: LayerPlans | None = None) -> torch.Tensor:
        """Run layers ``[start, end)`` on ``hidden`` (B, T, H) at the cache's current positions.

        Each layer's new K/V are written at position ``cache.lengths[layer]`` (a device tensor), and its
        length then advances by T. ``anchors`` stores the hidden state after chosen layer counts (the draft
        module's anchors). ``cache_offset`` maps a model layer to its cache slot when a cache holds
        only a slice of the layers (one pipeline rank). ``advance`` overrides how far the lengths move (an int
        or a device tensor): the pipeline passes 0 for an idle stage, so its writes land past the live length
        and are never read. ``plans`` (:class:`LayerPlans` for this step's shape and cache) make every op of
        every layer launch into outputs and workspaces allocated once.
        """
        attention_plan = plans.attention if plans is not None else None
        cos, sin = self.rope_tables(cache.capacity)
        anchor_column = {done: i for i, done in enumerate(anchors.layers_done)} if anchors is not None else {}
        residual = None
        for index in range(start, end):
            k_cache, v_cache, lengths = cache.layer(index - cache_offset)

            def attend(q, k, v, k_cache=k_cache, v_cache=v_cache, lengths=lengths):
                return ops.attention_with_kvcache(q, k_cache, v_cache, k, v, lengths, cos, sin,
                                                  backend=self.backend, plan=attention_plan)

            hidden, residual = self.decoder_layer(self.layers[index], hidden, residual, attend, plans=plans)
            if index + 1 in anchor_column:
                column = anchors.out.select(-2, anchor_column[index + 1])
                column.copy_((hidden + residual).view(column.shape))
        cache.advance(start - cache_offset, end - cache_offset, hidden.shape[1] if advance is None else advance)
        return hidden + residual if residual is not None else hidden

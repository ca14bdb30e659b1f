"""PINT, the Particle Interaction Transformer: a causal transformer over time x (K + 1)
particle tokens (the background token last) that predicts the distribution of every particle in
the next frame. Usable on its own: `PINT(...)(particles)` with particles of shape [B, T, K, ...].

Attention is causal over time and full over particles. Its positional information is a learned
relative bias per layer and head, split into a time table (offset tk - tq) and a particle table
(offset nk - nq), added to the attention logits through `scaled_dot_product_attention`.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .encoder import reparameterize
from .nn.blocks import init_normal, mlp
from .nn.precision import full_precision
from .particles import Particles


class ParticleEmbedding(nn.Module):
    """Per-attribute MLPs, concatenated [pos, scale, transparency, depth, features] -> token.

    With `velocity`, each particle token also embeds the particle's change of position since the
    previous frame (zero in the first frame), scaled by VELOCITY_SCALE. Not in the official PINT,
    which must recover motion from differences of position embeddings; on Balls that explicit
    input halves the rollout error of a PINT trained for minutes (docs/training.md)."""

    VELOCITY_SCALE = 10.0      # frame-to-frame moves are ~0.1 of the [-1, 1] range: about 1 after scaling

    def __init__(self, features_dim: int, bg_features_dim: int, dim: int, velocity: bool = False):
        super().__init__()
        self.position = mlp(2, dim, 2)
        self.scale = mlp(2, dim, 2)
        self.transparency = mlp(1, dim, 1)
        self.depth = mlp(1, dim, 1)
        self.features = mlp(features_dim, dim, features_dim)
        self.particle = mlp(6 + features_dim, dim, dim)
        self.background = mlp(bg_features_dim, dim, dim)
        self.velocity = mlp(2, dim, dim) if velocity else None

    def forward(self, p: Particles) -> Tensor:
        """[B, T, K, ...] particles -> tokens [B, T, K + 1, D]."""
        tokens = self.still(p)
        if self.velocity is not None:
            tokens = tokens + self.motion(self.moved(p.position))
        return tokens

    @staticmethod
    def moved(position: Tensor) -> Tensor:
        """Each frame's change of position [B, T, K, 2] since the previous frame (zero in the first)."""
        return F.pad(position[:, 1:] - position[:, :-1], (0, 0, 0, 0, 1, 0))

    def still(self, p: Particles) -> Tensor:
        """Tokens [B, T, K + 1, D] without the motion term: each frame's depend on that frame only."""
        fg = torch.cat([self.position(p.position), self.scale(p.scale),
                        self.transparency(p.transparency[..., None]), self.depth(p.depth),
                        self.features(p.features)], -1)
        return torch.cat([self.particle(fg), self.background(p.bg_features)[..., None, :]], -2)

    def motion(self, moved: Tensor) -> Tensor:
        """The velocity term [B, T, K + 1, D] of position changes `moved` [B, T, K, 2] (none on
        the background token)."""
        return F.pad(self.velocity(moved * self.VELOCITY_SCALE), (0, 0, 0, 1))


class RelativeBias(nn.Module):
    """Learned additive attention bias: time table [2M-1, heads] + particle table [2N-1, heads]."""

    def __init__(self, max_frames: int, n_tokens: int, heads: int):
        super().__init__()
        self.max_frames, self.n_tokens = max_frames, n_tokens
        self.time = nn.Parameter(torch.zeros(2 * max_frames - 1, heads))
        self.particle = nn.Parameter(torch.zeros(2 * n_tokens - 1, heads))

    def forward(self, T: int) -> Tensor:
        """Bias [heads, N*T, N*T] for the particle-major token order n*T + t."""
        t = torch.arange(T, device=self.time.device)
        n = torch.arange(self.n_tokens, device=self.time.device)
        bt = self.time[self.max_frames - 1 + t[None, :] - t[:, None]].permute(2, 0, 1)      # [h, Tq, Tk]
        bp = self.particle[self.n_tokens - 1 + n[None, :] - n[:, None]].permute(2, 0, 1)    # [h, Nq, Nk]
        bias = bp[:, :, None, :, None] + bt[:, None, :, None, :]                             # [h,Nq,Tq,Nk,Tk]
        N = self.n_tokens
        return bias.reshape(-1, N * T, N * T)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout: float = 0.0) -> Tensor:
    """Attention of q [B, h, S, d] over k, v [B, h, S', d] with an additive mask [1, h or 1, S, S'].

    On a CPU in float32, up to ~2^20 attention scores (PINT's windows: a few hundred tokens a
    clip), two batched matmuls and a softmax beat SDPA: its blocked kernel in inference (AVX2 EPYC,
    two threads: one Balls clip 135 against 220 us, ten 1.3 against 2.4 ms; equal at ten OBJ3D
    clips), and in training, where the learned mask sends it to its math path with checks for
    fully masked rows that PINT's masks never have (64 windows of 42 tokens, forward and backward:
    7.8-8.3 against 8.8-10.4 ms). The results are SDPA's to 1e-6, its dropout masks drawn alike.
    Elsewhere, and in bf16 (SDPA's softmax runs in float32), SDPA."""
    B, h, S, d = q.shape
    if q.device.type != "cpu" or q.dtype != torch.float32 or B * h * S * k.shape[2] > 1 << 20:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    scores = torch.baddbmm(mask.expand(B, h, S, k.shape[2]).reshape(B * h, S, -1), q.reshape(B * h, S, d),
                           k.reshape(B * h, -1, d).transpose(1, 2), alpha=d ** -0.5)
    weights = scores.softmax(-1)
    if dropout:
        weights = F.dropout(weights, dropout)
    return torch.bmm(weights, v.reshape(B * h, -1, d)).view(B, h, S, d)


class CausalParticleAttention(nn.Module):
    def __init__(self, dim: int, heads: int, max_frames: int, n_tokens: int,
                 dropout: float, relative_bias: bool = True):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.bias = RelativeBias(max_frames, n_tokens, heads) if relative_bias else None
        self.resid_drop = nn.Dropout(dropout)

    def attention_mask(self, N: int, T: int, ref: Tensor) -> Tensor:
        """Additive mask [1, heads or 1, N*T, N*T]: relative bias, -inf on future frames. Cached
        while the bias tables are unchanged (a rollout asks for the same mask at every step)."""
        tables = () if self.bias is None else (self.bias.time, self.bias.particle)
        key = (N, T, ref.device, ref.dtype, torch.is_grad_enabled(), *((id(t), t._version) for t in tables))
        cached = getattr(self, "_mask_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        mask = self._build_mask(N, T, ref)
        if not torch.is_grad_enabled():     # a graph-carrying mask must not outlive its step
            self._mask_cache = (key, mask)
        return mask

    def _build_mask(self, N: int, T: int, ref: Tensor) -> Tensor:
        t = torch.arange(T, device=ref.device)
        causal = (t[None, :] <= t[:, None])[None, :, None, :].expand(N, T, N, T).reshape(N * T, N * T)
        bias = self.bias(T).to(ref.dtype) if self.bias is not None else torch.zeros(
            1, N * T, N * T, device=ref.device, dtype=ref.dtype)
        # A large finite value instead of -inf (same softmax: no row is fully masked) and a 4-D
        # mask let CPU SDPA take its fused kernel (measured ~2x faster per call).
        return bias.masked_fill(~causal, -1e9)[None]

    def forward(self, x: Tensor, mask: Tensor, queries: Optional[Tensor] = None) -> Tensor:
        """x [B, N*T, D] in particle-major order; mask [1, heads or 1, N*T, N*T] additive.
        `queries` (token indices) restricts the outputs to those tokens."""
        B, S, D = x.shape
        split = lambda t: t.view(B, -1, self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        xq = x if queries is None else x[:, queries]
        if queries is not None:
            mask = mask[..., queries, :]
        q, k, v = split(self.query(xq)), split(self.key(x)), split(self.value(x))
        y = attend(q, k, v, mask, self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, xq.shape[1], D)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, max_frames: int, n_tokens: int, dropout: float,
                 relative_bias: bool = True):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalParticleAttention(dim, heads, max_frames, n_tokens, dropout, relative_bias)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor, mask: Tensor, queries: Optional[Tensor] = None) -> Tensor:
        h = self.ln1(x)
        x = (x if queries is None else x[:, queries]) + self.attn(h, mask, queries)
        return x + self.mlp(self.ln2(x))


def init_transformer(modules) -> None:
    """The official transformer init, in module order: N(0, 0.02) linears (zero biases) and
    relative-bias tables, unit LayerNorms."""
    init_normal(modules, 0.02, (nn.Linear,), (nn.LayerNorm,), (RelativeBias,))


class ParticleReadout(nn.Module):
    """Tokens -> raw prior parameters per particle (and for the background token)."""

    def __init__(self, features_dim: int, bg_features_dim: int, dim: int):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU())
        self.position_y_head = nn.Linear(dim, 2)
        self.position_x_head = nn.Linear(dim, 2)
        self.scale_head = nn.Linear(dim, 4)
        self.transparency_head = nn.Linear(dim, 2)
        self.depth_head = nn.Linear(dim, 2)
        self.features_head = nn.Linear(dim, 2 * features_dim)
        self.bg_features_head = nn.Linear(dim, 2 * bg_features_dim)


class PINT(nn.Module):
    """Predicts p(particles_{t+1} | particles_{<=t}) for every t of the input in one pass."""

    def __init__(self, n_particles: int, features_dim: int, bg_features_dim: int | None = None,
                 dim: int = 256, heads: int = 8, layers: int = 6, max_frames: int = 10,
                 dropout: float = 0.1, predict_delta: bool = True, max_delta: float = 1.0,
                 activation: str = "tanh", relative_bias: bool = True, velocity_input: bool = False):
        """relative_bias=False replaces the relative attention bias by learned absolute
        time and particle embeddings added to the tokens (the paper's "No RPE" ablation).
        velocity_input=True adds the particles' frame-to-frame motion to their tokens
        (`ParticleEmbedding`; ours, off in the official PINT)."""
        super().__init__()
        bg_features_dim = bg_features_dim or features_dim
        if dim % heads:
            raise ValueError(f"pint_dim ({dim}) must be divisible by pint_heads ({heads})")
        self.n_tokens, self.max_frames = n_particles + 1, max_frames
        self.predict_delta, self.max_delta, self.activation = predict_delta, max_delta, activation
        self.embedding = ParticleEmbedding(features_dim, bg_features_dim, dim, velocity_input)
        self.blocks = nn.ModuleList(Block(dim, heads, max_frames, self.n_tokens, dropout, relative_bias)
                                    for _ in range(layers))
        self.absolute = None if relative_bias else nn.ParameterList(
            [nn.Parameter(torch.zeros(max_frames, dim)), nn.Parameter(torch.zeros(self.n_tokens, dim))])
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, dim, bias=False)
        self.readout = ParticleReadout(features_dim, bg_features_dim, dim)
        self.reset_transformer()

    def set_dropout(self, p: float) -> None:
        """Dropout probability of every attention and MLP dropout (a training setting, no weights)."""
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = p
            elif isinstance(m, CausalParticleAttention):
                m.dropout = p

    def reset_transformer(self) -> None:
        """Official init of the trunk: N(0, 0.02) linears and bias tables, unit LayerNorms."""
        init_transformer([*self.blocks.modules(), self.ln_f, self.head])
        if self.absolute is not None:
            for p in self.absolute:
                nn.init.normal_(p, std=0.02)

    def trunk(self, tokens: Tensor, last_frame_only: bool = False) -> Tensor:
        """tokens [B, T, N, D] -> [B, T, N, D] (causal in T); last_frame_only -> [B, 1, N, D]
        (a rollout step: the last block then computes only the last frame's tokens)."""
        B, T, N, D = tokens.shape
        if T > self.max_frames:
            raise ValueError(f"PINT sees at most {self.max_frames} frames at once, got {T}")
        x = self.flat_tokens(tokens)
        last = torch.arange(N, device=x.device) * T + T - 1 if last_frame_only else None
        for i, block in enumerate(self.blocks):
            final = i == len(self.blocks) - 1
            x = block(x, block.attn.attention_mask(N, T, x), last if final else None)
        x = self.head(self.ln_f(x))
        return x.view(B, N, -1, D).permute(0, 2, 1, 3)

    def flat_tokens(self, tokens: Tensor) -> Tensor:
        """tokens [B, T, N, D] -> the trunk's input [B, N*T, D] (particle-major), with the "No RPE"
        ablation's learned absolute time/particle codes where the model has them."""
        B, T, N, D = tokens.shape
        if self.absolute is not None:
            tokens = tokens + self.absolute[0][:T, None] + self.absolute[1]
        return tokens.permute(0, 2, 1, 3).reshape(B, N * T, D)

    def forward(self, p: Particles, position_only_trunk: bool = False) -> Particles:
        """Particles [B, T, K, ...] (values only are read) -> prior of frames 1..T [B, T, K, ...].
        `position_only_trunk`: see `read`."""
        return self.read(self.trunk(self.embedding(p)), p, position_only_trunk=position_only_trunk)

    def read(self, h: Tensor, p: Particles, min_beta: float = 0.0, position_only_trunk: bool = False) -> Particles:
        """Turn trunk outputs into distributions; with predict_delta means are offsets from `p`.
        `position_only_trunk` leaves the outputs as they are but lets only the position heads send
        gradient into the shared layers (the other heads still learn): a training option, see
        ddlp.pint_tuning."""
        r = self.readout
        h = full_precision(r.backbone(h))   # distributions in float32 under autocast (Beta, KL, sampling)
        fg, bg = h[..., :-1, :], h[..., -1, :]
        py, px = r.position_y_head(fg), r.position_x_head(fg)
        if position_only_trunk:
            fg, bg = fg.detach(), bg.detach()
        return self.distributions((py, px, r.scale_head(fg), r.transparency_head(fg), r.depth_head(fg),
                                   r.features_head(fg), r.bg_features_head(bg)), p, min_beta)

    def distributions(self, heads: tuple[Tensor, ...], p: Particles, min_beta: float = 0.0) -> Particles:
        """The prior from the readout heads' outputs (position y, position x, scale, transparency,
        depth, features: [..., K, *]; background features: [..., *]) and the frame `p` it follows."""
        py, px, scale, on, depth, features, bg = heads
        squash = torch.tanh if self.activation == "tanh" else torch.sigmoid
        position = self.max_delta * squash(torch.stack([py[..., 0], px[..., 0]], -1))
        position_logvar = torch.stack([py[..., 1], px[..., 1]], -1)
        scale_mu, scale_logvar = scale.chunk(2, -1)
        a, b = torch.exp(on[..., 0]), torch.exp(on[..., 1])
        if min_beta:
            a, b = a.clamp_min(min_beta), b.clamp_min(min_beta)
        depth_delta = depth[..., :1]
        features_mu, features_logvar = features.chunk(2, -1)
        bg_mu, bg_logvar = bg.chunk(2, -1)
        depth_mu = depth_delta
        if self.predict_delta:
            position = p.position + position
            scale_mu = p.scale + scale_mu
            depth_mu = p.depth + depth_delta
            features_mu = p.features + features_mu
            bg_mu = p.bg_features + bg_mu
        # Official quirk, kept for parity: the depth log-variance is the depth head's *mean*
        # output; its log-variance output is unused.
        return Particles(
            position=position, scale=scale_mu, depth=depth_mu, transparency=a / (a + b),
            features=features_mu, bg_features=bg_mu,
            position_mu=position, position_logvar=position_logvar,
            scale_mu=scale_mu, scale_logvar=scale_logvar,
            depth_mu=depth_mu, depth_logvar=depth_delta,
            transparency_a=a, transparency_b=b,
            features_mu=features_mu, features_logvar=features_logvar,
            bg_mu=bg_mu, bg_logvar=bg_logvar)

    def step(self, history: Particles, deterministic: bool = True) -> Particles:
        """Next-frame particles [B, K, ...] from the last `max_frames` frames of `history`."""
        window = history[:, -self.max_frames:]
        return self._draw(self.prior(self.embedding(window), window[:, -1]), deterministic)

    def prior(self, tokens: Tensor, last: Particles) -> Particles:
        """The prior of the frame after tokens [B, T, N, D] of a window whose last frame is `last`
        [B, K, ...]."""
        return self.read(self.trunk(tokens, last_frame_only=True)[:, -1], last, min_beta=1e-5)

    @staticmethod
    def _draw(prior: Particles, deterministic: bool) -> Particles:
        if deterministic:
            return prior
        position = reparameterize(prior.position_mu, prior.position_logvar, False)
        depth = reparameterize(prior.depth_mu, prior.depth_logvar, False)
        scale = reparameterize(prior.scale_mu, prior.scale_logvar, False)
        features = reparameterize(prior.features_mu, prior.features_logvar, False)
        bg = reparameterize(prior.bg_mu, prior.bg_logvar, False)
        on = torch.distributions.Beta(prior.transparency_a, prior.transparency_b).sample()
        return prior.replace(position=position, depth=depth, scale=scale, features=features,
                             bg_features=bg, transparency=on)

    @torch.no_grad()
    def rollout(self, history: Particles, steps: int, deterministic: bool = True,
                edit: Optional[Callable[[int, Particles], Particles]] = None,
                progress: bool = False) -> Particles:
        """Extend particles [B, T, K, ...] by `steps` PINT steps: [B, T + steps, K, ...] (values
        only). Each step sees the last `max_frames` frames. `edit(t, p)`, if given, may change
        each new frame t (p: [B, 1, K, ...]) before the next step sees it.

        The same as calling `step` on the growing history, but a frame's tokens are embedded
        once, when it arrives, and slide along with the window (a step embeds one frame, not
        max_frames). On a CPU it runs as a `PackedPINT`, in float32 or, under bf16 autocast on a CPU
        with native bf16, in bf16."""
        from tqdm import tqdm
        T0, M = history.batch_shape[1], self.max_frames
        out = [history.values()]
        window = out[0][:, -M:]
        last = window[:, -1]
        dtype = PackedPINT.applies(self, window.position)
        packed = PackedPINT(self, dtype) if dtype is not None else None
        emb, prior = (packed, packed.prior) if packed is not None else (self.embedding, self.prior)
        moving = self.embedding.velocity is not None
        still = emb.still(window)
        if moving:      # a window's first frame has not moved: its term is motion(0)
            moves = emb.motion(ParticleEmbedding.moved(window.position))
            at_rest = moves[:, :1]
        for t in tqdm(range(T0, T0 + steps), desc="rollout", disable=not progress, leave=False):
            tokens = still + torch.cat([at_rest, moves[:, 1:]], 1) if moving else still
            nxt = self._draw(prior(tokens, last), deterministic).values().map(lambda v: v.unsqueeze(1))
            if edit is not None:
                nxt = edit(t, nxt)
            out.append(nxt)
            # a bounded window keeps every step's cost the same, however long the rollout
            still = torch.cat([still, emb.still(nxt)], 1)[:, -M:]
            if moving:
                moves = torch.cat([moves, emb.motion(nxt.position - last.position[:, None])], 1)[:, -M:]
            last = nxt[:, -1]
        return Particles.cat(out)


# a linear's weight laid out for oneDNN, its bias, and in float32 a small weight as it is (`_linear`)
Packed = tuple[Tensor, Optional[Tensor], Optional[Tensor]]
SMALL_WEIGHT, FEW_ROWS = 256 * 256, 32


class PackedPINT:
    """A PINT for rollouts on a CPU, in float32 or bf16: the same computation as the plain PINT
    (under bf16 autocast for bf16), with each linear's weight cast and laid out for oneDNN once
    per rollout instead of at every call.
    Query/key/value are one matmul, ReLU, the trunk's residual adds and (in bf16) GELU are fused
    into the linears before them, the attention masks are built once per rollout, the five
    attribute MLPs of the embedding run as two block-diagonal linears and the readout's particle
    heads as one.

    A rollout step is ~50 small matmuls (70 tokens at Balls size, 7 for the embedding and the
    readout), where autocast's casts and the per-call weight reorder cost as much as the
    arithmetic (docs/performance.md). In float32 the same fusions, with plain attention for
    the single clip, make a Balls rollout's PINT steps 1.3x faster. LayerNorms take bf16 and
    return bf16 while computing in float32: autocast returns float32 there, which the next
    linear rounds to bf16 anyway. The heads' outputs go on in float32."""

    def __init__(self, pint: PINT, dtype: torch.dtype = torch.bfloat16):
        self.pint, self.dtype = pint, dtype
        pack = functools.partial(_pack, dtype=dtype)
        self.blocks = [dict(block=b, proj=pack(b.attn.proj), fc1=pack(b.mlp[0]), fc2=pack(b.mlp[2]))
                       for b in pint.blocks]
        for p in self.blocks[:-1]:
            p["qkv"] = pack(p["block"].attn.query, p["block"].attn.key, p["block"].attn.value)
        last = self.blocks[-1]      # a rollout step asks it for the last frame's queries only
        last.update(q=pack(last["block"].attn.query), kv=pack(last["block"].attn.key, last["block"].attn.value))
        self.head = pack(pint.head)
        self._mask_cache: dict = {}
        e, r = pint.embedding, pint.readout
        attributes = [e.position, e.scale, e.transparency, e.depth, e.features]
        self.attributes = [pack(*[m[0] for m in attributes], diagonal=True),
                           pack(*[m[2] for m in attributes], diagonal=True)]
        pack_mlp = lambda mlp: [pack(mlp[0]), pack(mlp[2])]    # noqa: E731 (nn.blocks.mlp: Linear-ReLU-Linear[-ReLU])
        self.particle, self.background = pack_mlp(e.particle), pack_mlp(e.background)
        self.velocity = None if e.velocity is None else pack_mlp(e.velocity)
        self.backbone = pack_mlp(r.backbone)
        heads = [r.position_y_head, r.position_x_head, r.scale_head, r.transparency_head, r.depth_head, r.features_head]
        self.heads_fg, self.head_sizes = pack(*heads), [h.out_features for h in heads]
        self.head_bg = pack(r.bg_features_head)

    @staticmethod
    def applies(pint: PINT, ref: Tensor) -> Optional[torch.dtype]:
        """The dtype a rollout of `pint` on tensors like `ref` runs packed in, or None for the
        plain PINT: on a CPU without gradients, float32 for float32 tensors outside autocast,
        bf16 under bf16 autocast on a CPU with native bf16."""
        if ref.device.type != "cpu" or torch.is_grad_enabled() or pint.training:
            return None
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.bfloat16 if torch.get_autocast_dtype("cpu") == torch.bfloat16 else None
        else:
            dtype = torch.float32 if ref.dtype == torch.float32 else None
        return dtype if dtype is not None and PackedPINT.available(dtype) else None

    @staticmethod
    @functools.cache
    def available(dtype: torch.dtype = torch.bfloat16) -> bool:
        """oneDNN's packed linear (a torch-internal op, with its fused activation and residual add)
        present and agreeing with F.linear on a small case in `dtype`, and for bf16 a CPU with
        native bf16: otherwise rollouts keep the plain PINT."""
        from .nn.precision import native_bf16
        if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
            return False
        if dtype == torch.bfloat16 and not native_bf16("cpu")[0]:
            return False
        # the global RNG is put back: the first rollout of a run (a validation) must not shift the
        # training's random draws, or a resumed run would differ from an uninterrupted one
        with torch.random.fork_rng(devices=[]):
            return PackedPINT._agrees(dtype)

    @staticmethod
    def _agrees(dtype: torch.dtype) -> bool:
        """The packed linear's GELU and residual-add forms against F.linear on random data."""
        tolerance = 0.05 if dtype == torch.bfloat16 else 1e-4
        try:
            layer = nn.Linear(32, 48)
            rows = FEW_ROWS + 1         # enough for oneDNN's kernel, not F.linear (`_linear`)
            x = torch.randn(1, rows, 32).to(dtype)
            residual = torch.randn(1, rows, 48).to(dtype)
            with torch.no_grad():
                packed = _pack(layer, dtype=dtype)
                got = _linear(x, packed, "gelu").float()
                got_sum = _linear(x, packed, residual=residual).float()
                plain = F.linear(x.float(), layer.weight.to(dtype).float(), layer.bias.to(dtype).float())
            return (got.shape == plain.shape and bool((got - F.gelu(plain)).abs().max() < tolerance)
                    and bool((got_sum - plain - residual.float()).abs().max() < tolerance))
        except RuntimeError:
            return False

    def _mlp(self, x: Tensor, layers: list[Packed]) -> Tensor:
        return _linear(_linear(x.to(self.dtype), layers[0], "relu"), layers[1])

    def still(self, p: Particles) -> Tensor:
        """`ParticleEmbedding.still`: tokens [B, T, K + 1, D] in the packed dtype."""
        with torch.autocast("cpu", enabled=False):
            x = torch.cat([p.position, p.scale, p.transparency[..., None], p.depth, p.features], -1)
            fg = self._mlp(self._mlp(x, self.attributes), self.particle)
            return torch.cat([fg, self._mlp(p.bg_features, self.background)[..., None, :]], -2)

    def motion(self, moved: Tensor) -> Tensor:
        """`ParticleEmbedding.motion` in the packed dtype."""
        with torch.autocast("cpu", enabled=False):
            return F.pad(self._mlp(moved * ParticleEmbedding.VELOCITY_SCALE, self.velocity), (0, 0, 0, 1))

    def prior(self, tokens: Tensor, last: Particles) -> Particles:
        """`PINT.prior`."""
        with torch.autocast("cpu", enabled=False):
            h = _linear(_linear(self.trunk(tokens, last_frame_only=True)[:, -1], self.backbone[0], "relu"),
                        self.backbone[1], "relu")
            fg = _linear(h[..., :-1, :], self.heads_fg).float().split(self.head_sizes, -1)
            bg = _linear(h[..., -1, :], self.head_bg).float()
        return self.pint.distributions((*fg, bg), last, min_beta=1e-5)

    def trunk(self, tokens: Tensor, last_frame_only: bool = False) -> Tensor:
        """`PINT.trunk` in the packed dtype. Each block's residual add runs inside the linear before it."""
        B, T, N, D = tokens.shape
        with torch.autocast("cpu", enabled=False):
            x = self.pint.flat_tokens(tokens).to(self.dtype)
            last, masks = self._masks(N, T, last_frame_only)
            heads = self.pint.blocks[0].attn.heads
            split = lambda t, n: t.view(B, -1, n, heads, D // heads).permute(2, 0, 3, 1, 4)  # noqa: E731
            for i, (p, mask) in enumerate(zip(self.blocks, masks)):
                block = p["block"]
                h = _layer_norm(x, block.ln1)
                if last is not None and i == len(self.blocks) - 1:
                    q, (k, v) = split(_linear(h[:, last], p["q"]), 1)[0], split(_linear(h, p["kv"]), 2)
                    x = x[:, last]
                else:
                    if "qkv" not in p:      # the last block, asked for every frame: packed on first use
                        p["qkv"] = _pack(block.attn.query, block.attn.key, block.attn.value, dtype=self.dtype)
                    q, k, v = split(_linear(h, p["qkv"]), 3)
                y = attend(q, k, v, mask)
                x = _linear(y.transpose(1, 2).reshape(B, x.shape[1], D), p["proj"], residual=x)
                x = _linear(_linear(_layer_norm(x, block.ln2), p["fc1"], "gelu"), p["fc2"], residual=x)
            x = _linear(_layer_norm(x, self.pint.ln_f), self.head)
        return x.view(B, N, -1, D).permute(0, 2, 1, 3)

    def _masks(self, N: int, T: int, last_frame_only: bool) -> tuple[Optional[Tensor], list[Tensor]]:
        """The last frame's token indices (or None) and each block's attention mask (the last
        block's rows cut to those tokens), built once per window shape: the weights are fixed."""
        key = (N, T, last_frame_only)
        if key not in self._mask_cache:
            ref = torch.empty(0, dtype=self.dtype)
            masks = [p["block"].attn.attention_mask(N, T, ref) for p in self.blocks]
            last = torch.arange(N) * T + T - 1 if last_frame_only else None
            if last is not None:
                masks[-1] = masks[-1][..., last, :].contiguous()
            self._mask_cache[key] = (last, masks)
        return self._mask_cache[key]


def _layer_norm(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    """`norm` of x without the module call: bf16 x is normalised in float32 and returned in bf16."""
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _pack(*linears: nn.Linear, diagonal: bool = False, dtype: torch.dtype = torch.bfloat16) -> Packed:
    """One `dtype` linear for `linears` reading the same input (their outputs concatenated) or,
    `diagonal`, each its own slice of the input (a block-diagonal weight)."""
    weights = [m.weight.detach() for m in linears]
    weight = (torch.block_diag(*weights) if diagonal else torch.cat(weights)).to(dtype)
    bias = None if linears[0].bias is None else torch.cat([m.bias.detach() for m in linears]).to(dtype)
    plain = weight if dtype == torch.float32 and weight.numel() <= SMALL_WEIGHT else None
    return torch.ops.mkldnn._reorder_linear_weight(weight, None), bias, plain


def _linear(x: Tensor, packed: Packed, activation: str = "none", residual: Optional[Tensor] = None) -> Tensor:
    """A packed linear on x [..., in] (in the packed dtype), its activation ("none", "relu", "gelu") or the
    addition of `residual` [..., out] fused. A float32 linear of at most SMALL_WEIGHT weights on at
    most FEW_ROWS rows (a rollout step's embedding, readout and last-frame queries) runs as
    F.linear: oneDNN's call costs ~50 us before any arithmetic, F.linear's ~15 (AVX2 EPYC, two
    threads: [7, 256] x [256, 256] 41-55 against 68-91 us); larger ones are faster packed. A
    float32 GELU runs on its own: oneDNN's fused erf GELU takes longer than the matmul itself
    (AVX2 EPYC: 540 us against 280 + 90 for [70, 256] x [256, 1024] and a separate GELU)."""
    flat = x.reshape(-1, x.shape[-1])
    fused = "none" if activation == "gelu" and flat.dtype == torch.float32 else activation
    if packed[2] is not None and flat.shape[0] <= FEW_ROWS:
        y, fused = F.linear(flat, packed[2], packed[1]), "none"
        if residual is not None:
            y += residual.reshape(y.shape)
    elif residual is not None:
        y = torch.ops.mkldnn._linear_pointwise.binary(flat, residual.reshape(flat.shape[0], -1), packed[0],
                                                      packed[1], "add")
    else:
        y = torch.ops.mkldnn._linear_pointwise(flat, packed[0], packed[1], fused, [],
                                               "none" if fused == "gelu" else "")
    if fused != activation:
        y = y.relu_() if activation == "relu" else F.gelu(y)
    return y.view(*x.shape[:-1], y.shape[-1])

"""PINT on its own: causality, the relative bias, and the delta/quirk rules."""
import pytest
import torch

from ddlp import PINT, Particles


def random_particles(B=2, T=4, K=3, F=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return Particles(position=r(B, T, K, 2).tanh(), scale=r(B, T, K, 2), depth=r(B, T, K, 1),
                     transparency=torch.rand(B, T, K, generator=g), features=r(B, T, K, F),
                     bg_features=r(B, T, F))


def make(**kw):
    torch.manual_seed(0)
    args = dict(n_particles=3, features_dim=2, dim=32, heads=4, layers=2, max_frames=4)
    args.update(kw)
    return PINT(**args).eval()


@pytest.mark.parametrize("velocity_input", [False, True])
def test_prediction_is_causal_in_time(velocity_input):
    pint, p = make(velocity_input=velocity_input), random_particles()
    out = pint(p)
    later = p.replace(position=p.position.clone())
    later.position[:, 2:] += 0.5                        # change frames 2 and 3 only
    out2 = pint(later)
    assert torch.allclose(out.position_mu[:, :2], out2.position_mu[:, :2], atol=1e-6)
    assert not torch.allclose(out.position_mu[:, 2:], out2.position_mu[:, 2:])


def test_relative_bias_layout():
    pint = make()
    rb = pint.blocks[0].attn.bias
    torch.nn.init.normal_(rb.time)
    torch.nn.init.normal_(rb.particle)
    T, N = 3, pint.n_tokens
    bias = rb(T)                                         # [heads, N*T, N*T], index n*T + t
    for nq in range(N):
        for tq in range(T):
            for nk in range(N):
                for tk in range(T):
                    want = rb.time[rb.max_frames - 1 + tk - tq] + rb.particle[N - 1 + nk - nq]
                    assert torch.allclose(bias[:, nq * T + tq, nk * T + tk], want)


def test_fused_attention_equals_explicit_softmax():
    pint = make()
    attn = pint.blocks[0].attn
    torch.nn.init.normal_(attn.bias.time)
    x = torch.randn(2, pint.n_tokens * 3, 32)
    mask = attn.attention_mask(pint.n_tokens, 3, x)
    B, S, D = x.shape
    q, k, v = (m(x).view(B, S, 4, 8).transpose(1, 2) for m in (attn.query, attn.key, attn.value))
    w = (q @ k.transpose(-1, -2) / 8 ** 0.5 + mask).softmax(-1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(B, S, D))
    assert torch.allclose(attn(x, mask), ref, atol=1e-5)


def test_delta_prediction_and_depth_quirk():
    p = random_particles()
    delta = make(predict_delta=True)(p)
    # means are offsets from the input; the depth "logvar" is the depth mean offset
    assert torch.allclose(delta.depth_logvar, delta.depth_mu - p.depth, atol=1e-6)
    absolute = make(predict_delta=False)(p)
    assert torch.equal(absolute.depth_logvar, absolute.depth_mu)
    assert absolute.position_mu.abs().max() <= 1


def test_rollout_step_uses_a_sliding_window():
    pint = make()
    p = random_particles(T=7)
    nxt = pint.step(p)                                   # only the last max_frames=4 frames matter
    assert torch.allclose(nxt.position, pint.step(p[:, -4:]).position, atol=1e-6)
    assert nxt.position.shape == (2, 3, 2) and nxt.bg_features.shape == (2, 2)
    s = pint.step(p, deterministic=False)
    assert ((s.transparency >= 0) & (s.transparency <= 1)).all()


def test_absolute_embedding_ablation():
    pint = make(relative_bias=False)
    assert all(b.attn.bias is None for b in pint.blocks)
    out = pint(random_particles())
    assert out.position_mu.shape == (2, 4, 3, 2)


@pytest.mark.parametrize("velocity_input", [False, True])
def test_rollout_step_equals_the_full_pass_at_the_last_frame(velocity_input):
    pint, p = make(velocity_input=velocity_input), random_particles(T=4)
    with torch.no_grad():
        full = pint(p)
        nxt = pint.step(p)
    for name in ("position", "scale", "depth", "transparency", "features", "bg_features"):
        assert torch.allclose(getattr(nxt, name), getattr(full, name)[:, -1], atol=1e-6), name


def test_cached_mask_follows_the_bias_tables():
    pint, p = make(), random_particles(T=4)
    with torch.no_grad():
        before = pint.step(p).position
        assert torch.equal(pint.step(p).position, before)          # cached mask, same answer
        pint.blocks[0].attn.bias.time[0].add_(5.0)                     # an optimizer step would do this
        assert not torch.allclose(pint.step(p).position, before)   # the cache noticed


FIELDS = ("position", "scale", "depth", "transparency", "features", "bg_features")


def stepwise(pint, history, steps):
    """Reference rollout: PINT.step on the whole, growing history (step windows it itself)."""
    history = history.values()
    with torch.no_grad():
        for _ in range(steps):
            nxt = pint.step(history, deterministic=True).values()
            history = Particles.cat([history, nxt.map(lambda t: t.unsqueeze(1))])
    return history


@pytest.mark.parametrize("relative_bias,velocity_input", [(True, False), (False, False), (True, True)])
def test_rollout_is_pint_step_with_a_sliding_window(relative_bias, velocity_input):
    # the rollout embeds each frame once and slides the tokens; with velocity input the frame
    # that becomes a window's first must lose its move, as `step` (which embeds the window) has it
    pint = make(relative_bias=relative_bias, velocity_input=velocity_input)
    p = random_particles(T=3)
    out = pint.rollout(p, 6)
    assert out.batch_shape == (2, 9)
    assert torch.equal(out.position[:, :3], p.position)
    ref = stepwise(pint, p, 6)
    for name in FIELDS:
        assert torch.allclose(getattr(out, name), getattr(ref, name), atol=1e-5), name


def test_rollout_edit_hook_changes_what_later_steps_see():
    pint = make()
    p = random_particles(T=3)
    seen = []

    def freeze_particle_0(t, nxt):
        seen.append((t, nxt.batch_shape))
        return nxt.replace(position=torch.cat([torch.zeros_like(nxt.position[:, :, :1]),
                                               nxt.position[:, :, 1:]], 2))

    out = pint.rollout(p, 4, edit=freeze_particle_0)
    assert seen == [(t, (2, 1)) for t in range(3, 7)]
    assert (out.position[:, 3:, 0] == 0).all()
    plain = pint.rollout(p, 4)
    assert torch.equal(out.position[:, 3, 1:], plain.position[:, 3, 1:])      # the first step is the same
    assert not torch.allclose(out.position[:, 4:, 1:], plain.position[:, 4:, 1:])  # later steps see the edit


def test_rollout_sampled_steps():
    pint = make()
    p = random_particles(T=3)
    torch.manual_seed(0)
    a = pint.rollout(p, 5, deterministic=False)
    torch.manual_seed(0)
    b = pint.rollout(p, 5, deterministic=False)
    assert torch.equal(a.position, b.position)
    assert not torch.allclose(a.position[:, 3:], pint.rollout(p, 5).position[:, 3:])
    assert ((a.transparency >= 0) & (a.transparency <= 1)).all()


def test_velocity_input_embeds_the_last_move():
    plain, moving = make(), make(velocity_input=True)
    extra = {k for k in moving.state_dict()} - {k for k in plain.state_dict()}
    assert extra and all(k.startswith("embedding.velocity.") for k in extra)
    e, p = moving.embedding, random_particles(T=4)

    def without_motion(t):      # the official token of frame t
        return e.particle(torch.cat([e.position(p.position[:, t]), e.scale(p.scale[:, t]),
                                     e.transparency(p.transparency[:, t, :, None]), e.depth(p.depth[:, t]),
                                     e.features(p.features[:, t])], -1))

    tokens = e(p)[:, :, :-1]
    # frame t adds the embedding of position[t] - position[t - 1], scaled; frame 0 of no move
    move = (p.position[:, 2] - p.position[:, 1]) * e.VELOCITY_SCALE
    assert torch.allclose(tokens[:, 2], without_motion(2) + e.velocity(move), atol=1e-6)
    assert torch.allclose(tokens[:, 0], without_motion(0) + e.velocity(torch.zeros(2)), atol=1e-6)


def packed_trunk_runs() -> bool:
    from ddlp.pint import PackedPINT
    return PackedPINT.available()


NEEDS_PACKED = pytest.mark.skipif(not packed_trunk_runs(), reason="the packed bf16 PINT needs a CPU with native bf16 (AMX or AVX512-BF16)")


def trained_looking(pint):
    for p in pint.parameters():          # not the near-zero initialisation
        p.data.normal_(0, 0.2) if p.dim() > 1 else p.data.uniform_(0.5, 1.5)
    return pint


@NEEDS_PACKED
@pytest.mark.parametrize("last_frame_only", [False, True])
def test_packed_trunk_is_as_accurate_as_bf16_autocast(last_frame_only):
    from ddlp.pint import PackedPINT
    pint = trained_looking(make(dim=64, heads=4, layers=3, relative_bias=True))
    with torch.no_grad():
        tokens = pint.embedding(random_particles(B=2, T=4))
        ref = pint.trunk(tokens, last_frame_only)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = pint.trunk(tokens, last_frame_only).float()
            packed = PackedPINT(pint).trunk(tokens, last_frame_only).float()
    assert packed.shape == ref.shape and packed.dtype == torch.float32
    err_autocast, err_packed = (autocast - ref).abs().max(), (packed - ref).abs().max()
    # the same roundings but one (GELU is applied before, not after, fc1's bf16 rounding)
    assert err_packed <= 1.5 * err_autocast + 1e-3, (float(err_packed), float(err_autocast))
    assert err_packed <= 0.02 * ref.abs().max()


@NEEDS_PACKED
def test_packed_embedding_and_readout_are_as_accurate_as_bf16_autocast():
    from ddlp.pint import PackedPINT
    torch.manual_seed(0)
    pint = trained_looking(make(dim=64, heads=4, layers=2, velocity_input=True))
    p = random_particles(B=2, T=4)
    e = pint.embedding
    moved = e.moved(p.position)
    with torch.no_grad():
        tokens = e(p)
        ref = dict(still=e.still(p), motion=e.motion(moved), prior=pint.prior(tokens, p[:, -1]).position_mu)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = dict(still=e.still(p), motion=e.motion(moved), prior=pint.prior(tokens, p[:, -1]).position_mu)
            packed = PackedPINT(pint)
            got = dict(still=packed.still(p), motion=packed.motion(moved), prior=packed.prior(tokens, p[:, -1]).position_mu)
    for key in ref:
        assert got[key].shape == ref[key].shape, key
        err_auto, err = (auto[key].float() - ref[key]).abs().max(), (got[key].float() - ref[key]).abs().max()
        # the same bf16 roundings; the heads' outputs stay float32 here (autocast rounds them)
        assert err <= 1.5 * err_auto + 1e-3, (key, float(err), float(err_auto))
        assert err <= 0.02 * ref[key].abs().max(), key


@NEEDS_PACKED
@pytest.mark.parametrize("velocity_input", [False, True])
def test_bf16_rollouts_on_the_cpu_run_packed_and_stay_close_to_autocast(monkeypatch, velocity_input):
    from ddlp.pint import PackedPINT
    calls = []
    original = PackedPINT.prior
    monkeypatch.setattr(PackedPINT, "prior", lambda self, *a: calls.append(1) or original(self, *a))
    torch.manual_seed(0)
    pint, p = make(velocity_input=velocity_input), random_particles(T=3)
    fp32 = pint.rollout(p, 4)
    assert len(calls) == 4                                       # packed in float32 too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pint.rollout(p, 4)
        monkeypatch.setattr(PackedPINT, "applies", staticmethod(lambda *a: None))
        autocast = pint.rollout(p, 4)
    assert len(calls) == 8 and out.batch_shape == (2, 7)
    err, err_auto = (out.position - fp32.position).abs().max(), (autocast.position - fp32.position).abs().max()
    assert err <= 2 * err_auto + 1e-3, (float(err), float(err_auto))


def test_float32_packing_runs_here():
    from ddlp.pint import PackedPINT
    assert PackedPINT.available(torch.float32), "oneDNN's packed float32 linear is missing from this torch build"


@pytest.mark.parametrize("rows", [5, 33])          # F.linear (at most FEW_ROWS rows), oneDNN's kernel
@pytest.mark.parametrize("activation, residual", [("none", False), ("relu", False), ("gelu", False), ("none", True)])
def test_float32_packed_linear_is_the_linear_on_both_routes(monkeypatch, rows, activation, residual):
    from ddlp.pint import FEW_ROWS, _linear, _pack
    g = torch.Generator().manual_seed(0)
    layers = [torch.nn.Linear(64, 48), torch.nn.Linear(64, 16)]
    x, res = torch.randn(2, rows, 64, generator=g), torch.randn(2, rows, 64, generator=g)
    with torch.no_grad():
        ref = torch.cat([layer(x) for layer in layers], -1) + (res if residual else 0)
        ref = dict(none=ref, relu=ref.relu(), gelu=torch.nn.functional.gelu(ref))[activation]
        calls, linear = [], torch.nn.functional.linear
        monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: calls.append(1) or linear(*a))
        got = _linear(x, _pack(*layers, dtype=torch.float32), activation, res if residual else None)
    assert len(calls) == (2 * rows <= FEW_ROWS) and 2 * 5 <= FEW_ROWS < 2 * 33
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("few_rows", [0, 32])     # 0: every linear through oneDNN; 32: small ones as F.linear
@pytest.mark.parametrize("last_frame_only", [False, True])
def test_packed_float32_trunk_embedding_and_readout_match_the_plain_pint(monkeypatch, last_frame_only, few_rows):
    from ddlp.pint import PackedPINT
    monkeypatch.setattr("ddlp.pint.FEW_ROWS", few_rows)
    pint = trained_looking(make(dim=64, heads=4, layers=3, velocity_input=True))
    p = random_particles(B=2, T=4)
    e, packed = pint.embedding, PackedPINT(pint, torch.float32)
    with torch.no_grad():
        tokens = e(p)
        pairs = [(packed.trunk(tokens, last_frame_only), pint.trunk(tokens, last_frame_only)),
                 (packed.still(p), e.still(p)), (packed.motion(e.moved(p.position)), e.motion(e.moved(p.position))),
                 (packed.prior(tokens, p[:, -1]).position_mu, pint.prior(tokens, p[:, -1]).position_mu)]
    for got, ref in pairs:
        assert got.dtype == torch.float32 and got.shape == ref.shape
        # the same float32 arithmetic in another order: rounding only
        assert (got - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("kw", [dict(), dict(velocity_input=True), dict(relative_bias=False)])
def test_float32_rollouts_run_packed_and_match_the_plain_pint(monkeypatch, kw):
    from ddlp.pint import PackedPINT
    calls = []
    original = PackedPINT.prior
    monkeypatch.setattr(PackedPINT, "prior", lambda self, *a: calls.append(self.dtype) or original(self, *a))
    pint, p = trained_looking(make(**kw)), random_particles(T=3)
    out = pint.rollout(p, 5)
    assert calls == [torch.float32] * 5
    with torch.no_grad():       # training mode or gradients: the plain PINT
        assert pint.train().rollout(p, 1) is not None and len(calls) == 5
    pint.eval()
    monkeypatch.setattr(PackedPINT, "applies", staticmethod(lambda *a: None))
    plain = pint.rollout(p, 5)
    assert out.batch_shape == plain.batch_shape == (2, 8)
    for name in ("position", "scale", "depth", "transparency", "features", "bg_features"):
        assert torch.allclose(getattr(out, name), getattr(plain, name), atol=1e-5), name


@pytest.mark.parametrize("clips", [1, 40])     # 1: two matmuls and a softmax; 40 (> 2^20 scores): SDPA
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_attention_matches_sdpa_values_gradients_and_dropout(clips, dropout):
    """`attend`, which PINT's blocks and the packed PINT share, is SDPA's attention on either of
    its routes: the same values and gradients (to the mask's learned bias too), and with dropout
    the same dropped weights for the same seed."""
    from ddlp.pint import attend
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(clips, 8, 70, 32, generator=g).requires_grad_() for _ in range(3))
    bias = torch.randn(1, 8, 70, 70, generator=g).requires_grad_()
    future = torch.rand(70, 70, generator=g) < 0.3

    def run(f):
        torch.manual_seed(1)
        out = f(q, k, v, bias.masked_fill(future, -1e9), dropout)
        grads = torch.autograd.grad((out * out.detach().sin()).sum(), (q, k, v, bias))
        return out, grads

    got, got_grads = run(attend)
    ref, ref_grads = run(lambda *a: torch.nn.functional.scaled_dot_product_attention(*a[:4], dropout_p=a[4]))
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-5)
    for a, b in zip(got_grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-5)
    assert dropout == 0 or not torch.allclose(got, run(lambda *a: attend(*a[:4]))[0], atol=1e-3)


def test_probing_the_packed_kernels_leaves_the_global_rng_alone():
    """The first rollout of a training run (a validation) probes oneDNN: the training's random
    draws after it must be those of a run that never rolled out, or resumed runs would differ."""
    from ddlp.pint import PackedPINT
    PackedPINT.available.cache_clear()
    state = torch.get_rng_state()
    assert PackedPINT.available(torch.float32)
    PackedPINT.available(torch.bfloat16)
    assert torch.equal(torch.get_rng_state(), state)

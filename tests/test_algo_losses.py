"""Policy losses against plain per-element re-implementations of the papers' equations."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from maspo_megatron.algo import losses as L
from maspo_megatron.algo.aggregation import seq_mean_token_mean
from maspo_megatron.algo.metrics import combine, metric_values

F64 = torch.float64


def grad_of(name, cfg, lp, lpo, adv, mask=None):
    """(loss, d sum(loss) / d logprobs) for float lists, in float64."""
    lp_t = torch.tensor(lp, dtype=F64, requires_grad=True)
    loss, _ = L.policy_loss(name, cfg, lp_t, torch.tensor(lpo, dtype=F64),
                            torch.tensor(adv, dtype=F64), mask)
    loss.sum().backward()
    return loss.detach(), lp_t.grad


# ------------------------------------------------------------------------------- MASPO reference


def ref_maspo(lp, lpo, A, sigma_base=1.0, alpha=0.3, sigma_high=10.0, adv_low=0.1,
              adv_high=10.0, beta_pos=0.03, beta_neg=0.03, clamp=20.0):
    """One token, Python floats, following the DESIGN.md equations literally.

    Returns loss, d loss / d lp, gate, and which branch/clamps fired."""
    d = lp - lpo
    inside = -clamp < d < clamp
    r = math.exp(min(max(d, -clamp), clamp))
    p_old = math.exp(lpo)
    m_raw = sigma_base / p_old**alpha
    m = min(max(m_raw, sigma_base), sigma_high)
    fired = set()
    if m_raw > sigma_high:
        fired.add("sigma_high")
    w = 1.0
    if A > 0 and r > 1:
        k = 1 + beta_pos * A
        fired.add("pos_overshoot")
    elif A < 0 and r < 1:
        k = 1 / (1 - beta_neg * A)
        fired.add("neg_overshoot")
    else:
        k = None
        fired.add("pos_undershoot" if A > 0 else "neg_undershoot" if A < 0 else "zero_adv")
    if k is not None:
        if k > adv_high:
            fired.add("adv_high")
        if k < adv_low:
            fired.add("adv_low")
        s = m * min(max(k, adv_low), adv_high)
        w = math.exp(-((r - 1) ** 2) / (2 * s * s))
    loss = -A * w * r
    grad = -A * w * r if inside else 0.0  # the ratio is constant outside the log-ratio clamp
    return loss, grad, w, fired


# (logp, logp_old, A): every branch, sigma_high binding, both risk clamps binding, A == 0,
# and a log-ratio beyond the clamp.
HAND_CASES = [
    (math.log(0.5) + 0.8, math.log(0.5), 1.0),     # A>0, r>1: gated by s_pos
    (math.log(0.5) - 0.5, math.log(0.5), 1.0),     # A>0, r<1: no gate
    (math.log(0.3) - 0.9, math.log(0.3), -1.5),    # A<0, r<1: gated by s_neg
    (math.log(0.3) + 0.4, math.log(0.3), -1.5),    # A<0, r>1: no gate
    (-30.0 + 3.0, -30.0, 2.0),                     # p_old tiny: m = exp(9) -> sigma_high
    (-0.1 + 1.5, -0.1, 500.0),                     # 1 + 0.03*500 = 16 -> adv_high
    (-0.2 - 1.2, -0.2, -500.0),                    # 1/(1 + 15) = 0.0625 -> adv_low
    (-1.0 + 0.3, -1.0, 0.0),                       # A == 0: neither branch
    (-0.5 - 2.0, -0.5, 0.7),                       # A>0, r << 1
    (-40.0 + 25.0, -40.0, -1.0),                   # log-ratio 25 > clamp 20
    (math.log(0.9) + 0.05, math.log(0.9), 3.0),    # near-on-policy: gate ~ 1
]


def test_maspo_hand_cases_values_and_grads():
    lp, lpo, A = map(list, zip(*HAND_CASES))
    loss, grad = grad_of("maspo", None, lp, lpo, A)
    fired = set()
    for i, case in enumerate(HAND_CASES):
        ref_loss, ref_grad, ref_w, f = ref_maspo(*case)
        fired |= f
        assert loss[i].item() == pytest.approx(ref_loss, rel=1e-12, abs=1e-12), case
        assert grad[i].item() == pytest.approx(ref_grad, rel=1e-12, abs=1e-12), case
    # The hand cases must really cover every branch and clamp.
    assert fired >= {"pos_overshoot", "pos_undershoot", "neg_overshoot", "neg_undershoot",
                     "zero_adv", "sigma_high", "adv_high", "adv_low"}


def test_maspo_gate_is_strictly_inside_gated_cases():
    # The gated cases really attenuate (otherwise the test above would not test the gate).
    for case in (HAND_CASES[0], HAND_CASES[2], HAND_CASES[4], HAND_CASES[5], HAND_CASES[6]):
        assert ref_maspo(*case)[2] < 0.99, case


def test_maspo_per_sequence_advantages_broadcast():
    lp = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -0.2, -1.0]], dtype=F64)
    lpo = torch.tensor([[-1.2, -0.4, -1.0], [-0.6, -0.1, -1.5]], dtype=F64)
    A_seq = torch.tensor([[2.0], [-1.0]], dtype=F64)
    a, _ = L.maspo_token_loss(lp, lpo, A_seq)
    b, _ = L.maspo_token_loss(lp, lpo, A_seq.expand(2, 3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_maspo_custom_config_matches_reference():
    cfg = L.MASPOConfig(sigma_base=0.5, alpha=0.7, sigma_high=3.0, adv_low=0.5, adv_high=2.0,
                        beta_pos=0.2, beta_neg=0.4)
    kw = dict(sigma_base=0.5, alpha=0.7, sigma_high=3.0, adv_low=0.5, adv_high=2.0,
              beta_pos=0.2, beta_neg=0.4)
    lp, lpo, A = map(list, zip(*HAND_CASES))
    loss, grad = grad_of("maspo", cfg, lp, lpo, A)
    for i, case in enumerate(HAND_CASES):
        ref_loss, ref_grad, _, _ = ref_maspo(*case, **kw)
        assert loss[i].item() == pytest.approx(ref_loss, rel=1e-12, abs=1e-12), case
        assert grad[i].item() == pytest.approx(ref_grad, rel=1e-12, abs=1e-12), case


token = st.tuples(st.floats(-8.0, -0.01), st.floats(-3.0, 3.0), st.floats(-50.0, 50.0))


@settings(max_examples=200, deadline=None)
@given(st.lists(token, min_size=1, max_size=16))
def test_maspo_properties(tokens):
    lpo = torch.tensor([t[0] for t in tokens], dtype=F64)
    lp = (lpo + torch.tensor([t[1] for t in tokens], dtype=F64)).requires_grad_(True)
    A = torch.tensor([t[2] for t in tokens], dtype=F64)
    loss, _ = L.maspo_token_loss(lp, lpo, A)
    loss.sum().backward()
    r = torch.exp(lp.detach() - lpo)
    w, _ = L.maspo_gate(r, lpo, A)

    assert bool(((w > 0) & (w <= 1)).all())
    overshoot = ((A > 0) & (r > 1)) | ((A < 0) & (r < 1))
    assert bool((w[~overshoot] == 1).all())
    # d loss / d logp = -A * w * dr/dlogp, and dr/dlogp = r.
    torch.testing.assert_close(lp.grad, -A * w * r, rtol=1e-12, atol=1e-12)
    for i, (lpo_i, d_i, a_i) in enumerate(tokens):
        ref_loss, ref_grad, ref_w, _ = ref_maspo(lp[i].item(), lpo_i, a_i)
        assert loss[i].item() == pytest.approx(ref_loss, rel=1e-9, abs=1e-12)
        assert w[i].item() == pytest.approx(ref_w, rel=1e-9, abs=1e-300)


@settings(max_examples=50, deadline=None)
@given(st.lists(token, min_size=1, max_size=16))
def test_maspo_infinite_width_is_vanilla_policy_gradient(tokens):
    cfg = L.MASPOConfig(sigma_base=1e9, sigma_high=1e10)
    lpo = torch.tensor([t[0] for t in tokens], dtype=F64)
    lp = (lpo + torch.tensor([t[1] for t in tokens], dtype=F64)).requires_grad_(True)
    A = torch.tensor([t[2] for t in tokens], dtype=F64)
    loss, _ = L.maspo_token_loss(lp, lpo, A, cfg)
    loss.sum().backward()
    r = torch.exp(lp.detach() - lpo)
    torch.testing.assert_close(loss.detach(), -A * r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lp.grad, -A * r, rtol=1e-12, atol=1e-12)


def test_maspo_gradcheck_and_stop_gradient():
    lpo = torch.tensor([-0.7, -1.2, -0.3, -2.0], dtype=F64)
    A = torch.tensor([1.3, -0.8, 2.0, -1.0], dtype=F64)
    # Ungated tokens (A>0 & r<1, A<0 & r>1): w == 1, so the loss is smooth in logp.
    lp_ungated = (lpo + torch.tensor([-0.4, 0.5, -1.0, 0.2], dtype=F64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: L.maspo_token_loss(x, lpo, A)[0], (lp_ungated,))
    # Gated tokens: the gate is a stop-gradient coefficient, so autograd must NOT see dw/dr;
    # finite differences (which do) differ from it, and autograd equals -A w r exactly.
    lp_gated = (lpo + torch.tensor([0.6, -0.7, 0.9, -0.5], dtype=F64)).requires_grad_(True)
    loss, _ = L.maspo_token_loss(lp_gated, lpo, A)
    loss.sum().backward()
    r = torch.exp(lp_gated.detach() - lpo)
    w, _ = L.maspo_gate(r, lpo, A)
    assert bool((w < 0.99).all())
    torch.testing.assert_close(lp_gated.grad, -A * w * r)
    h = 1e-6
    fd = (L.maspo_token_loss(lp_gated.detach() + h, lpo, A)[0]
          - L.maspo_token_loss(lp_gated.detach() - h, lpo, A)[0]) / (2 * h)
    assert bool(((fd - lp_gated.grad).abs() > 1e-4).all())


def test_maspo_metrics():
    lp = torch.tensor([[0.5, -0.5, -0.9, 0.4, 9.0]], dtype=F64)
    lpo = torch.zeros(1, 5, dtype=F64)
    A = torch.tensor([[2.0, 2.0, -1.0, -1.0, 1.0]], dtype=F64)
    mask = torch.tensor([[True, True, True, True, False]])  # the last token is padding
    _, m = L.maspo_token_loss(lp, lpo, A, mask=mask)
    r = [math.exp(x) for x in (0.5, -0.5, -0.9, 0.4)]
    w = [ref_maspo(lp[0, i].item(), 0.0, A[0, i].item())[2] for i in range(4)]
    assert w[0] < 0.99 and w[1] == 1 and w[2] < 0.99 and w[3] == 1
    assert metric_values(m)["maspo/gated_frac_pos"] == pytest.approx(0.5)
    assert metric_values(m)["maspo/gated_frac_neg"] == pytest.approx(0.5)
    assert metric_values(m)["maspo/gate_mean"] == pytest.approx(sum(w) / 4)
    sigmas = [1.0 * (1 + 0.03 * 2)] * 2 + [1.0 / (1 + 0.03)] * 2  # p_old = 1 -> m = sigma_base
    assert metric_values(m)["maspo/sigma_mean"] == pytest.approx(sum(sigmas) / 4)
    assert metric_values(m)["policy/ratio_mean"] == pytest.approx(sum(r) / 4)
    assert metric_values(m)["policy/ratio_max"] == pytest.approx(max(r))  # padding ratio e^9 excluded
    k3 = sum(x - 1 - math.log(x) for x in r) / 4
    assert metric_values(m)["policy/approx_kl_k3"] == pytest.approx(k3)
    assert all(not t.requires_grad and t.dim() == 0 for v in m.values() for t in v)
    # Each mean carries the count it averages over: 2 tokens of each sign, 4 with A != 0.
    assert float(m["maspo/gated_frac_pos"].weight) == float(m["maspo/gated_frac_neg"].weight) == 2
    assert float(m["maspo/sigma_mean"].weight) == float(m["maspo/gate_mean"].weight) == 4


def test_maspo_float32_and_bf16_inputs_computed_in_float32():
    lp = torch.tensor([[-1.0, -0.5]], dtype=torch.bfloat16, requires_grad=True)
    loss, _ = L.maspo_token_loss(lp, torch.tensor([[-1.5, -0.5]]), torch.tensor([[1.0]]))
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert lp.grad.dtype == torch.bfloat16


# ------------------------------------------------------------------------------- PPO / GRPO


def ref_ppo(r, A, eps_low, eps_high, c):
    """Piecewise loss and d loss / d log r of the PPO (dual-)clipped surrogate for one token."""
    if A >= 0:
        if r > 1 + eps_high:
            return -A * (1 + eps_high), 0.0
        return -A * r, -A * r
    # A < 0: the surrogate keeps the larger of r, clip(r): the loss is |A| max(r, 1-eps_low)
    if r < 1 - eps_low:
        return -A * (1 - eps_low), 0.0
    if c is not None and r > c:
        return -A * c, 0.0
    return -A * r, -A * r


@pytest.mark.parametrize("name,cfg,eps_low,eps_high,c", [
    ("grpo", None, 0.2, 0.2, 3.0),
    ("clip_higher", None, 0.2, 0.28, None),
    ("grpo", L.GRPOConfig(eps=0.1, dual_clip_c=None), 0.1, 0.1, None),
    ("clip_higher", L.ClipHigherConfig(dual_clip_c=2.0), 0.2, 0.28, 2.0),
])
def test_ppo_family_at_and_beyond_clip_boundaries(name, cfg, eps_low, eps_high, c):
    d = 1e-3
    ratios = [0.3, 1 - eps_low - d, 1 - eps_low + d, 1.0, 1 + eps_high - d, 1 + eps_high + d, 2.5]
    if c is not None:
        ratios += [c - d, c + d, 10.0]
    cases = [(r, A) for r in ratios for A in (1.5, -1.5)]
    lpo = [-1.0] * len(cases)
    lp = [-1.0 + math.log(r) for r, _ in cases]
    loss, grad = grad_of(name, cfg, lp, lpo, [A for _, A in cases])
    for i, (r, A) in enumerate(cases):
        ref_loss, ref_grad = ref_ppo(r, A, eps_low, eps_high, c)
        assert loss[i].item() == pytest.approx(ref_loss, rel=1e-10), (r, A)
        assert grad[i].item() == pytest.approx(ref_grad, rel=1e-10, abs=1e-14), (r, A)


def test_grpo_defaults_and_clip_metrics():
    cfg = L.GRPOConfig()
    assert (cfg.eps, cfg.dual_clip_c) == (0.2, 3.0)
    ch = L.ClipHigherConfig()
    assert (ch.eps_low, ch.eps_high, ch.dual_clip_c) == (0.2, 0.28, None)
    # r:      1.5 (A>0 clipped), 0.5 (A<0 clipped), 5 (A<0 dual-clipped), 1.1 (A>0 unclipped)
    r = torch.tensor([1.5, 0.5, 5.0, 1.1], dtype=F64)
    A = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=F64)
    _, m = L.grpo_loss(r.log(), torch.zeros(4, dtype=F64), A, None, cfg)
    assert metric_values(m)["grpo/clip_frac"] == pytest.approx(0.75)
    assert metric_values(m)["grpo/dual_clip_frac"] == pytest.approx(0.25)
    _, m = L.clip_higher_loss(r.log(), torch.zeros(4, dtype=F64), A, None, ch)
    assert metric_values(m)["clip_higher/clip_frac"] == pytest.approx(0.5)


def test_dual_clip_must_exceed_one():
    with pytest.raises(ValueError, match="dual_clip_c must be > 1"):
        L.GRPOConfig(dual_clip_c=0.9)


# ------------------------------------------------------------------------------- SAPO


def ref_sapo(r, A, tau_pos=1.0, tau_neg=1.05):
    tau = tau_pos if A > 0 else tau_neg
    sig = 1 / (1 + math.exp(-tau * (r - 1)))
    return -A * sig * 4 / tau, -A * 4 * sig * (1 - sig) * r


def test_sapo_values_grads_and_soft_decay():
    cases = [(r, A) for r in (0.2, 0.8, 1.0, 1.3, 3.0, 8.0) for A in (2.0, -2.0)]
    lp = [math.log(r) - 0.5 for r, _ in cases]
    loss, grad = grad_of("sapo", None, lp, [-0.5] * len(cases), [A for _, A in cases])
    for i, (r, A) in enumerate(cases):
        ref_loss, ref_grad = ref_sapo(r, A)
        assert loss[i].item() == pytest.approx(ref_loss, rel=1e-10), (r, A)
        assert grad[i].item() == pytest.approx(ref_grad, rel=1e-10), (r, A)
    # On-policy the gate leaves the policy gradient unchanged: d loss / d logp = -A at r = 1.
    i = cases.index((1.0, 2.0))
    assert grad[i].item() == pytest.approx(-2.0, rel=1e-12)
    # Far off-policy the gradient is attenuated but never hard-zeroed (unlike a PPO clip).
    for r_far in (8.0,):
        for A in (2.0, -2.0):
            g = grad[cases.index((r_far, A))].item()
            assert 0 < abs(g) < 0.05 * abs(A) * r_far


def test_sapo_uses_tau_neg_for_negative_advantages():
    cfg = L.SAPOConfig(tau_pos=0.5, tau_neg=4.0)
    loss, _ = grad_of("sapo", cfg, [0.3, 0.3], [0.0, 0.0], [1.0, -1.0])
    r = math.exp(0.3)
    assert loss[0].item() == pytest.approx(ref_sapo(r, 1.0, 0.5, 4.0)[0])
    assert loss[1].item() == pytest.approx(ref_sapo(r, -1.0, 0.5, 4.0)[0])


def test_sapo_gradcheck():
    lp = torch.tensor([-0.2, -1.0, 0.5, -2.0], dtype=F64, requires_grad=True)
    lpo = torch.tensor([-0.5, -0.4, -0.2, -1.0], dtype=F64)
    A = torch.tensor([1.0, -2.0, 0.5, -0.3], dtype=F64)
    assert torch.autograd.gradcheck(lambda x: L.sapo_loss(x, lpo, A, None, L.SAPOConfig())[0],
                                    (lp,))


# ------------------------------------------------------------------------------- GSPO


def _gspo_batch(seq_shift):
    """Two sequences of 3 + 2 response tokens (one pad), per-token log-ratio noise around
    a chosen sequence mean ``seq_shift[i]``; padding holds garbage."""
    lpo = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.1, -7.0]], dtype=F64)
    noise = torch.tensor([[0.01, -0.02, 0.01], [0.005, -0.005, 0.0]], dtype=F64)
    lp = lpo + noise + torch.tensor(seq_shift, dtype=F64)[:, None]
    lp[1, 2] = 40.0  # padding: must be ignored
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return lp, lpo, mask


def test_gspo_inside_and_beyond_band():
    cfg = L.GSPOConfig()
    assert (cfg.eps_low, cfg.eps_high) == (3e-4, 4e-4)
    for shift, A, clipped in [(1e-4, 1.0, False), (1e-3, 1.0, True), (-1e-4, -1.0, False),
                              (-1e-3, -1.0, True), (1e-3, -1.0, False), (-1e-3, 1.0, False)]:
        lp, lpo, mask = _gspo_batch([shift, shift])
        lp.requires_grad_(True)
        adv = torch.full((2, 1), A, dtype=F64)
        loss, m = L.gspo_loss(lp, lpo, adv, mask, cfg)
        loss.sum().backward()
        s = [math.exp(sum((lp[i, t] - lpo[i, t]).item() for t in range(n)) / n)
             for i, n in ((0, 3), (1, 2))]
        for i, n in ((0, 3), (1, 2)):
            if clipped:
                bound = 1 + cfg.eps_high if A > 0 else 1 - cfg.eps_low
                assert loss[i, :n].tolist() == pytest.approx([-A * bound] * n)
                assert lp.grad[i, :n].abs().max().item() == 0
            else:
                assert loss[i, :n].tolist() == pytest.approx([-A * s[i]] * n, rel=1e-12)
                assert lp.grad[i, :n].tolist() == pytest.approx([-A * s[i]] * n, rel=1e-12)
        assert metric_values(m)["gspo/clip_frac"] == (1.0 if clipped else 0.0)
        assert metric_values(m)["gspo/seq_ratio_mean"] == pytest.approx(sum(s) / 2)
        assert float(m["gspo/seq_ratio_mean"].weight) == 2  # a mean over sequences


def test_gspo_token_form_has_sequence_level_gradient():
    """GSPO-token + seq-mean-token-mean == the paper's sequence objective, in value and grad."""
    lp, lpo, mask = _gspo_batch([2e-4, -5e-4])
    A = torch.tensor([[1.5], [0.7]], dtype=F64)
    cfg = L.GSPOConfig()

    lp1 = lp.clone().requires_grad_(True)
    tok, _ = L.gspo_loss(lp1, lpo, A, mask, cfg)
    seq_mean_token_mean(tok, mask, 2).backward()

    lp2 = lp.clone().requires_grad_(True)
    obj = 0
    for i, n in ((0, 3), (1, 2)):
        s = torch.exp((lp2[i, :n] - lpo[i, :n]).mean())
        a = A[i, 0]
        obj = obj + torch.minimum(s * a, torch.clamp(s, 1 - 3e-4, 1 + 4e-4) * a)
    (-obj / 2).backward()
    torch.testing.assert_close(lp1.grad, lp2.grad, rtol=1e-12, atol=1e-15)


def test_gspo_requires_mask():
    with pytest.raises(ValueError, match="gspo needs the response mask"):
        L.policy_loss("gspo", None, torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 1), None)


# ------------------------------------------------------------------------------- CISPO


def test_cispo_at_and_beyond_cap():
    cfg = L.CISPOConfig()
    assert (cfg.eps_high, cfg.eps_low) == (3.0, None)
    cases = [(r, A) for r in (0.01, 0.5, 1.0, 3.99, 4.01, 50.0) for A in (1.0, -2.0)]
    lpo = -1.3
    lp = [lpo + math.log(r) for r, _ in cases]
    loss, grad = grad_of("cispo", cfg, lp, [lpo] * len(cases), [A for _, A in cases])
    for i, (r, A) in enumerate(cases):
        w = min(r, 4.0)  # no lower bound
        assert loss[i].item() == pytest.approx(-w * A * lp[i], rel=1e-10)
        # The clip bounds the weight but never zeroes the gradient.
        assert grad[i].item() == pytest.approx(-w * A, rel=1e-10)


def test_cispo_lower_bound_and_clip_frac():
    cfg = L.CISPOConfig(eps_low=0.2, eps_high=0.28)
    r = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    lp = (r.log() - 1).requires_grad_(True)
    loss, m = L.cispo_loss(lp, torch.full((3,), -1.0, dtype=F64), torch.ones(3, dtype=F64),
                           None, cfg)
    loss.sum().backward()
    assert lp.grad.tolist() == pytest.approx([-0.8, -1.0, -1.28])
    assert metric_values(m)["cispo/clip_frac"] == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------- TIS + registry


def test_tis_weight_is_capped_and_detached():
    lp = torch.tensor([-1.0, -1.0, -1.0], dtype=F64, requires_grad=True)
    lpo = torch.tensor([-0.9, -1.2, -1.0], dtype=F64, requires_grad=True)
    rollout = torch.tensor([-1.5, -1.0, -0.2], dtype=F64)  # old/rollout = e^0.6, e^-0.2, e^-0.8
    A = torch.tensor([1.0, -1.0, 2.0], dtype=F64)
    plain, _ = L.policy_loss("grpo", None, lp, lpo, A, None)
    loss, m = L.policy_loss("grpo", None, lp, lpo, A, None, rollout_logprobs=rollout,
                            tis_cap=1.5)
    w = [min(math.exp(0.6), 1.5), math.exp(-0.2), math.exp(-0.8)]
    assert loss.tolist() == pytest.approx([p * x for p, x in zip(plain.tolist(), w)], rel=1e-12)
    loss.sum().backward()
    assert lpo.grad is None  # neither the weight nor the old log-probs carry gradient
    assert metric_values(m)["tis/capped_frac"] == pytest.approx(1 / 3)
    assert metric_values(m)["tis/weight_mean"] == pytest.approx(sum(w) / 3)
    # Default cap is 2.
    assert L.truncated_is_weight(torch.tensor([5.0]), torch.tensor([0.0])).item() == \
        pytest.approx(2.0)
    with pytest.raises(ValueError, match="tis_cap was given without rollout_logprobs"):
        L.policy_loss("grpo", None, lp, lpo, A, None, tis_cap=2.0)


def test_registry_and_errors():
    assert set(L.LOSSES) == {"maspo", "grpo", "clip_higher", "sapo", "gspo", "cispo"}
    assert L.loss_config_class("maspo") is L.MASPOConfig
    assert L.get_loss("cispo") is L.cispo_loss
    with pytest.raises(ValueError, match="unknown policy loss 'ppo'.*clip_higher.*sapo"):
        L.get_loss("ppo")
    with pytest.raises(TypeError, match="takes a GRPOConfig, got MASPOConfig"):
        L.policy_loss("grpo", L.MASPOConfig(), torch.zeros(2), torch.zeros(2), torch.ones(2), None)
    with pytest.raises(ValueError, match="advantages .* must be per-token"):
        L.maspo_token_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3, 2))
    with pytest.raises(ValueError, match="sigma_high"):
        L.MASPOConfig(sigma_base=5.0, sigma_high=2.0)
    with pytest.raises(ValueError, match="MASPOConfig.alpha must be >= 0"):
        L.MASPOConfig(alpha=-1.0)


@pytest.mark.parametrize("name", sorted(L.LOSSES))
def test_every_loss_is_minus_advantage_on_policy(name):
    """At r == 1 every loss's gradient is the vanilla policy gradient -A (CISPO's value differs)."""
    lp = torch.tensor([[-0.4, -1.7, -0.9]], dtype=F64, requires_grad=True)
    A = torch.tensor([[0.8, -1.3, 0.0]], dtype=F64)
    loss, _ = L.policy_loss(name, None, lp, lp.detach().clone(), A, torch.ones(1, 3).bool())
    loss.sum().backward()
    torch.testing.assert_close(lp.grad, -A, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", sorted(L.LOSSES))
def test_metrics_of_any_split_combine_to_those_of_one_call(name):
    """Each metric carries its own weight: combining the calls of any row split gives exactly
    the metrics of one call over the whole batch (the sign-split MASPO fractions, the A != 0
    width and GSPO's per-sequence ratio included)."""
    g = torch.Generator().manual_seed(7)
    n, t = 7, 6
    lpo = -torch.rand(n, t, generator=g, dtype=F64) * 3
    lp = lpo + 0.7 * torch.randn(n, t, generator=g, dtype=F64)
    rollout = lpo + 0.5 * torch.randn(n, t, generator=g, dtype=F64)
    A = torch.tensor([[1.5], [-0.7], [0.0], [2.0], [-1.2], [0.4], [-0.3]], dtype=F64)
    lengths = torch.tensor([6, 2, 4, 5, 1, 3, 6])
    mask = torch.arange(t)[None] < lengths[:, None]
    mask[4] = False  # a fully masked row

    def call(rows):
        return L.policy_loss(name, None, lp[rows], lpo[rows], A[rows], mask[rows],
                             rollout_logprobs=rollout[rows], tis_cap=1.5)[1]

    whole = call(slice(None))
    parts = combine(call(rows) for rows in (slice(0, 1), slice(1, 4), slice(4, 5), slice(5, 7)))
    assert parts.keys() == whole.keys()
    got, want = metric_values(parts), metric_values(whole)
    for key in whole:
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
        assert float(parts[key].weight) == float(whole[key].weight), key

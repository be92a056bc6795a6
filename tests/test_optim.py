"""Optimizers and learning-rate schedules (sparsegrid.nn.optim); checkpoints are in
test_checkpoint.py.

The optimizers are checked against references written here from the published update
equations (the algorithm boxes of PyTorch's documentation), and against torch.optim
itself when torch happens to be installed.
"""

import math

import numpy as np
import pytest

from sparsegrid import autodiff as ad
from sparsegrid.autodiff import Tensor
from nn_helpers import deep_equal as _deep_equal
from sparsegrid.nn import Parameter
from sparsegrid.nn import optim

SHAPES = [(3, 4), (5,)]
N_STEPS = 6


# -- references from the published equations ------------------------------------------------
def ref_sgd(theta, grads, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
    """torch.optim.SGD's documented algorithm, one parameter, all steps; every iterate."""
    out, buf = [], None
    for t, g in enumerate(grads, start=1):
        if weight_decay != 0:
            g = g + weight_decay * theta
        if momentum != 0:
            buf = g if t == 1 else momentum * buf + (1 - dampening) * g
            g = g + momentum * buf if nesterov else buf
        theta = theta - lr * g
        out.append(theta)
    return out


def ref_adam(theta, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
             amsgrad=False, decoupled=False):
    """torch.optim.Adam / AdamW's documented algorithm (AMSGrad: running max of v_t, then
    bias correction); every iterate."""
    beta1, beta2 = betas
    m = v = v_max = np.zeros_like(theta)
    out = []
    for t, g in enumerate(grads, start=1):
        if decoupled:
            theta = theta - lr * weight_decay * theta
        elif weight_decay != 0:
            g = g + weight_decay * theta
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1 ** t)
        if amsgrad:
            v_max = np.maximum(v_max, v)
            v_hat = v_max / (1 - beta2 ** t)
        else:
            v_hat = v / (1 - beta2 ** t)
        theta = theta - lr * m_hat / (np.sqrt(v_hat) + eps)
        out.append(theta)
    return out


SGD_CASES = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.1, momentum=0.9),
    "dampening": dict(lr=0.1, momentum=0.9, dampening=0.3),
    "nesterov": dict(lr=0.05, momentum=0.8, nesterov=True),
    "weight_decay": dict(lr=0.1, momentum=0.9, weight_decay=0.05),
    "weight_decay_nesterov": dict(lr=0.1, momentum=0.5, weight_decay=0.2, nesterov=True),
}
ADAM_CASES = {
    "default": dict(lr=0.01),
    "betas": dict(lr=0.02, betas=(0.5, 0.6), eps=1e-3),
    "amsgrad": dict(lr=0.02, betas=(0.8, 0.6), amsgrad=True),
    "weight_decay": dict(lr=0.01, weight_decay=0.3),
    "amsgrad_weight_decay": dict(lr=0.02, betas=(0.8, 0.6), weight_decay=0.3, amsgrad=True),
}
ADAMW_CASES = {
    "default": dict(lr=0.01),
    "strong_decay": dict(lr=0.05, weight_decay=0.5, betas=(0.7, 0.9)),
    "amsgrad": dict(lr=0.02, betas=(0.8, 0.6), weight_decay=0.1, amsgrad=True),
}


def _problem(rng, dtype=np.float64):
    """Initial values and a gradient sequence whose scale falls (so AMSGrad's running
    maximum differs from the current second moment)."""
    init = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    scales = [3.0, 1.0, 0.2, 2.0, 0.05, 0.5][:N_STEPS]
    grads = [[(scale * rng.standard_normal(s)).astype(dtype) for s in SHAPES]
             for scale in scales]
    return init, grads


def _run(cls, kwargs, init, grads):
    params = [Parameter(x.copy()) for x in init]
    opt = cls(params, **kwargs)
    history = []
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.copy()
        opt.step()
        history.append([p.data.copy() for p in params])
    return params, opt, history


def _reference(cls, kwargs, theta, grads):
    if cls is optim.SGD:
        return ref_sgd(theta, grads, **kwargs)
    if cls is optim.AdamW:  # AdamW's default weight decay is 0.01, Adam's 0
        return ref_adam(theta, grads, decoupled=True, **{"weight_decay": 1e-2, **kwargs})
    return ref_adam(theta, grads, **kwargs)


ALL_CASES = ([(optim.SGD, name, kw) for name, kw in SGD_CASES.items()]
             + [(optim.Adam, name, kw) for name, kw in ADAM_CASES.items()]
             + [(optim.AdamW, name, kw) for name, kw in ADAMW_CASES.items()])
CASE_IDS = [f"{cls.__name__}-{name}" for cls, name, _ in ALL_CASES]


@pytest.mark.parametrize("cls,name,kwargs", ALL_CASES, ids=CASE_IDS)
def test_matches_published_update_rule(rng, cls, name, kwargs):
    init, grads = _problem(rng)
    _, _, history = _run(cls, kwargs, init, grads)
    for k in range(len(SHAPES)):
        expected = _reference(cls, kwargs, init[k], [g[k] for g in grads])
        for step in range(N_STEPS):
            np.testing.assert_allclose(history[step][k], expected[step], rtol=1e-12,
                                       atol=1e-14, err_msg=f"param {k}, step {step + 1}")
            assert history[step][k].dtype == np.float64


def test_options_change_the_result(rng):
    """Guards the reference comparison: each option makes a visible difference."""
    init, grads = _problem(rng)

    def final(cls, **kw):
        return _run(cls, kw, init, grads)[2][-1][0]

    base_sgd = final(optim.SGD, lr=0.1, momentum=0.9)
    for kw in (dict(dampening=0.3), dict(nesterov=True), dict(weight_decay=0.05)):
        assert not np.allclose(final(optim.SGD, lr=0.1, momentum=0.9, **kw), base_sgd)
    base_adam = final(optim.Adam, lr=0.02, betas=(0.8, 0.6))
    assert not np.allclose(final(optim.Adam, lr=0.02, betas=(0.8, 0.6), amsgrad=True), base_adam)
    assert not np.allclose(final(optim.Adam, lr=0.02, betas=(0.8, 0.6), weight_decay=0.3),
                           base_adam)
    # AdamW's decoupled decay is not Adam's L2 term
    assert not np.allclose(final(optim.AdamW, lr=0.02, weight_decay=0.3),
                           final(optim.Adam, lr=0.02, weight_decay=0.3))
    assert np.array_equal(final(optim.AdamW, lr=0.02, weight_decay=0.0),
                          final(optim.Adam, lr=0.02))


@pytest.mark.parametrize("cls,name,kwargs", ALL_CASES, ids=CASE_IDS)
def test_matches_torch(rng, cls, name, kwargs):
    torch = pytest.importorskip("torch")
    init, grads = _problem(rng)
    _, _, history = _run(cls, kwargs, init, grads)
    tparams = [torch.tensor(x.copy(), requires_grad=True) for x in init]
    topt = getattr(torch.optim, cls.__name__)(tparams, **kwargs)
    for step, step_grads in enumerate(grads):
        for p, g in zip(tparams, step_grads):
            p.grad = torch.from_numpy(g.copy())
        topt.step()
        for k, p in enumerate(tparams):
            np.testing.assert_allclose(history[step][k], p.detach().numpy(), rtol=1e-12,
                                       atol=1e-14, err_msg=f"param {k}, step {step + 1}")


def test_schedules_match_torch():
    torch = pytest.importorskip("torch")
    cases = [
        ("LambdaLR", dict(lr_lambda=lambda e: 1.0 / (1 + e))),
        ("StepLR", dict(step_size=3, gamma=0.5)),
        ("MultiStepLR", dict(milestones=[2, 5, 5, 8], gamma=0.3)),
        ("ExponentialLR", dict(gamma=0.9)),
        ("CosineAnnealingLR", dict(T_max=6, eta_min=0.01)),
    ]
    for name, kwargs in cases:
        ours_opt = optim.SGD([Parameter(np.zeros(2))], lr=0.5)
        ours = getattr(optim, name)(ours_opt, **kwargs)
        theirs_opt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.5)
        theirs = getattr(torch.optim.lr_scheduler, name)(theirs_opt, **kwargs)
        for epoch in range(15):
            np.testing.assert_allclose(ours.get_last_lr(), theirs.get_last_lr(), rtol=1e-12,
                                       atol=1e-15, err_msg=f"{name}, epoch {epoch}")
            theirs_opt.step()
            theirs.step()
            ours.step()


# -- dtype, missing gradients, groups ------------------------------------------------------------
@pytest.mark.parametrize("cls,kwargs", [
    (optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)),
    (optim.Adam, dict(lr=0.01, weight_decay=0.01, amsgrad=True)),
    (optim.AdamW, dict(lr=0.01, amsgrad=True)),
], ids=["SGD", "Adam", "AdamW"])
def test_float32_stays_float32(rng, cls, kwargs):
    init, grads = _problem(rng, np.float32)
    params, opt, history = _run(cls, kwargs, init, grads)
    for p in params:
        assert p.data.dtype == np.float32
        for value in opt.state_of(p).values():
            if isinstance(value, np.ndarray):
                assert value.dtype == np.float32
    expected = _reference(cls, kwargs, init[0].astype(np.float64),
                          [g[0].astype(np.float64) for g in grads])
    np.testing.assert_allclose(params[0].data, expected[-1], rtol=1e-4, atol=1e-5)
    # a float64 gradient on a float32 parameter is cast, not promoted
    params[0].grad = np.ones(SHAPES[0])
    opt.step()
    assert params[0].data.dtype == np.float32


def test_update_is_in_place(rng):
    p = Parameter(rng.standard_normal(4))
    array = p.data
    opt = optim.Adam([p], lr=0.1)
    p.grad = np.ones(4)
    opt.step()
    assert p.data is array


@pytest.mark.parametrize("cls", [optim.SGD, optim.Adam, optim.AdamW])
def test_parameters_without_gradient_are_untouched(rng, cls):
    a, b = Parameter(rng.standard_normal(3)), Parameter(rng.standard_normal(3))
    before = b.data.copy()
    opt = cls([a, b], lr=0.1, weight_decay=0.1)
    for _ in range(3):
        a.grad = rng.standard_normal(3)
        opt.step()
    assert np.array_equal(b.data, before)
    assert opt.state_of(b) == {}
    assert not np.array_equal(a.data, before)


def test_zero_grad(rng):
    a, b = Parameter(rng.standard_normal(3)), Parameter(rng.standard_normal(2))
    opt = optim.SGD([a, b], lr=0.1)
    a.grad, b.grad = np.ones(3), np.ones(2)
    opt.zero_grad(set_to_none=False)
    assert np.array_equal(a.grad, np.zeros(3)) and np.array_equal(b.grad, np.zeros(2))
    opt.zero_grad()
    assert a.grad is None and b.grad is None
    opt.step()  # nothing to do


def test_param_groups_have_their_own_hyperparameters(rng):
    a, b = Parameter(rng.standard_normal(3)), Parameter(rng.standard_normal(3))
    a0, b0 = a.data.copy(), b.data.copy()
    opt = optim.SGD([{"params": [a]}, {"params": b, "lr": 0.01}], lr=0.1, momentum=0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    assert opt.param_groups[1]["momentum"] == 0.5
    g = rng.standard_normal(3)
    a.grad, b.grad = g, g
    opt.step()
    np.testing.assert_allclose(a.data, a0 - 0.1 * g, rtol=1e-15)
    np.testing.assert_allclose(b.data, b0 - 0.01 * g, rtol=1e-15)
    c = Parameter(rng.standard_normal(2))
    opt.add_param_group({"params": [c], "momentum": 0.0})
    assert opt.param_groups[2]["lr"] == 0.1 and opt.param_groups[2]["momentum"] == 0.0
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [a]})
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [Parameter(np.zeros(1))], "lr": -1.0})


def test_validation():
    p = [Parameter(np.zeros(2))]
    with pytest.raises(ValueError, match="lr"):
        optim.SGD(p, lr=-0.1)
    with pytest.raises(ValueError, match="momentum"):
        optim.SGD(p, lr=0.1, momentum=-0.5)
    with pytest.raises(ValueError, match="weight_decay"):
        optim.SGD(p, lr=0.1, weight_decay=-1)
    with pytest.raises(ValueError, match="nesterov"):
        optim.SGD(p, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="nesterov"):
        optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)
    for bad in [(1.0, 0.9), (0.9, 1.0), (-0.1, 0.9), (0.9,)]:
        with pytest.raises(ValueError, match="betas"):
            optim.Adam(p, betas=bad)
    with pytest.raises(ValueError, match="eps"):
        optim.Adam(p, eps=-1e-8)
    with pytest.raises(ValueError, match="weight_decay"):
        optim.AdamW(p, weight_decay=-0.01)
    with pytest.raises(ValueError, match="lr"):
        optim.AdamW(p, lr=float("nan"))
    with pytest.raises(TypeError):
        optim.SGD([np.zeros(2)], lr=0.1)
    with pytest.raises(TypeError):
        optim.SGD(Parameter(np.zeros(2)), lr=0.1)  # a Tensor, not an iterable of them
    with pytest.raises(ValueError, match="empty"):
        optim.Adam([])
    with pytest.raises(ValueError, match="empty"):
        optim.Adam(iter(()))
    # generators work, plain Tensors (requires_grad False) too
    assert len(optim.SGD((q for q in p), lr=0.1).param_groups[0]["params"]) == 1
    optim.SGD([Tensor(np.zeros(2))], lr=0.1)


def test_repr():
    opt = optim.Adam([Parameter(np.zeros(2))], lr=0.5)
    text = repr(opt)
    assert text.startswith("Adam (") and "Parameter Group 0" in text and "lr: 0.5" in text
    assert "betas: (0.9, 0.999)" in text
    assert "StepLR" in repr(optim.StepLR(opt, 2))


# -- state dict ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kwargs", [
    (optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1)),
    (optim.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.01)),
    (optim.AdamW, dict(lr=0.01, betas=(0.8, 0.9))),
], ids=["SGD", "Adam", "AdamW"])
def test_state_dict_round_trip_continues_identically(rng, cls, kwargs):
    init, grads = _problem(rng)
    params_a = [Parameter(x.copy()) for x in init]
    opt_a = cls(params_a, **kwargs)
    for step_grads in grads[:3]:
        for p, g in zip(params_a, step_grads):
            p.grad = g.copy()
        opt_a.step()
    saved = opt_a.state_dict()
    assert sorted(saved["state"]) == [0, 1]
    assert saved["param_groups"][0]["params"] == [0, 1]
    first_array = next(v for v in saved["state"][0].values() if isinstance(v, np.ndarray))
    assert not any(first_array is v for v in opt_a.state_of(params_a[0]).values())  # a copy

    params_b = [Parameter(p.data.copy()) for p in params_a]
    opt_b = cls(params_b, lr=123.0)  # hyper-parameters come from the state dict
    opt_b.load_state_dict(saved)
    first_array += 1.0  # the loaded optimizer does not share the saved arrays
    assert opt_b.param_groups[0]["lr"] == kwargs["lr"]
    assert _deep_equal(opt_b.state_dict(), opt_a.state_dict())
    for step_grads in grads[3:]:
        for pa, pb, g in zip(params_a, params_b, step_grads):
            pa.grad, pb.grad = g.copy(), g.copy()
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(params_a, params_b):
        assert np.array_equal(pa.data, pb.data)


def test_load_state_dict_checks_structure(rng):
    a, b = Parameter(np.zeros(2)), Parameter(np.zeros(3))
    saved = optim.SGD([a, b], lr=0.1).state_dict()
    with pytest.raises(ValueError, match="parameters"):
        optim.SGD([a], lr=0.1).load_state_dict(saved)
    with pytest.raises(ValueError, match="groups"):
        optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.1).load_state_dict(saved)


# -- schedules -----------------------------------------------------------------------------------
BASE_LRS = [0.5, 0.1]


def _two_group_sgd():
    return optim.SGD([{"params": [Parameter(np.zeros(2))]},
                      {"params": [Parameter(np.zeros(2))], "lr": BASE_LRS[1]}],
                     lr=BASE_LRS[0])


SCHEDULES = {
    "LambdaLR": (lambda o: optim.LambdaLR(o, lambda e: 0.95 ** e + 0.1 * (e % 3)),
                 lambda base, e: base * (0.95 ** e + 0.1 * (e % 3))),
    "StepLR": (lambda o: optim.StepLR(o, step_size=3, gamma=0.5),
               lambda base, e: base * 0.5 ** (e // 3)),
    "MultiStepLR": (lambda o: optim.MultiStepLR(o, milestones=[8, 2, 5, 5], gamma=0.3),
                    lambda base, e: base * 0.3 ** sum(m <= e for m in [2, 5, 5, 8])),
    "ExponentialLR": (lambda o: optim.ExponentialLR(o, gamma=0.9),
                      lambda base, e: base * 0.9 ** e),
    "CosineAnnealingLR": (lambda o: optim.CosineAnnealingLR(o, T_max=6, eta_min=0.01),
                          lambda base, e: 0.01 + (base - 0.01) * (1 + math.cos(math.pi * e / 6)) / 2),
    "ExponentialDecayLR": (lambda o: optim.ExponentialDecayLR(o, decay=0.04),
                           lambda base, e: base * math.exp(-0.04 * e)),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_follows_closed_form(name):
    make, closed_form = SCHEDULES[name]
    opt = _two_group_sgd()
    sched = make(opt)
    assert [g["initial_lr"] for g in opt.param_groups] == BASE_LRS
    seen = []
    for epoch in range(12):
        assert sched.last_epoch == epoch
        expected = [closed_form(base, epoch) for base in BASE_LRS]
        np.testing.assert_allclose(sched.get_last_lr(), expected, rtol=1e-13)
        assert [g["lr"] for g in opt.param_groups] == sched.get_last_lr()
        seen.append(sched.get_last_lr()[0])
        sched.step()
    assert len(set(seen)) > 2  # the rate actually changes
    assert [g["initial_lr"] for g in opt.param_groups] == BASE_LRS


def test_exponential_decay_matches_sparseconvnet():
    """SCN's ClassificationTrainValidate sets, at the start of epoch = 1, 2, ...:
    lr = initial_lr * exp((1 - epoch) * lr_decay). Here: train, then step()."""
    initial_lr, lr_decay = 0.1, 4e-2
    p = Parameter(np.zeros(1))
    opt = optim.SGD([p], lr=initial_lr, momentum=0.9)
    sched = optim.ExponentialDecayLR(opt, decay=lr_decay)
    for epoch in range(1, 21):
        scn_lr = initial_lr * math.exp((1 - epoch) * lr_decay)
        assert sched.epoch == epoch
        assert opt.param_groups[0]["lr"] == pytest.approx(scn_lr, rel=1e-15)
        sched.step()


def test_schedule_changes_the_step_size():
    p = Parameter(np.zeros(1))
    opt = optim.SGD([p], lr=1.0)
    sched = optim.StepLR(opt, step_size=1, gamma=0.5)
    for expected in [1.0, 0.5, 0.25]:
        before = p.data.copy()
        p.grad = np.ones(1)
        opt.step()
        assert before - p.data == pytest.approx(expected)
        sched.step()


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_state_dict_round_trip(name):
    make, _ = SCHEDULES[name]
    opt_a = _two_group_sgd()
    sched_a = make(opt_a)
    for _ in range(4):
        sched_a.step()
    opt_b = _two_group_sgd()
    sched_b = make(opt_b)
    opt_b.load_state_dict(opt_a.state_dict())
    sched_b.load_state_dict(sched_a.state_dict())
    assert sched_b.last_epoch == 4 and sched_b.get_last_lr() == sched_a.get_last_lr()
    for _ in range(5):
        sched_a.step()
        sched_b.step()
        assert sched_a.get_last_lr() == sched_b.get_last_lr()
        assert [g["lr"] for g in opt_b.param_groups] == sched_a.get_last_lr()


def test_schedule_resume_with_last_epoch():
    opt = _two_group_sgd()
    with pytest.raises(KeyError, match="initial_lr"):
        optim.ExponentialLR(opt, gamma=0.5, last_epoch=3)
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    sched = optim.ExponentialLR(opt, gamma=0.5, last_epoch=3)
    assert sched.last_epoch == 4
    np.testing.assert_allclose(sched.get_last_lr(), [b * 0.5 ** 4 for b in BASE_LRS])
    with pytest.raises(ValueError, match="step_size"):
        optim.StepLR(opt, step_size=0)
    with pytest.raises(ValueError, match="T_max"):
        optim.CosineAnnealingLR(opt, T_max=0)


# -- end to end ----------------------------------------------------------------------------------
@pytest.mark.parametrize("make,steps", [
    (lambda ps: optim.SGD(ps, lr=0.02), 150),
    (lambda ps: optim.SGD(ps, lr=0.01, momentum=0.9, nesterov=True), 150),
    (lambda ps: optim.Adam(ps, lr=0.1), 150),
    (lambda ps: optim.AdamW(ps, lr=0.1, weight_decay=1e-4, amsgrad=True), 150),
], ids=["SGD", "SGD-nesterov", "Adam", "AdamW-amsgrad"])
def test_minimises_a_quadratic(rng, make, steps):
    A = rng.standard_normal((8, 4))
    b = A @ rng.standard_normal((4, 1))
    x = Parameter(np.zeros((4, 1)))
    opt = make([x])

    def loss_fn():
        r = ad.sub(ad.matmul(Tensor(A), x), Tensor(b))
        return ad.sum(ad.mul(r, r))

    first = loss_fn().item()
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss_fn().item() < first / 100


# -- hardening: every bad hyper-parameter is refused, naming it and the value ---------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from nn_helpers import bits_equal, training_snapshot  # noqa: E402

_NOT_NUMBERS = st.one_of(st.text(max_size=5), st.none(), st.booleans(),
                         st.lists(st.floats(0, 1), max_size=2), st.just(np.bool_(True)),
                         st.just(1 + 2j))
_NON_FINITE = st.sampled_from([float("nan"), float("inf"), -float("inf"), np.float32("nan"),
                               np.float64("inf")])
_NEGATIVE = st.one_of(st.floats(max_value=-1e-300, allow_nan=False, allow_infinity=False),
                      st.integers(max_value=-1))
_BAD_NONNEGATIVE = st.one_of(_NOT_NUMBERS, _NON_FINITE, _NEGATIVE)
_BAD_FINITE = st.one_of(_NOT_NUMBERS, _NON_FINITE)
_BAD_BOOL = st.one_of(st.text(max_size=5), st.none(), st.floats(), st.integers().filter(
    lambda n: n not in (0, 1)), st.lists(st.booleans(), max_size=2))
_BAD_UNIT = st.one_of(_BAD_NONNEGATIVE, st.floats(min_value=1.0, allow_nan=False,
                                                 allow_infinity=False))


def _bad_int(low):
    return st.one_of(st.text(max_size=3), st.none(), st.booleans(), _NON_FINITE,
                     st.floats(allow_nan=False, allow_infinity=False),   # 2.0 is no int
                     st.integers(max_value=low - 1), st.just(np.bool_(False)))


def _params():
    return [Parameter(np.zeros(2)), Parameter(np.zeros((2, 3), np.float32))]


# constructor, its valid keyword arguments, {argument: strategy of bad values}
OPTIMIZER_ARGS = [
    (optim.SGD, dict(lr=0.1, momentum=0.9), dict(
        lr=_BAD_NONNEGATIVE, momentum=_BAD_NONNEGATIVE, dampening=_BAD_NONNEGATIVE,
        weight_decay=_BAD_NONNEGATIVE, nesterov=_BAD_BOOL)),
    (optim.Adam, dict(lr=0.1), dict(
        lr=_BAD_NONNEGATIVE, eps=_BAD_NONNEGATIVE, weight_decay=_BAD_NONNEGATIVE,
        amsgrad=_BAD_BOOL)),
    (optim.AdamW, dict(lr=0.1), dict(
        lr=_BAD_NONNEGATIVE, eps=_BAD_NONNEGATIVE, weight_decay=_BAD_NONNEGATIVE,
        amsgrad=_BAD_BOOL)),
]


def _check_message(exc, name, value):
    text = str(exc)
    assert name in text, text
    if not isinstance(value, (list, tuple)):
        assert repr(value) in text or repr(float(value)) in text, text


def _flat_cases(table):
    return [(cls, valid, name, strategy) for cls, valid, bad in table
            for name, strategy in bad.items()]


@pytest.mark.parametrize("cls,valid,name,strategy", _flat_cases(OPTIMIZER_ARGS),
                         ids=[f"{c.__name__}-{n}" for c, _, n, _ in _flat_cases(OPTIMIZER_ARGS)])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_optimizer_refuses_bad_scalars(cls, valid, name, strategy, data):
    value = data.draw(strategy, label=name)
    with pytest.raises((TypeError, ValueError)) as info:
        cls(_params(), **{**valid, name: value})
    _check_message(info.value, name, value)
    # the same value in a parameter group is refused too, and the optimizer stays as it was
    opt = cls(_params(), **valid)
    before = training_snapshot(optimizer=opt)
    with pytest.raises((TypeError, ValueError)):
        opt.add_param_group({"params": [Parameter(np.zeros(1))], name: value})
    assert len(opt.param_groups) == 1 and bits_equal(before[1], opt.state_dict())


@pytest.mark.parametrize("cls", [optim.Adam, optim.AdamW])
@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_adam_refuses_bad_betas(cls, data):
    which = data.draw(st.sampled_from([0, 1]))
    bad = data.draw(_BAD_UNIT)
    betas = [0.9, 0.999]
    betas[which] = bad
    with pytest.raises((TypeError, ValueError), match=rf"betas\[{which}\]") as info:
        cls(_params(), betas=tuple(betas))
    _check_message(info.value, f"betas[{which}]", bad)
    with pytest.raises((TypeError, ValueError), match="betas"):
        cls(_params(), betas=data.draw(st.one_of(st.none(), st.floats(), st.text(max_size=3),
                                                 st.lists(st.floats(0, 0.5), min_size=3))))


def test_boundaries_and_bool_likes_are_accepted():
    p = _params()
    optim.SGD(p, lr=0, momentum=0, dampening=0, weight_decay=0)
    optim.SGD(p, lr=np.float32(0.1), momentum=np.float64(0.9), nesterov=np.bool_(True))
    optim.Adam(p, lr=0, betas=(0, 0), eps=0, weight_decay=0, amsgrad=1)
    opt = optim.AdamW(p, betas=[np.float32(0.5), 0.999], amsgrad=np.bool_(False))
    assert opt.param_groups[0]["amsgrad"] is False
    assert optim.SGD(p, lr=0.1, momentum=0.5, nesterov=1).param_groups[0]["nesterov"] is True


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=0.1, nesterov=True), "momentum > 0"),
    (dict(lr=0.1, momentum=0.0, nesterov=True), "momentum > 0"),
    (dict(lr=0.1, momentum=0.9, dampening=0.5, nesterov=True), "dampening == 0"),
    (dict(lr=0.1, momentum=0.9, nesterov="False"), r"nesterov.*expected a bool.*'False'"),
    (dict(lr=float("inf")), r"Invalid lr: inf \(must be a finite real number >= 0"),
    (dict(lr="0.1"), r"Invalid lr: expected a finite real number >= 0\.0; got '0.1' \(str\)"),
    (dict(lr=0.1, dampening=-0.5), "dampening"),
], ids=["no-momentum", "zero-momentum", "dampening", "string-bool", "inf", "string", "damp"])
def test_sgd_messages(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        optim.SGD(_params(), **kwargs)


# schedule constructors: (name, factory(optimizer, **kwargs), valid kwargs, bad strategies)
SCHEDULE_ARGS = [
    (optim.StepLR, dict(step_size=2, gamma=0.5),
     dict(step_size=_bad_int(1), gamma=_BAD_NONNEGATIVE, last_epoch=_bad_int(-1))),
    (optim.MultiStepLR, dict(milestones=[2, 4], gamma=0.5),
     dict(gamma=_BAD_NONNEGATIVE, last_epoch=_bad_int(-1))),
    (optim.ExponentialLR, dict(gamma=0.9),
     dict(gamma=_BAD_NONNEGATIVE, last_epoch=_bad_int(-1))),
    (optim.CosineAnnealingLR, dict(T_max=5, eta_min=0.0),
     dict(T_max=_bad_int(1), eta_min=_BAD_NONNEGATIVE, last_epoch=_bad_int(-1))),
    (optim.ExponentialDecayLR, dict(decay=0.04),
     dict(decay=_BAD_FINITE, last_epoch=_bad_int(-1))),
    (optim.LambdaLR, dict(lr_lambda=lambda e: 1.0),
     dict(last_epoch=_bad_int(-1))),
]


def _sgd_for_schedules():
    return optim.SGD([{"params": [Parameter(np.zeros(2))]},
                      {"params": [Parameter(np.zeros(2))], "lr": 0.01}], lr=0.1)


@pytest.mark.parametrize("cls,valid,name,strategy", _flat_cases(SCHEDULE_ARGS),
                         ids=[f"{c.__name__}-{n}" for c, _, n, _ in _flat_cases(SCHEDULE_ARGS)])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_schedule_refuses_bad_scalars(cls, valid, name, strategy, data):
    value = data.draw(strategy, label=name)
    opt = _sgd_for_schedules()
    before = training_snapshot(optimizer=opt)
    with pytest.raises((TypeError, ValueError)) as info:
        cls(opt, **{**valid, name: value})
    _check_message(info.value, name, value)
    assert bits_equal(before[1], opt.state_dict())   # no initial_lr, no lr change


@settings(max_examples=80, deadline=None)
@given(milestones=st.one_of(
    st.none(), st.integers(), st.floats(), st.text(min_size=1, max_size=4),
    st.lists(st.one_of(st.integers(0, 9), st.floats(), st.none(), st.booleans(),
                       st.integers(max_value=-1), st.text(max_size=2)), min_size=1).filter(
        lambda ms: not all(isinstance(m, int) and not isinstance(m, bool) and m >= 0
                           for m in ms))))
def test_multistep_refuses_bad_milestones(milestones):
    opt = _sgd_for_schedules()
    before = training_snapshot(optimizer=opt)
    with pytest.raises((TypeError, ValueError), match="milestones"):
        optim.MultiStepLR(opt, milestones=milestones)
    assert bits_equal(before[1], opt.state_dict())


def test_schedule_needs_a_sparsegrid_optimizer():
    for cls, valid, _ in SCHEDULE_ARGS:
        with pytest.raises(TypeError, match="optimizer.*list"):
            cls([], **valid)


def test_valid_schedule_arguments_still_work():
    opt = _sgd_for_schedules()
    optim.StepLR(opt, step_size=np.int64(3), gamma=0)
    optim.MultiStepLR(opt, milestones=(0, np.int32(3), 3), gamma=2.0)
    optim.MultiStepLR(opt, milestones=np.array([1, 2]))
    optim.CosineAnnealingLR(opt, T_max=1, eta_min=np.float32(0.001))
    optim.ExponentialDecayLR(opt, decay=-0.1)   # a growing rate is allowed, as gamma > 1


# -- hardening: optimizer and schedule loads are all or nothing ----------------------------------
def _trained_adam(rng, **kwargs):
    params = [Parameter(rng.standard_normal(3)), Parameter(rng.standard_normal((2, 2)))]
    opt = optim.Adam(params, lr=0.01, **kwargs)
    for _ in range(2):
        for p in params:
            p.grad = rng.standard_normal(p.shape)
        opt.step()
    return opt


@pytest.mark.parametrize("damage,error,match", [
    (lambda s: s["param_groups"][0].update(lr="fast"), TypeError, "lr"),
    (lambda s: s["param_groups"][0].update(eps=float("nan")), ValueError, "eps"),
    (lambda s: s["param_groups"][0].update(betas=(0.9, 1.5)), ValueError, "betas"),
    (lambda s: s["param_groups"][0].update(amsgrad="no"), TypeError, "amsgrad"),
    (lambda s: s["param_groups"][0].pop("betas"), ValueError, "lacks"),
    (lambda s: s["param_groups"][0].update(params=[0, 0]), ValueError, "more than once"),
    (lambda s: s["param_groups"][0].update(params=["x", 1]), TypeError, "ints"),
    (lambda s: s["state"][1].update(exp_avg=np.zeros(3)), ValueError, "shape"),
    (lambda s: s["state"][1].update(exp_avg=np.full((2, 2), "a")), TypeError, "dtype"),
    (lambda s: s["state"][1].update(step="two"), TypeError, "step"),
    (lambda s: s["state"][1].update(step=-1), ValueError, "step"),
    (lambda s: s["state"][1].update(step=2.5), ValueError, "step"),
    (lambda s: s["state"].update({7: {}}), ValueError, "parameter 7"),
    (lambda s: s.update(state=[1, 2]), TypeError, "state"),
    (lambda s: s["state"][1].update(momentum_buffer=np.zeros((2, 2))), ValueError,
     "holds SGD state; the optimizer is Adam"),
], ids=["lr-str", "eps-nan", "betas", "amsgrad", "no-betas", "dup-index", "str-index",
        "shape", "dtype", "step-str", "step-neg", "step-frac", "unknown-index", "state-list",
        "sgd-buffer"])
def test_optimizer_load_is_all_or_nothing(rng, damage, error, match):
    saved = _trained_adam(rng, amsgrad=True).state_dict()
    damage(saved)
    opt = _trained_adam(rng)
    before = training_snapshot(optimizer=opt)
    with pytest.raises(error, match=match):
        opt.load_state_dict(saved)
    assert bits_equal(before[1], opt.state_dict())


def test_optimizer_load_accepts_torch_style_state(rng):
    saved = _trained_adam(rng).state_dict()
    saved["param_groups"][0].update(maximize=False, foreach=None, initial_lr=0.01)
    saved["state"] = {str(k): dict(v, step=np.array(float(v["step"]), np.float32))
                      for k, v in saved["state"].items()}
    opt = _trained_adam(rng)
    opt.load_state_dict(saved)
    assert opt.state_of(opt.param_groups[0]["params"][0])["step"] == 2


@pytest.mark.parametrize("damage,match", [
    (lambda s: s.update(last_epoch="3"), "last_epoch"),
    (lambda s: s.update(last_epoch=-5), "last_epoch"),
    (lambda s: s.update(gamma=-1.0), "gamma"),
    (lambda s: s.update(step_size=0), "step_size"),
    (lambda s: s.update(base_lrs=[0.1]), "base_lrs"),
    (lambda s: s.update(_last_lr=[0.1, float("nan")]), r"_last_lr\[1\]"),
    (lambda s: s.pop("gamma"), "missing.*gamma"),
    (lambda s: s.update(T_max=5), "unexpected.*T_max"),
])
def test_schedule_load_is_all_or_nothing(damage, match):
    opt = _sgd_for_schedules()
    sched = optim.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        sched.step()
    saved = sched.state_dict()
    damage(saved)
    target = optim.StepLR(_sgd_for_schedules(), step_size=5, gamma=0.1)
    before = training_snapshot(scheduler=target)
    with pytest.raises((TypeError, ValueError), match=match):
        target.load_state_dict(saved)
    assert bits_equal(before[2], target.state_dict())


def test_schedule_load_ignores_torch_bookkeeping():
    opt = _sgd_for_schedules()
    sched = optim.MultiStepLR(opt, milestones=[2, 5, 5])
    saved = dict(sched.state_dict(), _step_count=1, verbose=False,
                 _get_lr_called_within_step=False, milestones={2: 1, 5: 2})
    target = optim.MultiStepLR(_sgd_for_schedules(), milestones=[1])
    target.load_state_dict(saved)
    assert target.milestones == [2, 5, 5] and not hasattr(target, "_step_count")

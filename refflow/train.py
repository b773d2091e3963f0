r"""Algorithm 1: training a velocity field by conditional flow matching.

Each step draws :math:`x_1 \sim q_1` (with its prompt, if any),
:math:`t \sim U(0, 1)` and :math:`x_0 \sim \mathcal N(0, I)`, and takes an Adam
step on the gradient of :math:`\mathcal L_{CFM}` (eq 36/37; eq 38 with
prompts).  With ``label_dropout = p`` each prompt is replaced by the null
prompt -1 with probability p, so one model learns both the conditional and the
unconditional field that classifier-free guidance (eq 40) combines.

Determinism: every random draw comes from one ``numpy.random.Generator`` in a
fixed order (x_1 and y, then t, then x_0, then the dropout mask), and a
checkpoint stores that generator's state, so resuming from a checkpoint gives
the same parameters, bit for bit, as an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os

import numpy as np
from autograd import value_and_grad

from refflow._io import atomic_savez
from refflow._validation import as_rng, check_points, check_scalar
from refflow.backend import as_device_rng, get_namespace, is_device_array, namespace_of, to_device
from refflow.losses import cfm_loss
from refflow.paths import AffinePath, make_path

__all__ = ["Adam", "TrainState", "train", "save_checkpoint", "load_checkpoint", "make_sampler",
           "TrainingInterrupted", "TrainingDiverged"]

CHECKPOINT_FORMAT = "refflow-checkpoint-1"


@dataclasses.dataclass
class Adam:
    """Adam (Kingma and Ba, 2015) on a flat parameter vector, bias-corrected."""

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    m: np.ndarray | None = None
    v: np.ndarray | None = None
    step: int = 0

    def update(self, params, grad):
        """One step; ``params`` and ``grad`` on either backend (the moments follow them)."""
        xp = namespace_of(params, grad, self.m)
        if self.m is None:
            self.m = xp.zeros_like(params)
            self.v = xp.zeros_like(params)
        self.step += 1
        # In place: the moments are as large as the model.
        self.m *= self.beta1
        self.m += (1.0 - self.beta1) * grad
        self.v *= self.beta2
        self.v += (1.0 - self.beta2) * grad * grad
        m_hat_scale = 1.0 / (1.0 - self.beta1**self.step)
        v_hat_scale = 1.0 / (1.0 - self.beta2**self.step)
        return params - self.lr * (self.m * m_hat_scale) / (xp.sqrt(self.v * v_hat_scale) + self.eps)

    def hyper(self):
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps}


@dataclasses.dataclass
class TrainState:
    """Everything needed to continue training exactly where it stopped."""

    params: np.ndarray
    optimizer: Adam
    rng: np.random.Generator
    step: int = 0
    ema_params: np.ndarray | None = None
    ema_decay: float | None = None
    losses: list = dataclasses.field(default_factory=list)

    @property
    def final_params(self):
        """The EMA weights when an EMA is kept, else the raw weights."""
        return self.ema_params if self.ema_params is not None else self.params


def make_sampler(target):
    """A function ``(n, rng) -> (x_1, y)`` from a target object or a sampler callable.

    Accepts a :class:`~refflow.targets.GaussianMixture` (labels when it has
    them), an :class:`~refflow.targets.Empirical`, or a callable
    ``sampler(n, rng)`` returning ``x_1`` or ``(x_1, y)``.
    """
    if hasattr(target, "sample_with_labels"):
        labelled = getattr(target, "labels", None) is not None

        def sample(n, rng):
            x_1, y, _ = target.sample_with_labels(n, rng)
            return x_1, (y if labelled else None)

        return sample
    if hasattr(target, "sample"):
        return lambda n, rng: (target.sample(n, rng), None)
    if callable(target):
        def sample(n, rng):
            out = target(n, rng)
            return out if isinstance(out, tuple) else (out, None)

        return sample
    raise TypeError(
        f"target: expected a GaussianMixture, an Empirical or a callable sampler(n, rng), got {type(target).__name__}"
    )


def train(model, target, path: AffinePath, *, steps: int, batch_size: int = 256, lr: float = 1e-3,
          rng=None, params=None, ema_decay: float | None = None, label_dropout: float = 0.0,
          resume: TrainState | None = None, progress: bool | None = None, on_step=None,
          backend: str = "numpy", coupling=None) -> TrainState:
    r"""Train ``model`` by Algorithm 1 of the notes (CFM, eq 36–38) with Adam.

    Parameters
    ----------
    model : MLP-like
        ``model.apply(params, t, x, y)``, ``model.init_params(rng)`` and
        ``model.dim``; ``model.n_classes`` for prompts.
    target : GaussianMixture, Empirical or callable
        Source of :math:`x_1` (and prompts); see :func:`make_sampler`.
    path : AffinePath
        The conditional path (OT gives eq 37 exactly).
    steps : int
        Number of steps to run *in this call* (also when resuming).
    batch_size, lr : int, float
    rng : Generator or int
        Seeds everything (initialisation and batches).  Ignored on resume,
        where the stored generator continues.
    params : array, optional
        Initial parameters (default: ``model.init_params(rng)``).
    ema_decay : float in (0, 1), optional
        Keep an exponential moving average of the weights.
    label_dropout : float in [0, 1)
        Probability of replacing a prompt by the null prompt -1.
    resume : TrainState, optional
        Continue from this state (e.g. from :func:`load_checkpoint`).
    progress : bool, optional
        Show a progress line with the running loss, rate and ETA on stderr.
        None (default): only inside an enclosing display, such as a check of
        ``refflow verify`` on a terminal (:func:`refflow._progress.nested`).
    on_step : callable, optional
        Called as ``on_step(state)`` after every step.
    backend : {"numpy", "cupy"}
        Where the steps run.  ``"cupy"``: parameters, Adam's moments and
        every batch live on the GPU; the initial parameters are drawn on the
        host from ``rng`` (so they equal the CPU run's) and copied over, then
        the batches come from a ``cupy.random.Generator`` seeded from ``rng``:
        a different stream from NumPy's, so the CPU and GPU runs see
        different batches.  The target must be a mixture (or a sampler that
        accepts a CuPy generator).  ``state.params`` is then a CuPy array
        (:func:`refflow.backend.to_host` brings it back); checkpoints need
        host arrays.

    coupling : {None, "exact"} or callable, optional
        Re-pair every batch before the loss: ``"exact"`` by the minibatch
        OT permutation (OT-CFM, :func:`refflow.couplings.ot_pairing`), or a
        callable ``coupling(x_0, x_1, rng) -> j`` giving the row of ``x_1``
        for each row of ``x_0``.  None: the independent coupling.  Not stored
        in checkpoints (pass it again on resume).

    Returns
    -------
    TrainState

    Raises
    ------
    TrainingInterrupted
        On Ctrl-C (in the main thread), once the step in progress is done;
        its ``.state`` is consistent and can be saved and resumed.
    TrainingDiverged
        When the loss becomes NaN or inf, or exceeds
        ``EXPLODING_LOSS_FACTOR`` times its first value (the learning rate
        is the usual cause); ``.state`` is the state before that step.
    """
    if not isinstance(path, AffinePath):
        raise TypeError(f"path: expected an AffinePath, got {type(path).__name__}")
    steps = check_scalar(steps, "steps", low=0, integer=True)
    batch_size = check_scalar(batch_size, "batch_size", low=1, integer=True)
    label_dropout = check_scalar(label_dropout, "label_dropout", low=0.0, high=1.0, high_open=True)
    sampler = make_sampler(target)
    conditional = bool(getattr(model, "n_classes", None))
    if label_dropout > 0 and not conditional:
        raise ValueError("label_dropout: expected 0 for a model without classes (n_classes), got "
                         f"{label_dropout}")
    if resume is not None:
        state = resume
    else:
        lr = check_scalar(lr, "lr", low=0.0, low_open=True)
        rng = as_rng(rng)
        xp = get_namespace(backend)
        if params is None:
            params = model.init_params(rng)
        if xp is np:
            params = np.array(params, copy=True)
        else:
            params = xp.array(to_device(params, backend), copy=True)
            rng = as_device_rng(rng, backend)
        if ema_decay is not None:
            ema_decay = check_scalar(ema_decay, "ema_decay", low=0.0, high=1.0, low_open=True, high_open=True)
        state = TrainState(params=params, optimizer=Adam(lr=lr), rng=rng,
                           ema_params=None if ema_decay is None else params.copy(), ema_decay=ema_decay)

    loss_and_grad = _loss_and_grad(model, path)
    if coupling is not None:
        loss_and_grad = _coupled(loss_and_grad, coupling, state)
    d = model.dim
    if progress is None:
        from refflow._progress import nested_active

        progress = nested_active()
    bar = _Progress(steps) if progress else None
    try:
        with _deferred_interrupt() as interrupted:
            _run_steps(steps, state, sampler, loss_and_grad, d, batch_size, conditional, label_dropout,
                       bar, on_step, interrupted)
    finally:
        if bar is not None:
            bar.close()
    return state


def _run_steps(steps, state, sampler, loss_and_grad, d, batch_size, conditional, label_dropout, bar, on_step,
               interrupted):
    for _ in range(steps):
        x_1, y = sampler(batch_size, state.rng)
        x_1 = check_points(x_1, "target sample", d)
        t = state.rng.random(batch_size)
        x_0 = state.rng.standard_normal((batch_size, d))
        if conditional:
            if y is None:
                raise ValueError("target: a model with classes needs a target that yields labels")
            y = namespace_of(y).where(state.rng.random(batch_size) < label_dropout, -1, y)
        else:
            y = None
        value, grad = loss_and_grad(state.params, x_0, x_1, t, y)
        _check_loss(float(value), state)
        state.params = state.optimizer.update(state.params, grad)
        if state.ema_params is not None:
            state.ema_params = state.ema_decay * state.ema_params + (1.0 - state.ema_decay) * state.params
        state.step += 1
        state.losses.append(float(value))
        if bar is not None:
            bar.update(state)
        if on_step is not None:
            on_step(state)
        if interrupted():
            raise TrainingInterrupted(state)


def _coupled(loss_and_grad, coupling, state):
    """``loss_and_grad`` on the batch re-paired by ``coupling`` (labels follow their x_1)."""
    from refflow.couplings import ot_pairing

    if coupling == "exact":
        coupling = lambda x_0, x_1, rng: ot_pairing(x_0, x_1, "exact")  # noqa: E731
    elif not callable(coupling):
        raise ValueError(f"coupling: expected None, 'exact' or a callable (x_0, x_1, rng) -> j, got {coupling!r}")

    def coupled(params, x_0, x_1, t, y):
        j = coupling(x_0, x_1, state.rng)
        return loss_and_grad(params, x_0, x_1[j], t, None if y is None else y[j])

    return coupled


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`: raised after the step in progress has finished.

    ``.state`` is the :class:`TrainState` after the last whole step, so it can
    be saved and resumed (bit for bit, like an uninterrupted run).  It is a
    ``KeyboardInterrupt``, so code that does not catch it stops as usual.
    """

    def __init__(self, state):
        super().__init__(f"training interrupted after step {state.step}")
        self.state = state


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or inf, or grew far beyond its first value: ``.state`` is left
    at the last step before (the parameters are not updated with the bad step)."""

    def __init__(self, message, state):
        super().__init__(message)
        self.state = state


# A loss this many times its first value means the steps diverge (the CFM loss starts
# near its largest value and falls; a good run never grows it even 100-fold).
EXPLODING_LOSS_FACTOR = 1e6


def _check_loss(value, state):
    lr = state.optimizer.lr
    hint = f"the learning rate lr = {lr!r} is likely too large; try {lr / 10!r} or less"
    if not np.isfinite(value):
        raise TrainingDiverged(f"loss became {value!r} at step {state.step + 1}: {hint}", state)
    first = state.losses[0] if state.losses else None
    if first is not None and value > EXPLODING_LOSS_FACTOR * max(first, np.finfo(float).tiny):
        raise TrainingDiverged(f"loss exploded to {value!r} at step {state.step + 1}, "
                               f"{value / first:.3g} times its first value {first!r}: {hint}", state)


@contextlib.contextmanager
def _deferred_interrupt():
    """Turn the first Ctrl-C (SIGINT) into a flag that the step loop checks after each whole
    step, so an interrupted run keeps a consistent, resumable state; a second Ctrl-C stops
    at once.  Outside the main thread (where signals cannot be caught) Ctrl-C is left alone."""
    import signal
    import threading

    flag = []
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield lambda: False
        return

    def on_sigint(signum, frame):
        flag.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: bool(flag)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _loss_and_grad(model, path):
    """``(params, x_0, x_1, t, y) -> (L_CFM, grad)`` on one batch (eq 36-38).

    For models with a hand-written VJP (``value_and_vjp``, the MLP of
    :mod:`refflow.nn`) the gradient of the squared error is that VJP applied
    to 2 (u - target) / n, without autograd's tracing; otherwise autograd
    differentiates :func:`refflow.losses.cfm_loss`.  The tests hold both to
    the same numbers.
    """
    if not hasattr(model, "value_and_vjp"):
        return value_and_grad(lambda p, x_0, x_1, t, y: cfm_loss(model, p, path, x_0, x_1, t, y))

    def fast(params, x_0, x_1, t, y):
        x_t = path.sample(x_0, x_1, t)
        u, vjp = model.value_and_vjp(params, t, x_t, y)
        residual = u - path.target(x_0, x_1, t)
        xp = namespace_of(residual)  # the same code on NumPy and CuPy arrays
        value = xp.mean(xp.sum(residual * residual, axis=1))
        return value, vjp(residual * (2.0 / residual.shape[0]), wrt_x=False)[0]

    return fast


class _Progress:
    """Training's progress line: steps, the running (exponentially averaged) loss, rate and ETA."""

    def __init__(self, total, stream=None):
        from refflow._progress import Progress

        self.bar = Progress(total, "training", unit="steps", stream=stream)
        self.done, self.running = 0, None

    def update(self, state):
        self.done += 1
        value = state.losses[-1]
        self.running = value if self.running is None else 0.98 * self.running + 0.02 * value
        self.bar.update(self.done, note=f"step {state.step}, loss {self.running:.4f}")

    def close(self):
        self.bar.close()


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(file, state: TrainState, model, path: AffinePath, extra: dict | None = None) -> None:
    """Write ``state`` to an ``.npz``: the arrays, and a JSON config under the key ``config``.

    The config holds the model's and the path's configuration, the optimizer's
    hyper-parameters and step, the random generator's state and ``extra``
    (e.g. the target's name).  The file is written to a temporary name and
    renamed, so a crash never leaves a partly written checkpoint.
    """
    config = {
        "format": CHECKPOINT_FORMAT,
        "model": model.config(),
        "path": path.config(),
        "step": state.step,
        "adam": {**state.optimizer.hyper(), "step": state.optimizer.step},
        "ema_decay": state.ema_decay,
        "rng": state.rng.bit_generator.state,
        "rng_kind": type(state.rng.bit_generator).__name__,
        "extra": extra or {},
    }
    arrays = {"params": state.params, "losses": np.asarray(state.losses, dtype=np.float64),
              "config": np.array(json.dumps(config))}
    if state.optimizer.m is not None:
        arrays["adam_m"], arrays["adam_v"] = state.optimizer.m, state.optimizer.v
    if state.ema_params is not None:
        arrays["ema_params"] = state.ema_params
    for name, value in arrays.items():
        if is_device_array(value):
            raise TypeError(f"state: {name} is a CuPy (GPU) array; a checkpoint stores host arrays: "
                            "move the state with refflow.backend.to_host first")
    atomic_savez(file, **arrays)


def load_checkpoint(file):
    """Read a checkpoint; returns ``(model, path, state, extra)``.

    Raises ``ValueError`` (:class:`refflow._schema.CheckpointError`) naming
    the file and the field when it is missing, not a refflow checkpoint,
    damaged, or edited: every key is checked against the schema of
    :mod:`refflow._schema` (unknown and missing keys included), and nothing
    read from the file picks a Python object by name.
    """
    from refflow._schema import CheckpointError, read_checkpoint

    file = os.fspath(file)
    if not os.path.isfile(file):
        raise CheckpointError(f"model file: {file!r} does not exist")
    # Every field is checked against the schema in refflow._schema before use.
    config, data, model, path, rng = read_checkpoint(file, CHECKPOINT_FORMAT)
    adam_cfg = config["adam"]
    optimizer = Adam(lr=adam_cfg["lr"], beta1=adam_cfg["beta1"], beta2=adam_cfg["beta2"], eps=adam_cfg["eps"],
                     m=data.get("adam_m"), v=data.get("adam_v"), step=adam_cfg["step"])
    state = TrainState(params=data["params"], optimizer=optimizer, rng=rng,
                       step=config["step"], ema_params=data.get("ema_params"), ema_decay=config["ema_decay"],
                       losses=data["losses"].tolist())
    return model, path, state, config["extra"]

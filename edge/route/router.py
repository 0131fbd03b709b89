"""The reconfigurator: route a stream to the adapter of the domain it comes from, with no task label.

    tapped = tap_model("encoder.onnx", "encoder.tapped.onnx")
    rt = Runtime(tapped.path)                         # + load the known domains' adapters
    router = Reconfigurator(rt, tapped)
    router.add_domain("clean", None, x0, y0)          # the base model serves the source domain
    router.add_domain("rotate", "rotate", x1, y1)     # adapter "rotate" is loaded in rt
    router.fit()                                      # per-state detectors, calibrated
    for x, y in stream:                               # batches; labels optional, never used to route
        step = router.process(x, y)                   # logits served now; may switch for the next batch
        if router.growth_ready: ...                   # persistent novel inputs: see edge.learn.growth

**Features depend on the active adapter.** In fused mode an adapter rewrites the
encoder's own weights, so the same input has different features under each state
(base or adapter). Running a second, adapter-free pass per input would double the cost,
so the router keeps one HDC detector *per state*, fitted on the features every known
domain produces *under that state* (each domain keeps a small reservoir of inputs for
this). A batch is served by the active state and the same pass's features are scored by
that state's detector: the ID score says whether the input belongs to any known domain,
the domain prototypes say which. No probing pass is needed; refitting (after a domain is
added) runs every reservoir through every state once: n^2 reservoirs and n states' fits for n
domains. With ``RouterConfig(grow="incremental")`` a grown domain costs 2n - 1 reservoirs and one
state's fit (:func:`edge.route.fit.grow_states`); :meth:`Reconfigurator.fit` still refits all.

**Routing vote.** The domain of the most similar class prototype; the class prototypes
are retrained for routing at every :meth:`Reconfigurator.fit` (:meth:`edge.route.hdc.HDC.refine`,
``refine_epochs``, ``refine_lr``).

**Window policy** (``RouterConfig``). Decisions use the last ``window`` inputs' votes
(a domain, or OOD when the ID score is below the calibrated threshold), taken at batch
boundaries, so the batch that triggers a switch is still served by the old state:

* OOD share >= ``novel_share``: the stream is in an unknown domain. Route to the base
  model and collect OOD inputs; with ``novel_buffer`` of them, :attr:`growth_ready`.
  The buffer is dropped when the OOD share falls below ``novel_share / 2``.
* else another domain holds >= ``switch_share`` of the in-distribution votes (OOD share
  is below ``novel_share``, so they are at least half the window): switch to it.
* Hysteresis: after a switch the window restarts (its votes came from the other
  state's features) and no switch happens for ``dwell`` inputs, so a mixed stream
  settles on its majority domain instead of thrashing.

**Scoring in the graph.** When the model was tapped with a detector head
(``tap_model(..., head=Head())``), the active state's detector, threshold included, is
folded into the graph (:meth:`~edge.route.hdc.HDC.head_values`), so an inference already
returns each input's vote (its domain, or -1 when OOD) and only the window policy runs
in numpy; a batch fetches only the logits and the vote, plus the features while it learns
(:attr:`Reconfigurator.fetches`). The head is written with every switch (in the same step as the adapter,
:meth:`Runtime.switch` ``head=``) and after prototype updates at most once per
``head_sync_s``: each write makes the ``hybrid`` runtime rebuild its prepacked session
in the background, and onnxruntime holds the GIL for much of a build (stalls of up to
tens of ms for a thread busy in Python). :attr:`Step.scores` is ``None`` then (the graph
votes; scores are computed in numpy only where learning needs them). Without a head, or
when the known domains outgrow its capacity (logged as a warning,
:attr:`Reconfigurator.scoring` says ``"numpy"``), the same vote is computed in numpy
from the features.

**Incremental prototypes.** With ``learn``, inputs routed to the active domain are
bundled into that state's prototypes, with their labels when given, else with the
model's prediction when the ID score is above the ``confident_quantile`` of held-out
ID scores; pending inputs are folded in every ``learn_every`` inputs and the threshold
is recalibrated then. Labelled inputs also refresh the domain's reservoir.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, replace

import numpy as np

from edge.errors import ConfigError
from edge.route.fit import Domain, Refit, State, fit_states, grow_states, run_features
from edge.route.hdc import HDC
from edge.route.head import HEAD_RANK
from edge.route.headsync import HeadSync
from edge.route.policy import WindowPolicy
from edge.route.taps import VOTE, Tapped

__all__ = ["Reconfigurator", "Refit", "RouterConfig", "Step"]

log = logging.getLogger("edge.route.router")

GROW_MODES = ("refit", "incremental")


@dataclass(frozen=True)
class RouterConfig:
    """Window policy, detector and memory settings of a :class:`Reconfigurator` (module doc)."""

    window: int = 32
    switch_share: float = 0.75
    novel_share: float = 0.5
    dwell: int = 64
    tpr: float = 0.98  # serving threshold: share of known inputs accepted (on cross-fitted held-out scores)
    learn: bool = True
    learn_every: int = 512
    confident_quantile: float = 0.5
    reservoir: int = 1024
    novel_buffer: int = 256
    hdc_dim: int | None = None  # None: the smallest power of two >= 4096 above the feature width (edge.route.hdc)
    hdc_rank: int | None = None  # whitening rank (edge.route.hdc.HDC rank); None: the tapped head's, or 256
    hdc_bias: float = 2.0
    refine_epochs: int = 10  # HDC retraining of the class prototypes for routing (edge.route.hdc.HDC.refine); 0 = off
    refine_lr: float = 1.0
    head_sync_s: float = 1.0  # least time between writes of updated prototypes into the graph head
    grow: str = "refit"  # on add_grown: "refit" every state on every reservoir, or "incremental" (fit.grow_states)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("switch_share", "novel_share", "tpr", "confident_quantile"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ConfigError(f"RouterConfig.{name} must be in (0, 1], got {v}")
        for name in ("window", "learn_every", "reservoir", "novel_buffer"):
            if getattr(self, name) < 1:
                raise ConfigError(f"RouterConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.dwell < 0 or self.reservoir < 4:
            raise ConfigError(f"need dwell >= 0 and reservoir >= 4, got {self.dwell}, {self.reservoir}")
        if self.head_sync_s < 0:
            raise ConfigError(f"RouterConfig.head_sync_s must be >= 0, got {self.head_sync_s}")
        if self.grow not in GROW_MODES:
            raise ConfigError(f"RouterConfig.grow must be one of {GROW_MODES}, got {self.grow!r}")
        if self.refine_epochs < 0 or not self.refine_lr > 0:
            raise ConfigError(f"need refine_epochs >= 0 and refine_lr > 0, got {self.refine_epochs}, {self.refine_lr}")


@dataclass(frozen=True)
class Step:
    """What :meth:`Reconfigurator.process` did with one batch."""

    served_by: str  # domain whose state (adapter or base) produced these outputs
    logits: np.ndarray
    scores: np.ndarray | None  # ID score per input (higher = in-distribution); None when the graph head voted
    ood: np.ndarray  # bool per input
    codes: np.ndarray  # routed domain index per input (into ``names``), -1 when OOD
    names: tuple[str, ...]  # the known domains when this batch was scored
    event: str | None = None  # "switch:<domain>", "novel", "known" when the policy acted

    @property
    def votes(self) -> list[str | None]:
        """Routed domain name per input, ``None`` when OOD."""
        return [None if c < 0 else self.names[c] for c in self.codes.tolist()]


class Reconfigurator:
    """Route inputs to known domains' adapters by per-state HDC detectors; flag persistent novelty.

    Composes the per-state fitting (:mod:`edge.route.fit`), the graph head
    (:mod:`edge.route.headsync`) and the window policy (:mod:`edge.route.policy`).
    """

    def __init__(self, runtime, tapped: Tapped, config: RouterConfig = RouterConfig(), logits: str = "logits"):
        if len(runtime.info.inputs) != 1:
            raise ConfigError(f"the router feeds one input; model takes {list(runtime.info.inputs)}")
        if tapped.head is not None and config.hdc_rank not in (None, tapped.head.rank):
            raise ConfigError(
                f"RouterConfig.hdc_rank {config.hdc_rank} differs from the rank of the head {tapped.path.name} was "
                f"tapped with ({tapped.head.rank}): the detector could not be folded into it; leave hdc_rank unset"
            )
        if config.hdc_rank is None:
            config = replace(config, hdc_rank=tapped.head.rank if tapped.head is not None else HEAD_RANK)
        self.rt, self.tapped, self.config, self._logits = runtime, tapped, config, logits
        self._input = runtime.info.inputs[0]
        self._domains: dict[str, Domain] = {}
        self._states: dict[str | None, State] = {}
        self._fitted: list[str] = []  # the domains the states were fitted on
        self._rng = np.random.default_rng(config.seed)
        self.active: str | None = None
        self._policy = WindowPolicy(config)
        self.stats = {"inputs": 0, "switches": 0, "infer_s": 0.0, "detect_s": 0.0, "learn_s": 0.0, "write_s": 0.0}
        self._heads = HeadSync(tapped.head, config.head_sync_s)
        if self._heads.in_graph and not set(runtime.heads):
            raise ConfigError(f"{tapped.path.name} was tapped with a detector head, but the runtime's model has none")

    @property
    def scoring(self) -> str:
        """Where inputs are scored: ``"graph"`` (the detector head of :mod:`edge.route.taps`) or ``"numpy"``."""
        return "graph" if self._heads.in_graph else "numpy"

    @property
    def fetches(self) -> list[str]:
        """The outputs :meth:`process` fetches: the logits, and the vote (graph scoring) and the tapped features
        when they are scored in numpy or learned from (``config.learn``). Each output fetched costs about as much
        as a node at batch 1 (:mod:`edge.route.taps`), so a router that only serves leaves the features alone."""
        if not self._heads.in_graph:
            return [self._logits, self.tapped.features]
        return [self._logits, VOTE, *([self.tapped.features] if self.config.learn else [])]

    @property
    def novel(self) -> bool:
        """The window policy finds the stream in an unknown domain."""
        return self._policy.novel

    # -- domains ---------------------------------------------------------------------------
    @property
    def domains(self) -> list[str]:
        return list(self._domains)

    def adapter_of(self, domain: str) -> str | None:
        return self._domains[domain].adapter

    def add_domain(self, name: str, adapter: str | None, x: np.ndarray, y: np.ndarray) -> None:
        """A known domain served by ``adapter`` (loaded in the runtime; ``None`` = base) with labelled inputs.

        Up to ``config.reservoir`` inputs are kept (they fit the prototypes; cross-fitted halves calibrate).
        Call :meth:`fit` afterwards.
        """
        if name in self._domains:
            raise ConfigError(f"domain {name!r} is already known; known: {self.domains}")
        if adapter is not None and adapter not in self.rt.adapters:
            raise ConfigError(f"adapter {adapter!r} is not loaded in the runtime; loaded: {self.rt.adapters}")
        x, y = np.asarray(x, np.float32), np.asarray(y, np.int64)
        if len(x) != len(y) or len(x) < 4:
            raise ConfigError(f"domain {name!r} needs >= 4 labelled inputs with one label each, got {len(x)}/{len(y)}")
        keep = self._rng.permutation(len(x))[: self.config.reservoir]
        self._domains[name] = Domain(name, adapter, x[keep], y[keep], seen=len(x))
        if self.active is None:
            self.active = name

    def detector(self, domain: str) -> HDC:
        """The detector of the state that serves ``domain``."""
        return self._states[self.adapter_of(domain)].detector

    def features(self, x: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Tapped features and logits of ``x`` under the runtime's current state (no routing)."""
        return self._features(self.rt, x, batch)

    # -- fitting ---------------------------------------------------------------------------
    def fit(self, batch: int = 256, *, runtime=None) -> None:
        """(Re)build every state's detector from the reservoirs; leaves the active state switched in.

        ``runtime`` (default: the serving one) computes the features: pass a *shadow*
        runtime (the same model with the same adapters loaded) to leave the serving
        runtime's weights alone until the new detectors are installed.
        """
        self._install(fit_states(runtime or self.rt, self._snapshot(), self.config, self._features, batch))

    def _features(self, runtime, x: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
        return run_features(runtime, self._input, self.tapped.features, self._logits, x, batch)

    def _snapshot(self) -> list[Domain]:
        if not self._domains:
            raise ConfigError("no domains: add_domain(...) first")
        return [Domain(n, d.adapter, d.x.copy(), d.y.copy(), d.seen) for n, d in self._domains.items()]

    def _install(self, states: dict, switch_to: str | None = None) -> None:
        """Use these detectors from now on; switch to ``switch_to`` (default: stay) with its head."""
        for st in states.values():
            st.head = self._heads.fold(st.detector)
        self._states, self._fitted = states, list(self._domains)
        domain = switch_to or self.active
        adapter = self.adapter_of(domain)
        self._write(adapter, states[adapter])
        if switch_to is not None and switch_to != self.active:
            self.active = domain
            self.stats["switches"] += 1
            self._policy.restart()
        self._policy.window.clear()  # the votes so far came from the replaced detectors

    def _write(self, adapter: str | None, state: State) -> None:
        """Switch the runtime to ``adapter`` with ``state``'s head (timed: ``stats["write_s"]``)."""
        t0 = time.perf_counter()
        self.rt.switch(adapter, head=self._heads.for_write(state))
        self.stats["write_s"] += time.perf_counter() - t0

    # -- streaming -------------------------------------------------------------------------
    def process(self, x: np.ndarray, labels: np.ndarray | None = None) -> Step:
        """Serve one batch with the active state, score it on the same pass, and apply the window policy.

        ``labels`` (class labels, optional) only feed prototype updates and the growth
        buffer; routing never reads them.
        """
        if not self._states:
            raise ConfigError("the router is not fitted: call fit() after add_domain(...)")
        t0 = time.perf_counter()
        out = self.rt.run({self._input: x}, self.fetches)
        t1 = time.perf_counter()
        served = self.active
        if self._heads.in_graph:
            state = self._states[self.adapter_of(self.active)]
            step = self._observe(None, out[VOTE], out.get(self.tapped.features), out[self._logits], x, labels)
            if self._heads.due(state):
                t2 = time.perf_counter()
                head = self._heads.for_write(state)  # the prototypes learned since the last write
                if head is not None:
                    self.rt.set_head(head)
                self.stats["write_s"] += time.perf_counter() - t2
        else:
            step = self.observe(out[self.tapped.features], out[self._logits], x, labels)
        self.stats["infer_s"] += t1 - t0
        self.stats["detect_s"] += time.perf_counter() - t1
        self.stats["inputs"] += len(x)
        return Step(served, out[self._logits], *step)

    def observe(self, feats: np.ndarray, logits: np.ndarray, x: np.ndarray, labels=None):
        """The detection half of :meth:`process`, on features computed under the active state.

        Returns ``(scores, ood, codes, names, event)`` (the fields of :class:`Step` after ``logits``).
        """
        det = self._states[self.adapter_of(self.active)].detector
        score, dom = det.route(feats)
        return self._observe(score, np.where(score < det.threshold, -1, dom), feats, logits, x, labels)

    def _observe(self, score, codes, feats, logits, x, labels):
        """Window, learning and growth buffer from each input's vote (domain index, -1 = OOD) and score (or None)."""
        state = self._states[self.adapter_of(self.active)]
        self._policy.add(codes, x, labels)
        if self.config.learn:
            self._learn(state, feats, logits, labels, codes, score, x)
        base = next((n for n, d in self._domains.items() if d.adapter is None), None)
        decision = self._policy.decide(list(self._domains), self.active, base)
        if decision.switch is not None:
            self._switch(decision.switch)
        return score, codes < 0, codes, tuple(self._domains), decision.event

    def switch_to(self, domain: str) -> None:
        """Serve ``domain`` now (its adapter, or the base model), as the policy would; restarts the window."""
        if domain not in self._domains:
            raise ConfigError(f"unknown domain {domain!r}; known: {self.domains}")
        self._switch(domain)

    def _switch(self, domain: str) -> None:
        log.info("switch %s -> %s", self.active, domain)
        adapter = self.adapter_of(domain)
        self._write(adapter, self._states[adapter])
        self.active = domain
        self.stats["switches"] += 1
        self._policy.restart()

    def _learn(self, state: State, feats, logits, labels, codes, score, x) -> None:
        """Queue inputs routed to the active domain for its prototypes; bundle every ``learn_every``."""
        t0 = time.perf_counter()
        index = list(self._domains).index(self.active)
        mine = codes == index
        if labels is not None:
            labels = np.asarray(labels, np.int64)
            self._domains[self.active].sample(np.asarray(x)[mine], labels[mine], self.config.reservoir, self._rng)
        else:  # confident predictions only (the graph head returns votes: score these in numpy)
            mine &= (state.detector.score(feats) if score is None else score) >= state.confident
        if mine.any():
            state.add(feats[mine], logits[mine].argmax(1) if labels is None else labels[mine])
        if state.waiting >= self.config.learn_every:
            state.bundle(index)
            state.head_dirty = self._heads.in_graph  # written by process() within head_sync_s, or with the next switch
        self.stats["learn_s"] += time.perf_counter() - t0

    # -- growth hand-off -------------------------------------------------------------------
    @property
    def growth_ready(self) -> bool:
        """The stream has been novel long enough to collect ``novel_buffer`` OOD inputs."""
        return self.novel and len(self._policy.buffer) >= self.config.novel_buffer

    def take_buffer(self) -> tuple[np.ndarray, np.ndarray]:
        """The collected novel inputs and their labels (-1 where none were given); empties the buffer."""
        return self._policy.buffer.take()

    def add_grown(self, name: str, adapter: str, x: np.ndarray, y: np.ndarray, *, shadow=None) -> None:
        """Register a grown domain (its adapter loaded in the runtime), refit the states, and route to it.

        ``config.grow``: ``"refit"`` fits every state on every reservoir; ``"incremental"`` fits the grown
        domain's state and adds the grown domain to the others (:func:`~edge.route.fit.grow_states`), when the
        states were fitted on every other domain (else it refits all).

        With ``shadow`` (a second runtime of the same tapped model with the same adapters,
        this one included), the refit's inference runs there; see :meth:`add_grown_background`
        to keep serving meanwhile.
        """
        self.commit(self.add_grown_background(name, adapter, x, y, shadow=shadow, thread=False))

    def add_grown_background(self, name: str, adapter: str, x, y, *, shadow=None, thread: bool = True) -> Refit:
        """Register a grown domain now and refit every state on ``shadow`` in a thread; :meth:`commit` when done.

        Until then :meth:`process` keeps serving with the current detectors (which never
        vote for the new domain). Without a shadow runtime the refit must switch the
        serving runtime, so it runs at once in this thread (``thread`` is ignored).
        """
        self.add_domain(name, adapter, x, y)
        snapshot, rt = self._snapshot(), shadow or self.rt
        if self.config.grow == "incremental" and self._fitted == self.domains[:-1]:
            states = {a: State(copy.deepcopy(st.detector), st.confident) for a, st in self._states.items()}
            work = lambda: grow_states(rt, states, snapshot, self.config, self._features, 256)  # noqa: E731
        else:
            work = lambda: fit_states(rt, snapshot, self.config, self._features, 256)  # noqa: E731
        return Refit(name, self.domains, work, thread and shadow is not None)

    def commit(self, refit: Refit) -> None:
        """Install a finished refit's detectors and route to its grown domain (waits for the refit)."""
        states = refit.result()
        if refit.domains != list(self._domains):
            raise ConfigError(
                f"the router's domains changed while refitting for {refit.name!r} ({refit.domains} -> "
                f"{list(self._domains)}); call fit() again"
            )
        self._install(states, switch_to=refit.name)
        self._policy.novel = False

"""An evaluation session: one loaded model, its unit table, its plan switcher and per-split evaluators.

Everything a trial needs and that should be paid once per process lives here: the model on its device (or split
across GPUs with ``eval.device_map``) in the evaluation dtype, the :class:`~qsweep.apply.PlanApplier` (one
pristine copy of the weights in the checkpoint's dtype, ``eval.pristine``, and a quantized-tensor cache of
``eval.cache_mb``), the token ids of each split (cached on disk) and an :class:`~qsweep.evaluate.Evaluator` per
split, and the baseline's result per split. Before the weights are loaded, the memory the run needs is estimated
from the model's config and refused in one line when the device cannot hold it (:mod:`qsweep.memory`).

The evaluation dtype (``eval.dtype``): ``auto`` evaluates in the checkpoint's dtype on a GPU (a bf16 checkpoint in
bf16: what its users run) and in fp32 on the CPU and for fp32 checkpoints; ``fp32`` is exact anywhere (a 16-bit
checkpoint is widened losslessly), ``bf16``/``fp16`` hold the weights in that dtype.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from qsweep.apply import PlanApplier
from qsweep.data import load_token_ids
from qsweep.errors import ConfigError
from qsweep.evaluate import (
    CI_MIN_TOKENS,
    CI_MIN_WINDOWS,
    COMPUTE_DTYPES,
    MIN_SCORED_TOKENS,
    EvalResult,
    Evaluator,
    partial_result,
    resolve_device,
)
from qsweep.families import resolve_for_model
from qsweep.memory import (
    ResourceError,
    check_fits,
    check_reference_fits,
    estimate_memory,
    is_out_of_memory,
    out_of_memory_message,
    peak_host_rss_bytes,
    release_host_memory,
    resolve_eval_dtype,
    split_across_gpus,
)
from qsweep.metrics import paired_degradation_ci
from qsweep.model import checkpoint_dtype, load_model, load_model_config, load_tokenizer, unit_table
from qsweep.plan import Plan, load_plan_file, named_plan_spec, plan_from_config
from qsweep.score import PlanScore
from qsweep.size import model_size_bytes, packed_size_bytes

__all__ = ["EvalSession", "PlanScore", "named_plan_spec"]

log = logging.getLogger(__name__)


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


# what a null protocol integer means, for the messages that refuse 0
_NULL = {"context": "the model's maximum", "stride": "= context", "max_tokens": "the whole split"}


def _plan_source() -> str:
    """``plan=NAME`` when Hydra composed the config (its choice of the plan group), else ``plan``."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("plan")
        if choice:
            return f"plan={choice}"
    return "plan"


class EvalSession:
    """Loads once, then scores any number of plans on any split of the configured corpus and protocol."""

    def __init__(self, cfg: DictConfig | Mapping):
        self.cfg = cfg
        self.model_cfg = _plain(cfg["model"])
        self.data_cfg = _plain(cfg["data"])
        self.eval_cfg = _plain(cfg["eval"])
        # config errors first, before minutes of loading: device, then the protocol's integers
        self.device = resolve_device(self.eval_cfg.get("device"))
        for key, low in (("context", 2), ("stride", 1), ("max_tokens", 1)):
            value = self.eval_cfg.get(key)
            if value is not None and int(value) < low:
                raise ConfigError(f"eval.{key} must be >= {low} or null, got {value} (null: {_NULL[key]})")
        penalty = cfg.get("penalty", 10.0)
        if penalty is None or float(penalty) < 0:
            raise ConfigError(
                f"penalty must be >= 0 (fitness = compression - penalty x degradation), got {penalty}"
            )
        pristine_at = self.eval_cfg.get("pristine") or "device"
        if pristine_at not in ("device", "cpu"):
            raise ConfigError(f"unknown eval.pristine {pristine_at!r}; valid: device, cpu")
        cache_mb = self.eval_cfg.get("cache_mb")
        if cache_mb is not None and int(cache_mb) < 0:
            raise ConfigError(f"eval.cache_mb must be >= 0 (MiB of quantized tensors kept) or null (a quarter of "
                              f"the weights, at most 512), got {cache_mb}")  # fmt: skip
        device_map = self.eval_cfg.get("device_map")
        if device_map not in (None, "auto"):
            raise ConfigError(f"unknown eval.device_map {device_map!r}; valid: null (one device), auto")
        config = load_model_config(self.model_cfg)
        ckpt_dtype = checkpoint_dtype(config)
        self.dtype = resolve_eval_dtype(self.eval_cfg.get("dtype"), ckpt_dtype, self.device)
        self.memory = estimate_memory(
            config, self.device, dtype=self.dtype, checkpoint=ckpt_dtype, pristine=pristine_at,
            cache_bytes=None if cache_mb is None else int(cache_mb) * 2**20,
            batch_size=int(self.eval_cfg.get("batch_size", 8)),
            context=self._context_of(config), logits_chunk=self.eval_cfg.get("logits_chunk"),
            max_tokens=self.eval_cfg.get("max_tokens"), backward=cfg.get("search") is not None,
            device_map=device_map,
        )  # fmt: skip
        check_fits(self.memory)
        max_memory = None
        if device_map is not None:
            if self.device.type != "cuda":
                raise ConfigError(f"eval.device_map={device_map} splits a model across GPUs, but eval.device is "
                                  f"{self.device}; use eval.device=cuda or eval.device_map=null")  # fmt: skip
            free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
            max_memory = split_across_gpus(self.memory, free)
        started = time.perf_counter()
        with self.out_of_memory_is_an_error("loading the model"):
            self.model = load_model(self.model_cfg, self.device, device_map=device_map, max_memory=max_memory)
        self.tokenizer = load_tokenizer(self.model_cfg)
        self.table = unit_table(self.model, self.model_cfg)
        self.context  # noqa: B018 - validates eval.context against the model's positions now, not at the first split
        self.applier = PlanApplier.converting(
            self.model, self.table, COMPUTE_DTYPES[self.dtype], pristine_device=None if pristine_at == "device" else "cpu",
            cache_bytes=self.memory.cache,
        )  # fmt: skip
        self.load_seconds = time.perf_counter() - started
        self._started = started
        self._evaluators: dict[str, Evaluator] = {}
        self._baseline: dict[str, EvalResult] = {}
        self._kld_heads: list = []  # the baseline head copy the splits' KL references share (Evaluator.head_copy)
        bcfg = _plain(cfg.get("baseline") or {})
        self.baseline_plan = resolve_for_model(
            named_plan_spec(bcfg.get("plan", "fp16")), self.table, f"baseline.plan={bcfg.get('plan', 'fp16')}"
        )
        # a single-plan run whose plan does not fit this model fails now, saying why (see qsweep.families)
        if cfg.get("search") is None and not cfg.get("plan_file") and cfg.get("plan") is not None:
            resolve_for_model(_plain(cfg["plan"]), self.table, _plan_source())
        self.pinned_perplexity = bcfg.get("perplexity")
        self.baseline_size_bytes = bcfg.get("size_bytes") or model_size_bytes(self.table, self.baseline_plan)
        self.penalty = float(cfg.get("penalty", 10.0))

    def resources(self) -> dict:
        """What this process has used so far: seconds since loading began (load included), the load's seconds, the
        peak device memory (torch's allocator, GPUs only) and the peak resident memory of the process (host)."""
        peak_device = None
        if self.device.type == "cuda":
            peak_device = max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
        rss = peak_host_rss_bytes()
        return {
            "device": str(self.device) if self.eval_cfg.get("device_map") is None else "device_map=auto",
            "dtype": self.dtype,
            "wall_seconds": time.perf_counter() - self._started,
            "load_seconds": self.load_seconds,
            "peak_device_bytes": peak_device,
            "peak_host_rss_bytes": rss,
            "estimated_device_bytes": self.memory.device_bytes,
            "pristine_bytes": self.applier.pristine_bytes,
            "quantizations": self.applier.n_quantized,
        }

    @property
    def context(self) -> int:
        """``eval.context``, or the model's maximum positions when null; longer than the model's is refused."""
        return self._context_of(self.model.config)

    def _context_of(self, conf) -> int:
        ctx = self.eval_cfg.get("context")
        key = "n_positions" if getattr(conf, "n_positions", None) else "max_position_embeddings"
        limit = getattr(conf, key, None)
        if ctx is None:
            if not limit:
                raise ConfigError("the model's config names no maximum positions: set eval.context=N")
            return int(limit)
        if limit and int(ctx) > int(limit):
            raise ConfigError(
                f"eval.context={ctx} is longer than the model's {limit} positions (config {key}); "
                f"use eval.context<={limit} or null (the model's maximum)"
            )
        return int(ctx)

    def evaluator(self, split: str) -> Evaluator:
        if split not in self._evaluators:
            ids = load_token_ids(self.data_cfg, split, self.tokenizer)
            if self.eval_cfg.get("max_tokens") is not None:
                ids = ids[: int(self.eval_cfg["max_tokens"])]
            e = self.eval_cfg
            stride = self.context if e.get("stride") is None else int(e["stride"])
            where = (
                f"split {split!r} of data.path={self.data_cfg['path']!r}"
                if self.data_cfg.get("path")
                else f"split {split!r} of data={self.data_cfg.get('name')}"
            )
            protocol = (
                f"eval.context={self.context}, eval.stride={stride}, eval.max_tokens={e.get('max_tokens')}"
            )
            if ids.numel() <= MIN_SCORED_TOKENS:
                raise ConfigError(
                    f"{where} has {ids.numel()} tokens ({protocol}): at least {MIN_SCORED_TOKENS + 1} are needed "
                    f"to measure a perplexity; use a longer corpus or a larger eval.max_tokens"
                )
            self._evaluators[split] = Evaluator(
                ids,
                self.context,
                stride,
                batch_size=int(e.get("batch_size", 8)),
                dtype=self.dtype,
                logits_chunk=e.get("logits_chunk"),
                device=self.device,
                compile=bool(e.get("compile", False)),
                kld=bool(e.get("kld", True)),
            )
            ev = self._evaluators[split]
            # every split's KL reference shares one copy of the baseline's head
            ev.shared_heads = self._kld_heads
            if ev.n_tokens < MIN_SCORED_TOKENS:
                del self._evaluators[split]
                raise ConfigError(
                    f"{where} gives {ev.n_tokens} scored tokens ({protocol}): at least {MIN_SCORED_TOKENS} are "
                    f"needed to measure a perplexity; use a longer corpus or a smaller eval.stride"
                )
            if ev.n_tokens < CI_MIN_TOKENS or len(ev.windows) < CI_MIN_WINDOWS:
                log.warning(
                    "%s gives only %d scored tokens in %d windows (%s): its perplexity is noisy and the "
                    "degradation CI needs >= %d tokens in >= %d windows; use more text (data.path, "
                    "eval.max_tokens) or shorter windows (eval.context, eval.stride)",
                    where, ev.n_tokens, len(ev.windows), protocol, CI_MIN_TOKENS, CI_MIN_WINDOWS,
                )  # fmt: skip
        return self._evaluators[split]

    def resolve_plan(self, plan_cfg=None, plan_file: str | Path | None = None) -> Plan:
        """The plan given by a file (wins) or an inline spec, resolved against this model's units."""
        if plan_file:
            return load_plan_file(plan_file, self.table)
        return plan_from_config(_plain(plan_cfg), self.table)

    def evaluate(
        self,
        plan: Plan,
        split: str,
        stop: int | None = None,
        resume: EvalResult | None = None,
        record_reference: bool = False,
    ) -> EvalResult:
        """``plan``'s evaluation on ``split`` (its first ``stop`` windows, extending ``resume``, or recording its
        distribution as the split's KL reference: see :meth:`qsweep.evaluate.Evaluator.evaluate`)."""
        with self.out_of_memory_is_an_error(f"an evaluation on split {split!r}"):
            self.applier.apply_(plan)
            return self.evaluator(split).evaluate(self.model, stop=stop, resume=resume,
                                                  record_reference=record_reference)  # fmt: skip

    @contextlib.contextmanager
    def out_of_memory_is_an_error(self, during: str):
        """Turn an out-of-memory error of the device into a :class:`~qsweep.memory.ResourceError` (one line with
        the estimate and the settings that lower it), after freeing the quantized-tensor cache. On the CPU, what
        the work freed goes back to the OS when it ends (:func:`~qsweep.memory.release_host_memory`), so the next
        phase starts from the resident set of the model, not from the last phase's peak."""
        try:
            yield
        except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(e):
                raise
            if getattr(self, "applier", None) is not None:
                self.applier.clear_cache()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise ResourceError(out_of_memory_message(e, self.memory, during)) from None
        finally:
            if self.device.type == "cpu":
                release_host_memory()

    def baseline(self, split: str) -> EvalResult:
        """The baseline plan on ``split``, evaluated once; its distribution becomes the split's KL reference."""
        if split not in self._baseline:
            self.check_reference_fits(self.evaluator(split), split)
            self._baseline[split] = self.evaluate(self.baseline_plan, split, record_reference=True)
            if not self._baseline[split].ok:
                raise RuntimeError(
                    f"the baseline plan fails to evaluate on {split!r}: {self._baseline[split].error}"
                )
        return self._baseline[split]

    def check_reference_fits(self, ev: Evaluator, split: str) -> None:
        """Refuse in one line a KL reference of ``ev`` (this session's model's, on ``split``) the device cannot
        hold (:func:`qsweep.memory.check_reference_fits`); nothing to check with ``eval.kld=false``."""
        if ev.kld:
            head = self.model.get_output_embeddings().weight
            check_reference_fits(self.model.config, self.device, ev.n_tokens, head.dtype,
                                 with_head=not ev.shared_heads, split=split)  # fmt: skip

    def baseline_perplexity(self, split: str) -> float:
        """The pinned baseline perplexity, or the baseline plan's measured on ``split``."""
        if self.pinned_perplexity is not None:
            return float(self.pinned_perplexity)
        return self.baseline(split).perplexity

    def score(
        self, plan: Plan, split: str, stop: int | None = None, resume: PlanScore | None = None
    ) -> PlanScore:
        """Evaluate ``plan`` and the baseline on ``split``; degradation is paired on the same windows. ``stop``:
        on the first ``stop`` windows only (a partial score, against the baseline on those windows), extending
        the partial score ``resume`` of the same plan (racing: qsweep.search.racing)."""
        if self.pinned_perplexity is not None:
            base_ppl, ci = float(self.pinned_perplexity), None
            result = self.evaluate(plan, split, stop, resume.result if resume is not None else None)
        else:
            base = self.baseline(split)
            if plan == self.baseline_plan:
                result = base if stop is None else partial_result(base, stop)
            else:
                result = self.evaluate(plan, split, stop, resume.result if resume is not None else None)
            if len(result.window_nll) < len(base.window_nll):
                base = partial_result(base, len(result.window_nll))
            base_ppl, ci = base.perplexity, paired_degradation_ci(result, base) if result.ok else None
        size = model_size_bytes(self.table, plan)
        return PlanScore(
            plan=plan,
            split=split,
            result=result,
            baseline_perplexity=base_ppl,
            model_size_bytes=size,
            packed_size_bytes=packed_size_bytes(self.table, plan),
            baseline_size_bytes=int(self.baseline_size_bytes),
            bit_histogram=plan.histogram(self.table),
            bits_per_param=8 * size / self.table.numel,  # as qsweep.size.bits_per_param, without re-counting
            penalty=self.penalty,
            degradation_ci95=ci,
        )

"""A unified multistep solver (the S³ / USF idea): a schedule of per-step decisions, run through diffusers'
scheduler interface, so every adapter's denoise loop runs it unchanged.

A schedule with K steps makes exactly K model calls (K + 1 with the last step's corrector, below). Step i calls
the model at its `timestep`, then moves the sample to the next step's noise level (after the last step: noise
level zero, the image) with:

- `prediction`: what the update extrapolates, the data prediction x0 ("data", DPM-Solver++ and UniPC's default)
  or the noise prediction eps ("noise", DPM-Solver). The last step goes to noise level zero: it must use "data" at
  order 1 (a noise-prediction update there is 0 * inf, a higher order divides by the infinite log-SNR step), which
  is what DPM-Solver++ and UniPC do too; the image is then that call's data prediction.
- `order` 1-3: how many model outputs the update uses, this call's and the `order - 1` before it.
- `derivative`: how the higher-order terms are estimated from them: "dpm", DPM-Solver++'s multistep differences
  (the midpoint form at order 2, 3M at order 3); "unip", UniPC's predictor (B(h) = e^h - 1, coefficients solved
  from the step ratios). At order 1 both are the exact exponential-integrator step.
- `corrector`: UniC applied to this step's result once the next call's output is known, before the next step
  moves on (UniPC's corrector, order = this step's order). It needs no extra model call, except on the last step:
  there it costs one more call (a schedule of K - 1 steps then makes K calls). The last step then moves to the
  noise level of timestep 0 (the lowest the model was trained at, sigma about 0.01 for SD's schedule) instead of
  zero, the model is called there once more, and the image is the corrected sample: diffusers' "sigma_min" ending
  with UniC after it, as the USF paper's final corrector does. Moving to a nonzero level, the last step may then
  take any prediction and order.
- `analytic` (step 0 only): S³'s analytic first step. The run starts from pure noise x_T at the last training
  timestep; with it the sampler first moves x_T to step 0's timestep taking the noise prediction to be x_T itself
  (x_T is almost all noise), with no model call, so all K calls are spent lower down.

With `dpm_solver_pp_schedule` and `unipc_schedule` the sampler reproduces diffusers' DPMSolverMultistepScheduler
(dpmsolver++, 2M or 3M) and UniPCMultistepScheduler (bh2) step for step (tests/test_unified_solver.py, to 1e-5 on
the tiny pipelines): the arithmetic below follows theirs operation by operation, so that the equivalence holds in
float32, and the noise levels come from the same interpolation of the training schedule.

A schedule is data (to_dict / from_dict, a digest), never a pickle.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

PREDICTIONS = ("data", "noise")
DERIVATIVES = ("dpm", "unip")
MAX_ORDER = 3


@dataclass(frozen=True)
class StepDecision:
    """What one model call of a schedule does (see the module docstring)."""

    timestep: float  # where the model is called, in training timesteps (0 .. num_train_timesteps - 1)
    prediction: str = "data"
    order: int = 1
    derivative: str = "dpm"
    corrector: bool = False
    # Step 0 only: first move the starting noise (at the last training timestep) to this step's timestep with the
    # analytic first step, the noise prediction taken as the noise itself (x_T is almost all noise); no model call.
    analytic: bool = False


@dataclass(frozen=True)
class SolverSchedule:
    """A whole schedule: one decision per model call, in calling order (timesteps strictly decreasing)."""

    steps: tuple[StepDecision, ...]

    @property
    def final_corrector(self) -> bool:
        """Whether the last step is corrected by one extra model call at timestep 0 (see the module docstring)."""
        return bool(self.steps) and self.steps[-1].corrector

    @property
    def calls(self) -> int:
        return len(self.steps) + self.final_corrector

    @property
    def timesteps(self) -> list[float]:
        """Where the model is called, one per call: the steps' timesteps, then 0 for the final corrector's call."""
        return [step.timestep for step in self.steps] + ([0.0] if self.final_corrector else [])

    def problems(self, num_train_timesteps: int = 1000) -> list[str]:
        """Why this schedule cannot run, one line each; [] when it can."""
        found = []
        if not self.steps:
            return ["a schedule needs at least one step"]
        for i, step in enumerate(self.steps):
            where = f"step {i}"
            if not 0 <= step.timestep <= num_train_timesteps - 1:
                found.append(f"{where}: timestep {step.timestep} is outside 0..{num_train_timesteps - 1}")
            if i and not step.timestep < self.steps[i - 1].timestep:
                found.append(f"{where}: timestep {step.timestep} does not come after {self.steps[i - 1].timestep}")
            if step.prediction not in PREDICTIONS:
                found.append(f"{where}: prediction {step.prediction!r} is not one of {', '.join(PREDICTIONS)}")
            if step.derivative not in DERIVATIVES:
                found.append(f"{where}: derivative {step.derivative!r} is not one of {', '.join(DERIVATIVES)}")
            if not 1 <= step.order <= min(MAX_ORDER, i + 1):
                found.append(f"{where}: order {step.order} needs {step.order - 1} earlier model calls "
                             f"(orders 1-{MAX_ORDER}, at most i + 1)")
            if step.analytic and (i > 0 or step.timestep >= num_train_timesteps - 1):
                found.append(f"{where}: the analytic first step comes before the first call, from timestep "
                             f"{num_train_timesteps - 1} down to a lower one")
        last = self.steps[-1]
        if last.corrector:
            if last.timestep <= 0:
                found.append(f"step {len(self.steps) - 1}: a last step with a corrector moves to timestep 0's noise "
                             f"level, so it must start above it (timestep {last.timestep})")
            return found
        if last.prediction != "data":
            found.append(f"step {len(self.steps) - 1}: the last step goes to noise level zero and must use the data "
                         "prediction")
        if last.order != 1:
            found.append(f"step {len(self.steps) - 1}: the last step goes to noise level zero, where a step of order "
                         f"{last.order} divides by an infinite log-SNR step; it takes order 1 (the data prediction)")
        return found

    def to_dict(self) -> dict:
        # `analytic` only where set: schedules written before it existed keep their content and digest.
        return {"steps": [{k: v for k, v in asdict(step).items() if k != "analytic" or v} for step in self.steps]}

    @classmethod
    def from_dict(cls, value: dict) -> SolverSchedule:
        if not isinstance(value, dict) or not isinstance(value.get("steps"), list):
            raise ValueError("a solver schedule is an object with a list of `steps`")
        fields = set(StepDecision.__dataclass_fields__)
        steps = []
        for i, step in enumerate(value["steps"]):
            if not isinstance(step, dict) or "timestep" not in step or set(step) - fields:
                raise ValueError(f"schedule step {i}: expected an object with `timestep` and some of "
                                 f"{', '.join(sorted(fields - {'timestep'}))}; got {step!r}")
            steps.append(StepDecision(timestep=float(step["timestep"]), prediction=str(step.get("prediction", "data")),
                                      order=int(step.get("order", 1)), derivative=str(step.get("derivative", "dpm")),
                                      corrector=bool(step.get("corrector", False)),
                                      analytic=bool(step.get("analytic", False))))
        return cls(tuple(steps))

    @property
    def digest(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def dpm_solver_pp_schedule(timesteps: list[float], solver_order: int = 2) -> SolverSchedule:
    """DPM-Solver++ (multistep, midpoint) as diffusers runs it with final noise level zero: a warm-up of lower orders,
    order 1 at the last step and, for 3M under 15 steps, at most 2 at the step before."""
    count = len(timesteps)
    steps = []
    for i, timestep in enumerate(timesteps):
        order = min(solver_order, i + 1)
        if i == count - 1:
            order = 1
        elif i == count - 2 and count < 15:
            order = min(order, 2)
        steps.append(StepDecision(timestep=float(timestep), prediction="data", order=order, derivative="dpm"))
    return SolverSchedule(tuple(steps))


def unipc_schedule(timesteps: list[float], solver_order: int = 2) -> SolverSchedule:
    """UniPC (bh2, data prediction, lower orders at the end) as diffusers runs it: its corrector after every step
    but the last."""
    count = len(timesteps)
    steps = [StepDecision(timestep=float(timestep), prediction="data", order=min(solver_order, count - i, i + 1),
                          derivative="unip", corrector=i < count - 1)
             for i, timestep in enumerate(timesteps)]
    return SolverSchedule(tuple(steps))


def solver_timesteps(scheduler_config, steps: int) -> list[int]:
    """The timesteps diffusers' DPMSolverMultistepScheduler (and UniPC, which spaces them alike) calls the model at
    for `steps` calls with this pipeline's scheduler config: the presets' grid and the search's starting point."""
    from diffusers import DPMSolverMultistepScheduler

    reference = DPMSolverMultistepScheduler.from_config(dict(scheduler_config), algorithm_type="dpmsolver++",
                                                        use_karras_sigmas=False)
    reference.set_timesteps(steps)
    return [int(t) for t in reference.timesteps.tolist()]


def training_betas(config) -> torch.Tensor:
    """The training noise schedule's betas, as diffusers' multistep schedulers build them from a config."""
    from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar

    count = config["num_train_timesteps"]
    if config.get("trained_betas") is not None:
        return torch.tensor(config["trained_betas"], dtype=torch.float32)
    kind = config.get("beta_schedule", "linear")
    if kind == "linear":
        return torch.linspace(config["beta_start"], config["beta_end"], count, dtype=torch.float32)
    if kind == "scaled_linear":
        return torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, count, dtype=torch.float32) ** 2
    if kind == "squaredcos_cap_v2":
        return betas_for_alpha_bar(count)
    raise ValueError(f"beta_schedule {kind!r} is not supported by the unified solver")


UNSUPPORTED = {  # scheduler config settings that change the noise levels or the outputs in ways not modelled here
    "thresholding": False, "rescale_betas_zero_snr": False, "use_karras_sigmas": False,
    "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False,
}


class UnifiedSolverScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler that runs a SolverSchedule: `set_timesteps(K)` with K its number of steps, then one
    `step` per model call. Build it with `UnifiedSolverScheduler.for_pipeline(pipe.scheduler.config, schedule)`."""

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: list | None = None,
                 prediction_type: str = "epsilon", schedule: dict | None = None):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type {prediction_type!r}: the unified solver takes epsilon, v_prediction "
                             "or sample")
        self.schedule = SolverSchedule.from_dict(schedule or {"steps": []})
        problems = self.schedule.problems(num_train_timesteps)
        if problems:
            raise ValueError("solver schedule: " + "; ".join(problems))
        betas = training_betas(dict(self.config))
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.train_sigmas = np.array(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = None
        self._reset()

    @classmethod
    def for_pipeline(cls, scheduler_config, schedule: SolverSchedule) -> UnifiedSolverScheduler:
        """The unified solver on a pipeline's own training noise schedule (from its scheduler's config)."""
        config = dict(scheduler_config)
        for name, plain in UNSUPPORTED.items():
            if config.get(name, plain) != plain:
                raise ValueError(f"the pipeline's scheduler sets {name}={config[name]!r}, which the unified solver "
                                 "does not model")
        if config.get("variance_type") not in (None, "fixed_small"):
            raise ValueError(f"the pipeline's scheduler has variance_type={config['variance_type']!r}; the unified "
                             "solver takes the noise prediction alone")
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
        return cls(**{key: config[key] for key in keys if key in config}, schedule=schedule.to_dict())

    def _reset(self) -> None:
        self._step_index = 0
        self._outputs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (x0, eps) of each call so far
        self._last_sample: torch.Tensor | None = None  # the sample the previous step started from

    # ---- the scheduler interface ---------------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int | None = None, device=None) -> None:
        if num_inference_steps != self.schedule.calls:
            raise ValueError(f"this solver schedule makes {self.schedule.calls} model calls; the run asks for "
                             f"{num_inference_steps} steps")
        timesteps = np.array(self.schedule.timesteps, dtype=np.float64)
        sigmas = np.interp(timesteps, np.arange(0, len(self.train_sigmas)), self.train_sigmas)
        # The noise level after the last step: zero (the image), or with the final corrector timestep 0's, which
        # is already the last entry (the corrector's call).
        ending = [] if self.schedule.final_corrector else [0.0]
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, ending]).astype(np.float32))
        integral = bool(np.all(timesteps == np.round(timesteps)))
        self.timesteps = torch.from_numpy(timesteps.astype(np.int64) if integral else timesteps.astype(np.float32))
        self.timesteps = self.timesteps.to(device)
        self.num_inference_steps = self.schedule.calls
        self._reset()

    def set_begin_index(self, begin_index: int = 0) -> None:
        if begin_index != 0:
            raise ValueError("the unified solver keeps the outputs of earlier steps: it starts at step 0")

    @property
    def step_index(self) -> int:
        return self._step_index

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The model's input: the sample itself, but before the first call of a schedule with the analytic first
        step, the starting noise moved to that call's timestep (step() makes the same move on its sample)."""
        if self._step_index == 0 and self.schedule.steps[0].analytic:
            return self._analytic_first_step(sample)
        return sample

    def _analytic_first_step(self, sample: torch.Tensor) -> torch.Tensor:
        """x_T (at the last training timestep) to step 0's noise level, with eps = x_T: a DDIM step, no call."""
        start = torch.tensor(float(self.train_sigmas[-1]), dtype=torch.float32)
        alpha_s, sigma_s = self._alpha_sigma(start)
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[0])
        x0 = (sample - sigma_s * sample) / alpha_s
        return (alpha_t * x0 + sigma_t * sample).to(sample.dtype)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True,
             **unused) -> SchedulerOutput | tuple:
        if self.timesteps is None:
            raise ValueError("set_timesteps first")
        i = self._step_index
        if i >= self.schedule.calls:
            raise ValueError(f"the schedule has {self.schedule.calls} steps; step {i} was asked for")
        if float(timestep) != float(self.timesteps[i]):
            raise ValueError(f"step {i} of the schedule is at timestep {float(self.timesteps[i])}, called at "
                             f"{float(timestep)}")
        if i == 0 and self.schedule.steps[0].analytic:
            sample = self._analytic_first_step(sample)
        x0, eps = self._convert(model_output, sample, i)
        if i > 0 and self.schedule.steps[i - 1].corrector:
            sample = self._uni_c(self.schedule.steps[i - 1], i, x0 if self._is_data(i - 1) else eps, sample)
        if i == len(self.schedule.steps):  # the final corrector's call: the corrected sample is the result
            self._step_index += 1
            return SchedulerOutput(prev_sample=sample) if return_dict else (sample,)
        decision = self.schedule.steps[i]
        self._outputs.append((x0, eps))
        self._last_sample = sample
        if decision.derivative == "unip":
            prev_sample = self._uni_p(decision, i, sample)
        else:
            prev_sample = self._dpm(decision, i, sample.to(torch.float32)).to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ---- the updates -----------------------------------------------------------------------------------------

    @staticmethod
    def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha_t, sigma * alpha_t

    def _lambda(self, index: int) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(self.sigmas[index])
        return torch.log(alpha) - torch.log(sigma)

    def _is_data(self, index: int) -> bool:
        return self.schedule.steps[index].prediction == "data"

    def _convert(self, model_output: torch.Tensor, sample: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from the model's output at step i's noise level (both, so each update picks its own)."""
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i])
        kind = self.config.prediction_type
        if kind == "epsilon":
            eps = model_output
            x0 = (sample - sigma_t * model_output) / alpha_t
        elif kind == "v_prediction":
            x0 = alpha_t * sample - sigma_t * model_output
            eps = alpha_t * model_output + sigma_t * sample
        else:
            x0 = model_output
            eps = (sample - alpha_t * model_output) / sigma_t
        return x0, eps

    def _output(self, index: int, data: bool) -> torch.Tensor:
        x0, eps = self._outputs[index]
        return x0 if data else eps

    def _move(self, i: int) -> tuple[torch.Tensor, ...]:
        """(alpha_t, sigma_t, alpha_s0, sigma_s0, lambda_s0, h) of the move from noise level i to level i + 1."""
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i + 1])
        alpha_s0, sigma_s0 = self._alpha_sigma(self.sigmas[i])
        lambda_t, lambda_s0 = torch.log(alpha_t) - torch.log(sigma_t), torch.log(alpha_s0) - torch.log(sigma_s0)
        return alpha_t, sigma_t, alpha_s0, sigma_s0, lambda_s0, lambda_t - lambda_s0

    def _differences(self, i: int, order: int, data: bool, lambda_s0: torch.Tensor, h: torch.Tensor):
        """UniPC's step ratios r_k and scaled differences (m_{i-k} - m_i) / r_k of the `order - 1` outputs before
        call i."""
        m0 = self._output(i, data)
        ratios, D1s = [], []
        for k in range(1, order):
            rk = (self._lambda(i - k) - lambda_s0) / h
            ratios.append(rk)
            D1s.append((self._output(i - k, data) - m0) / rk)
        return ratios, D1s

    def _dpm(self, decision: StepDecision, i: int, sample: torch.Tensor) -> torch.Tensor:
        """DPM-Solver(++) multistep update of order 1-3 from step i to the next noise level."""
        data = decision.prediction == "data"
        alpha_t, sigma_t, alpha_s0, sigma_s0, lambda_s0, h = self._move(i)
        m0 = self._output(i, data)
        if decision.order == 1:
            if data:
                return (sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * m0
            return (alpha_t / alpha_s0) * sample - (sigma_t * (torch.exp(h) - 1.0)) * m0
        m1 = self._output(i - 1, data)
        lambda_s1 = self._lambda(i - 1)
        h_0 = lambda_s0 - lambda_s1
        r0 = h_0 / h
        if decision.order == 2:
            D0, D1 = m0, (1.0 / r0) * (m0 - m1)
            if data:
                return ((sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * D0
                        - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1)
            return ((alpha_t / alpha_s0) * sample - (sigma_t * (torch.exp(h) - 1.0)) * D0
                    - 0.5 * (sigma_t * (torch.exp(h) - 1.0)) * D1)
        m2 = self._output(i - 2, data)
        h_1 = lambda_s1 - self._lambda(i - 2)
        r1 = h_1 / h
        D0 = m0
        D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
        D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
        if data:
            return ((sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * D0
                    + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
                    - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * D2)
        return ((alpha_t / alpha_s0) * sample - (sigma_t * (torch.exp(h) - 1.0)) * D0
                - (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * D1
                - (sigma_t * ((torch.exp(h) - 1.0 - h) / h**2 - 0.5)) * D2)

    def _bh_coefficients(self, order: int, h: torch.Tensor, data: bool, ratios: list[torch.Tensor]):
        """UniPC's bh2 terms: (h_phi_1, B(h), R, b) for the step ratios of the earlier outputs."""
        rks = torch.stack([*ratios, torch.ones((), device=h.device)])
        hh = -h if data else h
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial_i = 1
        B_h = torch.expm1(hh)
        R, b = [], []
        for k in range(1, order + 1):
            R.append(torch.pow(rks, k - 1))
            b.append(h_phi_k * factorial_i / B_h)
            factorial_i *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        return h_phi_1, B_h, torch.stack(R), torch.stack(b)

    def _uni_p(self, decision: StepDecision, i: int, x: torch.Tensor) -> torch.Tensor:
        """UniPC's predictor (bh2) of order 1-3 from step i to the next noise level."""
        data = decision.prediction == "data"
        order = decision.order
        alpha_t, sigma_t, alpha_s0, sigma_s0, lambda_s0, h = self._move(i)
        m0 = self._output(i, data)
        ratios, D1s = self._differences(i, order, data, lambda_s0, h)
        h_phi_1, B_h, R, b = self._bh_coefficients(order, h, data, ratios)
        pred_res = 0
        if D1s:
            D1s = torch.stack(D1s, dim=1)
            if order == 2:
                rhos_p = torch.ones(1, dtype=x.dtype, device=x.device) * 0.5
            else:
                rhos_p = torch.linalg.solve(R[:-1, :-1], b[:-1]).to(x.device).to(x.dtype)
            pred_res = torch.einsum("k,bkc...->bc...", rhos_p, D1s)
        if data:
            x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0 - alpha_t * B_h * pred_res
        else:
            x_t = alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0 - sigma_t * B_h * pred_res
        return x_t.to(x.dtype)

    def _uni_c(self, decision: StepDecision, i: int, model_t: torch.Tensor, this_sample: torch.Tensor) -> torch.Tensor:
        """UniC: correct the result of step i - 1 (its decision given) with the output of the call at step i."""
        data = decision.prediction == "data"
        order = decision.order
        x = self._last_sample
        alpha_t, sigma_t, alpha_s0, sigma_s0, lambda_s0, h = self._move(i - 1)  # the move step i - 1 made
        m0 = self._output(i - 1, data)
        ratios, D1s = self._differences(i - 1, order, data, lambda_s0, h)
        h_phi_1, B_h, R, b = self._bh_coefficients(order, h, data, ratios)
        if order == 1:
            rhos_c = torch.ones(1, dtype=x.dtype, device=x.device) * 0.5
        else:
            rhos_c = torch.linalg.solve(R, b).to(x.device).to(x.dtype)
        corr_res = torch.einsum("k,bkc...->bc...", rhos_c[:-1], torch.stack(D1s, dim=1)) if D1s else 0
        D1_t = model_t - m0
        if data:
            x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0 - alpha_t * B_h * (corr_res + rhos_c[-1] * D1_t)
        else:
            x_t = alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0 - sigma_t * B_h * (corr_res + rhos_c[-1] * D1_t)
        return x_t.to(this_sample.dtype)


# ---- schedule files ------------------------------------------------------------------------------------------------

SCHEDULE_FORMAT = "seedsift.solver-schedule"
SCHEDULE_VERSION = 1
NOISE_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                       "prediction_type")


def noise_schedule_of(model_path: str) -> dict:
    """The training noise schedule of a pipeline (its scheduler config's keys that fix the noise levels)."""
    config = UnifiedSolverScheduler.load_config(model_path, subfolder="scheduler")
    return {key: config.get(key) for key in NOISE_SCHEDULE_KEYS}


def solver_model_identity(model_path: str) -> dict:
    """What a schedule is searched for: the pipeline's classes, its training noise schedule and a digest of its
    denoiser's config. Cheap (configs only); a schedule for another model, or a retrained one with another
    architecture or noise schedule, does not match."""
    from actors.models.families import family_of, model_identity, read_config

    denoiser = read_config(model_path, family_of(model_path).denoiser_name)
    denoiser = {key: value for key, value in denoiser.items() if not key.startswith("_")}
    text = json.dumps(denoiser, sort_keys=True, default=str)
    identity = {key: value for key, value in model_identity(model_path).items() if key != "scheduler"}
    return {**identity, "noise_schedule": noise_schedule_of(model_path),
            "denoiser_config": hashlib.blake2b(text.encode(), digest_size=8).hexdigest()}


@dataclass(frozen=True)
class ScheduleFile:
    """A schedule.json: the schedule, the model and step count it is for, and what its search recorded."""

    schedule: SolverSchedule
    model: dict  # solver_model_identity of the model searched on, plus its `name` as given
    objective: dict
    figures: dict

    @property
    def calls(self) -> int:
        return self.schedule.calls

    @property
    def digest(self) -> str:
        """Digest of what decides the images (model identity, steps); not of the search's notes."""
        identity = {key: value for key, value in self.model.items() if key != "name"}
        text = json.dumps({"model": identity, "schedule": self.schedule.to_dict()}, sort_keys=True, default=str)
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    @property
    def label(self) -> str:
        """What manifest rows record as the scheduler."""
        from actors.models.solvers import SCHEDULE_PREFIX

        return f"{SCHEDULE_PREFIX}{self.digest}"

    def to_dict(self) -> dict:
        return {"format": SCHEDULE_FORMAT, "version": SCHEDULE_VERSION, "model": self.model, "calls": self.calls,
                "schedule": self.schedule.to_dict(), "objective": self.objective, "figures": self.figures,
                "digest": self.digest}

    @classmethod
    def from_dict(cls, value: dict, source: str = "schedule") -> ScheduleFile:
        """Parse and check a schedule.json's content; ValueError naming `source` and what is wrong."""
        if not isinstance(value, dict) or value.get("format") != SCHEDULE_FORMAT:
            raise ValueError(f"{source} is not a seedsift solver schedule (no \"format\": \"{SCHEDULE_FORMAT}\")")
        if value.get("version") != SCHEDULE_VERSION:
            raise ValueError(f"{source} has schedule version {value.get('version')!r}; this seedsift reads "
                             f"version {SCHEDULE_VERSION}")
        try:
            schedule = SolverSchedule.from_dict(value.get("schedule"))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{source}: {exc}") from exc
        found = cls(schedule=schedule, model=dict(value.get("model") or {}),
                    objective=dict(value.get("objective") or {}), figures=dict(value.get("figures") or {}))
        if value.get("calls") != found.calls:
            raise ValueError(f"{source} says {value.get('calls')} model calls but lists {found.calls} steps")
        if value.get("digest") != found.digest:
            raise ValueError(f"{source}: its digest {value.get('digest')!r} does not match its content "
                             f"({found.digest}); it was edited by hand or damaged")
        return found

    @staticmethod
    def recorded_for(label: str, run: dict | None) -> dict | None:
        """The schedule file content rows labelled `label` were rendered with, from their output's run.json (`run`);
        None for a named solver's label. ValueError when run.json does not hold that schedule."""
        from actors.models.solvers import SCHEDULE_PREFIX

        if not str(label).startswith(SCHEDULE_PREFIX):
            return None
        recorded = (run or {}).get("solver_schedule")
        if recorded is None or ScheduleFile.from_dict(recorded).label != label:
            raise ValueError(f"the rows were rendered with solver schedule {label}, which the output's run.json does "
                             "not hold")
        return recorded

    def check_fits(self, model_path: str, steps: int) -> None:
        """ValueError unless this schedule was searched for this model and this number of steps (model calls)."""
        if steps != self.calls:
            raise ValueError(f"the schedule was searched for {self.calls} model calls; this run asks for --steps "
                             f"{steps}. Use --steps {self.calls}, or search a schedule for {steps}")
        here = solver_model_identity(model_path)
        recorded = {key: value for key, value in self.model.items() if key != "name"}
        changed = [key for key in sorted(set(here) | set(recorded)) if here.get(key) != recorded.get(key)]
        if changed:
            raise ValueError(f"the schedule was searched for model {self.model.get('name', '?')!r}, which differs "
                             f"from this one in {', '.join(changed)}; search a schedule for this model")
        problems = self.schedule.problems(int(here["noise_schedule"]["num_train_timesteps"] or 1000))
        if problems:
            raise ValueError("the schedule cannot run: " + "; ".join(problems))

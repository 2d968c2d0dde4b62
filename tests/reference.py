"""Float64 NumPy references for every approach, written from the formulas of each
approach's docstring (the exact formula the package documents) in their h-form
(the undebiased moving average, divided out where it is read), with input
gradients in closed form.

Each reference step takes a batch `x` of shape (B, C, *spatial) and a cotangent `g`
of the same shape, and returns (y, dL/dx) for L = sum(g * y), updating its own
state; `infer()` returns the inference statistics.
"""

import numpy as np


def batch_moments(x):
    axes = (0,) + tuple(range(2, x.ndim))
    mu = x.mean(axes)
    v = ((x - np.expand_dims(mu, axes)) ** 2).mean(axes)
    n = x.size // x.shape[1]
    return mu, v, n, axes


class Reference:
    """y = (x - M) / sqrt(V + eps) * w + b, where M and V are functions of the batch
    mean mu and biased variance v with the partial derivatives
    dM/dmu, dM/dv, dV/dmu, dV/dv returned by `stats`."""

    def __init__(self, channels, momentum, eps=1e-5):
        self.m = momentum
        self.eps = eps
        self.t = 0
        self.h_mean = np.zeros(channels)
        self.h_var = np.zeros(channels)

    def debiased(self):
        if self.t == 0:
            return np.zeros_like(self.h_mean), np.ones_like(self.h_var)
        scale = 1 - self.m**self.t
        return self.h_mean / scale, self.h_var / scale

    def ema(self, mu, var):
        self.t += 1
        self.h_mean = self.m * self.h_mean + (1 - self.m) * mu
        self.h_var = self.m * self.h_var + (1 - self.m) * var

    def infer(self):
        return self.debiased()

    def stats(self, mu, v, n):
        """(M, V, dM/dmu, dM/dv, dV/dmu, dV/dv) for this batch; updates the state."""
        raise NotImplementedError

    def step(self, x, g, w, b):
        mu, v, n, axes = batch_moments(x)
        M, V, dM_dmu, dM_dv, dV_dmu, dV_dv = self.stats(mu, v, n)

        def e(a):
            return np.expand_dims(a, axes)

        s = w / np.sqrt(V + self.eps)
        y = (x - e(M)) * e(s) + e(b)
        dL_dM = -s * g.sum(axes)
        dL_dV = -0.5 * (g * (x - e(M))).sum(axes) * s / (V + self.eps)
        dmu_dx = 1 / n
        dv_dx = 2 * (x - e(mu)) / n
        dx = (
            g * e(s)
            + e(dL_dM) * (e(dM_dmu) * dmu_dx + e(dM_dv) * dv_dx)
            + e(dL_dV) * (e(dV_dmu) * dmu_dx + e(dV_dv) * dv_dx)
        )
        return y, dx

    def inference(self, x, w, b):
        mean, var = self.infer()
        axes = (0,) + tuple(range(2, x.ndim))
        s = w / np.sqrt(var + self.eps)
        return (x - np.expand_dims(mean, axes)) * np.expand_dims(s, axes) + (
            np.expand_dims(b, axes)
        )


def _ones(a):
    return np.ones_like(a)


class BatchRef(Reference):
    def stats(self, mu, v, n):
        self.ema(mu, v * n / (n - 1))
        one, zero = _ones(mu), 0 * mu
        return mu, v, one, zero, zero, one


class EMARef(Reference):
    def __init__(self, channels, momentum, eps=1e-5):
        super().__init__(channels, momentum, eps)
        self.r = (np.zeros(channels), np.ones(channels))

    def infer(self):
        return self.r

    def stats(self, mu, v, n):
        self.t += 1
        if self.t == 1:
            self.r = (mu, v)
            a = 1.0
        else:
            self.r = (
                self.m * self.r[0] + (1 - self.m) * mu,
                self.m * self.r[1] + (1 - self.m) * v,
            )
            a = 1 - self.m
        zero = 0 * mu
        return self.r[0], self.r[1], a * _ones(mu), zero, zero, a * _ones(mu)


class AdamCorrectionRef(Reference):
    def stats(self, mu, v, n):
        self.ema(mu, v)
        a = (1 - self.m) / (1 - self.m**self.t) * _ones(mu)
        M, V = self.debiased()
        return M, V, a, 0 * a, 0 * a, a


class SmoothStartRef(Reference):
    def stats(self, mu, v, n):
        self.ema(mu, v)
        mt = self.m**self.t
        a = (1 - self.m + mt) * _ones(mu)
        return self.h_mean + mt * mu, self.h_var + mt * v, a, 0 * a, 0 * a, a


class FrozenRef(Reference):
    def __init__(self, channels, momentum, eps=1e-5, mean=None, var=None):
        super().__init__(channels, momentum, eps)
        self.mean = np.zeros(channels) if mean is None else mean
        self.var = np.ones(channels) if var is None else var

    def infer(self):
        return self.mean, self.var

    def stats(self, mu, v, n):
        zero = 0 * mu
        return self.mean, self.var, zero, zero, zero, zero


class RunningRef(Reference):
    """Exact population statistics of all values seen, with the count capped."""

    def __init__(self, channels, momentum, eps=1e-5, max_count=256):
        super().__init__(channels, momentum, eps)
        self.max_count = max_count
        self.c = 0
        self.mean = np.zeros(channels)
        self.var = np.ones(channels)

    def infer(self):
        return self.mean, self.var

    def stats(self, mu, v, n):
        c, T = self.c, self.c + n
        d = mu - self.mean
        self.mean = self.mean + d * n / T
        self.var = (c * self.var + n * v + d**2 * c * n / T) / T
        self.c = min(T, self.max_count)
        one = _ones(mu)
        return (
            self.mean,
            self.var,
            n / T * one,
            0 * mu,
            2 * d * c * n / T**2,
            n / T * one,
        )


class RenormRef(Reference):
    def __init__(self, channels, momentum, eps=1e-5, r_max=3.0, d_max=5.0):
        super().__init__(channels, momentum, eps)
        self.r_max, self.d_max = r_max, d_max

    def stats(self, mu, v, n):
        sigma_b = np.sqrt(v + self.eps)
        if self.t == 0:
            r, d = _ones(mu), 0 * mu
        else:
            mean, var = self.debiased()
            sigma = np.sqrt(var + self.eps)
            r = np.clip(sigma_b / sigma, 1 / self.r_max, self.r_max)
            d = np.clip((mu - mean) / sigma, -self.d_max, self.d_max)
        self.ema(mu, v * n / (n - 1))
        M = mu - d * sigma_b / r
        V = sigma_b**2 / r**2 - self.eps
        return M, V, _ones(mu), -d / (2 * r * sigma_b), 0 * mu, 1 / r**2


class TrackingRef(BatchRef):
    """Training as `batch`; the inference statistics are those of the candidate
    debiased moving average (h-form, one per momentum) whose score, a debiased
    moving average of its one-step-ahead prediction error (twice the
    Kullback-Leibler divergence to second order, averaged over channels), is
    lowest."""

    MOMENTA = (0.0, 0.5, 0.8, 0.9, 0.97, 0.995)
    WINDOW = 0.95

    def __init__(self, channels, momentum, eps=1e-5):
        super().__init__(channels, momentum, eps)
        k = len(self.MOMENTA)
        self.h = np.zeros((k, channels)), np.zeros((k, channels))
        self.g = np.zeros(k)  # the scores' undebiased moving average
        self.chosen = (np.zeros(channels), np.ones(channels))

    def candidates(self):
        scale = 1 - np.asarray(self.MOMENTA)[:, None] ** self.t
        return self.h[0] / scale, self.h[1] / scale

    def infer(self):
        return self.chosen

    def stats(self, mu, v, n):
        s_var = v * n / (n - 1)
        if self.t >= 1:
            mean_k, var_k = self.candidates()
            u = self.chosen[1] + self.eps  # the inference variance until now
            e = np.mean((mu - mean_k) ** 2 / u + (s_var - var_k) ** 2 / (2 * u**2), 1)
            self.g = self.WINDOW * self.g + (1 - self.WINDOW) * e
        self.t += 1
        m = np.asarray(self.MOMENTA)[:, None]
        self.h = m * self.h[0] + (1 - m) * mu, m * self.h[1] + (1 - m) * s_var
        scores = self.g / (1 - self.WINDOW ** (self.t - 1)) if self.t >= 2 else self.g
        # The first of the lowest: at t = 2 every candidate made the same prediction
        # (all were the first batch's statistics), which float64 rounds apart.
        best = int(np.flatnonzero(scores <= scores.min() * (1 + 1e-9))[0])
        mean_k, var_k = self.candidates()
        self.chosen = mean_k[best], var_k[best]
        self.scores = scores
        one, zero = _ones(mu), 0 * mu
        return mu, v, one, zero, zero, one


REFERENCES = {
    "batch": BatchRef,
    "ema": EMARef,
    "adam-correction": AdamCorrectionRef,
    "smooth-start": SmoothStartRef,
    "frozen": FrozenRef,
    "running": RunningRef,
    "renorm": RenormRef,
    "tracking": TrackingRef,
}

"""StateProbe: streaming statistics of the SSM state of Mamba / Mamba-2 mixers, by position.

A long input is fed chunk by chunk with the model's own cache carried over (see
workbench.metrics.state.state_scan). The probe watches two kinds of site through the capture:

- each mixer (a "post" hook on the projection whose output carries dt and B: Mamba-2's
  ``in_proj``, Mamba's ``x_proj``) for the per-token dt, decay exp(dt A), x and B of the call;
- the model call (a "post" hook on the model) for the logits (token loss) and the cache, which
  holds each layer's SSM state h after the call.

Positions are grouped in buckets of ``bucket`` tokens (a call must cover whole buckets, except
the last call of a sequence). Per layer, head and bucket it keeps sums over sequences of

- the state h after the bucket's last token (heads x P x N; Mamba: one head, P = d_inner):
  sum, sum of squares, element count (-> mean, variance, RMS), a median estimate (the exact
  median of every k-th value of the batch's state, k = values // ``median_sample``, averaged over
  calls; exact for states that small), cosine similarity with the previous
  bucket's state (per head, and over the whole layer), the fraction of state channels (the N
  columns of a head's P x N matrix) whose norm exceeds ``usage_tol`` x the largest, and the
  effective rank exp(entropy of the normalised singular values) of each head's P x N matrix;
- the token means of dt, exp(dt A), x (over P) and B (over N) in the bucket;
- the mean next-token NLL of predictions made in the bucket;
- value histograms of h (all heads) at ``hist_positions`` (bucket ends), over fixed
  symmetric log-spaced edges.

The state at the end of a call is read from the cache; states at bucket ends inside a call
(a chunk of several buckets) follow from the previous state and the call's dt, x, B by the
exact SSM recurrence h_t = exp(dt_t A) h_(t-1) + dt_t x_t B_t^T, computed once per bucket
(the chunk-state step of the SSD scan). Mamba-2's x and B are taken after the mixer's causal
convolution, recomputed from ``in_proj``'s output with the last kernel-1 inputs carried over.

Everything lives on the model's device; per-bucket arrays grow with the number of buckets (a few
floats per head per bucket), never with the number of tokens inside a bucket, and the probe
never reads a device value back to the host.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from workbench._compat import recurrent_state
from workbench.capture.probes import HookPoint, ModelSite, SiteProbe
from workbench.errors import CaptureError

HEAD_FIELDS = ("s1", "s2", "med", "cos", "usage", "erank", "dt", "decay", "x", "B")
BUCKET_FIELDS = ("snaps", "elems", "cos_n", "cos_layer", "tokens")


def default_edges() -> torch.Tensor:
    """Symmetric log-spaced histogram edges: +-1e-6 .. +-1e3 (4 bins per decade) and 0."""
    pos = torch.logspace(-6, 3, 37, dtype=torch.float64)
    return torch.cat([-pos.flip(0), torch.zeros(1, dtype=torch.float64), pos]).float()


def _median(v: torch.Tensor) -> torch.Tensor:
    """torch.median over the last dim (the lower of the two middle values for an even count).
    On the CPU the same value from numpy's partial sort (introselect): several times faster than
    torch's median on many short rows, and no device sync there."""
    if v.device.type != "cpu" or v.requires_grad or v.isnan().any():
        return v.contiguous().median(-1).values
    import numpy as np

    k = (v.shape[-1] - 1) // 2
    return torch.from_numpy(np.partition(v.contiguous().numpy(), k, axis=-1)[..., k].copy())


def erank_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Effective rank exp(entropy of the normalised singular values) of matrices M from their
    Gram matrices M M^T [..., k, k] (the smaller side; float64): singular values are the square
    roots of the Gram's eigenvalues."""
    sv = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    pr = sv / sv.sum(-1, keepdim=True).clamp_min(1e-30)
    return torch.exp(-(pr * torch.log(pr.clamp_min(1e-30))).sum(-1))


def _erank_part(gram: torch.Tensor, event) -> torch.Tensor:
    if event is not None:
        event.synchronize()  # the copy to this pinned buffer has landed (waits in a worker thread)
    return erank_from_gram(gram)


class _HostLinalg:
    """Effective ranks of CUDA states, computed on the host while the GPU carries on.

    torch.linalg.eigvalsh on CUDA decomposes matrices larger than 32 x 32 one at a time (cuSOLVER
    syevd in a loop, ~0.1 ms each; the batched solver is used only up to 32 x 32), and a Mamba-2
    370M call has 48 layers x 32 heads x 4 buckets of 64 x 64 Gram matrices. So on CUDA each
    call's Gram matrices are copied to a pinned host buffer (an asynchronous copy and an event:
    no sync), and a thread pool decomposes them in parallel on the CPU cores while the forward
    goes on. The results are folded into the state (``apply``) in call order, when the state is
    read (state_dict, finish, merge) or when more than ``depth`` calls wait."""

    def __init__(self, workers: int | None = None, depth: int = 2):
        import os
        from concurrent.futures import ThreadPoolExecutor

        self.workers = int(workers or max(1, min(16, (os.cpu_count() or 2) - 1)))
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="wb-state-linalg")
        self.depth = depth
        self.jobs: list = []
        self.free: dict[tuple, list] = {}

    def submit(self, gram: torch.Tensor, apply) -> None:
        shape = tuple(gram.shape)
        bufs = self.free.setdefault(shape, [])
        host = bufs.pop() if bufs else torch.empty(shape, dtype=gram.dtype, pin_memory=gram.is_cuda)
        host.copy_(gram, non_blocking=gram.is_cuda)
        event = None
        if gram.is_cuda:
            event = torch.cuda.Event()
            event.record()
        flat = host.view(-1, shape[-2], shape[-1])
        parts = [p for p in torch.tensor_split(flat, self.workers) if p.shape[0]]
        self.jobs.append(([self.pool.submit(_erank_part, p, event) for p in parts], host, shape, apply))
        while len(self.jobs) > self.depth:
            self._collect_one()

    def _collect_one(self) -> None:
        futs, host, shape, apply = self.jobs.pop(0)
        er = torch.cat([f.result() for f in futs]).view(shape[:-2])
        self.free[shape].append(host)
        apply(er)

    def drain(self) -> None:
        while self.jobs:
            self._collect_one()


class StateProbe(SiteProbe):
    """Per layer / head / position-bucket statistics of the SSM state (see the module doc)."""

    name = "state"
    site_kind = "mixer"

    def __init__(self, bucket: int = 128, hist_positions=(), usage_tol: float = 1e-2,
                 edges: torch.Tensor | None = None, median_sample: int = 1024, host_linalg: bool | None = None):
        super().__init__()
        # effective ranks on the host, overlapped with the forward (see _HostLinalg): None = on CUDA
        self.host_linalg = host_linalg
        self._linalg: _HostLinalg | None = None
        if bucket < 1:
            raise CaptureError(f"bucket must be a positive number of tokens, got {bucket}")
        self.bucket = int(bucket)
        self.hist_positions = sorted(int(p) for p in hist_positions)
        bad = [p for p in self.hist_positions if p <= 0 or p % self.bucket]
        if bad:
            raise CaptureError(f"hist_positions {bad} are not bucket ends: use positive multiples of "
                               f"the bucket ({self.bucket} tokens)")
        self.usage_tol = float(usage_tol)
        self.median_sample = int(median_sample)
        self.edges = (edges if edges is not None else default_edges()).float()
        self.pos = 0  # tokens of the current sequence seen so far (host int: shapes only)
        self._pending: dict[str, dict] = {}
        self._prev: dict[str, torch.Tensor] = {}  # state after the previous call, per layer
        self._carry: dict[str, torch.Tensor] = {}  # Mamba-2: last conv_kernel-1 conv inputs
        self._mixers: list = []
        self.model_state: dict[str, torch.Tensor] = {}
        self.nb = 0

    def config(self) -> dict:
        return {"bucket": self.bucket, "hist_positions": self.hist_positions, "usage_tol": self.usage_tol,
                "n_edges": int(self.edges.numel()), "median_sample": self.median_sample}

    # -- sites and hook points -----------------------------------------------------------
    def sites(self, layout, model):
        mixers = [m for m in layout.mixers if m.kind in ("mamba", "mamba2")]
        if not mixers:
            raise CaptureError(
                f"{type(model).__name__} has no Mamba / Mamba-2 mixer (adapter {layout.adapter!r}: "
                f"{len(layout.mixers)} mixers), so it has no recurrent state to probe. The state "
                "probe needs a recurrent model; passkey retrieval (workbench.metrics.passkey."
                "passkey_grid) works on any causal LM.")
        self._mixers = mixers
        return [*mixers, ModelSite(model)]

    def points(self, site):
        if isinstance(site, ModelSite):
            return [HookPoint(site.module, "model_output", "post")]
        mod = site.module
        proj = mod.in_proj if site.kind == "mamba2" else mod.x_proj
        return [HookPoint(proj, "proj", "post")]

    def new_sequence(self) -> None:
        """Start a new batch of sequences (the cache starts empty)."""
        self.pos = 0
        self._pending.clear()
        self._prev.clear()
        self._carry.clear()

    # -- per-call observation ------------------------------------------------------------
    def observe(self, site, call):
        if isinstance(site, ModelSite):
            self._observe_model(site, call)
        elif site.kind == "mamba2":
            self._observe_mamba2(site, call)
        else:
            self._observe_mamba(site, call)

    def _observe_mamba2(self, site, call):
        mix = site.module
        proj = call.output.float()  # [b, L, d_in_proj]
        b, L, _ = proj.shape
        d_mlp = (proj.shape[-1] - 2 * mix.intermediate_size - 2 * mix.n_groups * mix.ssm_state_size
                 - mix.num_heads) // 2
        h, p, n, g = mix.num_heads, mix.head_dim, mix.ssm_state_size, mix.n_groups
        n_xb = mix.intermediate_size + g * n  # x and B; C is not needed
        xbc = proj[..., 2 * d_mlp + mix.intermediate_size: 2 * d_mlp + mix.intermediate_size + n_xb]
        dt = proj[..., -mix.num_heads:]
        k = mix.conv_kernel_size
        carry = self._carry.get(site.name)
        if carry is None or carry.shape[0] != b:
            carry = xbc.new_zeros(b, k - 1, xbc.shape[-1])
        full = torch.cat([carry, xbc], 1)
        self._carry[site.name] = full[:, -(k - 1):] if k > 1 else full[:, :0]
        conv = F.conv1d(full.transpose(1, 2), mix.conv1d.weight[:n_xb].float(),
                        None if mix.conv1d.bias is None else mix.conv1d.bias[:n_xb].float(),
                        groups=n_xb)  # valid conv: L outputs
        act = mix.act(conv)  # [b, C, L]
        # token means over P (x) and N (B) in this channel-major layout: contiguous reductions
        x_mean = act[:, : h * p].reshape(b, h, p, L).mean(2).transpose(1, 2)  # [b, L, h]
        B_mean = act[:, h * p: h * p + g * n].reshape(b, g, n, L).mean(2).transpose(1, 2)  # [b, L, g]
        xbc = act.transpose(1, 2)
        x = xbc[..., : h * p].reshape(b, L, h, p)
        B = xbc[..., h * p: h * p + g * n].reshape(b, L, g, n)  # per group; head k uses group k // (h // g)
        dt = F.softplus(dt + mix.dt_bias.float())
        lo, hi = mix.time_step_limit
        if lo > 0.0 or hi != float("inf"):
            dt = dt.clamp(min=lo, max=hi)
        A = -torch.exp(mix.A_log.float())  # [h]
        logdec = dt * A  # [b, L, h]
        self._pending[site.name] = {"x": x, "B": B, "dt": dt, "logdec": logdec, "L": L,
                                    "x_mean": x_mean, "B_mean": B_mean.repeat_interleave(h // g, dim=2),
                                    "dec_mean": torch.exp(logdec), "dt_mean": dt}

    def _observe_mamba(self, site, call):
        mix = site.module
        x = call.args[0].float()  # [b, L, d_inner]: the conv output after the activation
        out = call.output.float()
        b, L, d = x.shape
        r, n = mix.time_step_rank, mix.ssm_state_size
        ts, B = out[..., :r], out[..., r: r + n]
        dt = F.softplus(F.linear(ts, mix.dt_proj.weight.float(), mix.dt_proj.bias.float()))  # [b, L, d]
        A = -torch.exp(mix.A_log.float())  # [d, n]
        logdec = dt[..., None] * A  # [b, L, d, n]
        self._pending[site.name] = {
            "x": x[:, :, None], "B": B[:, :, None], "dt": dt, "logdec": logdec, "L": L,
            "x_mean": x.mean(-1, keepdim=True), "B_mean": B.mean(-1, keepdim=True),
            "dec_mean": torch.exp(logdec).mean((-1, -2))[..., None], "dt_mean": dt.mean(-1, keepdim=True)}

    def _bucket_states(self, site, pend, h0, h_end, kind):
        """States after the last token of each bucket ending in this call: [b, J, H, P, N]."""
        L, bk = pend["L"], self.bucket
        J = -(-L // bk)
        if J == 1:
            return h_end[:, None]
        # earlier bucket ends (all full buckets): each bucket's own contribution S_j (the
        # chunk-state step of SSD) for all of them in one batched op, then the exact recurrence
        # h_j = exp(sum of the bucket's dt A) h_(j-1) + S_j over the few bucket ends
        x, B, dt, ld = pend["x"], pend["B"], pend["dt"], pend["logdec"]
        n = (J - 1) * bk
        b = x.shape[0]
        cum = ld[:, :n].reshape(b, J - 1, bk, *ld.shape[2:]).cumsum(2)  # [b, J-1, l, H] (Mamba: [.., d, n])
        last = cum[:, :, -1]
        if kind == "mamba2":
            w = torch.exp(last[:, :, None] - cum) * dt[:, :n].reshape(b, J - 1, bk, -1)  # [b, J-1, l, H]
            H, P = x.shape[2], x.shape[3]
            g = B.shape[2]
            xs = x[:, :n].reshape(b, J - 1, bk, H, P) * w[..., None]
            # one matmul per group: (H/g * P, l) @ (l, N)
            S = torch.einsum("bjlgq,bjlgn->bjgqn", xs.reshape(b, J - 1, bk, g, (H // g) * P),
                             B[:, :n].reshape(b, J - 1, bk, g, -1))
            S = S.reshape(b, J - 1, H, P, -1)
            dec = torch.exp(last)[..., None, None]  # [b, J-1, H, 1, 1]
        else:
            w = torch.exp(last[:, :, None] - cum) * dt[:, :n].reshape(b, J - 1, bk, -1)[..., None]
            S = torch.einsum("bjldn,bjld,bjln->bjdn", w, x[:, :n, 0].reshape(b, J - 1, bk, -1),
                             B[:, :n, 0].reshape(b, J - 1, bk, -1))[:, :, None]  # [b, J-1, 1, d, n]
            dec = torch.exp(last)[:, :, None]  # [b, J-1, 1, d, n]
        out = []
        h = h0
        for j in range(J - 1):
            h = dec[:, j] * h + S[:, j]
            out.append(h)
        out.append(h_end)
        return torch.stack(out, 1)

    def _use_host_linalg(self, device) -> bool:
        return self.host_linalg if self.host_linalg is not None else torch.device(device).type == "cuda"

    def _host(self) -> _HostLinalg:
        if self._linalg is None:
            self._linalg = _HostLinalg()
        return self._linalg

    def _fold_erank(self, names, idx, er: torch.Tensor) -> None:
        """Add host-computed effective ranks [Ly, b, J, H] (float64, CPU) of `names` at buckets `idx`."""
        er = er.sum(1).float()
        dev = idx.device
        if dev.type == "cuda":
            er = er.pin_memory().to(dev, non_blocking=True)
        for i, name in enumerate(names):
            self.state[name]["erank"].index_add_(1, idx, er[i].T)

    def _drain(self) -> None:
        if self._linalg is not None:
            self._linalg.drain()

    def __getstate__(self):  # copies (distributed blanks) carry no thread pool
        d = dict(self.__dict__)
        if d.get("_linalg") is not None:
            self._linalg.drain()
        d["_linalg"] = None
        return d

    def _grow(self, st: dict, nb: int, fields_h, fields_b, H: int, device):
        cur = st["s1"].shape[1] if "s1" in st else 0
        if nb <= cur:
            return
        new = max(nb, 2 * cur, 8)
        for f in fields_h:
            old = st.get(f)
            t = torch.zeros(H, new, device=device, dtype=torch.float64 if f in ("s1", "s2") else torch.float32)
            if old is not None:
                t[:, :cur] = old
            st[f] = t
        for f in fields_b:
            old = st.get(f)
            t = torch.zeros(new, device=device, dtype=torch.float32)
            if old is not None:
                t[:cur] = old
            st[f] = t

    def _observe_model(self, site, call):
        from workbench._compat import output_cache

        out = call.output
        ids = call.input_ids
        if ids is None:
            raise CaptureError("the state probe needs input_ids in each model call (not inputs_embeds)")
        cache = output_cache(out, old="cache_params")
        if cache is None:
            raise CaptureError("the model call returned no cache: call it with use_cache=True (state_scan "
                               "does) so the state probe can read each layer's SSM state")
        b, L = ids.shape
        bk = self.bucket
        if self.pos % bk:
            raise CaptureError(
                f"a model call started at position {self.pos}, inside a bucket of {bk} tokens: the "
                f"bucket size must divide the chunk length (use a chunk that is a multiple of {bk})")
        j0 = self.pos // bk
        J = -(-L // bk)
        self.nb = max(self.nb, j0 + J)
        device = out.logits.device
        idx = torch.arange(j0, j0 + J, device=device)
        # token loss per bucket: predictions made at positions pos .. pos+L-1 (the previous
        # call's last logits predict this call's first token)
        lp = F.log_softmax(out.logits.float(), -1)
        ms = self.model_state
        if "loss" not in ms or ms["loss"].shape[0] < self.nb:
            new = max(self.nb, 2 * (ms["loss"].shape[0] if "loss" in ms else 0), 8)
            for f in ("loss", "loss_n"):
                t = torch.zeros(new, device=device, dtype=torch.float64)
                if f in ms:
                    t[: ms[f].shape[0]] = ms[f]
                ms[f] = t
        nll = -lp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # [b, L-1] at positions pos..pos+L-2
        if "last_lp" in ms and self.pos > 0:
            first = -ms["last_lp"].gather(-1, ids[:, :1])[:, 0]  # position pos-1
            ms["loss"][j0 - 1] += first.double().sum()
            ms["loss_n"][j0 - 1] += b
        pad = J * bk - (L - 1)
        nll_p = F.pad(nll, (0, pad)).reshape(b, J, bk)
        cnt = torch.full((J * bk,), 1.0, device=device)
        cnt[L - 1:] = 0
        ms["loss"].index_add_(0, idx, nll_p.double().sum((0, 2)))
        ms["loss_n"].index_add_(0, idx, (cnt.reshape(J, bk).sum(1) * b).double())
        ms["last_lp"] = lp[:, -1]
        # per-layer state statistics (layers of one shape reduced together)
        groups: dict[tuple, list] = {}
        for m in self._mixers:
            pend = self._pending.pop(m.name, None)
            if pend is None:
                raise CaptureError(f"{m.name}: the mixer's projection was not called during the model call")
            if pend["L"] != L:
                raise CaptureError(f"{m.name}: saw {pend['L']} tokens but the model call had {L}; the state "
                                   "probe needs the plain forward (no inputs_embeds, no packing)")
            h_end = recurrent_state(cache, m.module.layer_idx).float()
            if m.kind == "mamba":
                h_end = h_end[:, None]  # one head: [b, 1, d_inner, N]
            h0 = self._prev.get(m.name)
            if h0 is None:
                h0 = torch.zeros_like(h_end)
            states = self._bucket_states(m, pend, h0, h_end, m.kind)  # [b, J, H, P, N]
            self._prev[m.name] = h_end.clone()
            groups.setdefault(tuple(states.shape), []).append((m.name, states, h0, pend))
        for group in groups.values():
            names, sts, h0s, pends = zip(*group)
            self._reduce(list(names), torch.stack(sts), torch.stack(h0s) if self.pos > 0 else None,
                         list(pends), idx, j0, J, L, b)
        self.pos += L

    def _reduce(self, names, states, h_prev, pends, idx, j0, J, L, b):
        """Fold the bucket-end states [Ly, b, J, H, P, N] of `names` (layers of one shape, done
        together: a few large ops instead of many small ones) into the per-bucket sums."""
        bk = self.bucket
        Ly, _, _, H, P, N = states.shape
        device = states.device
        flat = states.permute(0, 2, 3, 1, 4, 5).reshape(Ly, J, H, -1)  # [Ly, J, H, b*P*N]
        sq_pn = states.pow(2).sum(-2)  # [Ly, b, J, H, N]: squared channel norms
        nb_ = sq_pn.sum(-1)  # [Ly, b, J, H]: squared state norms
        s1 = flat.sum(-1).double()
        s2 = nb_.sum(1).double()  # [Ly, J, H]
        # median estimate: the exact median of every k-th value, k = values // median_sample
        step = max(1, flat.shape[-1] // self.median_sample)
        med = _median(flat[..., ::step]) * b  # [Ly, J, H]
        # cosine with the previous bucket's state (none for a sequence's first bucket)
        first = h_prev[:, :, None] if h_prev is not None else states[:, :, :1]
        prev = torch.cat([first, states[:, :, :-1]], 2)
        dot = (prev * states).sum((-1, -2))  # [Ly, b, J, H]
        na0 = h_prev.pow(2).sum((-1, -2))[:, :, None] if h_prev is not None else nb_[:, :, :1]
        na = torch.cat([na0, nb_[:, :, :-1]], 2)
        cos = dot / (na * nb_).sqrt().clamp_min(1e-30)
        cos_l = dot.sum(-1) / (na.sum(-1) * nb_.sum(-1)).sqrt().clamp_min(1e-30)  # [Ly, b, J]
        valid = torch.ones(J, device=device)
        if h_prev is None:
            valid[0] = 0
        cos = (cos * valid[:, None]).sum(1)  # [Ly, J, H]
        cos_l = (cos_l * valid).sum(1)  # [Ly, J]
        # usage: fraction of the N channels whose norm over P exceeds usage_tol x the largest
        cn = sq_pn.sqrt()  # [Ly, b, J, H, N]
        used = (cn > self.usage_tol * cn.amax(-1, keepdim=True)).float().mean(-1).sum(1)  # [Ly, J, H]
        # singular values from the eigenvalues of the smaller Gram matrix (float64): a P x N
        # SVD per head costs ~3x more on the CPU
        hd = states.double()
        gram = hd @ hd.transpose(-1, -2) if P <= N else hd.transpose(-1, -2) @ hd
        if self._use_host_linalg(device):  # folded in later (see _HostLinalg)
            self._host().submit(gram, functools.partial(self._fold_erank, list(names), idx))
            erank = None
        else:
            erank = erank_from_gram(gram).sum(1).float()  # [Ly, J, H]
        pad = J * bk - L
        tok = F.pad(torch.ones(L, device=device), (0, pad)).reshape(J, bk).sum(1) * b
        snaps = torch.full((J,), float(b), device=device)
        elems = torch.full((J,), float(b * P * N), device=device)

        def bsum(t):  # [b, L, H] -> [H, J]
            return F.pad(t, (0, 0, 0, pad)).reshape(b, J, bk, -1).sum((0, 2)).T

        for i, (name, pend) in enumerate(zip(names, pends)):
            st = self.state.setdefault(name, {})
            self._grow(st, j0 + J, HEAD_FIELDS, BUCKET_FIELDS, H, device)
            st["s1"].index_add_(1, idx, s1[i].T)
            st["s2"].index_add_(1, idx, s2[i].T)
            st["med"].index_add_(1, idx, med[i].T)
            st["snaps"].index_add_(0, idx, snaps)
            st["elems"].index_add_(0, idx, elems)
            st["cos"].index_add_(1, idx, cos[i].T)
            st["cos_layer"].index_add_(0, idx, cos_l[i])
            st["cos_n"].index_add_(0, idx, valid * b)
            st["usage"].index_add_(1, idx, used[i].T)
            if erank is not None:
                st["erank"].index_add_(1, idx, erank[i].T)
            st["dt"].index_add_(1, idx, bsum(pend["dt_mean"]))
            st["decay"].index_add_(1, idx, bsum(pend["dec_mean"]))
            st["x"].index_add_(1, idx, bsum(pend["x_mean"]))
            st["B"].index_add_(1, idx, bsum(pend["B_mean"]))
            st["tokens"].index_add_(0, idx, tok)
            # histograms at the chosen positions
            for k, p in enumerate(self.hist_positions):
                j = p // bk - 1 - j0
                if 0 <= j < J and (j + 1) * bk <= L:
                    key = f"hist{k}"
                    if key not in st:
                        st[key] = torch.zeros(self.edges.numel() + 1, device=device)
                    e = self.edges.to(device)
                    v = states[i, :, j].reshape(-1)
                    st[key] += torch.bincount(torch.bucketize(v, e), minlength=e.numel() + 1).float()

    def _merge_site(self, mine, theirs):
        for k, v in theirs.items():
            v = v.to(mine[k].device) if k in mine else v
            if k not in mine:
                mine[k] = v.clone()
            elif v.dim() and mine[k].shape != v.shape:  # per-bucket arrays of different lengths
                n = max(mine[k].shape[-1], v.shape[-1])
                a = F.pad(mine[k], (0, n - mine[k].shape[-1]))
                mine[k] = a + F.pad(v, (0, n - v.shape[-1]))
            else:
                mine[k] += v

    def merge(self, other):
        self._drain()
        if isinstance(other, StateProbe):
            other._drain()
        super().merge(other)
        self.nb = max(self.nb, other.nb)
        for k, v in other.model_state.items():
            if k == "last_lp":
                continue
            if k not in self.model_state:
                self.model_state[k] = v.clone()
            else:
                a, c = self.model_state[k], v
                n = max(a.shape[0], c.shape[0])
                self.model_state[k] = F.pad(a, (0, n - a.shape[0])) + F.pad(c, (0, n - c.shape[0]))
        return self

    def state_dict(self):
        self._drain()
        out = {}
        for site, fields in self.state.items():
            for k, v in fields.items():
                out[f"{self.name}/{site}/{k}"] = v[..., : self.nb] if k in HEAD_FIELDS + BUCKET_FIELDS else v
        for k in ("loss", "loss_n"):
            if k in self.model_state:
                out[f"{self.name}/model/{k}"] = self.model_state[k][: self.nb]
        out[f"{self.name}/model/edges"] = self.edges
        return out

    def finish(self, run) -> None:
        self._drain()
        run.meta["state"] = {
            "bucket": self.bucket, "hist_positions": self.hist_positions, "usage_tol": self.usage_tol,
            "mixers": [{"layer": m.layer, "name": m.name, "kind": m.kind} for m in self._mixers],
            "n_buckets": self.nb,
        }

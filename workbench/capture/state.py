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
    if v.device.type != "cpu" or v.requires_grad:
        return v.contiguous().median(-1).values
    import numpy as np

    a = v.contiguous().numpy()
    if np.isnan(a).any():  # torch's NaN semantics (numpy's NaN check: ~10x cheaper than torch's here)
        return v.contiguous().median(-1).values
    k = (v.shape[-1] - 1) // 2
    return torch.from_numpy(np.partition(a, k, axis=-1)[..., k].copy())


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
        self._slot: dict[str, tuple] = {}
        self._groups: dict[tuple, list] = {}
        self._bufs: dict[str, torch.Tensor] = {}  # scratch reused across calls (no fresh pages per call)
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
        # layers whose states have one shape [H, P, N] are reduced together, from one scratch
        # tensor: each mixer's (group, index in the group)
        self._slot, self._groups = {}, {}
        for m in mixers:
            mod = m.module
            key = ((m.kind, mod.num_heads, mod.head_dim, mod.ssm_state_size) if m.kind == "mamba2"
                   else (m.kind, 1, mod.intermediate_size, mod.ssm_state_size))
            self._slot[m.name] = (key, len(self._groups.setdefault(key, [])))
            self._groups[key].append(m)
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
        carry = self._carry.get(site.name)  # the last k-1 conv inputs of the previous call
        if carry is None or carry.shape[0] != b:
            carry = xbc.new_zeros(b, k - 1, xbc.shape[-1])
        # the depthwise causal conv over [carry; xbc] (F.conv1d's sum) as k shifted multiply-adds
        # in this token-major layout: no concatenated or channel-major copy of the input, x and
        # B come out token-major (~3x faster on the CPU than F.conv1d with its transposing copy)
        w = mix.conv1d.weight[:n_xb, 0].float().t().contiguous()  # [k, C]: contiguous taps
        bias = mix.conv1d.bias
        conv = (xbc * w[k - 1] if bias is None
                else torch.addcmul(bias[:n_xb].float(), xbc, w[k - 1]))
        for i in range(k - 1):
            sh = k - 1 - i  # tap i reads input t + i - (k-1): the carry for the first sh outputs
            if sh < L:
                conv[:, sh:].addcmul_(xbc[:, : L - sh], w[i])
            conv[:, :sh].addcmul_(carry[:, i: i + min(sh, L)], w[i])
        self._carry[site.name] = (xbc[:, L - (k - 1):].clone() if L >= k - 1
                                  else torch.cat([carry[:, L:], xbc], 1))
        act = F.silu(conv, inplace=True) if mix.activation == "silu" else mix.act(conv)  # [b, L, C]
        x = act[..., : h * p].view(b, L, h, p)
        B = act[..., h * p: h * p + g * n].view(b, L, g, n)  # per group; head k uses group k // (h // g)
        x_mean = x.mean(-1)  # [b, L, h]
        B_mean = B.mean(-1)  # [b, L, g]
        dt = F.softplus(dt + mix.dt_bias.float())
        lo, hi = mix.time_step_limit
        if lo > 0.0 or hi != float("inf"):
            dt = dt.clamp(min=lo, max=hi)
        A = -torch.exp(mix.A_log.float())  # [h]
        logdec = dt * A  # [b, L, h]
        self._inner_states(site, x, B, dt, logdec, L,
                           (dt, torch.exp(logdec), x_mean, B_mean.repeat_interleave(h // g, dim=2)))

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
        self._inner_states(site, x[:, :, None], B[:, :, None], dt, logdec, L,
                           (dt.mean(-1, keepdim=True), torch.exp(logdec).mean((-1, -2))[..., None],
                            x.mean(-1, keepdim=True), B.mean(-1, keepdim=True)))

    def _scratch(self, key, shape, dtype, device) -> torch.Tensor:
        """A scratch tensor kept across calls (freed in finish): the large per-call temporaries
        reuse their memory instead of being allocated afresh each call (on the CPU each fresh
        allocation of this size costs page faults that dominated the probe's time)."""
        t = self._bufs.get(key)
        if t is None or t.shape != tuple(shape) or t.dtype != dtype or t.device != device:
            t = self._bufs[key] = torch.empty(shape, dtype=dtype, device=device)
        return t

    def _inner_states(self, site, x, B, dt, ld, L, means):
        """At the mixer's call: each full bucket's own contribution S_j to the state (all but the
        last bucket of the call; the chunk-state step of SSD, one batched op) written into the
        slots 1..J-1 of the group's scratch tensor, so that x and B are not kept until the model
        call; pending: the bucket decays exp(sum of dt A) and the bucket sums of the token means
        of dt, decay, x and B. The model call completes the exact recurrence
        h_j = decay_j h_(j-1) + S_j from the state before the call (slot 0)."""
        bk = self.bucket
        J = -(-L // bk)
        b = x.shape[0]
        key, i = self._slot[site.name]
        shape = (len(self._groups[key]), b, J + 1, *key[1:])
        out = self._scratch(("states", key, b, J), shape, torch.float32, x.device)[i]  # [b, J+1, H, P, N]
        pad = J * bk - L
        sums = F.pad(torch.stack(means), (0, 0, 0, pad)).reshape(4, b, J, bk, -1).sum((1, 3))  # [4, J, H]
        pend = {"L": L, "sums": sums.transpose(1, 2), "dec": None}  # sums: [4, H, J]
        self._pending[site.name] = pend
        if J == 1:
            return
        n = (J - 1) * bk
        cum = ld[:, :n].reshape(b, J - 1, bk, *ld.shape[2:]).cumsum(2)  # [b, J-1, l, H] (Mamba: [.., d, n])
        last = cum[:, :, -1]
        if site.kind == "mamba2":
            w = torch.exp(last[:, :, None] - cum) * dt[:, :n].reshape(b, J - 1, bk, -1)  # [b, J-1, l, H]
            H, P = x.shape[2], x.shape[3]
            g = B.shape[2]
            xs = x[:, :n].reshape(b, J - 1, bk, H, P) * w[..., None]
            # one matmul per group: (H/g * P, l) @ (l, N)
            if b == 1 and g == 1:  # straight into the scratch slots
                torch.bmm(xs.view(J - 1, bk, H * P).transpose(1, 2), B[0, :n, 0].view(J - 1, bk, -1),
                          out=out[0, 1:J].view(J - 1, H * P, -1))
            else:
                S = torch.einsum("bjlgq,bjlgn->bjgqn", xs.reshape(b, J - 1, bk, g, (H // g) * P),
                                 B[:, :n].reshape(b, J - 1, bk, g, -1))
                out[:, 1:J] = S.reshape(b, J - 1, H, P, -1)
            pend["dec"] = torch.exp(last)[..., None, None]  # [b, J-1, H, 1, 1]
        else:
            w = torch.exp(last[:, :, None] - cum) * dt[:, :n].reshape(b, J - 1, bk, -1)[..., None]
            out[:, 1:J, 0] = torch.einsum("bjldn,bjld,bjln->bjdn", w, x[:, :n, 0].reshape(b, J - 1, bk, -1),
                                          B[:, :n, 0].reshape(b, J - 1, bk, -1))  # [b, J-1, d, n]
            pend["dec"] = torch.exp(last)[:, :, None]  # [b, J-1, 1, d, n]

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
        d["_bufs"] = {}  # scratch: made again on demand
        d["_prev"] = {k: v.clone() for k, v in self._prev.items()}  # views of the scratch: own copies
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

    def _token_nll(self, logits, ids):
        """The next-token NLL at positions 0..L-2 of the call ([b, L-1]) and the log-probabilities
        at its last position ([b, V], for the next call's first token). log_softmax + gather:
        the cheapest exact form measured on the CPU (logsumexp - logit: ~2x slower). On the CPU
        in blocks of rows through a ~1 MB scratch that stays in cache (one [b, L, V] float32
        result costs more in memory traffic than the softmax); elsewhere one block."""
        b, L, V = logits.shape
        ch = max(1, (1 << 18) // V) if logits.device.type == "cpu" else max(L - 1, 1)
        buf = self._scratch("lp", (b, min(ch, max(L - 1, 1)), V), torch.float32, logits.device)
        parts = []
        for r in range(0, L - 1, ch):
            e = min(r + ch, L - 1)
            lp = torch.log_softmax(logits[:, r:e].float(), -1, out=buf[:, : e - r])
            parts.append(lp.gather(-1, ids[:, r + 1: e + 1, None])[..., 0])
        if not parts:
            return logits.new_zeros(b, 0, dtype=torch.float32), torch.log_softmax(logits[:, -1].float(), -1)
        nll = (parts[0] if len(parts) == 1 else torch.cat(parts, 1)).neg_()
        return nll, torch.log_softmax(logits[:, -1].float(), -1)

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
        nll, last_lp = self._token_nll(out.logits, ids)  # [b, L-1] at positions pos..pos+L-2
        ms = self.model_state
        if "loss" not in ms or ms["loss"].shape[0] < self.nb:
            new = max(self.nb, 2 * (ms["loss"].shape[0] if "loss" in ms else 0), 8)
            for f in ("loss", "loss_n"):
                t = torch.zeros(new, device=device, dtype=torch.float64)
                if f in ms:
                    t[: ms[f].shape[0]] = ms[f]
                ms[f] = t
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
        ms["last_lp"] = last_lp
        # per-layer state statistics (layers of one shape reduced together)
        for key, group in self._groups.items():
            # the group's states before the call (slot 0) and at each bucket end (slots 1..J):
            # [Ly, b, J+1, H, P, N], a scratch tensor reused across calls
            buf = self._bufs.get(("states", key, b, J))
            sums = []
            for i, m in enumerate(group):
                pend = self._pending.pop(m.name, None)
                if pend is None or buf is None:
                    raise CaptureError(f"{m.name}: the mixer's projection was not called during the model call")
                if pend["L"] != L:
                    raise CaptureError(f"{m.name}: saw {pend['L']} tokens but the model call had {L}; the state "
                                       "probe needs the plain forward (no inputs_embeds, no packing)")
                out = buf[i]
                h0 = self._prev.get(m.name)
                if h0 is None:
                    out[:, 0].zero_()
                else:
                    out[:, 0].copy_(h0)  # before slot J is rewritten (h0 may be a view of it)
                h_end = recurrent_state(cache, m.module.layer_idx)
                out[:, J].copy_(h_end if m.kind == "mamba2" else h_end[:, None])  # Mamba: one head
                for j in range(1, J):  # h_j = S_j + decay_j h_(j-1), in place
                    out[:, j].addcmul_(out[:, j - 1], pend["dec"][:, j - 1])
                # the next call's slot 0: read before this slot is rewritten
                self._prev[m.name] = out[:, J]
                sums.append(pend["sums"])
            self._reduce([m.name for m in group], buf, self.pos > 0, sums, idx, j0, J, L, b)
        self.pos += L

    def _reduce(self, names, buf, has_prev, sums, idx, j0, J, L, b):
        """Fold the bucket-end states buf[:, :, 1:] ([Ly, b, J+1, H, P, N]; slot 0: the state
        before the call) of `names` (layers of one shape, done together: a few large ops instead
        of many small ones) into the per-bucket sums."""
        bk = self.bucket
        Ly, _, _, H, P, N = buf.shape
        device = buf.device
        states = buf[:, :, 1:]  # [Ly, b, J, H, P, N]
        # channel norms (the N columns' norms over P) of every slot: usage, and squared state norms
        sq = (buf * buf).sum(-2)  # [Ly, b, J+1, H, N] (linalg.vector_norm over P: ~25x slower on the CPU)
        n2 = sq.sum(-1)  # [Ly, b, J+1, H]
        na, nb_ = n2[:, :, :-1], n2[:, :, 1:]
        s1 = states.sum((1, -1, -2)).double()  # [Ly, J, H]
        s2 = nb_.sum(1).double()  # [Ly, J, H]
        # median estimate: the exact median of every k-th value, k = values // median_sample
        flat = states.permute(0, 2, 3, 1, 4, 5).reshape(Ly, J, H, -1)  # [Ly, J, H, b*P*N]
        step = max(1, flat.shape[-1] // self.median_sample)
        med = _median(flat[..., ::step]) * b  # [Ly, J, H]
        # cosine with the previous bucket's state (none for a sequence's first bucket)
        fb = buf.flatten(-2)  # [Ly, b, J+1, H, P*N]
        dot = torch.stack([torch.linalg.vecdot(fb[:, :, j], fb[:, :, j + 1]) for j in range(J)], 2)  # [Ly, b, J, H]
        cos = dot / (na * nb_).sqrt().clamp_min(1e-30)
        cos_l = dot.sum(-1) / (na.sum(-1) * nb_.sum(-1)).sqrt().clamp_min(1e-30)  # [Ly, b, J]
        valid = torch.ones(J, device=device)
        if not has_prev:
            valid[0] = 0
        cos = (cos * valid[:, None]).sum(1)  # [Ly, J, H]
        cos_l = (cos_l * valid).sum(1)  # [Ly, J]
        # usage: fraction of the N channels whose norm over P exceeds usage_tol x the largest
        cn = sq[:, :, 1:].sqrt()  # [Ly, b, J, H, N]
        used = (cn > self.usage_tol * cn.amax(-1, keepdim=True)).float().mean(-1).sum(1)  # [Ly, J, H]
        # singular values from the eigenvalues of the smaller Gram matrix (float64): a P x N
        # SVD per head costs ~3x more on the CPU
        hd = self._scratch("hd", states.shape, torch.float64, device)
        hd.copy_(states)
        hv = hd.view(-1, P, N)
        m = min(P, N)
        gram = self._scratch("gram", (hv.shape[0], m, m), torch.float64, device)
        if P <= N:
            torch.bmm(hv, hv.transpose(-1, -2), out=gram)
        else:
            torch.bmm(hv.transpose(-1, -2), hv, out=gram)
        gram = gram.view(Ly, b, J, H, m, m)
        if self._use_host_linalg(device):  # folded in later (see _HostLinalg; copies gram at once)
            self._host().submit(gram, functools.partial(self._fold_erank, list(names), idx))
            erank = None
        else:
            erank = erank_from_gram(gram).sum(1).float()  # [Ly, J, H]
        pad = J * bk - L
        tok = F.pad(torch.ones(L, device=device), (0, pad)).reshape(J, bk).sum(1) * b
        snaps = torch.full((J,), float(b), device=device)
        elems = torch.full((J,), float(b * P * N), device=device)

        # fold into the per-layer sums: one foreach add over all layers and fields (bucket
        # slice j0..j0+J) instead of ~15 index_add_ calls per layer
        sl = slice(j0, j0 + J)
        cos_n = valid * b
        dst, src = [], []
        for i, name in enumerate(names):
            st = self.state.setdefault(name, {})
            self._grow(st, j0 + J, HEAD_FIELDS, BUCKET_FIELDS, H, device)
            heads = [("s1", s1[i]), ("s2", s2[i]), ("med", med[i]), ("cos", cos[i]), ("usage", used[i])]
            if erank is not None:
                heads.append(("erank", erank[i]))
            for f, v in heads:  # [J, H]
                dst.append(st[f][:, sl])
                src.append(v.T)
            for k, f in enumerate(("dt", "decay", "x", "B")):  # bucket sums of the token means: [H, J]
                dst.append(st[f][:, sl])
                src.append(sums[i][k])
            for f, v in (("snaps", snaps), ("elems", elems), ("cos_layer", cos_l[i]), ("cos_n", cos_n),
                         ("tokens", tok)):  # [J]
                dst.append(st[f][sl])
                src.append(v)
        torch._foreach_add_(dst, src)
        for i, name in enumerate(names):
            st = self.state[name]
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
        self._bufs.clear()  # scratch and carried states: not needed once the capture ends
        self._prev.clear()
        self._carry.clear()
        run.meta["state"] = {
            "bucket": self.bucket, "hist_positions": self.hist_positions, "usage_tol": self.usage_tol,
            "mixers": [{"layer": m.layer, "name": m.name, "kind": m.kind} for m in self._mixers],
            "n_buckets": self.nb,
        }

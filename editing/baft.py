"""BaFT: basis-level representation fine-tuning (arXiv 2503.00306), in one file.

LoReFT edits a hidden state h inside the subspace spanned by the r orthonormal rows
of R:

    Phi(h) = h + R^T (W h + b - R h)

BaFT gives every basis k its own input-dependent weight s_k(h) in (0, 1):

    Phi(h) = h + sum_k s_k(h) * r_k * (w_k^T h + b_k - r_k^T h)

Our weight function is a learned key per basis, a soft cousin of GRACE's codebook
keys with radii. It reads the direction of h, not its scale:

    s_k(h) = sigmoid(g_k^T u(h) + c_k),   u(h) = (h - m)/|h - m|

m is the mean residual of ordinary text at that layer. Without it every hidden
state shares a large common direction (early positions most of all), unrelated
tokens look alike to the keys, and the weights leak.

g_k starts as ``sharpness`` times the unit representation of the fact the basis
was assigned to, and c_k = -sharpness * threshold, so a basis starts open on its
own fact (cosine above ``threshold``) and closed on unrelated text.

Where the weights look matters more than their form. The subject's own tokens
at an early layer identify a fact far more sharply than any position at the
layer that best writes the new answer, so the weights can be read at an earlier
``gate_layer`` and pooled causally: position t uses the strongest weight seen at
any position up to t (``causal_pool``). The edit then fires after the subject is
mentioned, in any wording, and stays shut for other subjects. With
``gated=False`` every s_k is 1 and the module is exactly LoReFT: that is the ReFT
baseline of every benchmark.

A subject gate alone opens on every question about the subject, so an edit of one
of its facts overwrote the others. With ``query=True`` each basis has a second,
per-position key read on h at the edit layer itself, where the last token carries
the question (subject and relation) about to be answered:

    s_k(t) = pooled subject weight_k(t) * sigmoid(q_k^T u'(h_t) + d_k)

so the edit is written only where its own fact is being asked and answered, not on
other relations of the subject, nor on the text after the answer.

Blocks compose by stacking: a set of blocks at one layer is one BaFTIntervention
whose rows are the concatenated rows of the blocks (see ``stack``), so inference
costs the same few matmuls however many blocks there are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# At inference a basis whose weight is below this everywhere in a call is skipped:
# its term would change h by less than a millionth of its edit.
INACTIVE = 1e-6
# Per-basis tensors (one row per basis), as ``select`` and ``stack`` treat them.
BASIS_TENSORS = ("R", "W", "b", "G", "c", "Q", "d")


class BaFTIntervention(nn.Module):
    def __init__(self, hidden_size: int, rank: int, gated: bool = True,
                 sharpness: float = 30.0, threshold: float = 0.8, gate_layer: int | None = None,
                 query: bool = False):
        super().__init__()
        self.hidden_size, self.rank, self.gated = hidden_size, rank, gated
        self.gate_layer = gate_layer if gated else None   # None: weights read h itself
        self.query = bool(query) and gated                # a per-position question gate
        self.sharpness, self.threshold = float(sharpness), float(threshold)
        self.R = nn.Parameter(torch.empty(rank, hidden_size))   # basis rows r_k
        self.W = nn.Parameter(torch.zeros(rank, hidden_size))   # w_k
        self.b = nn.Parameter(torch.zeros(rank))                # b_k
        self.G = nn.Parameter(torch.zeros(rank, hidden_size))   # gate keys g_k
        self.c = nn.Parameter(torch.zeros(rank))                # gate biases c_k
        self.register_buffer("center", torch.zeros(hidden_size))  # m
        self.Q = nn.Parameter(torch.zeros(rank, hidden_size))   # question keys q_k
        self.d = nn.Parameter(torch.zeros(rank))                # question biases d_k
        self.register_buffer("qcenter", torch.zeros(hidden_size))  # m at the edit layer
        nn.init.orthogonal_(self.R)

    # -- the mathematics ------------------------------------------------------
    def weights(self, h: torch.Tensor) -> torch.Tensor:
        """s(h): (..., rank) basis weights in (0, 1), or ones for ReFT."""
        if not self.gated:
            return h.new_ones(*h.shape[:-1], self.rank)
        return torch.sigmoid(self.gate_logits(h))

    def gate_logits(self, h: torch.Tensor) -> torch.Tensor:
        """g_k^T u(h) + c_k: (..., rank), the weights before the sigmoid."""
        unit = F.normalize(h - self.center.to(h.dtype), dim=-1)
        return unit @ self.G.T.to(h.dtype) + self.c.to(h.dtype)

    def query_logits(self, h: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """q_k^T u'(h) + d_k: (..., rank) the question gate before the sigmoid (``rows``: those bases only)."""
        Q, d = (self.Q, self.d) if rows is None else (self.Q[rows], self.d[rows])
        unit = F.normalize(h - self.qcenter.to(h.dtype), dim=-1)
        return unit @ Q.T.to(h.dtype) + d.to(h.dtype)

    def forward(self, h: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Phi(h); ``weights`` are s(.) read elsewhere (a gate layer), else s(h)."""
        s = self.weights(h) if weights is None else weights
        R, D, b, rows = self.R, self._w_minus_r(), self.b, None
        if self.gated and not torch.is_grad_enabled():
            # Inference: only bases open somewhere in this call do any work, so a set
            # of thousands of edits costs little more than its gate on unrelated text.
            active = (s > INACTIVE).flatten(0, -2).any(0).nonzero().squeeze(1)
            if len(active) == 0:
                return h
            if len(active) < self.rank:
                s, R, D, b, rows = s[..., active], R[active], D[active], b[active], active
        if self.query:
            s = s * torch.sigmoid(self.query_logits(h, rows)).to(s.dtype)
        delta = h @ D.to(h.dtype).T + b.to(h.dtype)   # w^T h + b - r^T h
        return h + (s.to(h.dtype) * delta) @ R.to(h.dtype)

    def _w_minus_r(self) -> torch.Tensor:
        # Frozen (inference): computed once, not at every decoding step.
        if torch.is_grad_enabled() and (self.W.requires_grad or self.R.requires_grad):
            return self.W - self.R
        version = (self.W._version, self.R._version, self.W.data_ptr(), self.R.data_ptr())
        if getattr(self, "_cache_version", None) != version:
            self._cache, self._cache_version = (self.W - self.R).detach(), version
        return self._cache

    # -- initialisation and structure -----------------------------------------
    @torch.no_grad()
    def init_keys(self, keys: torch.Tensor) -> None:
        """Open basis k on the representation keys[k] and close it elsewhere."""
        self.G.copy_(self.sharpness * F.normalize(keys.to(self.G) - self.center, dim=-1))
        self.c.fill_(-self.sharpness * self.threshold)

    @torch.no_grad()
    def init_query(self, keys: torch.Tensor, threshold: float) -> None:
        """Open basis k's question gate on the edit-layer state keys[k] (its prompt's last token)."""
        self.Q.copy_(self.sharpness * F.normalize(keys.to(self.Q) - self.qcenter, dim=-1))
        self.d.fill_(-self.sharpness * threshold)

    @torch.no_grad()
    def lower_gates(self, logits: float | torch.Tensor) -> None:
        """Move the gate biases down by ``logits`` (one figure, or one per basis):
        bases open later, on closer matches only."""
        self.c -= torch.as_tensor(logits, dtype=self.c.dtype, device=self.c.device)

    @torch.no_grad()
    def orthonormalise(self) -> None:
        """Project R back onto orthonormal rows (QR), keeping each row's span order."""
        q, r = torch.linalg.qr(self.R.T.float())
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
        self.R.copy_(q.T.to(self.R))

    def config(self) -> dict:
        """The constructor's arguments, as saved in a manifest (``from_config`` reads them)."""
        return {"hidden_size": self.hidden_size, "rank": self.rank, "gated": self.gated,
                "sharpness": self.sharpness, "threshold": self.threshold, "gate_layer": self.gate_layer,
                "query": self.query}

    @classmethod
    def from_config(cls, config: dict, rank: int | None = None) -> "BaFTIntervention":
        """A fresh intervention shaped as ``config()`` says (``rank`` overrides its rank);
        manifests written before the question gate have no ``query`` or ``gate_layer``."""
        return cls(config["hidden_size"], config["rank"] if rank is None else rank, config["gated"],
                   config["sharpness"], config["threshold"], config.get("gate_layer"),
                   config.get("query", False))

    def extra_repr(self) -> str:
        kind = "BaFT" if self.gated else "ReFT"
        return f"{kind}, hidden_size={self.hidden_size}, rank={self.rank}"

    def select(self, rows: torch.Tensor) -> "BaFTIntervention":
        """A copy keeping only the bases ``rows``: the others' terms are simply gone."""
        out = type(self).from_config(self.config(), rank=len(rows))
        with torch.no_grad():
            for name in BASIS_TENSORS:
                getattr(out, name).copy_(getattr(self, name)[rows.to(self.R.device)])
            out.center.copy_(self.center)
            out.qcenter.copy_(self.qcenter)
        return out.requires_grad_(False).to(self.R.device)

    @classmethod
    def stack(cls, parts: list["BaFTIntervention"]) -> "BaFTIntervention":
        """One intervention equal to applying the sum of all parts' basis terms."""
        asking = [p for p in parts if p.query]
        if len({(p.gated, p.gate_layer) for p in parts}) != 1 or \
                any(not same_centre(p.center, parts[0].center) for p in parts) or \
                any(not same_centre(p.qcenter, asking[0].qcenter) for p in asking):
            raise ValueError("cannot stack interventions with different gating or gate centres")
        first = parts[0]
        out = cls.from_config(dict(first.config(), query=bool(asking)), rank=sum(p.rank for p in parts))
        with torch.no_grad():
            for name in BASIS_TENSORS:
                getattr(out, name).copy_(torch.cat([getattr(p, name) for p in parts]))
            if asking:   # bases of blocks without a question gate keep theirs open: sigmoid(50) = 1
                out.d.copy_(torch.cat([p.d if p.query else torch.full_like(p.d, 50.0) for p in parts]))
                out.qcenter.copy_(asking[0].qcenter)
            out.center.copy_(first.center)
        return out.to(first.R.device)


def same_centre(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Gate centres agree up to float noise (the same text on another device or thread count)."""
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def causal_pool(s: torch.Tensor, valid: torch.Tensor | None = None,
                past: torch.Tensor | None = None) -> torch.Tensor:
    """Running maximum of basis weights along the sequence.

    s: (batch, T, rank) weights per position; valid: (batch, T) False at padding;
    past: (batch, rank) the running maximum of earlier tokens (KV-cache decoding).
    Without ``past`` the call starts the sequence, and its first real token is left out.
    """
    if valid is None:
        valid = torch.ones(s.shape[:2], dtype=torch.bool, device=s.device)
    if past is None:
        # A sequence's first token is an attention sink: its state barely depends
        # on the token, so it would match every key. It has no say.
        valid = valid & (valid.long().cumsum(1) > 1)
    s = s * valid.unsqueeze(-1).to(s.dtype)
    if past is not None:
        s = torch.maximum(s, past.unsqueeze(1).to(s.dtype))
    return torch.cummax(s, dim=1).values

"""The fusion network: one encoder per modality, a mask-aware fusion, age conditioning, quantile heads.

Sequence modalities (frame embeddings) go through a temporal 1D-CNN + bidirectional GRU + attention
pooling; vector/scalar modalities (audio, text, meta, history) through an MLP over normalised numerics,
missing flags and categorical embeddings. Any subset of modalities may be present per row.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from featurizers.core.contracts import MIN_AGE_DAYS
from model.data import Batch, ModalityInputs, ModalityLayout, Observed

__all__ = ["QUANTILES", "NetworkConfig", "PopularityNet", "pinball_loss"]

QUANTILES: tuple[float, ...] = (0.1, 0.5, 0.9)


@dataclass
class NetworkConfig:
    """Architecture hyper-parameters (JSON-able, stored in config.json)."""
    width: int = 64                 # modality token width
    hidden: int = 128               # fusion trunk width
    dropout: float = 0.2
    sequence_kernel: int = 3
    category_dim: int = 8
    age_basis: int = 8              # number of radial basis functions over log age
    n_targets: int = 4
    modality_dropout: float = 0.15  # per row and modality, during training only
    # log1p(age) is clamped to the training range: beyond it nothing was learnt, and a flat extrapolation
    # (what trees do) is safer than an extrapolated curve. Set from the training rows by train().
    log_age_min: float | None = None
    log_age_max: float | None = None
    # Nowcasting: condition on the counts a video already has (Batch.observed) and predict from them where
    # known. Set by train() when the catalog holds several observations of some videos.
    nowcast: bool = False
    extra: dict = field(default_factory=dict)


class SequenceEncoder(nn.Module):
    """Temporal 1D-CNN + bidirectional GRU + attention pooling over a masked (B, K, D) sequence."""

    def __init__(self, in_dim: int, width: int, kernel: int, dropout: float):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(in_dim, width), nn.GELU(), nn.Dropout(dropout))
        self.conv = nn.Sequential(nn.Conv1d(width, width, kernel, padding=kernel // 2), nn.GELU(),
                                  nn.Conv1d(width, width, kernel, padding=kernel // 2))
        self.gru = nn.GRU(width, width // 2, batch_first=True, bidirectional=True)
        self.attention = nn.Linear(width, 1)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = mask.unsqueeze(-1)
        # where() (not multiply) so that garbage, even NaN, in masked frames cannot leak into the result.
        frames = torch.where(keep, frames, torch.zeros((), dtype=frames.dtype, device=frames.device))
        h = self.project(frames)
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = torch.where(keep, h, torch.zeros((), dtype=h.dtype, device=h.device))
        h, _ = self.gru(h)
        scores = self.attention(h).squeeze(-1).float()
        any_frame = mask.any(dim=1, keepdim=True)
        scores = scores.masked_fill(~mask, float("-inf"))
        scores = torch.where(any_frame, scores, torch.zeros_like(scores))  # all-masked: no NaN softmax
        weights = torch.softmax(scores, dim=1).to(h.dtype)
        return (weights.unsqueeze(-1) * h).sum(dim=1)


class TabularEncoder(nn.Module):
    """MLP over a modality's 1-D vectors, normalised numerics (+ missing flags) and categorical embeddings."""

    def __init__(self, layout: ModalityLayout, cfg: NetworkConfig, extra_in: int = 0):
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(size, cfg.category_dim) for size in layout.category_sizes)
        self.vector_width = layout.vector_width
        in_dim = layout.vector_width + layout.numeric_width + cfg.category_dim * len(self.embeddings) + extra_in
        # Wide embeddings (text, audio) first shrink through a bottleneck so that numerics are not drowned.
        self.vector_bottleneck = (nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(layout.vector_width, cfg.hidden),
                                                nn.GELU())
                                  if layout.vector_width > cfg.hidden else None)
        if self.vector_bottleneck is not None:
            in_dim += cfg.hidden - layout.vector_width
        self.mlp = nn.Sequential(nn.Linear(max(in_dim, 1), cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.hidden, cfg.width))

    def forward(self, inputs: ModalityInputs, extra: list[torch.Tensor] = ()) -> torch.Tensor:
        parts = []
        if self.vector_width:
            vec = inputs.vectors
            parts.append(self.vector_bottleneck(vec) if self.vector_bottleneck is not None else vec)
        parts.append(inputs.numeric)
        parts += [emb(inputs.categorical[:, j]) for j, emb in enumerate(self.embeddings)]
        parts += list(extra)
        x = torch.cat(parts, dim=1) if parts else inputs.numeric.new_zeros((len(inputs.present), 1))
        if x.shape[1] == 0:
            x = x.new_zeros((x.shape[0], 1))
        return self.mlp(x)


class ModalityEncoder(nn.Module):
    """A modality's token: its sequence encoders (if any) feed the tabular encoder of the same modality."""

    def __init__(self, layout: ModalityLayout, cfg: NetworkConfig):
        super().__init__()
        self.sequence_names = list(layout.sequences)
        self.sequences = nn.ModuleDict({
            name: SequenceEncoder(shape[-1], cfg.width, cfg.sequence_kernel, cfg.dropout)
            for name, shape in layout.sequences.items()})
        self.tabular = TabularEncoder(layout, cfg, extra_in=cfg.width * len(self.sequence_names))

    def forward(self, inputs: ModalityInputs) -> torch.Tensor:
        pooled = [self.sequences[name](inputs.sequences[name], inputs.sequence_masks[name])
                  for name in self.sequence_names]
        return self.tabular(inputs, pooled)


class AgeBasis(nn.Module):
    """Gaussian radial basis over log1p(age in days), so the network can learn any age curve."""

    def __init__(self, n: int, max_log_age: float = 8.0):
        super().__init__()
        self.register_buffer("centers", torch.linspace(0.0, max_log_age, n), persistent=False)
        self.width = max_log_age / max(n - 1, 1)

    def forward(self, log_age: torch.Tensor) -> torch.Tensor:
        z = (log_age.unsqueeze(1) - self.centers) / self.width
        return torch.cat([torch.exp(-0.5 * z * z), log_age.unsqueeze(1) / 4.0], dim=1)


def _log_days(log1p_age: torch.Tensor) -> torch.Tensor:
    """ln(age in days) from log1p(age): the scale on which counts grow (Szabo & Huberman)."""
    return torch.log(torch.expm1(log1p_age.float()).clamp_min(MIN_AGE_DAYS))


class Nowcaster(nn.Module):
    """The nowcasting path: from the counts a video already has (normalised log1p, which are known), the age
    they were read at, the log-age ratio to the requested age (the Szabo–Huberman growth variable), the content
    tokens and the cold-start trunk's state, the growth of each count in log space and its interval.
    Its own MLP, without dropout: growth is a precise quantity, and the cold path keeps its trunk."""

    def __init__(self, cfg: NetworkConfig, content_dim: int, age: AgeBasis):
        super().__init__()
        self.age = age
        in_dim = 2 * cfg.n_targets + 3 + (cfg.age_basis + 1) + content_dim + cfg.hidden
        self.mlp = nn.Sequential(nn.Linear(in_dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.hidden),
                                 nn.GELU())
        self.head = nn.Linear(cfg.hidden, cfg.n_targets * 3)
        self.rate = nn.Linear(cfg.hidden, cfg.n_targets)

    def forward(self, observed: Observed, log_age: torch.Tensor, clamped_input_age: torch.Tensor,
                content: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
        """(B, T, 3): the growth of each count (middle) and the widths of its interval below and above."""
        ln_input = _log_days(observed.log_age)
        ln_gap = (_log_days(log_age) - ln_input).clamp_min(0.0).unsqueeze(1)
        counts = observed.counts.float()
        x = torch.cat([counts, observed.mask.to(counts.dtype), ln_input.unsqueeze(1) / 4.0, ln_gap,
                       (log_age - observed.log_age).float().unsqueeze(1), self.age(clamped_input_age).float(),
                       content.float(), trunk.float()], dim=1)
        h = self.mlp(x)
        growth = self.head(h).view(-1, counts.shape[1], 3)
        center = growth[..., 1] + self.rate(h) * ln_gap
        return torch.stack([growth[..., 0], center, growth[..., 2]], dim=-1)


class PopularityNet(nn.Module):
    """Multimodal fusion → per-target quantiles (p10, p50, p90) of normalised log1p(count)."""

    def __init__(self, layouts: dict[str, ModalityLayout], cfg: NetworkConfig):
        super().__init__()
        self.cfg = cfg
        self.modality_names = list(layouts)
        self.encoders = nn.ModuleDict({name: ModalityEncoder(layout, cfg) for name, layout in layouts.items()})
        # A learned offset per modality tells the trunk which subset is present.
        self.presence = nn.Parameter(torch.zeros(len(self.modality_names), cfg.width))
        self.age = AgeBasis(cfg.age_basis)
        age_dim = cfg.age_basis + 1
        fused_dim = cfg.width * len(self.modality_names) + len(self.modality_names) + age_dim
        if cfg.nowcast:
            # Where a count is known, the prediction is that count plus a growth in log space, with its own
            # interval; the cold-start path below is unchanged.
            self.nowcaster = Nowcaster(cfg, cfg.width * len(self.modality_names) + len(self.modality_names),
                                       self.age)
        self.trunk = nn.Sequential(nn.Linear(fused_dim, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout),
                                   nn.Linear(cfg.hidden, cfg.hidden), nn.GELU())
        # FiLM: age scales and shifts the fused representation (counts grow with age, per content).
        self.film = nn.Linear(age_dim, 2 * cfg.hidden)
        self.head = nn.Linear(cfg.hidden, cfg.n_targets * 3)
        # A direct age curve per target, so the shared trunk models content, not mostly age.
        self.age_curve = nn.Linear(age_dim, cfg.n_targets)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, batch: Batch, drop_modalities: tuple[str, ...] = ()) -> torch.Tensor:
        """(B, T, 3) quantiles in normalised label units; monotone p10 ≤ p50 ≤ p90 by construction."""
        tokens, masks = [], []
        for j, name in enumerate(self.modality_names):
            inputs = batch.modalities[name]
            present = inputs.present
            if name in drop_modalities:
                present = torch.zeros_like(present)
            if self.training and self.cfg.modality_dropout > 0:
                keep = torch.rand(present.shape, device=present.device) >= self.cfg.modality_dropout
                present = present & keep
            token = self.encoders[name](inputs) + self.presence[j]
            tokens.append(torch.where(present.unsqueeze(1), token, torch.zeros((), dtype=token.dtype,
                                                                               device=token.device)))
            masks.append(present.to(token.dtype).unsqueeze(1))
        log_age = self._clamp(batch.log_age)
        age = self.age(log_age)
        fused = torch.cat(tokens + masks + [age.to(tokens[0].dtype if tokens else age.dtype)], dim=1)
        h = self.trunk(fused)
        gamma, beta = self.film(age).chunk(2, dim=1)
        h = h * (1 + gamma) + beta
        raw = self.head(h).view(-1, self.cfg.n_targets, 3).float()
        center = raw[..., 1] + self.age_curve(age).float()
        low = center - F.softplus(raw[..., 0]) - 1e-3
        high = center + F.softplus(raw[..., 2]) + 1e-3
        if self.cfg.nowcast:
            observed = self._observed(batch)
            content = torch.cat(tokens + masks, dim=1) if tokens else h.new_zeros((len(h), 0))
            growth = self.nowcaster(observed, batch.log_age, self._clamp(observed.log_age), content, h).float()
            now = observed.counts.float() + growth[..., 1]
            use = observed.mask
            center = torch.where(use, now, center)
            low = torch.where(use, now - F.softplus(growth[..., 0]) - 1e-3, low)
            high = torch.where(use, now + F.softplus(growth[..., 2]) + 1e-3, high)
        return torch.stack([low, center, high], dim=-1)

    def _clamp(self, log_age: torch.Tensor) -> torch.Tensor:
        if self.cfg.log_age_min is not None or self.cfg.log_age_max is not None:
            return log_age.clamp(self.cfg.log_age_min, self.cfg.log_age_max)
        return log_age

    def _observed(self, batch: Batch) -> Observed:
        """The batch's observations; none known when the batch carries none (cold start for every row)."""
        if batch.observed is not None:
            return batch.observed
        n, t = len(batch.log_age), self.cfg.n_targets
        zeros = batch.log_age.new_zeros((n, t))
        return Observed(zeros, torch.zeros((n, t), dtype=torch.bool, device=zeros.device), batch.log_age.new_zeros(n))


def pinball_loss(pred: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                 row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean pinball loss over known labels only: a null label is skipped, never treated as zero.

    pred: (B, T, Q) quantiles; labels/mask: (B, T); row_weights (B,): a weighted mean instead (None: all 1).
    Returns a scalar (0 if no label is known).
    """
    q = torch.tensor(QUANTILES, dtype=pred.dtype, device=pred.device)
    diff = labels.unsqueeze(-1).to(pred.dtype) - pred
    loss = torch.maximum(q * diff, (q - 1) * diff)
    known = mask.unsqueeze(-1).to(torch.bool)
    weight = known.to(pred.dtype)
    if row_weights is not None:
        weight = weight * row_weights.to(pred.dtype)[:, None, None]
    # where() so that whatever sits in an unknown label slot cannot reach the gradient.
    loss = torch.where(known, loss * weight, torch.zeros_like(loss))
    return loss.sum() / (weight.sum() * len(QUANTILES)).clamp_min(1.0)

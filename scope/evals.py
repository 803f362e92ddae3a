"""SAE evaluations over a corpus slice: sparsity, reconstruction and what splicing costs the model.

Per SAE (names follow SAEBench's core eval where one exists):

- ``l0``: mean number of features firing per token; ``l0_p10``/``l0_p50``/``l0_p90`` its spread.
- ``fvu``: fraction of variance unexplained, sum |x - x̂|² / sum |x - mean(x)|² over tokens (the
  mean taken over the slice); ``explained_variance`` = 1 - fvu; ``cossim``: mean cosine of x̂ to x.
- ``ce_loss_without_sae`` (clean), ``ce_loss_with_sae`` (the site replaced by the SAE's
  reconstruction), ``ce_loss_with_ablation`` (the site zeroed): mean next-token cross-entropy;
  ``delta_loss`` = with_sae - clean; ``ce_loss_score`` (loss recovered) =
  (ablation - with_sae) / (ablation - clean).
- ``kl_div_with_sae``: mean KL(clean || with SAE) of the next-token distributions;
  ``kl_div_with_ablation``; ``kl_div_score`` = 1 - with_sae / with_ablation.
- ``dead`` (never fired on the slice) and ``dense`` (fired on > 10% of its tokens) features.

BOS, padding and special tokens are excluded from every figure, as Gemma Scope did: they are
never spliced or counted, and a prediction counts only when both its input and its target
token count. A transcoder's figures are of its output hook (reconstructed from its input,
skip term included), and splicing replaces that output. Splicing replaces one site at a time (the other SAEs stay off). One forward pass
per batch feeds every SAE's statistics; the spliced and ablated passes come per SAE.

``splice_all`` splices every SAE at once (the replacement model that attribution graphs
explain: each transcoder reads what the splices before it produced) and gives that loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
from jaxtyping import Bool, Float

from scope.acts import counted_mask, enable_hooks, site_input
from scope.codec import codec_of, reconstruct
from scope.corpus import CorpusSpec, ReadReport, Windows, iter_windows
from scope.errors import ScopeError
from scope.identity import sae_info, sae_keys
from scope.store.schema import EVALS

if TYPE_CHECKING:
    from sae_lens import SAE, HookedSAETransformer

    from scope.store import Store

DENSE = 0.1


@dataclass(frozen=True, kw_only=True)
class EvalRow:
    """One SAE's evaluation (see the module docstring for each metric)."""

    sae: str
    hook: str
    d_sae: int
    sha256: str
    tokens: int
    """Counted tokens the statistics are over."""
    predictions: int
    """Next-token predictions the losses and KL are over."""
    l0: float
    l0_p10: float
    l0_p50: float
    l0_p90: float
    fvu: float
    explained_variance: float
    cossim: float
    ce_loss_without_sae: float
    ce_loss_with_sae: float
    ce_loss_with_ablation: float
    delta_loss: float
    ce_loss_score: float
    kl_div_with_sae: float
    kl_div_with_ablation: float
    kl_div_score: float
    dead: int
    dense: int


class _Totals:
    """Running float64 sums for one SAE."""

    def __init__(self, d_in: int, d_sae: int, device: torch.device) -> None:
        z = torch.zeros
        self.n = 0
        self.x_sum = z(d_in, dtype=torch.float64, device=device)
        self.x_sq = z((), dtype=torch.float64, device=device)
        self.err_sq = z((), dtype=torch.float64, device=device)
        self.cos = z((), dtype=torch.float64, device=device)
        self.fired = z(d_sae, dtype=torch.int64, device=device)
        self.l0: list[torch.Tensor] = []
        self.preds = 0
        self.ce = z(2, dtype=torch.float64, device=device)  # with SAE, with ablation
        self.kl = z(2, dtype=torch.float64, device=device)


def _splice(
    replace: Float[torch.Tensor, "batch pos d_in"], where: Bool[torch.Tensor, "batch pos"]
) -> Any:
    """A hook putting ``replace`` in place of the site's activation at ``where``."""

    def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
        x = site_input(act)  # hook_z: heads flattened, a copy when act is not contiguous
        x[where] = replace[where].to(x.dtype)
        return x.reshape(act.shape)

    return hook


def _losses(
    logits: Float[torch.Tensor, "batch pos vocab"],
    clean_logp: Float[torch.Tensor, "n vocab"],
    targets: torch.Tensor,
    pred: Bool[torch.Tensor, "batch pos"],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and KL(clean || this) over the counted predictions."""
    logp = torch.log_softmax(logits[:, :-1][pred].float(), dim=-1)
    ce = -logp.gather(-1, targets[:, None]).double().sum()
    kl = (clean_logp.exp() * (clean_logp - logp)).double().sum()
    return ce, kl


@torch.no_grad()
def evaluate_batches(
    model: HookedSAETransformer, saes: Sequence[SAE], batches: Any, *, keys: list[str]
) -> list[EvalRow]:
    """Evaluate ``saes`` over ``batches`` of (tokens [batch, pos], lengths [batch])."""
    device = next(model.parameters()).device
    codecs = [codec_of(s) for s in saes]
    hooks = sorted({c.read_hook for c in codecs} | {c.write_hook for c in codecs})
    enable_hooks(model, hooks)
    totals = [_Totals(s.W_dec.shape[-1], s.cfg.d_sae, device) for s in saes]
    clean_ce = torch.zeros((), dtype=torch.float64, device=device)
    n_pred = 0
    acts: dict[str, torch.Tensor] = {}

    def grab(act: torch.Tensor, hook: Any) -> None:
        acts[hook.name] = site_input(act).clone()

    for tokens, lengths in batches:
        counted = counted_mask(model, tokens, lengths)
        pred = counted[:, :-1] & counted[:, 1:]  # input and target both count
        targets = tokens[:, 1:][pred]
        acts.clear()
        logits = model.run_with_hooks(tokens, fwd_hooks=[(h, grab) for h in hooks])
        clean_logp = torch.log_softmax(logits[:, :-1][pred].float(), dim=-1)  # [n, vocab]
        clean_ce += -clean_logp.gather(-1, targets[:, None]).double().sum()
        n_pred += int(pred.sum())
        for sae, codec, t in zip(saes, codecs, totals, strict=True):
            x = acts[codec.write_hook]  # what the SAE reconstructs: a transcoder's output
            codes, recon = reconstruct(sae, acts[codec.read_hook])
            recon = recon.to(x.dtype)
            xc, rc, cc = x[counted].double(), recon[counted].double(), codes[counted]
            t.n += xc.shape[0]
            t.x_sum += xc.sum(0)
            t.x_sq += (xc**2).sum()
            t.err_sq += ((xc - rc) ** 2).sum()
            t.cos += torch.nn.functional.cosine_similarity(xc, rc, dim=-1).sum()
            fired = cc > 0
            t.fired += fired.sum(0)
            t.l0.append(fired.sum(-1).cpu())
            t.preds += int(pred.sum())
            for i, fill in enumerate((recon, torch.zeros_like(x))):
                hook = (codec.write_hook, _splice(fill, counted))
                spliced = model.run_with_hooks(tokens, fwd_hooks=[hook])
                ce, kl = _losses(spliced, clean_logp, targets, pred)
                t.ce[i] += ce
                t.kl[i] += kl
    if n_pred == 0:
        raise ScopeError("the corpus slice has no next-token predictions to evaluate on")
    clean = float(clean_ce) / n_pred
    return [_row(k, s, t, clean) for k, s, t in zip(keys, saes, totals, strict=True)]


def _row(key: str, sae: SAE, t: _Totals, clean: float) -> EvalRow:
    info = sae_info(sae)
    mean = t.x_sum / t.n
    variance = float(t.x_sq - t.n * (mean**2).sum())
    fvu = float(t.err_sq) / variance if variance > 0 else float("nan")
    with_sae, ablated = (float(v) / t.preds for v in t.ce)
    kl_sae, kl_ablated = (float(v) / t.preds for v in t.kl)
    l0 = torch.cat(t.l0).double().numpy()
    return EvalRow(
        sae=key, hook=info.hook_name, d_sae=info.d_sae, sha256=info.sha256, tokens=t.n,
        predictions=t.preds, l0=float(l0.mean()), l0_p10=float(np.percentile(l0, 10)),
        l0_p50=float(np.percentile(l0, 50)), l0_p90=float(np.percentile(l0, 90)),
        fvu=fvu, explained_variance=1 - fvu, cossim=float(t.cos) / t.n,
        ce_loss_without_sae=clean, ce_loss_with_sae=with_sae, ce_loss_with_ablation=ablated,
        delta_loss=with_sae - clean,
        ce_loss_score=(ablated - with_sae) / (ablated - clean) if ablated != clean else float("nan"),
        kl_div_with_sae=kl_sae, kl_div_with_ablation=kl_ablated,
        kl_div_score=1 - kl_sae / kl_ablated if kl_ablated > 0 else float("nan"),
        dead=int((t.fired == 0).sum()), dense=int((t.fired > DENSE * t.n).sum()),
    )  # fmt: skip


def evaluate(
    model: HookedSAETransformer,
    saes: Sequence[SAE],
    corpus: CorpusSpec | Windows,
    *,
    batch_size: int = 8,
    store: Store | None = None,
) -> EvalReport:
    """Evaluate ``saes`` on ``corpus``: a CorpusSpec (read a block at a time) or Windows
    already built. With a ``store``, SAEs are named by the store's keys and the report is
    saved in its ``evals`` side table. Memory: a batch's next-token distributions are held in
    fp32 ([batch x ctx, vocab]; 1 GB for 8 x 128 tokens of Gemma's 256k vocabulary)."""
    if not saes:
        raise ScopeError("no SAEs given: pass --sae at least once")
    ctx = corpus.ctx if isinstance(corpus, CorpusSpec) else corpus.tokens.shape[1]
    if ctx > model.cfg.n_ctx:
        raise ScopeError(
            f"--ctx {ctx} is longer than the context of {model.cfg.model_name} "
            f"({model.cfg.n_ctx} tokens): use --ctx {model.cfg.n_ctx} or less"
        )
    from scope.fit import check_fit
    from scope.identity import sae_key

    for s in saes:
        check_fit(model, s)
    keys = sae_keys([sae_info(s) for s in saes])
    if store is not None:
        keys = [sae_key(s, store.saes) for s in saes]
    report = corpus.report if isinstance(corpus, Windows) else ReadReport()
    rows = evaluate_batches(model, saes, _batches(model, corpus, report, batch_size), keys=keys)
    paths = list(corpus.paths) if isinstance(corpus, CorpusSpec) else sorted(set(corpus.doc_names))
    result = EvalReport(rows=rows, corpus=report.text_hash.hexdigest(), corpus_paths=paths)
    if store is not None:
        result.save(store.root)
    return result


def _batches(
    model: HookedSAETransformer, corpus: CorpusSpec | Windows, report: ReadReport, batch_size: int
) -> Any:
    """(tokens [batch, pos], lengths [batch]) on the model's device, each batch trimmed to its
    longest window."""
    device = next(model.parameters()).device
    blocks = (
        [corpus] if isinstance(corpus, Windows) else iter_windows(corpus, model.tokenizer, report)
    )
    for block in blocks:
        for i in range(0, len(block), batch_size):
            lengths = block.lengths[i : i + batch_size]
            tokens = block.tokens[i : i + batch_size, : int(lengths.max())]
            yield (torch.from_numpy(tokens).to(device, torch.long),
                   torch.from_numpy(lengths).to(device))  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class SplicedTogether:
    """Next-token loss with several SAEs spliced in at once (``splice_all``)."""

    saes: int
    predictions: int
    ce_loss_without_saes: float
    ce_loss_with_saes: float
    delta_loss: float
    """with - without, in nats."""
    kl_div_with_saes: float
    """Mean KL(clean || all spliced) of the next-token distributions."""


def _replace_hooks(sae: SAE, where: Bool[torch.Tensor, "batch pos"]) -> list[tuple[str, Any]]:
    """Hooks putting ``sae``'s output in place of its write hook's activation at ``where``,
    computed from its read hook's activation in the same forward pass."""
    codec = codec_of(sae)
    seen: list[torch.Tensor] = []

    def grab(act: torch.Tensor, hook: Any) -> None:
        seen.append(site_input(act).clone())

    def put(act: torch.Tensor, hook: Any) -> torch.Tensor:
        x = seen.pop() if seen else site_input(act).clone()
        return _splice(reconstruct(sae, x)[1], where)(act, hook)

    if codec.read_hook == codec.write_hook:
        return [(codec.write_hook, put)]
    return [(codec.read_hook, grab), (codec.write_hook, put)]


@torch.no_grad()
def splice_all(
    model: HookedSAETransformer,
    saes: Sequence[SAE],
    corpus: CorpusSpec | Windows,
    *,
    batch_size: int = 8,
) -> SplicedTogether:
    """The loss with every SAE of ``saes`` spliced in at once, counted tokens only, as in
    ``evaluate``: each SAE's output (a transcoder's, skip term included) replaces its write
    hook, computed from its read hook as the spliced model gives it, so a transcoder at layer
    L reads what the transcoders before it wrote. SAEs at the same write hook are refused."""
    codecs = [codec_of(s) for s in saes]
    writes = [c.write_hook for c in codecs]
    if len(set(writes)) != len(writes):
        raise ScopeError(f"two SAEs write the same hook ({sorted(writes)}): splice one per hook")
    from scope.fit import check_fit

    for s in saes:
        check_fit(model, s)
    enable_hooks(model, sorted({c.read_hook for c in codecs} | set(writes)))
    ce = torch.zeros(2, dtype=torch.float64)  # clean, spliced
    kl = torch.zeros((), dtype=torch.float64)
    n_pred = 0
    for tokens, lengths in _batches(model, corpus, ReadReport(), batch_size):
        counted = counted_mask(model, tokens, lengths)
        pred = counted[:, :-1] & counted[:, 1:]
        targets = tokens[:, 1:][pred]
        clean_logp = torch.log_softmax(model(tokens)[:, :-1][pred].float(), dim=-1)
        hooks = [h for sae in saes for h in _replace_hooks(sae, counted)]
        spliced = model.run_with_hooks(tokens, fwd_hooks=hooks)
        c, k = _losses(spliced, clean_logp, targets, pred)
        ce += torch.stack([-clean_logp.gather(-1, targets[:, None]).double().sum().cpu(), c.cpu()])
        kl += k.cpu()
        n_pred += int(pred.sum())
    if n_pred == 0:
        raise ScopeError("the corpus slice has no next-token predictions to evaluate on")
    clean, with_saes = (float(v) / n_pred for v in ce)
    return SplicedTogether(saes=len(saes), predictions=n_pred, ce_loss_without_saes=clean,
                           ce_loss_with_saes=with_saes, delta_loss=with_saes - clean,
                           kl_div_with_saes=float(kl) / n_pred)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class EvalReport:
    """Evaluations of several SAEs on one corpus slice."""

    rows: list[EvalRow]
    corpus: str
    """The corpus slice's fingerprint (settings and texts)."""
    corpus_paths: list[str]

    def table(self) -> pa.Table:
        """A row per SAE: its ``EvalRow`` and the corpus (the ``evals`` side table's columns)."""
        return EVALS.from_rows(
            [
                {**asdict(r), "corpus": self.corpus, "corpus_paths": ", ".join(self.corpus_paths)}
                for r in self.rows
            ]  # fmt: skip
        )

    def df(self) -> Any:
        return self.table().to_pandas()

    def save(self, folder: Any) -> list[Any]:
        """Add the rows to the ``evals`` side table of ``folder`` (a store), one file per SAE
        (weights and hook) and corpus: evaluating the same SAE on the same corpus again
        replaces its row instead of adding a second one."""
        import hashlib

        from scope.store.writer import add_side_table

        table, saved = self.table(), []
        for i, row in enumerate(self.rows):
            name = hashlib.sha256(f"{row.sha256}|{row.hook}|{self.corpus}".encode()).hexdigest()
            saved.append(add_side_table(folder, EVALS.name, name[:24], table.slice(i, 1)))
        return saved

    def figure(self) -> Any:
        """Delta loss against L0, a point per SAE: the frontier users pick from."""
        import plotly.graph_objects as go

        fig = go.Figure()
        fig.add_scatter(x=[r.l0 for r in self.rows], y=[r.delta_loss for r in self.rows],
                        mode="markers+text", text=[r.sae for r in self.rows], textposition="top center")  # fmt: skip
        fig.update_layout(title="delta LM loss against L0", xaxis_title="mean L0",
                          yaxis_title="delta loss (nats)", height=480)  # fmt: skip
        return fig


__all__ = [
    "EvalReport",
    "EvalRow",
    "SplicedTogether",
    "evaluate",
    "evaluate_batches",
    "splice_all",
]

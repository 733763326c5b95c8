"""The trainer's objective: the contrastive loss plus, optionally, the three second-stage objectives.

The contrastive formulas are defined once, in the model folder's `loss_temde` (`LOSSES`, `SCORE_LOSSES`,
which the model's `forward(return_loss=True)` uses too); this module only composes them over the global
batch (`losses.contrastive_loss`) and defines the terms that exist only in training (the matching head's
cross-entropy on mined negatives, the distillation KL).

- **Alignment** (TERAN): a contrastive loss (`--alignment_loss_type`, VSE++ hinge by default) on the
  token-level alignment scores of every (image, caption) of the global batch (`alignment_temde`).
- **Matching head** (Retrieve Fast, Rerank Smart / ALBEF / BLIP): binary cross-entropy of the head's
  logit on each pair and on one hard negative caption per image and one hard negative image per
  caption, *mined by the dual encoder* over the global batch (drawn in proportion to its softmax, or
  its hardest); the head sees the joint-space tokens (`TemdeForImageTextRetrieval`).
- **Distillation** (VLDeformer): KL(teacher ‖ dual encoder) over each query's in-batch candidates, both
  directions, the teacher being the alignment score (all candidates) or the matching head (the positive
  and the dual encoder's top k-1), with no gradient into the teacher.

Exactness. Every term is a function of the gathered embeddings and tokens, so gradient caching
(`accumulation`) gives the gradients of one big batch, and two processes those of one. The terms every
process computes in full (contrastive, alignment, distillation) follow the `losses.gather_with_grad`
convention. The matching head only scores this process's own rows (positives and the negatives mined
for them, which may sit on another process): that local sum is scaled by the number of processes, so
that DDP's averaging leaves exactly the gradient of the global mean. Negatives are drawn for the whole
global batch from one generator seeded by (seed, step), identical on every process, so the draw does
not depend on how the batch is split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn import functional as F

from ..models.temde.alignment_temde import alignment_scores
from ..models.temde.loss_temde import SCORE_LOSSES, same_pair_mask
from .losses import contrastive_loss, gather_no_grad, gather_with_grad, world_size

# (image_tokens (P, Li, D), image_mask (P, Li), text_tokens (P, Lt, D), text_mask (P, Lt)) -> logits (P,)
HeadFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (image_embeds (n, E), text_embeds (n, E), logit_scale (1,), pair_ids (n,) | None) -> scalar loss
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass
class Encoded:
    """What one training forward gives for `n` pairs (row i of images pairs with row i of texts).

    Attributes:
        image_embeds: `(n, E)`.
        text_embeds: `(n, E)`.
        logit_scale: `(1,)` the exponentiated scale, read through the (wrapped) forward.
        image_tokens: `(n, L_image, D)` joint-space tokens (objectives that need them), else ``None``.
        image_mask: `(n, L_image)`.
        text_tokens: `(n, L_text, D)`.
        text_mask: `(n, L_text)`.
    """

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    logit_scale: torch.Tensor
    image_tokens: torch.Tensor | None = None
    image_mask: torch.Tensor | None = None
    text_tokens: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None


@dataclass
class PairTokens:
    """Row-paired token sets fed to the matching head: `(P, L, D)` tokens and `(P, L)` masks."""

    image_tokens: torch.Tensor
    image_mask: torch.Tensor
    text_tokens: torch.Tensor
    text_mask: torch.Tensor

    def detach(self) -> PairTokens:
        return PairTokens(
            self.image_tokens.detach(), self.image_mask, self.text_tokens.detach(), self.text_mask
        )

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """As keyword arguments of `TemdeForImageTextRetrieval.forward`."""
        return {
            "pair_image_tokens": self.image_tokens,
            "pair_image_mask": self.image_mask,
            "pair_text_tokens": self.text_tokens,
            "pair_text_mask": self.text_mask,
        }


@dataclass
class ObjectiveResult:
    """Attributes:
    loss: What this process back-propagates (see the module docstring for the scaling).
    value: The global objective's value, the same on every process (logging, NaN check).
    head_pairs: The (detached) token pairs the matching head scored with gradients, or ``None``.
    head_logits: Its logits `(P,)`, part of `loss`'s graph (their gradient trains the head).
    """

    loss: torch.Tensor
    value: torch.Tensor
    head_pairs: PairTokens | None = None
    head_logits: torch.Tensor | None = None


class ContrastiveObjective:
    """A plain contrastive `LossFn` (embeddings only) as an objective."""

    needs_tokens = False
    needs_head = False
    head_gradients = False

    def __init__(self, loss_fn: LossFn) -> None:
        self.loss_fn = loss_fn

    def __call__(self, enc: Encoded, pair_ids: torch.Tensor | None, head: HeadFn | None) -> ObjectiveResult:
        loss = self.loss_fn(enc.image_embeds, enc.text_embeds, enc.logit_scale, pair_ids)
        return ObjectiveResult(loss, loss.detach())


def as_objective(
    loss_fn: LossFn | TrainingObjective | ContrastiveObjective,
) -> TrainingObjective | ContrastiveObjective:
    """Objectives pass through; a plain contrastive loss function is wrapped."""
    if isinstance(loss_fn, TrainingObjective | ContrastiveObjective):
        return loss_fn
    return ContrastiveObjective(loss_fn)


def pad_tokens(tokens: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad `(n, L, D)` tokens (zeros) and their `(n, L)` mask (0) to `length` tokens."""
    extra = length - tokens.shape[1]
    return F.pad(tokens, (0, 0, 0, extra)), F.pad(mask, (0, extra))


def mine_hard_negatives(
    logits: torch.Tensor, positives: torch.Tensor, mode: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One negative caption per image and one negative image per caption, chosen by the dual encoder.

    Args:
        logits: `(n, n)` the dual encoder's scaled scores, image i x caption j (no gradient).
        positives: `(n, n)` True where a caption describes the image (never drawn).
        mode: ``"sample"``: drawn in proportion to the softmax of the scores (ALBEF/BLIP: hard, but a
            near-duplicate caption is not always the one); ``"hardest"``: the highest-scoring negative.
        generator: CPU generator of the draw.

    Returns:
        `(n,)` the negative caption of each image and `(n,)` the negative image of each caption.
    """
    if bool(positives.all(dim=1).any()):
        raise ValueError(
            "a batch row has no negative (every pair shows the same image): the matching head's hard "
            "negatives need at least two images per global batch"
        )
    masked = logits.detach().float().masked_fill(positives, float("-inf")).cpu()

    def pick(rows: torch.Tensor) -> torch.Tensor:
        if mode == "hardest":
            return rows.argmax(dim=1)
        return torch.multinomial(rows.softmax(dim=1), 1, generator=generator).squeeze(1)

    return pick(masked).to(logits.device), pick(masked.T).to(logits.device)


def _kl_over_support(teacher: torch.Tensor, student: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher) ‖ softmax(student)), both restricted to `keep`."""
    log_p = teacher.masked_fill(~keep, float("-inf")).log_softmax(dim=-1)
    log_q = student.masked_fill(~keep, float("-inf")).log_softmax(dim=-1)
    # outside the support p = 0 and both logs are -inf: where() keeps the NaN of 0·(-inf + inf) out
    return torch.where(keep, log_p.exp() * (log_p - log_q), 0.0).sum(dim=-1).mean()


class TrainingObjective:
    """Contrastive loss + alignment + matching head + distillation, with the weights of the settings.

    Args:
        loss_fn: The contrastive loss on *already gathered* rows (`contrastive_loss` bound to
            ``negatives="local"``).
        negatives: ``"global"``: gather every process's rows (with gradients); ``"local"``: this
            process's only.
        aggregation: The model's `alignment_aggregation`.
        seed: Seeds the negatives' draw (combine the run's seed and the step).
        alignment_weight, alignment_loss_type, margin, max_violation: The alignment term.
        itm_weight, itm_negatives, itm_detach_tokens: The matching-head term (detach: the head trains on
            top of the dual encoder, its loss does not reach the tokens).
        distill_weight, distill_teacher, distill_topk, distill_temperature: The distillation term.
    """

    def __init__(
        self, loss_fn: LossFn, *, negatives: str = "global", aggregation: str = "max_mean", seed: int = 0,
        alignment_weight: float = 0.0, alignment_loss_type: str = "vse_hinge", margin: float = 0.2,
        max_violation: bool = True, itm_weight: float = 0.0, itm_negatives: str = "sample",
        itm_detach_tokens: bool = False, distill_weight: float = 0.0, distill_teacher: str = "alignment",
        distill_topk: int = 8, distill_temperature: float = 1.0,
    ) -> None:  # fmt: skip
        self.loss_fn, self.negatives, self.aggregation, self.seed = loss_fn, negatives, aggregation, seed
        self.alignment_weight, self.alignment_loss_type = alignment_weight, alignment_loss_type
        self.margin, self.max_violation = margin, max_violation
        self.itm_weight, self.itm_negatives = itm_weight, itm_negatives
        self.itm_detach_tokens = itm_detach_tokens
        self.distill_weight, self.distill_teacher = distill_weight, distill_teacher
        self.distill_topk, self.distill_temperature = distill_topk, distill_temperature
        distill_itm = distill_weight > 0 and distill_teacher == "itm"
        self.needs_tokens = alignment_weight > 0 or itm_weight > 0 or distill_weight > 0
        self.needs_head = itm_weight > 0 or distill_itm  # the model must have a matching head
        self.head_gradients = itm_weight > 0  # the head trains: its forward must go through the model

    # -- plumbing ------------------------------------------------------------------------------------
    def _gather(self, tensor: torch.Tensor, grad: bool = True) -> torch.Tensor:
        if self.negatives != "global":
            return tensor
        return gather_with_grad(tensor) if grad else gather_no_grad(tensor)

    def _world(self) -> tuple[int, int]:
        """(number of processes whose rows the loss sees, this process's index among them)."""
        if self.negatives != "global" or world_size() == 1:
            return 1, 0
        return world_size(), dist.get_rank()

    def _global_tokens(self, enc: Encoded) -> PairTokens:
        """Every process's tokens (text padded to the longest caption of all processes)."""
        length = enc.text_tokens.shape[1]
        if self.negatives == "global" and world_size() > 1:
            length = int(gather_no_grad(torch.tensor([length], device=enc.text_tokens.device)).max())
        text_tokens, text_mask = pad_tokens(enc.text_tokens.float(), enc.text_mask, length)
        return PairTokens(
            self._gather(enc.image_tokens.float()), self._gather(enc.image_mask, grad=False),
            self._gather(text_tokens), self._gather(text_mask, grad=False),
        )  # fmt: skip

    @staticmethod
    def _select(tokens: PairTokens, images: torch.Tensor, texts: torch.Tensor) -> PairTokens:
        return PairTokens(
            tokens.image_tokens[images],
            tokens.image_mask[images],
            tokens.text_tokens[texts],
            tokens.text_mask[texts],
        )

    def _all_sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over processes of a detached local value (for the logged global objective)."""
        value = value.detach().clone()
        if self._world()[0] > 1:
            dist.all_reduce(value)
        return value

    # -- the terms -----------------------------------------------------------------------------------
    def _matching(
        self, tokens: PairTokens, logits: torch.Tensor, positives: torch.Tensor, head: HeadFn
    ) -> tuple[torch.Tensor, torch.Tensor, PairTokens, torch.Tensor]:
        """BCE of the head on this process's positives and their mined negatives: (loss, value, pairs, logits)."""
        n_global = logits.shape[0]
        processes, rank = self._world()
        n = n_global // processes
        generator = torch.Generator().manual_seed(self.seed)
        negative_text, negative_image = mine_hard_negatives(logits, positives, self.itm_negatives, generator)
        rows = torch.arange(rank * n, (rank + 1) * n, device=logits.device)
        # (3n,) pairs: each row's positive, its negative caption, its negative image
        images = torch.cat([rows, rows, negative_image[rows]])
        texts = torch.cat([rows, negative_text[rows], rows])
        pairs = self._select(tokens, images, texts)
        if self.itm_detach_tokens:
            pairs = pairs.detach()
        head_logits = head(pairs.image_tokens, pairs.image_mask, pairs.text_tokens, pairs.text_mask).float()
        if not head_logits.requires_grad:  # detached tokens and constant parameters: keep dL/dlogits anyway
            head_logits.requires_grad_()
        labels = torch.cat([torch.ones(n), torch.zeros(2 * n)]).to(head_logits.device)
        local = F.binary_cross_entropy_with_logits(head_logits, labels, reduction="sum") / (3 * n_global)
        return processes * local, self._all_sum(local), pairs.detach(), head_logits

    def _itm_teacher(
        self, tokens: PairTokens, logits: torch.Tensor, positives: torch.Tensor, head: HeadFn
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The matching head's logits on each query's positive + the dual encoder's top k-1 candidates.

        Returns:
            Per direction (image->text, text->image): the teacher logits `(n, k)` of every global query
            and its candidates `(n, k)` (column 0: the query's own pair).
        """
        processes, rank = self._world()
        n = logits.shape[0] // processes
        rows = torch.arange(rank * n, (rank + 1) * n, device=logits.device)
        # k - 1 negatives per query, never another caption of the same image
        k = min(self.distill_topk, int((~positives).sum(dim=1).min()) + 1)
        teachers, candidates = [], []
        for image_to_text, scores in ((True, logits), (False, logits.T)):  # rows are the queries
            ranked = scores.detach().masked_fill(positives, float("-inf")).topk(k - 1, dim=1).indices
            own = torch.arange(scores.shape[0], device=scores.device)[:, None]
            chosen = torch.cat([own, ranked], dim=1)  # (n_global, k)
            mine = chosen[rows].reshape(-1)  # this process scores its own queries' candidates
            queries = rows.repeat_interleave(k)
            images, texts = (queries, mine) if image_to_text else (mine, queries)
            pairs = self._select(tokens, images, texts)
            with torch.no_grad():
                out = head(pairs.image_tokens, pairs.image_mask, pairs.text_tokens, pairs.text_mask).float()
            teachers.append(self._gather(out.reshape(n, k), grad=False))
            candidates.append(chosen)
        return teachers, candidates

    def _distillation(
        self, logits: torch.Tensor, positives: torch.Tensor, align: torch.Tensor | None,
        tokens: PairTokens | None, head: HeadFn | None, scale: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """KL(teacher ‖ dual encoder), mean of the image->text and text->image directions."""
        eye = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
        if self.distill_teacher == "alignment":
            teacher = scale.detach() * align.detach() / self.distill_temperature
            keep = ~(positives & ~eye)  # the other captions of the same image are no candidates
            return (
                _kl_over_support(teacher, logits, keep) + _kl_over_support(teacher.T, logits.T, keep.T)
            ) / 2
        teachers, chosen = self._itm_teacher(tokens, logits, positives, head)
        students = (logits.gather(1, chosen[0]), logits.T.gather(1, chosen[1]))  # (n, k) each
        keep = torch.ones_like(students[0], dtype=torch.bool)
        kls = [_kl_over_support(t / self.distill_temperature, s, keep) for t, s in zip(teachers, students)]
        return (kls[0] + kls[1]) / 2

    def __call__(self, enc: Encoded, pair_ids: torch.Tensor | None, head: HeadFn | None) -> ObjectiveResult:
        """The objective on this process's rows `enc` (gathered inside).

        Args:
            enc: This process's rows (leaves of the gradient cache, or the live forward's outputs).
            pair_ids: `(n,)` image index of every pair (rows of one image are not each other's negatives).
            head: The matching head (``TemdeForImageTextRetrieval.get_matching_logits`` or a stand-in that
                keeps its parameters out of the graph); needed when `needs_head`.
        """
        if self.needs_head and head is None:
            raise ValueError(
                "--itm_weight / --distill_teacher itm need the matching head: train a TemdeForImageTextRetrieval"
            )
        images, texts = self._gather(enc.image_embeds), self._gather(enc.text_embeds)
        pair_ids = self._gather(pair_ids, grad=False) if pair_ids is not None else None
        scale = enc.logit_scale.float()
        loss = self.loss_fn(images, texts, enc.logit_scale, pair_ids)  # the rows are already global
        value = loss.detach().clone()
        result = ObjectiveResult(loss, value)
        if not self.needs_tokens:
            return result
        tokens = self._global_tokens(enc)
        positives = same_pair_mask(pair_ids, images.shape[0], images.device)
        logits = scale * images.float() @ texts.float().T  # (n, n) the dual encoder's in-batch scores
        align = None
        if self.alignment_weight > 0 or (self.distill_weight > 0 and self.distill_teacher == "alignment"):
            align = alignment_scores(
                tokens.image_tokens, tokens.image_mask, tokens.text_tokens, tokens.text_mask, self.aggregation
            )
        terms = []
        if self.alignment_weight > 0:
            term = SCORE_LOSSES[self.alignment_loss_type](
                align,
                logit_scale=scale,
                margin=self.margin,
                max_violation=self.max_violation,
                pair_ids=pair_ids,
            )
            terms.append((self.alignment_weight * term, self.alignment_weight * term.detach()))
        if self.itm_weight > 0:
            term, term_value, result.head_pairs, result.head_logits = self._matching(
                tokens, logits, positives, head
            )
            terms.append((self.itm_weight * term, self.itm_weight * term_value))
        if self.distill_weight > 0:
            term = self._distillation(logits, positives, align, tokens, head, scale)
            terms.append((self.distill_weight * term, self.distill_weight * term.detach()))
        for term, term_value in terms:
            result.loss = result.loss + term
            result.value = result.value + term_value
        return result


def build_objective(
    args: object, aggregation: str, step: int, *, max_violation: bool | None = None, negatives: str | None = None,
    contrastive: Callable[..., torch.Tensor] = contrastive_loss,
) -> TrainingObjective | ContrastiveObjective:  # fmt: skip
    """The objective of the training settings `args` (`TemdeTrainingArguments`) at optimizer step `step`.

    Without any second-stage option this is exactly the contrastive loss (the trainer's behaviour
    before these options existed).

    Args:
        args: The training settings.
        aggregation: The model's `alignment_aggregation`.
        step: The optimizer step (seeds the hard negatives' draw).
        max_violation: Overrides ``args.max_violation`` (VSE∞'s all-negatives warm-up).
        negatives: Overrides ``args.negatives`` (the start-up probe runs before any gather is possible).
        contrastive: The contrastive loss function (`losses.contrastive_loss`).
    """
    negatives = negatives or args.negatives
    max_violation = args.max_violation if max_violation is None else max_violation
    base = dict(loss_type=args.loss_type, margin=args.margin, max_violation=max_violation)
    if args.alignment_weight == 0 and args.itm_weight == 0 and args.distill_weight == 0:
        return ContrastiveObjective(lambda i, t, s, p: contrastive(i, t, s, p, negatives=negatives, **base))
    return TrainingObjective(
        lambda i, t, s, p: contrastive(i, t, s, p, negatives="local", **base),  # rows already gathered
        negatives=negatives, aggregation=aggregation, seed=args.seed * 1_000_003 + step,
        alignment_weight=args.alignment_weight, alignment_loss_type=args.alignment_loss_type,
        margin=args.margin, max_violation=max_violation, itm_weight=args.itm_weight,
        itm_negatives=args.itm_negatives, itm_detach_tokens=args.itm_detach_tokens,
        distill_weight=args.distill_weight, distill_teacher=args.distill_teacher,
        distill_topk=args.distill_topk, distill_temperature=args.distill_temperature,
    )  # fmt: skip

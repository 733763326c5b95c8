"""Which FAISS index a gallery gets: the index types, their settings, and the automatic choice.

Index types (all inner product, the retrieval rule of the fused embeddings):

| type | what FAISS stores | bytes / image (E-d) | search |
|---|---|---|---|
| ``flat`` | float32 vectors | 4·E | exact scan |
| ``fp16`` / ``sq8`` | scalar-quantised codes | 2·E / E | full scan of the codes, near-exact |
| ``hnsw`` | float32 vectors + graph links | 4·E + 8·M | graph walk |
| ``ivfpq`` | (OPQ rotation) + IVF lists of PQ codes | ``pq_m`` + 8 | probe ``nprobe`` lists |
| ``global`` | IVF lists of fp16 codes of the *global part* only | 2·D + 8 | probe, over the first D dims |

``ivfpq`` and ``global`` can re-rank a shortlist of ``k_factor · k`` candidates exactly: the full fused
vectors are kept as fp16 codes in a second file that is memory-mapped, not loaded, so only the
shortlist's rows are read per query. ``global`` uses the model's structure: a T-EMDE ``concat``
embedding is ``[ê ; √(λ/N)·vec(Ŝ)]``, so its first ``projection_dim`` values are the unit-norm global
vector, a compact first pass whose shortlist the exact fused score then re-orders.

The automatic choice (`choose_spec`) follows the reasoning autofaiss uses: exact or scalar-quantised
scans while the codes fit the memory budget and one scan stays fast; beyond that ``global`` for a
``concat`` checkpoint (the structure-aware first pass), else IVF with PQ codes sized to the budget,
both re-ranked from the fp16 store (settings from the measured sweep in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

INDEX_TYPES = ("flat", "fp16", "sq8", "hnsw", "ivfpq", "global")
RERANK_TYPES = ("ivfpq", "global")
# One exhaustive scan reads every code; this machine streams ≈ 13 GB/s from RAM (100k × 2304 float32
# = 0.92 GB in 71 ms, 1M × 256 fp16 = 0.51 GB in 37 ms), so 256 MB of codes is ≈ 20 ms per query.
MAX_SCAN_BYTES = 256 * 2**20
DEFAULT_MEMORY_BUDGET = 2**30  # 1 GiB of index memory
ID_BYTES = 8  # an IVF list stores a 64-bit id beside every code
# Re-ranked shortlist = 30·k: at 1M the first pass (the global part, or PQ codes) orders the many
# near-duplicates poorly (recall@10 0.94 with 10·k); 30·k re-scored exactly gave 0.99 / 0.987 at
# 2.3 / 10 ms (benchmarks/RESULTS.md).
RERANK_K_FACTOR = 30


# Numeric index settings and their least valid values; FAISS is never handed anything below (with
# nlist 0 its IVF factory crashes the process with a segmentation fault instead of raising).
MINIMUM_SETTINGS = {
    "nlist": 1,
    "nprobe": 1,
    "pq_m": 1,
    "hnsw_m": 2,
    "ef_search": 1,
    "k_factor": 0,
    "global_dim": 1,
}
_FLAGS = {"pq_m": "--pq-m", "k_factor": "--k-factor", "hnsw_m": "hnsw_m", "ef_search": "ef_search"}


def check_index_settings(settings: dict[str, Any]) -> None:
    """Refuse a numeric index setting FAISS cannot take (None means "the automatic value").

    Raises:
        ValueError: One line naming the flag, its value and the fix.
    """
    for name, least in MINIMUM_SETTINGS.items():
        value = settings.get(name)
        if value is None:
            continue
        flag = _FLAGS.get(name, f"--{name}")
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(
                f"{flag} {value!r}: must be a whole number >= {least}; leave it out for the automatic value"
            )


@dataclass
class IndexSpec:
    """One index configuration; serialised into the index folder's ``gallery.json``.

    Attributes:
        kind: One of `INDEX_TYPES`.
        nlist: IVF lists (``ivfpq``, ``global``).
        nprobe: Lists probed per query.
        pq_m: PQ sub-quantisers = bytes per code (``ivfpq``; must divide the embedding width).
        opq: Learn an OPQ rotation before PQ (``ivfpq``).
        hnsw_m: Graph degree (``hnsw``); ``ef_search``: its search breadth.
        k_factor: Re-rank ``k_factor · k`` candidates with the exact fused score (0 = no re-ranking).
        global_dim: Width of the global part searched first (``global``).
        reason: Why this spec was chosen (the automatic choice fills it in).
    """

    kind: str = "flat"
    nlist: int | None = None
    nprobe: int | None = None
    pq_m: int | None = None
    opq: bool = False
    hnsw_m: int = 32
    ef_search: int = 128
    k_factor: int = 0
    global_dim: int | None = None
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in INDEX_TYPES:
            raise ValueError(f"index type {self.kind!r} unknown; choose one of {('auto', *INDEX_TYPES)}")
        check_index_settings(self.to_dict())
        if self.kind not in RERANK_TYPES and (self.nlist is not None or self.nprobe is not None):
            raise ValueError(
                f"--nlist / --nprobe apply to IVF indexes (--index-type ivfpq or global), not {self.kind!r}"
                f"{' (the automatic choice: ' + self.reason + ')' if self.reason != 'asked for' else ''}; "
                "drop them, or pass --index-type ivfpq / global"
            )
        if self.pq_m is not None and self.kind != "ivfpq":
            raise ValueError(f"--pq-m applies to --index-type ivfpq, not {self.kind!r}; drop it")
        if self.k_factor and self.kind not in RERANK_TYPES:
            raise ValueError(f"k_factor (exact re-ranking) applies to {RERANK_TYPES}, not {self.kind!r}")

    @property
    def reranks(self) -> bool:
        return self.k_factor > 0

    def base_dim(self, dim: int) -> int:
        """Width of the vectors the FAISS index itself holds."""
        return self.global_dim if self.kind == "global" else dim

    def factory(self, dim: int) -> str:
        """The FAISS ``index_factory`` string for `dim`-d vectors."""
        if self.kind == "flat":
            return "Flat"
        if self.kind == "fp16":
            return "SQfp16"
        if self.kind == "sq8":
            return "SQ8"
        if self.kind == "hnsw":
            return f"HNSW{self.hnsw_m}"
        if self.kind == "global":
            return f"IVF{self.nlist},SQfp16"
        if dim % self.pq_m:
            divisors = [m for m in range(1, dim + 1) if dim % m == 0]
            raise ValueError(
                f"--pq-m {self.pq_m}: must divide the embedding width {dim}; pass one of {divisors[-8:]} or "
                "leave it out for the automatic value"
            )
        rotation = f"OPQ{self.pq_m}_{dim}," if self.opq else ""
        # "np": no polysemous training (a Hamming pre-filter this search never uses; slow to train)
        return f"{rotation}IVF{self.nlist},PQ{self.pq_m}np"

    def memory_bytes(self, n: int, dim: int) -> int:
        """Estimated RAM of the index for `n` vectors (codes, ids, centroids; not the re-rank store)."""
        if self.kind == "flat":
            return n * dim * 4
        if self.kind == "fp16":
            return n * dim * 2
        if self.kind == "sq8":
            return n * dim
        if self.kind == "hnsw":
            return n * (dim * 4 + self.hnsw_m * 2 * 4)
        if self.kind == "global":
            return n * (self.global_dim * 2 + ID_BYTES) + self.nlist * self.global_dim * 4
        return n * (self.pq_m + ID_BYTES) + self.nlist * dim * 4 + (dim * dim * 4 if self.opq else 0)

    def train_size(self, n: int) -> int:
        """Vectors used to train the quantisers (k-means wants ≈ 39+ per centroid)."""
        if self.kind in ("flat", "fp16", "hnsw"):
            return 0
        if self.kind == "sq8":
            return min(n, 65_536)
        wanted = 64 * (self.nlist or 1)
        if self.kind == "ivfpq":
            wanted = max(wanted, 256 * 64)  # the PQ codebooks: 256 centroids per sub-quantiser
        return min(n, max(wanted, 16_384), 131_072)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexSpec:
        return cls(**data)


def default_nlist(n: int) -> int:
    """IVF lists for `n` vectors: ≈ √n (a power of two), at least 39 training vectors per list.

    autofaiss and the FAISS guidelines take 4–16·√n lists; √n keeps k-means training on 2 CPU cores
    to minutes at 2,304-d, and each probed list then holds ≈ √n codes.
    """
    nlist = 2 ** round(math.log2(max(1.0, math.sqrt(n))))
    return int(max(1, min(nlist, n // 39, 65_536)))


def default_nprobe(nlist: int) -> int:
    """Lists probed per query: 1/32 of them, at least 32 (all of them for small galleries).

    Measured on the demo checkpoint's embeddings (benchmarks/RESULTS.md): 32 of 256 lists at 100k and
    32 of 1,024 at 1M give recall@10 >= 0.98 with re-ranking, at 2-6 ms per query.
    """
    return min(nlist, max(32, nlist // 32))


def pq_bytes_for_budget(n: int, dim: int, nlist: int, budget: int) -> int | None:
    """The largest PQ code size (a divisor of `dim`, ≤ dim/2) whose index fits `budget`, or None."""
    per_vector = (budget - nlist * dim * 4) / max(n, 1) - ID_BYTES
    divisors = [m for m in range(1, dim // 2 + 1) if dim % m == 0 and m <= per_vector]
    return max(divisors) if divisors else None


def choose_spec(
    n: int,
    dim: int,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    global_dim: int | None = None,
    max_scan_bytes: int = MAX_SCAN_BYTES,
) -> IndexSpec:
    """The automatic index choice for `n` vectors of width `dim` within `memory_budget` bytes.

    Args:
        global_dim: Width of the model's global part when the embedding is a ``concat`` fusion (the
            ``global`` type is then possible); None otherwise.
    """
    limit = min(memory_budget, max_scan_bytes)
    for kind, per_dim in (("flat", 4), ("fp16", 2), ("sq8", 1)):
        if n * dim * per_dim <= limit:
            return IndexSpec(
                kind,
                reason=f"{n} x {dim} codes at {per_dim} B fit the {memory_budget / 2**20:.0f} MiB budget "
                f"and one scan reads <= {max_scan_bytes / 2**20:.0f} MiB",
            )
    nlist = default_nlist(n)
    nprobe = default_nprobe(nlist)
    if global_dim:
        spec = IndexSpec(
            "global", nlist=nlist, nprobe=nprobe, k_factor=RERANK_K_FACTOR, global_dim=global_dim
        )
        if spec.memory_bytes(n, dim) <= memory_budget:
            spec.reason = (
                f"{n} x {dim} too large to scan; the {global_dim}-d global part as IVF{nlist} fp16 codes "
                f"fits {memory_budget / 2**20:.0f} MiB, its shortlist re-ranked by the exact fused score"
            )
            return spec
    pq_m = pq_bytes_for_budget(n, dim, nlist, memory_budget)
    if pq_m is None:
        raise ValueError(
            f"no index of {n} x {dim} vectors fits a {memory_budget / 2**20:.0f} MiB budget; raise "
            "--memory-budget"
        )
    return IndexSpec(
        "ivfpq",
        nlist=nlist,
        nprobe=nprobe,
        pq_m=pq_m,
        k_factor=RERANK_K_FACTOR,
        reason=f"{n} x {dim} too large to scan; IVF{nlist} with {pq_m}-byte PQ codes fits "
        f"{memory_budget / 2**20:.0f} MiB, re-ranked by the exact fused score",
    )


def parse_spec(
    index_type: str,
    n: int,
    dim: int,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    global_dim: int | None = None,
    **overrides: Any,
) -> IndexSpec:
    """An `IndexSpec` from a type name (``"auto"`` or one of `INDEX_TYPES`) and explicit settings.

    Settings left as None get the same defaults the automatic choice would use.
    """
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if index_type == "auto":
        spec = choose_spec(n, dim, memory_budget=memory_budget, global_dim=global_dim)
        return IndexSpec.from_dict({**spec.to_dict(), **overrides})
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index type {index_type!r} unknown; choose one of {('auto', *INDEX_TYPES)}")
    settings: dict[str, Any] = {"kind": index_type, "reason": "asked for"}
    if index_type in ("ivfpq", "global"):
        nlist = default_nlist(n)
        settings.update(nlist=nlist, nprobe=default_nprobe(nlist), k_factor=RERANK_K_FACTOR)
    if index_type == "ivfpq":
        settings["pq_m"] = pq_bytes_for_budget(n, dim, settings["nlist"], memory_budget) or min(
            m for m in range(1, dim + 1) if dim % m == 0 and m >= 8
        )
    if index_type == "global":
        if not global_dim:
            raise ValueError(
                "--index-type global needs a concat-fusion checkpoint (its first projection_dim values are "
                "the global part)"
            )
        settings.update(global_dim=global_dim, k_factor=RERANK_K_FACTOR)
    settings.update(overrides)
    return IndexSpec(**settings)

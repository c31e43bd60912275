"""A request in flight (Sequence) and how it samples (SamplingParams)."""

from __future__ import annotations

import enum
import itertools
import math
from dataclasses import dataclass, field

from fieldprint.canon import is_int
from fieldprint.errors import EngineError


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token. temperature 0 is greedy; seed makes sampling reproducible."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        checks = [
            (isinstance(self.temperature, (int, float)) and not isinstance(self.temperature, bool)
             and math.isfinite(self.temperature) and self.temperature >= 0, "temperature must be a finite number >= 0"),
            (isinstance(self.top_p, (int, float)) and not isinstance(self.top_p, bool) and 0 < self.top_p <= 1,
             "top_p must lie in (0, 1]"),
            (is_int(self.top_k) and self.top_k >= 0, "top_k must be an integer >= 0 (0: no limit)"),
            (is_int(self.max_tokens) and 1 <= self.max_tokens <= 1 << 20, "max_tokens must be an integer in [1, 2**20]"),
            (isinstance(self.stop, (tuple, list)) and all(isinstance(s, str) and s for s in self.stop),
             "stop must be a list of non-empty strings"),
            (self.seed is None or (is_int(self.seed) and 0 <= self.seed < 2**63), "seed must be None or an integer in [0, 2**63)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise EngineError(f"bad sampling parameters: {msg}; got {self!r}")
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        """The JSON form receipts and generation entries record (floats as exact decimal strings)."""
        return {"temperature": repr(float(self.temperature)), "top_p": repr(float(self.top_p)), "top_k": self.top_k,
                "max_tokens": self.max_tokens, "stop": list(self.stop), "seed": self.seed, "ignore_eos": self.ignore_eos}


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(slots=True, eq=False)
class Sequence:
    """One generation: its tokens (prompt then output), cache blocks, anchor set and progress."""

    prompt_ids: list[int]
    params: SamplingParams
    anchor_key: str | None = None  # the compiled anchor set it reads (pinned while it runs)
    anchor_len: int = 0  # its tokens start at this position
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the cache
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop", "length", or "error"
    error: str | None = None
    sample_seed: int | None = None  # its draws' seed: params.seed, or one drawn at its first sampled token
    preemptions: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_at(self, i: int) -> int:
        """Token i of prompt + output, without building the joined list (the decode step's hot path)."""
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

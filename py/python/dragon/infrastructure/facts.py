"""DragonHPC's ``dragon.infrastructure.facts``: constants of the runtime that user code
imports, above all ``PMIBackend`` for ``ProcessGroup(pmi=...)``."""

from __future__ import annotations

import enum

# The id ranges DragonHPC reserves for user code (channels a user makes with a c_uid of its
# own choosing, e.g. ``BASE_USER_MANAGED_CUID + i`` in its ring example). Our channels do not
# need unique c_uids (a channel is found by its serialized descriptor), so these are only
# the numbers user code computes with.
BASE_USER_MANAGED_CUID = 2**54
RANGE_USER_MANAGED_CUID = 2**54
FIRST_CUID = 2**63
FIRST_PUID = 2**32
FIRST_DEFAULT_MUID = 2**62


class PMIBackend(enum.Enum):
    """What a ``ProcessGroup`` of MPI ranks asks for. Either way every rank gets the
    runtime's PMI-1 "simple" service (what MPICH, Cray PMI-1 and Intel MPI clients speak):
    a rank without PMI settings would hang, so the library picks what it speaks."""

    CRAY = "cray"
    PMIX = "pmix"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def from_str(cls, s: str) -> PMIBackend:
        """The backend named ``s`` (``"cray"``, ``"pmix"``, any case)."""
        try:
            return cls(str(s).lower())
        except ValueError:
            raise ValueError(f"unknown PMI backend {s!r} (cray or pmix)") from None


def default_pool_muid_from_index(index: int) -> int:
    """The m_uid by which DragonHPC code names node ``index``'s default pool (the runtime's
    node pool): ``FIRST_DEFAULT_MUID + index``."""
    if index < 0:
        raise ValueError("a node index is >= 0")
    return FIRST_DEFAULT_MUID + index


def infrastructure_pool_muid_from_index(index: int) -> int:
    """The m_uid DragonHPC gives node ``index``'s infrastructure pool (``index``). This
    runtime has no separate infrastructure pool; the number is kept for code that computes it."""
    if index < 0:
        raise ValueError("a node index is >= 0")
    return index

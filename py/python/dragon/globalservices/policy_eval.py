"""DragonHPC's ``dragon.globalservices.policy_eval``: where its examples import ``Policy``."""

from dragon.infrastructure.policy import Policy

__all__ = ["Policy"]

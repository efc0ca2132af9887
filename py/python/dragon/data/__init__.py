"""Dragon data layer: the distributed dictionary (``dragon.data.ddict``)."""


def __getattr__(name):
    if name == "DDict":
        from dragon.data.ddict import DDict

        return DDict
    raise AttributeError(f"module 'dragon.data' has no attribute {name!r}")

"""Dragon data layer: the distributed dictionary (``dragon.data.ddict``)."""

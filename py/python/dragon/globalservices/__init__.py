"""DragonHPC's global-services client API (``dragon.globalservices.process``, ``.group``,
``.node``, ``.channel``, ``.pool``, ``.policy_eval``): functions that ask the runtime to make,
find, join and end its objects, each returning a descriptor. Here they are answered by the
runtime's node agents and name registry through the same paths as ``dragon.native``."""

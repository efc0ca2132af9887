"""DragonHPC's native API (``dragon.native.*``). Modules land as the runtime grows."""

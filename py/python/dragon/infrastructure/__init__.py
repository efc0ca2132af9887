"""Infrastructure pieces shared by the native API and the runtime (DragonHPC's layout)."""

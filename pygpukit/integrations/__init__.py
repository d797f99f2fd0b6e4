"""Optional integrations (each imported on its own): ``pygpukit.integrations.fastapi``."""
